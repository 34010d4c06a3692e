"""A diffusers autoencoder (`VQModel` or `AutoencoderKL`) as this pipeline's first stage.

Users with a trained autoencoder (the CompVis LDM VQ-f4/f8, SD's VAE) point `vq.pretrained` at its
diffusers directory (config.json + diffusion_pytorch_model.safetensors, or a pipeline directory
with a `vae/` subfolder), read from the local path; nothing is downloaded. It then answers what
`VQModel` answers (`encode` to the latents the LDM diffuses, `decode` back to images in [-1, 1],
`cfg.downsample`, `cfg.latent_channels`), and is saved in the pipeline's own layout: model.json
(`kind: diffusers`, the diffusers class and config, the latent scale measured on the user's data)
and model.safetensors, so packages, serving and the registry carry it like our VQ. Needs the
`diffusers` extra.

- `VQModel`: the latents are the pre-quantization ones (after `quant_conv`), as with ours; `decode`
  quantizes, then decodes (diffusers' default).
- `AutoencoderKL`: the latents are the posterior's mean (deterministic, as for precomputed latents);
  `decode` decodes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

KINDS = ("VQModel", "AutoencoderKL")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors",)


@dataclass(frozen=True)
class FirstStageShape:
    """What the rest of the pipeline reads of a first stage's config."""

    downsample: int
    latent_channels: int
    codebook_size: int
    """0 for a continuous (KL) latent space."""


def diffusers_dir(path: str | Path) -> Path | None:
    """The diffusers autoencoder directory at `path` (itself or its `vae/`), or None if it is not one."""
    for candidate in (Path(path), Path(path) / "vae"):
        config = candidate / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") in KINDS:
            return candidate
    return None


def shape_of(config: dict) -> FirstStageShape:
    return FirstStageShape(downsample=2 ** (len(config["block_out_channels"]) - 1),
                           latent_channels=int(config["latent_channels"]),
                           codebook_size=int(config.get("num_vq_embeddings", 0)) if config["_class_name"] == "VQModel"
                           else 0)


class DiffusersFirstStage(nn.Module):
    """A diffusers autoencoder behind `VQModel`'s interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.kind = type(model).__name__
        if self.kind not in KINDS:
            raise ValueError(f"a diffusers first stage must be one of {KINDS}, got {self.kind}")
        self.cfg = shape_of({**model.config, "_class_name": self.kind})

    @classmethod
    def from_diffusers(cls, directory: str | Path) -> "DiffusersFirstStage":
        """Read a diffusers directory (config.json + safetensors weights); no download, no pickle."""
        import diffusers

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        weights = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{directory} has no {' or '.join(WEIGHT_FILES)} (safetensors weights are required)")
        model = getattr(diffusers, config["_class_name"]).from_config(config)
        model.load_state_dict(load_file(str(weights)))
        return cls(model.eval())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> the latents the LDM diffuses (B, C, H/f, W/f)."""
        out = self.model.encode(images)
        return out.latents if self.kind == "VQModel" else out.latent_dist.mode()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in about [-1, 1] (a VQ quantizes first)."""
        return self.model.decode(latents).sample

    def forward(self, images: torch.Tensor):
        """(reconstruction, code indices or None, 0): what the vq stage's evaluation reads."""
        latents = self.encode(images)
        indices = None
        if self.kind == "VQModel":
            _, _, (_, _, indices) = self.model.quantize(latents)
            indices = indices.view(latents.shape[0], *latents.shape[2:])
        return self.decode(latents), indices, torch.zeros(())

    def save(self, directory: str | Path, **extra) -> None:
        """The pipeline's layout: model.json (kind, class, diffusers config, `extra`) + model.safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}
        meta = {"kind": "diffusers", "class": self.kind, "config": {**config, "_class_name": self.kind}, **extra}
        (directory / "model.json").write_text(json.dumps(meta, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()},
                  str(directory / "model.safetensors"))

    @classmethod
    def load(cls, directory: str | Path) -> tuple["DiffusersFirstStage", dict]:
        """Rebuild one saved by `save`; returns (model in eval mode, the extra fields of model.json)."""
        import diffusers

        directory = Path(directory)
        meta = json.loads((directory / "model.json").read_text())
        meta.pop("kind")
        config = meta.pop("config")
        model = getattr(diffusers, meta.pop("class")).from_config(config)
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return cls(model).eval(), meta
