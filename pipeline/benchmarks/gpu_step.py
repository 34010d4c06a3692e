"""The bf16 training step of the larger UNet presets on one GPU: images/s, MFU and peak memory.

    python jobs/benchmark.py gpu_step [--presets medium,sd] [--device cuda] [--iters 10]

Each preset trains on its intended shapes (`SHAPES`: SD's 4x64x64 latents with CLIP ViT-L's 77x768
tokens; medium's 4x32x32 with ViT-B's 77x512) under torch autocast bf16 with fp32 master weights and
fused AdamW, as DeepSpeed's bf16 mode runs it. MFU is the model's FLOP/s (FlopCounterMode over one
step: matmuls, convolutions and attention) over the GPU's dense bf16 peak (`PEAK_BF16_TFLOPS`, from
the vendor's data sheets, without sparsity). On a CPU (`--device cpu`, the `tiny` preset) it runs
the same code path, for the tests; there the MFU is left out.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.conditioning import Conditioning
from pipeline.models.unet import UNet, unet_config

# Dense bf16 tensor-core peaks in TFLOP/s (data sheets, SXM parts, no 2:4 sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 125.0}
# preset -> (micro batch, latent side, context length, context width)
SHAPES = {"tiny": (4, 8, 16, 128), "medium": (32, 32, 77, 512), "sd": (16, 64, 77, 768)}


def gpu_peak_flops(device: torch.device) -> tuple[str, float | None]:
    """The GPU's name and its dense bf16 peak in FLOP/s (None when not in the table)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return name, tflops * 1e12
    return name, None


def step_closure(preset: str, device: torch.device, batch: int | None = None):
    """(one bf16 training step as a closure, the batch size, the model's parameter count)."""
    micro, side, length, width = SHAPES[preset]
    batch = batch or micro
    torch.manual_seed(0)
    model = UNet(unet_config(preset, context_dim=width, pooled_dim=0, dropout=0.0,
                             gradient_checkpointing=preset == "sd")).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(batch, 4, side, side, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    mask = torch.arange(length, device=device)[None, :] < torch.randint(8, length + 1, (batch, 1), device=device)
    cond = Conditioning(torch.randn(batch, length, width, device=device), mask, torch.zeros(batch, 0, device=device))
    target = torch.randn_like(x)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.mse_loss(model(x, t, cond).float(), target)
        loss.backward()
        optimizer.step()
        return loss.item()  # synchronises

    return step, batch, sum(p.numel() for p in model.parameters())


def measure(preset: str, device: torch.device, iters: int, batch: int | None = None) -> dict:
    step, batch, params = step_closure(preset, device, batch)
    step()  # warm-up: kernels chosen, memory allocated
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    name, peak = gpu_peak_flops(device)
    flops = counter.get_total_flops()
    result = {"preset": preset, "device": name, "params_m": round(params / 1e6, 1), "batch": batch,
              "step_s": round(seconds, 4), "img_per_s": round(batch / seconds, 1),
              "step_gflop": round(flops / 1e9, 2), "tflop_per_s": round(flops / seconds / 1e12, 2)}
    if peak:
        result["mfu"] = round(flops / seconds / peak, 3)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="medium,sd")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None, help="micro batch (default: SHAPES per preset)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return {"steps": [measure(preset, device, args.iters, args.batch) for preset in args.presets.split(",")]}
