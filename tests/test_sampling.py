"""Samplers against diffusers' schedulers, guidance, and per-sample seeding."""

import pytest
import torch

from pipeline.conditioning import Conditioning
from pipeline.diffusion import NoiseSchedule, ScheduleConfig
from pipeline.models.unet import UNet, unet_config
from pipeline.sampling import (
    SAMPLERS,
    guided,
    randn_per_sample,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
)

F64 = torch.float64
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def toy_model(schedule: NoiseSchedule):
    """A deterministic model whose x0 prediction is a bounded nonlinear function of (x, t).

    Bounded x0 keeps the samples O(1), so float32 rounding inside diffusers stays far below the
    tolerance; the output is the eps or v that this x0 implies, per the schedule.
    """

    def model_fn(x, t):
        x0 = torch.tanh(x) * (1 + 0.5 * torch.sin(t.to(x.dtype) / 100)).view(-1, 1, 1, 1)
        alpha_bar = schedule.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        if schedule.prediction_type == "epsilon":
            return eps
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0

    return model_fn


def float64_oracle(scheduler, schedule: NoiseSchedule):
    """Give a diffusers scheduler our float64 alphas_cumprod, so both sides compute in float64."""
    scheduler.betas = schedule.betas.clone()
    scheduler.alphas = schedule.alphas.clone()
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.one = torch.tensor(1.0, dtype=F64)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    return scheduler


def run_oracle(scheduler, model_fn, x, **step_kwargs):
    """Drive a diffusers scheduler; returns the sample after every step."""
    trajectory = []
    for t in scheduler.timesteps:
        t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long)
        x = scheduler.step(model_fn(x, t_batch), t, x, **step_kwargs).prev_sample
        trajectory.append(x)
    return trajectory


def run_ours(sampler, model_fn, x, schedule, **kwargs):
    trajectory, timesteps = [], []

    def record(step, timestep, x_next, x0):
        trajectory.append(x_next)
        timesteps.append(timestep)

    final = sampler(model_fn, x, schedule, callback=record, **kwargs)
    assert torch.equal(final, trajectory[-1])
    return trajectory, timesteps


def assert_same_trajectory(ours, theirs, atol):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        diff = (a - b).abs().max().item()
        assert diff <= atol, f"step {step}: max abs diff {diff}"


def initial_noise(batch=2):
    return torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)


@pytest.mark.parametrize(
    "prediction_type,num_steps,variance",
    [
        ("epsilon", 10, "beta_tilde"),
        ("epsilon", 13, "beta"),
        ("v", 20, "beta_tilde"),
        ("epsilon", 1000, "beta_tilde"),
    ],
)
def test_ddpm_matches_diffusers_step_for_step(prediction_type, num_steps, variance):
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    oracle = float64_oracle(
        DDPMScheduler(
            clip_sample=False,
            prediction_type=DIFFUSERS_PREDICTION[prediction_type],
            variance_type="fixed_small" if variance == "beta_tilde" else "fixed_large",
        ),
        schedule,
    )
    oracle.set_timesteps(num_steps)
    model_fn = toy_model(schedule)
    x = initial_noise()
    theirs = run_oracle(oracle, model_fn, x, generator=torch.Generator().manual_seed(1))
    ours, timesteps = run_ours(
        sample_ddpm, model_fn, x, schedule, num_steps=num_steps, variance=variance,
        generator=torch.Generator().manual_seed(1),
    )
    assert timesteps == oracle.timesteps.tolist()
    assert_same_trajectory(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_matches_diffusers_step_for_step(prediction_type, eta):
    from diffusers import DDIMScheduler

    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    oracle = float64_oracle(
        DDIMScheduler(clip_sample=False, prediction_type=DIFFUSERS_PREDICTION[prediction_type]), schedule
    )
    oracle.set_timesteps(15)
    model_fn = toy_model(schedule)
    x = initial_noise()
    theirs = run_oracle(oracle, model_fn, x, eta=eta, generator=torch.Generator().manual_seed(1))
    ours, timesteps = run_ours(
        sample_ddim, model_fn, x, schedule, num_steps=15, eta=eta, generator=torch.Generator().manual_seed(1)
    )
    assert timesteps == oracle.timesteps.tolist()
    assert_same_trajectory(ours, theirs, atol=1e-5)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize(
    "prediction_type,num_steps", [("epsilon", 1), ("epsilon", 2), ("epsilon", 10), ("epsilon", 20), ("v", 15)]
)
def test_dpmpp_2m_matches_diffusers_step_for_step(prediction_type, num_steps):
    from diffusers import DPMSolverMultistepScheduler

    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    # diffusers casts the sample to float32 inside step(); 1e-5 still holds.
    oracle = float64_oracle(
        DPMSolverMultistepScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction_type]), schedule
    )
    oracle.set_timesteps(num_steps)
    # set_timesteps rounds its sigmas to float32; at t = 999 (sigma ~ 157) x0 = (x - sigma_t eps) / alpha_t
    # cancels enough digits to amplify that to ~1e-5. The exact values at the same timesteps:
    alpha_bar = schedule.alphas_cumprod[oracle.timesteps]
    oracle.sigmas = torch.cat([((1 - alpha_bar) / alpha_bar).sqrt(), torch.zeros(1, dtype=F64)])
    model_fn = toy_model(schedule)
    x = initial_noise()
    theirs = run_oracle(oracle, model_fn, x)
    ours, timesteps = run_ours(sample_dpmpp_2m, model_fn, x, schedule, num_steps=num_steps)
    assert timesteps == oracle.timesteps.tolist()
    assert_same_trajectory(ours, theirs, atol=1e-5)


def test_ddim_with_all_steps_and_eta_one_is_ddpm():
    """DDIM at eta = 1 over the full chain is the seed's ancestral sampler (Song et al. 2021)."""
    schedule = NoiseSchedule(ScheduleConfig(num_train_timesteps=50))
    model_fn = toy_model(schedule)
    x = initial_noise()
    # DDIM also draws at its last step (scaled by 0), after the streams' common prefix: no effect.
    ddpm = sample_ddpm(model_fn, x, schedule, generator=torch.Generator().manual_seed(3))
    ddim = sample_ddim(model_fn, x, schedule, num_steps=50, eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-10)


def test_randn_per_sample_draws_row_i_from_generator_i():
    generators = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    noise = randn_per_sample((3, 2, 4, 4), generators, "cpu", F64)
    for row, seed in enumerate((5, 6, 7)):
        alone = torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=F64)
        assert torch.equal(noise[row : row + 1], alone)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn_per_sample((3, 4), generators[:2], "cpu", F64)


@pytest.mark.parametrize("name,kwargs", [("ddpm", {"num_steps": 6}), ("ddim", {"num_steps": 6, "eta": 0.8})])
def test_per_sample_generators_make_a_sample_independent_of_its_batch(name, kwargs):
    schedule = NoiseSchedule(ScheduleConfig())
    model_fn = toy_model(schedule)
    x = initial_noise(batch=3)
    seeds = (10, 11, 12)
    batch = sample(name, model_fn, x, schedule, generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)
    for i, seed in enumerate(seeds):
        alone = sample(name, model_fn, x[i : i + 1], schedule, generator=[torch.Generator().manual_seed(seed)], **kwargs)
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=0, atol=1e-12)


def test_sample_dispatches_by_name_and_rejects_unknown_names():
    schedule = NoiseSchedule(ScheduleConfig())
    model_fn = toy_model(schedule)
    x = initial_noise()
    assert torch.equal(sample("ddim", model_fn, x, schedule, num_steps=4), sample_ddim(model_fn, x, schedule, num_steps=4))
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp_2m"}
    with pytest.raises(ValueError, match=r"'euler'.*\['ddim', 'ddpm', 'dpmpp_2m'\]"):
        sample("euler", model_fn, x, schedule)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_bad_step_counts_are_rejected(name):
    schedule = NoiseSchedule(ScheduleConfig(num_train_timesteps=100))
    with pytest.raises(ValueError, match="num_steps"):
        sample(name, toy_model(schedule), initial_noise(), schedule, num_steps=101)


# --- classifier-free guidance ------------------------------------------------------------------


def small_unet_fn():
    """A small UNet with random (not zero-initialised) weights, in float64, as unet_fn."""
    cfg = unet_config(
        "tiny", base_channels=16, channel_mult=[1, 2], attention_levels=[1], num_heads=2, norm_groups=4,
        context_dim=8, pooled_dim=6,
    )
    torch.manual_seed(0)
    model = UNet(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def text_batch(batch, length=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, 3:] = False
    return Conditioning(
        torch.randn(batch, length, 8, generator=gen, dtype=F64), mask, torch.randn(batch, 6, generator=gen, dtype=F64)
    )


class CountingUNet:
    def __init__(self, unet):
        self.unet, self.batch_sizes = unet, []

    def __call__(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        return self.unet(x, t, cond)


def test_guidance_scale_one_is_exactly_the_conditional_model():
    unet = CountingUNet(small_unet_fn())
    cond, null = text_batch(3), text_batch(1, seed=9)
    x = torch.randn(3, 4, 8, 8, dtype=F64)
    t = torch.tensor([5, 500, 999])
    for scale in (1.0, torch.ones(3)):
        out = guided(unet, cond, null, scale)(x, t)
        assert torch.equal(out, unet.unet(x, t, cond))
    assert unet.batch_sizes == [3, 3]


def test_guidance_is_one_batched_forward_combining_cond_and_uncond():
    unet = CountingUNet(small_unet_fn())
    cond, null = text_batch(3), text_batch(1, seed=9)
    x = torch.randn(3, 4, 8, 8, dtype=F64)
    t = torch.tensor([5, 500, 999])
    out = guided(unet, cond, null, 4.0)(x, t)
    assert unet.batch_sizes == [6]
    conditional = unet.unet(x, t, cond)
    unconditional = unet.unet(x, t, null.expand(3))
    torch.testing.assert_close(out, unconditional + 4.0 * (conditional - unconditional), rtol=0, atol=1e-10)


def test_mixed_guidance_scales_equal_each_sample_alone():
    unet = small_unet_fn()
    cond, null = text_batch(3), text_batch(1, seed=9)
    scales = torch.tensor([1.0, 2.5, 7.0])
    schedule = NoiseSchedule(ScheduleConfig())
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    seeds = (20, 21, 22)
    batch = sample_ddim(
        guided(unet, cond, null, scales), x, schedule, num_steps=3, eta=0.5,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )
    for i in range(3):
        alone = sample_ddim(
            guided(unet, cond.index(slice(i, i + 1)), null, float(scales[i])), x[i : i + 1], schedule,
            num_steps=3, eta=0.5, generator=[torch.Generator().manual_seed(seeds[i])],
        )
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=0, atol=1e-9)


def test_guidance_scale_shape_must_match_the_batch():
    with pytest.raises(ValueError, match="guidance_scale"):
        guided(small_unet_fn(), text_batch(3), text_batch(1), torch.tensor([1.0, 2.0]))
