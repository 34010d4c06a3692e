"""The claims the benchmarks rest on: like is compared with like, and the fast paths are exact.

`pipeline.benchmarks.unet` times our UNet against diffusers' `UNet2DConditionModel` built by
`diffusers_config`: the two must be the same network. `pipeline.benchmarks.sampler` times our guided
DDIM against diffusers' `DDIMScheduler`: the two must land on the same latents. Our speed-ups
(`UNet.bind`, the sub-pixel `Upsample`, the text context cut to the longest caption) must not change
what the model computes. No timing is asserted here.
"""

from copy import deepcopy

import pytest
import torch

from pipeline.benchmarks import sampler as sampler_bench
from pipeline.benchmarks import unet as unet_bench
from pipeline.conditioning import Conditioning
from pipeline.diffusion import SCHEDULE_PRESETS, NoiseSchedule
from pipeline.models.unet import SUBPIXEL_MIN_SIDE, UNet, UNetConfig, Upsample, build_unet

from pipeline.tiny_models import SMALL_UNET as SMALL
from pipeline.tiny_models import perturbed as randomized
from pipeline.tiny_models import random_conditioning

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def captions(lengths: list[int], **kwargs) -> Conditioning:
    return random_conditioning(lengths, dtype=F64, **kwargs)


@pytest.mark.parametrize("preset", ["tiny", "medium"])
def test_diffusers_twin_has_the_same_parameter_count(preset):
    from diffusers import UNet2DConditionModel

    work = unet_bench.WORKLOADS[preset]
    with torch.device("meta"):  # shapes only
        ours = build_unet(preset, context_dim=work.context_dim)
        theirs = UNet2DConditionModel(**unet_bench.diffusers_config(ours.config, work.latent_size))
    params_ours, params_theirs = unet_bench.param_count(ours), unet_bench.param_count(theirs)
    assert abs(params_ours - params_theirs) <= unet_bench.PARAM_TOLERANCE * params_ours
    unet_bench.check_param_counts(params_ours, params_theirs)
    with pytest.raises(AssertionError, match="parameter counts"):
        unet_bench.check_param_counts(params_ours, int(params_ours * 1.06))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"channel_mult": [1, 2, 2], "num_res_blocks": 2, "attention_levels": [0, 2], "transformer_depth": 2}],
)
def test_diffusers_twin_with_our_weights_computes_our_function(overrides):
    """Every weight maps onto diffusers' model (strict load) and the outputs agree: the same network."""
    from diffusers import UNet2DConditionModel

    ours = randomized(UNet(UNetConfig(**{**SMALL, **overrides}))).double().eval()
    theirs = UNet2DConditionModel(**unet_bench.diffusers_config(ours.config, 16)).double().eval()
    theirs.load_state_dict(unet_bench.diffusers_state_dict(ours), strict=True)
    x = torch.randn(3, 4, 16, 16, dtype=F64)
    t = torch.tensor([1, 400, 999])
    cond = captions([2, 6, 4])
    with torch.no_grad():
        out = ours(x, t, cond)
        twin = theirs(x, t, encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask, return_dict=False)[0]
    assert out.abs().max() > 0.1
    torch.testing.assert_close(twin, out, rtol=0, atol=1e-10)


def test_unet_benchmark_runs_and_reports_its_fields():
    result = unet_bench.main(["--preset", "tiny", "--batch", "2", "--iters", "1", "--warmup", "0"])
    assert result["params_ours"] == result["params_diffusers"]
    assert result["threads"] == 1 and result["batch"] == 2
    for key in ("ratio_vs_diffusers", "step_s_ours", "step_s_diffusers", "cpu_mfu", "cpu_mfu_of_gemm"):
        assert result[key] > 0, key
    assert result["cpu_mfu"] <= result["cpu_mfu_of_gemm"] or result["fma_peak_gflop_s"] is None


def test_the_mfu_ceiling_comes_from_the_clock_and_the_widest_vector_unit():
    """cpu_mfu divides by a ceiling no kernel can pass: threads x clock x 2 FMA pipes x lanes x 2."""
    info = "processor : 0\ncpu MHz : 2000.0\nflags : fpu sse avx avx2 fma {extra}\nprocessor : 1\ncpu MHz : 2500.0\n"
    assert unet_bench.fma_peak_flops_per_s(1, info.format(extra="avx512f")) == 2500e6 * 2 * 16 * 2
    assert unet_bench.fma_peak_flops_per_s(2, info.format(extra="")) == 2 * 2500e6 * 2 * 8 * 2
    assert unet_bench.fma_peak_flops_per_s(1, "flags : fpu\n") is None  # no clock: the caller uses the GEMM peak
    assert unet_bench.gemm_flops_per_s([(64, 64, 64), (128, 32, 128)], repeats=1) > 0


def test_sampler_benchmark_sides_agree():
    """Our guided DDIM and diffusers' DDIMScheduler loop, same UNet and noise: the same latents."""
    unet = sampler_bench.perturbed_unet()
    schedule = NoiseSchedule(SCHEDULE_PRESETS["ldm"])
    cond, null = sampler_bench.text_conditions(2)
    noise = torch.randn(2, *sampler_bench.LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    ours = sampler_bench.sample_ours(unet, cond, null, noise, schedule, num_steps=5)
    theirs = sampler_bench.sample_diffusers(unet, cond, null, noise, sampler_bench.diffusers_ddim_scheduler(schedule), 5)
    assert (ours - noise).abs().max() > 0.1  # the sampler moved
    assert (ours - theirs).abs().max() <= 1e-4


def test_sampler_benchmark_runs_and_reports_its_fields():
    result = sampler_bench.main(["--batch", "1", "--steps", "3", "--repeats", "1"])
    assert result["max_abs_diff"] <= 1e-4
    assert result["ratio_vs_diffusers"] > 0 and len(result["times_ours"]) == 1


@pytest.mark.parametrize("side", [SUBPIXEL_MIN_SIDE, SUBPIXEL_MIN_SIDE + 4])
def test_subpixel_upsample_is_nearest_doubling_then_conv(side):
    upsample = randomized(Upsample(6)).double()
    x = torch.randn(2, 6, side, side + 2, dtype=F64, requires_grad=True)
    reference = upsample.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = upsample(x)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(reference, [x, upsample.conv.weight], grad)
    got = torch.autograd.grad(out, [x, upsample.conv.weight], grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("lengths", [[3, 5], [0, 4], [6, 6], [0, 0]])
def test_bound_unet_is_the_unet_with_its_condition_fixed(lengths):
    model = randomized(UNet(UNetConfig(**SMALL, pooled_dim=5))).double().eval()
    cond = captions(lengths, pooled_dim=5)
    x = torch.randn(2, 4, 16, 16, dtype=F64)
    with torch.no_grad():
        bound = model.bind(cond)
        for t in (torch.tensor([0, 999]), torch.tensor([500, 500])):
            torch.testing.assert_close(bound(x, t), model(x, t, cond), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="batch"):
        bound(torch.randn(3, 4, 16, 16, dtype=F64), torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("lengths", [[3, 5], [0, 4], [6, 6]])
def test_traced_bound_unet_computes_what_the_eager_one_does(lengths):
    """After `after_calls` eager calls at one layout, the bound function runs a trace: same result,
    the UNet's current weights, one trace per layout, never under autograd, not carried by copies."""
    model = randomized(UNet(UNetConfig(**SMALL, pooled_dim=5))).double().eval()
    model.traces.after_calls = 2
    cond = captions(lengths, pooled_dim=5)
    x, t = torch.randn(2, 4, 16, 16, dtype=F64), torch.tensor([3, 700])
    bound = model.bind(cond)
    with torch.no_grad():
        expected = model(x, t, cond)
        outs = [bound(x, t) for _ in range(4)]
        assert len(model.traces.traces) == 1  # made at the third call
        for out in outs:
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        for p in model.parameters():  # in place, as load_state_dict and an EMA swap do
            p.mul_(1.1)
        torch.testing.assert_close(model.bind(cond)(x, t), model(x, t, cond), rtol=0, atol=1e-12)
        assert len(model.traces.traces) == 1
        copy = deepcopy(model)
        assert not copy.traces.traces and copy.traces.after_calls == 2
        torch.testing.assert_close(copy.bind(cond)(x, t), model(x, t, cond), rtol=0, atol=1e-12)
    calls = sum(model.traces.calls.values())
    out = bound(x, t)  # with autograd: the eager network, gradients flow
    assert out.requires_grad and sum(model.traces.calls.values()) == calls


def test_traced_float32_outputs_are_bitwise_the_eager_ones():
    """Serving promises the same PNG bytes for a request whether its replica has traced or not."""
    model = randomized(UNet(UNetConfig(**SMALL))).eval()
    model.traces.after_calls = 1
    cond = captions([2, 6, 4]).to(torch.device("cpu"), torch.float32)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 999])
    with torch.no_grad():
        bound = model.bind(cond)
        eager, traced, again = bound(x, t), bound(x, t), bound(x, t)
        assert len(model.traces.traces) == 1
        assert torch.equal(traced, eager) and torch.equal(again, eager)


def test_a_layout_that_cannot_be_traced_stays_eager_with_one_warning(monkeypatch):
    """A tracer failure (an op TorchScript cannot record, a torch without torch.jit) must not fail
    sampling: the layout warns once, then keeps running the eager network without retracing."""
    model = randomized(UNet(UNetConfig(**SMALL))).double().eval()
    model.traces.after_calls = 1
    attempts = []

    def failing_trace(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("an op the tracer cannot record")

    monkeypatch.setattr(torch.jit, "trace", failing_trace)
    cond = captions([2, 5])
    x, t = torch.randn(2, 4, 8, 8, dtype=F64), torch.tensor([4, 900])
    with torch.no_grad():
        bound = model.bind(cond)
        expected = bound(x, t)
        with pytest.warns(RuntimeWarning, match="cannot record"):
            second = bound(x, t)
        third = bound(x, t)
    assert len(attempts) == 1
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    torch.testing.assert_close(third, expected, rtol=0, atol=0)


def test_trailing_padding_changes_nothing():
    """The context is cut after the last real token: extra padding columns must not matter."""
    model = randomized(UNet(UNetConfig(**SMALL))).double().eval()
    cond = captions([2, 4])
    padded = Conditioning(
        torch.cat([cond.tokens, 50 * torch.randn(2, 10, 8, dtype=F64)], dim=1),
        torch.cat([cond.mask, torch.zeros(2, 10, dtype=torch.bool)], dim=1),
        cond.pooled,
    )
    x, t = torch.randn(2, 4, 8, 8, dtype=F64), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, padded), model(x, t, cond), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_the_train_benchmark_times_the_same_work_on_both_sides():
    """`benchmark.py train`: the stage (Ray Train + DeepSpeed + MLflow) and the bare loop train the
    same UNet on the same batches and noise, so they end at the same loss; both times are reported."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "jobs/benchmark.py", "train", "--steps", "12", "--warmup", "2",
                          "--rows", "64", "ldm.batch_size=16"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["stage_final_loss"] == pytest.approx(result["bare_final_loss"], rel=1e-4)
    for key in ("stage_step_s", "bare_step_s", "steady_ratio", "stage_startup_s"):
        assert result[key] > 0, key
    assert set(result["stage_startup_parts_s"]) == {"worker_group", "worker_setup", "first_step_extra"}
