"""Benchmark: our guided DDIM sampler against diffusers' `DDIMScheduler` driving the same UNet.

    python jobs/benchmark.py sampler [--batch N] [--steps N] [--repeats N] [--threads N]

Both sides sample from the same initial noise with the same UNet instance (the tiny preset at the
demo's shapes, weights perturbed so that its output is not the untrained zero), classifier-free
guidance batched as cond + uncond in one forward pass, and the same 50 "leading" DDIM timesteps.
Ours is `sample_ddim(guided(...))` from `pipeline.sampling`; theirs is the loop of diffusers'
pipelines around `DDIMScheduler.step`, configured to our schedule (no x0 clipping, abar_final = 1).
Repeats alternate ours / theirs after two warm-up runs each (ours traces its network in the
second, see `UNet.bind`); the result reports median seconds, the warm-up runs' seconds and the
largest absolute difference between the two final latents.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.conditioning import Conditioning
from pipeline.diffusion import SCHEDULE_PRESETS, NoiseSchedule
from pipeline.models.unet import UNet, build_unet
from pipeline.sampling import guided, sample_ddim
from pipeline.tiny_models import perturbed

# The demo's shapes: 4x8x8 latents (32px images, VQ downsample 4) and CLIP tokens 16 x 128.
LATENT_SHAPE = (4, 8, 8)
CONTEXT_LENGTH, CONTEXT_DIM = 16, 128
# The serving default (pipeline.config's sampling section).
GUIDANCE_SCALE = 3.0
# Scale of the noise added to every weight so the untrained UNet's zero-initialised layers act.
WEIGHT_PERTURBATION = 0.05
# Untimed sampling runs per side first: at 50 steps, ours traces its network in the second
# (`pipeline.models.unet.TRACE_AFTER_CALLS`); both sides' warm-up times are reported.
WARMUP_RUNS = 2
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}
DIFFUSERS_BETA_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def perturbed_unet(seed: int = 0, **overrides) -> UNet:
    """The tiny UNet at the demo's context width, every weight perturbed, in eval mode."""
    torch.manual_seed(seed)
    unet = build_unet("tiny", context_dim=CONTEXT_DIM, pooled_dim=0, **overrides)
    return perturbed(unet, WEIGHT_PERTURBATION, seed).eval()


def text_conditions(batch: int, length: int = CONTEXT_LENGTH, dim: int = CONTEXT_DIM, seed: int = 0):
    """Random captions with 3-10 real tokens, and a null condition (batch 1) with 2 real tokens."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None, :] < torch.randint(3, 11, (batch, 1), generator=gen)
    cond = Conditioning(torch.randn(batch, length, dim, generator=gen), mask, torch.zeros(batch, 0))
    null_mask = torch.arange(length)[None, :] < 2
    null = Conditioning(torch.randn(1, length, dim, generator=gen), null_mask, torch.zeros(1, 0))
    return cond, null


def diffusers_ddim_scheduler(schedule: NoiseSchedule):
    """diffusers' DDIMScheduler on our schedule, stepping the way `sample_ddim` does."""
    from diffusers import DDIMScheduler

    config = schedule.config
    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=DIFFUSERS_BETA_SCHEDULE[config.beta_schedule],
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=DIFFUSERS_PREDICTION[config.prediction_type],
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )


def sample_ours(unet, cond: Conditioning, null: Conditioning, noise: torch.Tensor, schedule: NoiseSchedule,
                num_steps: int, guidance_scale: float = GUIDANCE_SCALE) -> torch.Tensor:
    """Guided DDIM with `pipeline.sampling`."""
    return sample_ddim(guided(unet, cond, null, guidance_scale), noise, schedule, num_steps=num_steps)


@torch.no_grad()
def sample_diffusers(unet, cond: Conditioning, null: Conditioning, noise: torch.Tensor, scheduler,
                     num_steps: int, guidance_scale: float = GUIDANCE_SCALE) -> torch.Tensor:
    """Guided DDIM the way diffusers' pipelines run it: cat the latents, one forward, step."""
    scheduler.set_timesteps(num_steps)
    both = Conditioning.cat([cond, null.expand(len(cond))])
    x = noise
    for t in scheduler.timesteps:
        model_input = torch.cat([x, x])
        out = unet(model_input, t.expand(model_input.shape[0]), both)
        out_cond, out_uncond = out.chunk(2)
        x = scheduler.step(out_uncond + guidance_scale * (out_cond - out_uncond), t, x).prev_sample
    return x


def interleaved_repeats(fns: list, repeats: int) -> tuple[list[list[float]], list[torch.Tensor]]:
    """Seconds of each call of each function, in turn, plus each function's last result."""
    times: list[list[float]] = [[] for _ in fns]
    results: list[torch.Tensor] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return times, results


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py sampler", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="images per sampling call (2x in each forward)")
    # LDM's schedule: an untrained eps-model's DDIM latents grow like 1 / sqrt(abar_N), 15x here and
    # 160x under DDPM's, where float32 rounding alone reaches 1e-4.
    parser.add_argument("--schedule", choices=sorted(SCHEDULE_PRESETS), default="ldm", help="a SCHEDULE_PRESETS name")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7, help="timed sampling runs per side, after one warm-up each")
    # One thread, like the unet benchmark: on a shared machine more threads mostly time OpenMP waits.
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict:
    """Run the benchmark; returns the result line's fields."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    unet = perturbed_unet()
    schedule = NoiseSchedule(SCHEDULE_PRESETS[args.schedule])
    scheduler = diffusers_ddim_scheduler(schedule)
    cond, null = text_conditions(args.batch)
    noise = torch.randn(args.batch, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1))

    fns = [
        lambda: sample_ours(unet, cond, null, noise, schedule, args.steps),
        lambda: sample_diffusers(unet, cond, null, noise, scheduler, args.steps),
    ]
    # Warm-up: two runs each; ours traces its network during the second (`UNet.bind`).
    (warmup_ours, warmup_theirs), _ = interleaved_repeats(fns, WARMUP_RUNS)
    (times_ours, times_theirs), (final_ours, final_theirs) = interleaved_repeats(fns, args.repeats)
    median_ours, median_theirs = statistics.median(times_ours), statistics.median(times_theirs)
    return {
        "batch": args.batch,
        "steps": args.steps,
        "schedule": args.schedule,
        "guidance_scale": GUIDANCE_SCALE,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ratio_vs_diffusers": round(median_ours / median_theirs, 4),
        "max_abs_diff": float((final_ours - final_theirs).abs().max()),
        "latent_abs_max": float(final_theirs.abs().max()),
        "s_ours": round(median_ours, 4),
        "s_diffusers": round(median_theirs, 4),
        "times_ours": [round(s, 4) for s in times_ours],
        "times_diffusers": [round(s, 4) for s in times_theirs],
        "warmup_s_ours": [round(s, 4) for s in warmup_ours],
        "warmup_s_diffusers": [round(s, 4) for s in warmup_theirs],
    }
