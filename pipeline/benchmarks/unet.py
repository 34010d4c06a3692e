"""Benchmark: our UNet's training step against diffusers' `UNet2DConditionModel` of the same shape.

    python jobs/benchmark.py unet [--preset tiny|medium] [--batch N] [--iters N] [--warmup N] [--threads N]

Both models are built in this process as the same network: `diffusers_config` maps a `UNetConfig`
onto diffusers' arguments (the parameter counts must agree within 5%; they are equal) and
`diffusers_state_dict` gives diffusers' model our weights, so both compute the same function. Both
get the same inputs (padded captions of realistic lengths) and run the same step: forward, epsilon
MSE, backward, torch's AdamW. After a warm-up the two steps alternate, ours then theirs, so a load
spike on a shared machine hits both; the result reports medians (and the ratio of the fastest
steps). `cpu_mfu` is our model's FLOP/s (FlopCounterMode over one step) over a ceiling: the
float32 FMA peak of the threads used, from the CPU's clock and vector width (`fma_peak_gflop_s`;
the best of several float32 GEMM shapes where /proc/cpuinfo says neither, or where that GEMM runs
faster than the "peak", as on a core clocked above what cpuinfo reports). `cpu_mfu_of_gemm`
divides by the best GEMM throughput measured in the same run instead, the practical peak (once the
2048^3 matmul alone, which smaller GEMMs beat, so that an MFU above 1 came out). Our step counts
fewer FLOPs than diffusers' for the same function: `step_gflop` and `step_gflop_diffusers` show by
how much.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.conditioning import Conditioning
from pipeline.models.unet import TIME_EMBED_MULT, UNet, UNetConfig, unet_config

# Parameter counts of the two models may differ by at most this fraction (of ours).
PARAM_TOLERANCE = 0.05
# (M, K, N) of the GEMMs whose best float32 throughput is the practical peak: square ones of several
# sizes and the skinny shapes of a conv's im2col and of attention projections.
GEMM_SHAPES = ((512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 256, 4096), (256, 4096, 256),
               (8192, 576, 64), (2048, 64, 2048))
FMA_PIPES = 2
"""Vector FMA units per core, the most any x86 core has: what makes the FMA peak a ceiling."""
FP32_LANES = (("avx512f", 16), ("avx", 8), ("sse", 4))


@dataclass(frozen=True)
class Workload:
    """The shapes of one benchmark preset: what the model sees in a training step."""

    batch: int
    latent_size: int
    """H = W of the latents."""
    context_length: int
    """L, text tokens per caption."""
    context_dim: int
    """D, the text encoder's token width (the UNet's cross-attention dim)."""
    caption_tokens: tuple[int, int]
    """Range (inclusive) of the real (not padding) tokens per caption, BOS and EOS included."""
    warmup: int
    iters: int


WORKLOADS: dict[str, Workload] = {
    # The demo: 32px images through a VQ with downsample 4 -> 4x8x8 latents; the demo CLIP has
    # context 16 and width 128, its captions ("a red circle on the left") 8-12 tokens; the ldm
    # stage's micro batch is 32.
    "tiny": Workload(batch=32, latent_size=8, context_length=16, context_dim=128, caption_tokens=(8, 12),
                     warmup=3, iters=30),
    # The medium preset is meant for 32x32 latents and a CLIP ViT-B text tower (77 x 512), with
    # alt-text-like captions of 8-24 tokens.
    "medium": Workload(batch=4, latent_size=32, context_length=77, context_dim=512, caption_tokens=(8, 24),
                       warmup=2, iters=12),
}


def diffusers_config(cfg: UNetConfig, sample_size: int) -> dict:
    """`UNet2DConditionModel` arguments for the same network as `UNet(cfg)`.

    Same blocks per level and attention placement, heads (diffusers' legacy `attention_head_dim`
    is the head count), GroupNorm groups, the sinusoids cos-first with no frequency shift, linear
    projections in and out of the transformers and zero dropout. `pooled_dim` has no one-layer
    equivalent in diffusers; the benchmark uses 0.
    """
    if cfg.pooled_dim:
        raise ValueError("diffusers_config needs pooled_dim=0")
    levels = range(len(cfg.channel_mult))
    attention = [level in cfg.attention_levels for level in levels]
    return dict(
        sample_size=sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=cfg.norm_groups,
        norm_eps=1e-5,
        cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=cfg.transformer_depth,
        attention_head_dim=cfg.num_heads,
        use_linear_projection=True,
        dropout=cfg.dropout,
        time_embedding_dim=TIME_EMBED_MULT * cfg.base_channels,
    )


# Our parameter names -> diffusers', inside a ResBlock / SpatialTransformer (applied in order).
RESBLOCK_NAMES = (("emb_proj.", "time_emb_proj."), ("skip.", "conv_shortcut."))
TRANSFORMER_NAMES = (
    ("layers.", "transformer_blocks."), (".norm_self.", ".norm1."), (".self_attn.", ".attn1."),
    (".norm_cross.", ".norm2."), (".cross_attn.", ".attn2."), (".norm_ff.", ".norm3."),
    (".ff.proj_in.", ".ff.net.0.proj."), (".ff.proj_out.", ".ff.net.2."), (".to_out.", ".to_out.0."),
)


def diffusers_state_dict(ours: UNet) -> dict[str, torch.Tensor]:
    """Our UNet's weights under the names of `UNet2DConditionModel(**diffusers_config(...))`.

    Loaded with `strict=True`, it proves the two models have the same modules and shapes; with
    the same weights they compute the same function (up to diffusers' -10000 mask bias).
    """
    cfg = ours.config
    levels = len(cfg.channel_mult)
    blocks = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
              "conv_in.": "conv_in.", "norm_out.": "conv_norm_out.", "conv_out.": "conv_out.",
              "middle.res1.": "mid_block.resnets.0.", "middle.attn.": "mid_block.attentions.0.",
              "middle.res2.": "mid_block.resnets.1."}
    index = 0
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            blocks[f"down.{index}.res."] = f"down_blocks.{level}.resnets.{j}."
            blocks[f"down.{index}.attn."] = f"down_blocks.{level}.attentions.{j}."
            index += 1
        if level != levels - 1:
            blocks[f"down.{index}.conv."] = f"down_blocks.{level}.downsamplers.0.conv."
            index += 1
    index = 0
    for k, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            blocks[f"up.{index}.res."] = f"up_blocks.{k}.resnets.{j}."
            blocks[f"up.{index}.attn."] = f"up_blocks.{k}.attentions.{j}."
            index += 1
        if level != 0:
            blocks[f"up.{index}.conv."] = f"up_blocks.{k}.upsamplers.0.conv."
            index += 1

    mapped = {}
    for name, tensor in ours.state_dict().items():
        prefix = next(p for p in blocks if name.startswith(p))
        rest = name[len(prefix):]
        if ".attentions." in blocks[prefix]:
            rest = "." + rest
            for old, new in TRANSFORMER_NAMES:
                rest = rest.replace(old, new)
            rest = rest[1:]
        elif ".resnets." in blocks[prefix]:
            for old, new in RESBLOCK_NAMES:
                rest = rest.replace(old, new)
        mapped[blocks[prefix] + rest] = tensor
    return mapped


def build_pair(preset: str, context_dim: int, sample_size: int, seed: int = 0):
    """Our UNet of `preset` and diffusers' model of the same shape and weights, in training mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    ours = UNet(unet_config(preset, context_dim=context_dim, pooled_dim=0, dropout=0.0)).train()
    theirs = UNet2DConditionModel(**diffusers_config(ours.config, sample_size)).train()
    theirs.load_state_dict(diffusers_state_dict(ours), strict=True)
    return ours, theirs


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_param_counts(ours: int, theirs: int) -> None:
    """The two models are the same network only if their sizes agree."""
    if abs(ours - theirs) > PARAM_TOLERANCE * ours:
        raise AssertionError(f"parameter counts differ by more than {PARAM_TOLERANCE:.0%}: ours {ours}, diffusers {theirs}")


def make_inputs(cfg: UNetConfig, work: Workload, batch: int, seed: int = 0):
    """Noisy latents, timesteps, a padded text condition and the epsilon target."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.in_channels, work.latent_size, work.latent_size)
    x = torch.randn(shape, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    low, high = work.caption_tokens
    lengths = torch.randint(low, high + 1, (batch, 1), generator=gen)
    mask = torch.arange(work.context_length)[None, :] < lengths  # (B, L), padding after each caption
    cond = Conditioning(torch.randn(batch, work.context_length, work.context_dim, generator=gen), mask,
                        torch.zeros(batch, 0))
    target = torch.randn(shape, generator=gen)
    return x, t, cond, target


def training_step(model: torch.nn.Module, forward: Callable[[], torch.Tensor], target: torch.Tensor,
                  lr: float = 1e-4) -> Callable[[], float]:
    """A closure running one training step (forward, MSE, backward, AdamW) and returning the loss.

    Both models get the same optimizer, torch's fused AdamW (the fastest on CPU), so that the step
    time differs only by the model.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward(), target)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def step_pair(ours: UNet, theirs: torch.nn.Module, x, t, cond: Conditioning, target):
    """Training-step closures for both models on the same inputs."""
    ours_step = training_step(ours, lambda: ours(x, t, cond), target)
    theirs_step = training_step(
        theirs,
        lambda: theirs(x, t, encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask, return_dict=False)[0],
        target,
    )
    return ours_step, theirs_step


def interleaved_times(fns: list[Callable[[], object]], warmup: int, iters: int) -> list[tuple[float, float]]:
    """(median, min) seconds per call of each function, timed in turn (a, b, a, b, ...) after a warm-up."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [(statistics.median(bucket), min(bucket)) for bucket in times]


def gemm_flops_per_s(shapes=GEMM_SHAPES, repeats: int = 5) -> float:
    """The best float32 GEMM throughput over `shapes` (each the best of `repeats`): the practical peak."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.matmul(a, b)
        fastest = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            fastest = min(fastest, time.perf_counter() - start)
        best = max(best, 2 * m * k * n / fastest)
    return best


def fma_peak_flops_per_s(threads: int, cpuinfo: str | None = None) -> float | None:
    """A ceiling on float32 FLOP/s: threads x the highest clock /proc/cpuinfo reports x FMA_PIPES
    x the vector's float32 lanes x 2 (an FMA is two FLOPs). None where cpuinfo has no clock or flags."""
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo").read()
        except OSError:
            return None
    clocks = [float(line.split(":")[1]) for line in cpuinfo.splitlines() if line.startswith("cpu MHz")]
    flags = next((line.split(":")[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    lanes = next((width for flag, width in FP32_LANES if flag in flags), None)
    if not clocks or lanes is None:
        return None
    return threads * max(clocks) * 1e6 * FMA_PIPES * lanes * 2


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls and convolutions that one call of `fn` runs (FlopCounterMode has no
    formula for the CPU attention kernel, so the attention scores are left out on both sides)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py unet", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(WORKLOADS), default="tiny")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's workload)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per model (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model first")
    # One thread, as each of the demo's DeepSpeed workers trains with (ldm.cpus_per_worker = 1); more
    # threads on a shared machine time OpenMP barriers waiting for a busy core more than the model.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict:
    """Run the benchmark; returns the result line's fields."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = WORKLOADS[args.preset]
    batch = args.batch or work.batch
    iters = args.iters or work.iters
    warmup = work.warmup if args.warmup is None else args.warmup

    ours, theirs = build_pair(args.preset, work.context_dim, work.latent_size)
    params_ours, params_theirs = param_count(ours), param_count(theirs)
    check_param_counts(params_ours, params_theirs)
    x, t, cond, target = make_inputs(ours.config, work, batch)
    ours_step, theirs_step = step_pair(ours, theirs, x, t, cond, target)

    flops, flops_theirs = count_flops(ours_step), count_flops(theirs_step)
    (step_ours, min_ours), (step_theirs, min_theirs) = interleaved_times([ours_step, theirs_step], warmup, iters)
    gemm = gemm_flops_per_s()
    fma_peak = fma_peak_flops_per_s(torch.get_num_threads())
    achieved = flops / step_ours
    return {
        "preset": args.preset,
        "batch": batch,
        "latent": [ours.config.in_channels, work.latent_size, work.latent_size],
        "context": [work.context_length, work.context_dim],
        "threads": torch.get_num_threads(),
        "iters": iters,
        "ratio_vs_diffusers": round(step_ours / step_theirs, 4),
        # Load from other processes only ever slows a step down: the fastest steps are a second,
        # less noisy view of the same comparison.
        "ratio_of_fastest": round(min_ours / min_theirs, 4),
        "step_s_ours": round(step_ours, 5),
        "step_s_diffusers": round(step_theirs, 5),
        "params_ours": params_ours,
        "params_diffusers": params_theirs,
        "step_gflop": round(flops / 1e9, 3),
        "step_gflop_diffusers": round(flops_theirs / 1e9, 3),
        "gemm_gflop_s": round(gemm / 1e9, 2),
        "fma_peak_gflop_s": round(fma_peak / 1e9, 2) if fma_peak else None,
        # The clock /proc/cpuinfo reports can be below the one the core runs at (turbo): a GEMM
        # measured above that "peak" shows it is none, and the measured GEMM is the ceiling then.
        "cpu_mfu": round(achieved / max(fma_peak or 0.0, gemm), 4),
        "cpu_mfu_of_gemm": round(achieved / gemm, 4),
    }
