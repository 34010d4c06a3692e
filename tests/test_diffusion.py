"""The diffusion math: forward marginals, the posterior, targets, the loss and the schedule's config."""

import json
import math

import pytest
import torch

from pipeline.conditioning import Conditioning
from pipeline.diffusion import (
    SCHEDULE_PRESETS,
    NoiseSchedule,
    ScheduleConfig,
    training_loss,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _t(*values):
    return torch.tensor(values, dtype=torch.long)


@pytest.mark.parametrize("preset", ["ddpm", "cosine"])
def test_forward_chain_marginals_match_closed_form(preset):
    """Running the seed's Markov chain q(z_n | z_{n-1}) step by step gives the closed-form q(z_n | x0)."""
    schedule = NoiseSchedule(SCHEDULE_PRESETS[preset])
    gen = torch.Generator().manual_seed(0)
    samples = 20_000
    x0 = torch.full((samples, 1), 0.7, dtype=F64)
    checkpoints = {0, 9, 99, 499, 999}
    z = x0
    for t in range(schedule.num_train_timesteps):
        beta = schedule.betas[t]
        z = (1 - beta).sqrt() * z + beta.sqrt() * torch.randn(z.shape, generator=gen, dtype=F64)
        if t in checkpoints:
            alpha_bar = schedule.alphas_cumprod[t].item()
            direct = schedule.q_sample(x0, torch.full((samples,), t), torch.randn(z.shape, generator=gen, dtype=F64))
            for name, draws in (("chain", z), ("q_sample", direct)):
                # 6 standard errors of the estimators: a fixed seed, far from flaky.
                mean_tol = 6 * math.sqrt((1 - alpha_bar) / samples)
                var_tol = 6 * (1 - alpha_bar) * math.sqrt(2 / samples)
                assert abs(draws.mean().item() - math.sqrt(alpha_bar) * 0.7) < mean_tol, (name, t)
                assert abs(draws.var().item() - (1 - alpha_bar)) < var_tol, (name, t)


@pytest.mark.parametrize("preset", ["ddpm", "ldm", "cosine"])
@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_posterior_matches_bayes_rule(preset, t):
    """mu~ and beta~ equal the moments of q(z_{t-1} | x0) q(z_t | z_{t-1}), normalised on a 1-D grid."""
    schedule = NoiseSchedule(SCHEDULE_PRESETS[preset])
    x0, z_t = 0.8, -0.3
    alpha_bar_prev = schedule.alphas_cumprod[t - 1].item()
    beta = schedule.betas[t].item()
    prior_mean, prior_var = math.sqrt(alpha_bar_prev) * x0, 1 - alpha_bar_prev
    # As a function of z_{t-1}, q(z_t | z_{t-1}) peaks at z_t / sqrt(1 - beta) with width sqrt(beta / (1 - beta)).
    like_mean, like_var = z_t / math.sqrt(1 - beta), beta / (1 - beta)
    width = max(math.sqrt(prior_var), math.sqrt(like_var))
    grid = torch.linspace(
        min(prior_mean, like_mean) - 12 * width, max(prior_mean, like_mean) + 12 * width, 400_001, dtype=F64
    )
    log_density = -0.5 * (grid - prior_mean) ** 2 / prior_var - 0.5 * (z_t - math.sqrt(1 - beta) * grid) ** 2 / beta
    density = (log_density - log_density.max()).exp()
    density = density / torch.trapezoid(density, grid)
    bayes_mean = torch.trapezoid(grid * density, grid).item()
    bayes_var = torch.trapezoid((grid - bayes_mean) ** 2 * density, grid).item()

    mean, var = schedule.posterior(torch.tensor([[x0]], dtype=F64), torch.tensor([[z_t]], dtype=F64), _t(t))
    assert mean.item() == pytest.approx(bayes_mean, rel=1e-6, abs=1e-9)
    assert var.item() == pytest.approx(bayes_var, rel=1e-6)


def test_posterior_at_first_step_is_the_data():
    schedule = NoiseSchedule(ScheduleConfig())
    x0 = torch.randn(3, 2, 4, 4, dtype=F64)
    mean, var = schedule.posterior(x0, torch.randn_like(x0), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mean, x0, rtol=0, atol=1e-12)
    assert var.abs().max().item() < 1e-15


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_model_output_conversion_inverts_the_training_target(prediction_type):
    """A perfect model (output = training target) gives back exactly the noise and the data."""
    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 8, 8, generator=gen, dtype=F64)
    noise = torch.randn(5, 4, 8, 8, generator=gen, dtype=F64)
    t = _t(0, 1, 250, 700, 999)
    z_t = schedule.q_sample(x0, t, noise)
    eps, x0_hat = schedule.eps_and_x0(schedule.training_target(x0, noise, t), z_t, t)
    torch.testing.assert_close(eps, noise, rtol=0, atol=1e-10)
    # x0 from eps divides by sqrt(abar), ~0.006 at t = 999: allow that amplification of rounding.
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)


def test_coefficients_follow_the_input_dtype():
    schedule = NoiseSchedule(ScheduleConfig())
    x0 = torch.randn(2, 4, 4, 4)
    z = schedule.q_sample(x0, _t(3, 900), torch.randn_like(x0))
    assert z.dtype == torch.float32
    mean, var = schedule.posterior(x0, z, _t(3, 900))
    assert mean.dtype == var.dtype == torch.float32


@pytest.mark.parametrize(
    "config",
    [*SCHEDULE_PRESETS.values(), ScheduleConfig(prediction_type="v", min_snr_gamma=5.0, num_train_timesteps=500)],
)
def test_schedule_json_round_trip(config):
    schedule = NoiseSchedule(config)
    restored = NoiseSchedule.from_dict(json.loads(json.dumps(schedule.to_dict())))
    assert restored.config == config
    assert torch.equal(restored.alphas_cumprod, schedule.alphas_cumprod)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="beta_max"):
        NoiseSchedule.from_dict({**ScheduleConfig().__dict__, "beta_max": 0.1})


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_train_timesteps", 1),
        ("beta_schedule", "quadratic"),
        ("beta_start", 0.0),
        ("beta_end", 1.5),
        ("prediction_type", "x0"),
        ("min_snr_gamma", -1.0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ScheduleConfig(**{field: value})


@pytest.mark.parametrize(
    "preset,diffusers_schedule", [("ddpm", "linear"), ("ldm", "scaled_linear"), ("cosine", "squaredcos_cap_v2")]
)
def test_betas_match_diffusers(preset, diffusers_schedule):
    """Our float64 betas round to diffusers' float32 betas: the samplers' oracle sees the same chain."""
    from diffusers import DDPMScheduler

    config = SCHEDULE_PRESETS[preset]
    oracle = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=diffusers_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
    )
    torch.testing.assert_close(NoiseSchedule(config).betas, oracle.betas.to(F64), rtol=1e-6, atol=0)


class _ZeroModel:
    """Predicts 0 and records what the loss fed it."""

    def __call__(self, z_t, t, cond):
        self.z_t, self.t, self.cond = z_t, t, cond
        return torch.zeros_like(z_t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
@pytest.mark.parametrize("min_snr_gamma", [0.0, 5.0])
def test_training_loss_is_the_weighted_mse_to_the_target(prediction_type, min_snr_gamma):
    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type, min_snr_gamma=min_snr_gamma))
    x0 = torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    cond = Conditioning(torch.randn(64, 3, 5), torch.ones(64, 3, dtype=torch.bool), torch.randn(64, 2))
    model = _ZeroModel()
    loss = training_loss(model, schedule, x0, cond, generator=torch.Generator().manual_seed(2))

    assert model.cond is cond
    t = model.t
    assert t.dtype == torch.long and 0 <= t.min() and t.max() < schedule.num_train_timesteps
    alpha_bar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = (model.z_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    target = noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    if min_snr_gamma == 0:
        weight = torch.ones_like(snr)
    elif prediction_type == "epsilon":
        weight = torch.minimum(snr, torch.full_like(snr, min_snr_gamma)) / snr
    else:
        weight = torch.minimum(snr, torch.full_like(snr, min_snr_gamma)) / (snr + 1)
    expected = (weight * target.pow(2).flatten(1).mean(1)).mean()
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_training_loss_is_reproducible_with_a_generator():
    schedule = NoiseSchedule(ScheduleConfig())
    x0 = torch.randn(4, 2, 4, 4)
    cond = Conditioning(torch.randn(4, 3, 5), torch.ones(4, 3, dtype=torch.bool), torch.randn(4, 2))

    def model(z, t, c):
        return 0.5 * z

    first = training_loss(model, schedule, x0, cond, generator=torch.Generator().manual_seed(7))
    second = training_loss(model, schedule, x0, cond, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
