"""Tiny untrained models and random conditions, built one way for the tests and the benchmarks.

A zero-initialised branch makes an untrained network's output (and most of its gradients) zero,
so the builders here perturb every weight: a check that compares two computations then compares
something. Seeds make every builder deterministic.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.conditioning import Conditioning

SMALL_UNET = dict(base_channels=16, channel_mult=[1, 2], attention_levels=[1], num_heads=2, norm_groups=4,
                  context_dim=8)
"""A UNet small enough to train on CPU in seconds: two levels, attention at the lower one."""


def perturbed(model: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """`model` with `scale` x N(0, 1) noise added to every parameter (in place; returned)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def small_unet(seed: int = 0, **overrides):
    """A perturbed `SMALL_UNET` (with `overrides`), in train mode and float32."""
    from pipeline.models.unet import UNet, UNetConfig

    return perturbed(UNet(UNetConfig(**{**SMALL_UNET, **overrides})), seed=seed)


def random_conditioning(lengths: list[int], length: int = 6, dim: int = 8, pooled_dim: int = 0, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> Conditioning:
    """One row per entry of `lengths`: that many real tokens of `length`, random embeddings."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    batch = len(lengths)
    return Conditioning(torch.randn(batch, length, dim, generator=gen, dtype=dtype), mask,
                        torch.randn(batch, pooled_dim, generator=gen, dtype=dtype))


def save_untrained_encoders(cfg, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """An untrained VQ (latent scale 1) and text encoder of `cfg`, saved under `root` as the vq and
    clip stages save theirs; returns (vq_dir, clip_dir)."""
    from pipeline.models.text import build_text_encoder
    from pipeline.models.vq import VQModel
    from pipeline.stages.clip import encoder_spec
    from pipeline.stages.vq import model_config

    torch.manual_seed(seed)
    vq_dir, clip_dir = Path(root) / "vq", Path(root) / "clip"
    VQModel(model_config(cfg)).save(vq_dir, latent_scale=1.0)
    build_text_encoder(encoder_spec(cfg)).save(clip_dir)
    return vq_dir, clip_dir


def write_latent_dataset(out: Path, rows: int, latent_shape: tuple[int, int, int], context: int = 8,
                         width: int = 32, image_size: int = 32, seed: int = 0) -> Path:
    """A latent dataset as the encode stage writes it (Parquet rows via Ray Data, metadata, the null
    condition) of random latents and conditions, one square bucket; returns `out`. Needs Ray."""
    import json

    import numpy as np
    import ray
    from safetensors.torch import save_file

    out = Path(out)
    rng = np.random.default_rng(seed)
    mask = np.zeros((rows, context), dtype=bool)
    mask[:, : context // 2] = True
    items = [{"key": f"{i:06d}", "caption": f"caption {i}",
              "latent": rng.standard_normal(latent_shape).astype(np.float16),
              "tokens": rng.standard_normal((context, width)).astype(np.float16),
              "mask": mask[i], "pooled": rng.standard_normal(width).astype(np.float16)} for i in range(rows)]
    ray.data.from_items(items).repartition(3).write_parquet(str(out / "data"))
    save_file({"tokens": torch.zeros(1, context, width), "mask": torch.tensor(mask[:1]),
               "pooled": torch.zeros(1, width)}, str(out / "null_condition.safetensors"))
    (out / "metadata.json").write_text(json.dumps({
        "latent_shape": list(latent_shape), "context_length": context, "token_dim": width, "pooled_dim": width,
        "latent_scale": 1.0, "samples": rows, "image_size": image_size}))
    return out
