"""The VQ-VAE first stage: images <-> latents.

Sits at the two ends of the flow: the encode stage calls `encode` (pre-quantization latents, which
the LDM diffuses), and sampling calls `decode` (quantize, then decode), as in Rombach et al. 2022.
The codebook is vector-quantize-pytorch's EMA codebook with k-means init and dead-code replacement;
with `num_quantizers` > 1 its residual stack (each codebook codes what the ones before left).
A saved model is a directory with `model.json` (the constructor's arguments) and
`model.safetensors`, so it can be rebuilt without the training config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F


@dataclass
class VQArchitecture:
    """The architecture fields a user chooses: the vq stage's config (`pipeline.config.training.VQConfig`)
    and a saved model's `VQModelConfig` both are one, so each field is declared here only."""

    hidden_channels: int = 64
    """Channels at full resolution."""
    channel_mult: list[int] = field(default_factory=list)
    """Channels per resolution, full first, as multiples of hidden_channels, the last entry holding
    for the resolutions below it ([1, 1, 2]: the latents' resolution twice as wide at downsample 4,
    and the last two at 8); empty, hidden_channels at every resolution. Width where the maps are
    small is cheap: a layer at half the side with twice the channels costs the same."""
    latent_channels: int = 4
    downsample: int = 4
    """Spatial downsampling factor of the encoder: 4 or 8."""
    codebook_size: int = 256
    num_quantizers: int = 1
    """Codebooks in a residual stack (residual VQ, Zeghidour et al. 2021): each codes what the ones
    before left, so a latent carries num_quantizers x log2(codebook_size) bits; 1 is the plain VQ-VAE."""
    commitment_weight: float = 0.25
    """Weight of the commitment loss (van den Oord et al. 2017 use 0.25)."""

    def __post_init__(self):
        if self.downsample not in (4, 8):
            raise ValueError(f"downsample must be 4 or 8, got {self.downsample}")
        levels = int(math.log2(self.downsample)) + 1
        if self.channel_mult and (len(self.channel_mult) > levels or min(self.channel_mult) < 1):
            raise ValueError(f"channel_mult must be at most {levels} multiples >= 1 (one per resolution at "
                             f"downsample {self.downsample}), got {list(self.channel_mult)}")
        if self.num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {self.num_quantizers}")

    def widths(self) -> list[int]:
        """Channels per resolution, full first."""
        mult = list(self.channel_mult) or [1]
        mult += mult[-1:] * (int(math.log2(self.downsample)) + 1 - len(mult))
        return [self.hidden_channels * m for m in mult]


@dataclass
class VQModelConfig(VQArchitecture):
    """Everything `VQModel` is built from (saved in model.json)."""

    in_channels: int = 3
    codebook_decay: float = 0.95
    """EMA decay of the codebook; lower than the usual 0.99 since our runs are short."""
    dead_code_threshold: float = 2.0
    """Codes used fewer times than this (EMA count) are replaced by batch vectors."""

    @classmethod
    def of(cls, architecture: VQArchitecture) -> "VQModelConfig":
        """The model config of an architecture (e.g. the vq stage's config), other fields at their defaults."""
        return cls(**{f.name: getattr(architecture, f.name) for f in fields(VQArchitecture)})


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return x + self.block(x)


class VQModel(nn.Module):
    def __init__(self, cfg: VQModelConfig):
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths()
        # Residual blocks only below full resolution: at full resolution they would cost most of
        # the compute for little gain on small images (the stride-2 convs see every pixel).
        enc = [nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)]
        for wide, narrow in zip(widths[1:], widths):
            enc += [nn.Conv2d(narrow, wide, 4, stride=2, padding=1), ResBlock(wide)]
        enc += [_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], cfg.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)]
        for wide, narrow in reversed(list(zip(widths[1:], widths))):
            dec += [ResBlock(wide), nn.ConvTranspose2d(wide, narrow, 4, stride=2, padding=1)]
        dec += [_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        # Imported here: `pipeline.config` imports this module for `VQArchitecture`, and the
        # quantizer's library takes seconds to import.
        from vector_quantize_pytorch import ResidualVQ, VectorQuantize

        codebook = dict(codebook_size=cfg.codebook_size, decay=cfg.codebook_decay,
                        commitment_weight=cfg.commitment_weight, kmeans_init=True, kmeans_iters=10,
                        threshold_ema_dead_code=cfg.dead_code_threshold)
        # Both are given (B, h*w, C) vectors: ResidualVQ's own image-map path fails (0.6.x).
        self.quantizer = (VectorQuantize(dim=cfg.latent_channels, **codebook) if cfg.num_quantizers == 1 else
                          ResidualVQ(dim=cfg.latent_channels, num_quantizers=cfg.num_quantizers, **codebook))

    def codebooks(self) -> list[nn.Module]:
        """The quantizer's codebooks (`embed`, `initted`), the first quantizer's first."""
        layers = [self.quantizer] if self.cfg.num_quantizers == 1 else list(self.quantizer.layers)
        return [layer._codebook for layer in layers]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> pre-quantization latents (B, C, H/f, W/f)."""
        return self.encoder(images)

    def quantize(self, latents: torch.Tensor):
        """Latents (B, C, h, w) -> (quantized latents, code indices (B, h, w, num_quantizers), commitment loss)."""
        b, c, h, w = latents.shape
        quantized, indices, commit_loss = self.quantizer(latents.flatten(2).transpose(1, 2))  # (B, h*w, C)
        quantized = quantized.transpose(1, 2).reshape(b, c, h, w)
        return quantized, indices.reshape(b, h, w, self.cfg.num_quantizers), commit_loss.sum()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents -> images in about [-1, 1]: quantize, then decode."""
        quantized, _, _ = self.quantize(latents)
        return self.decoder(quantized)

    def forward(self, images: torch.Tensor):
        """Training forward: (reconstruction, code indices, commitment loss)."""
        quantized, indices, commit_loss = self.quantize(self.encode(images))
        return self.decoder(quantized), indices, commit_loss

    def save(self, directory: str | Path, **extra) -> None:
        """Write model.json (constructor args + `extra`, e.g. latent_scale) and model.safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.json").write_text(json.dumps({"config": asdict(self.cfg), **extra}, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))

    @classmethod
    def load(cls, directory: str | Path) -> tuple["VQModel", dict]:
        """Rebuild a saved model; returns (model in eval mode, the extra fields of model.json).

        A first stage saved from a diffusers autoencoder (model.json `kind: diffusers`), or a
        diffusers autoencoder directory itself, loads as a `DiffusersFirstStage`, which answers
        the same calls."""
        from pipeline.models import diffusers_first_stage as dfs

        directory = Path(directory)
        meta_path = directory / "model.json"
        if not meta_path.is_file():
            if (found := dfs.diffusers_dir(directory)) is not None:
                return dfs.DiffusersFirstStage.from_diffusers(found), {}
            raise FileNotFoundError(f"not a VQ model directory (no model.json, nor a diffusers VQModel or "
                                    f"AutoencoderKL config.json): {directory}")
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") == "diffusers":
            return dfs.DiffusersFirstStage.load(directory)
        model = cls(VQModelConfig(**meta.pop("config")))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        # The state dict carries the codebook's `initted` flag, so k-means does not run again.
        return model.eval(), meta


def downsample_of(meta: dict) -> int:
    """How much a saved first stage shrinks each side, from its model.json (ours or `kind: diffusers`)."""
    if meta.get("kind") == "diffusers":
        from pipeline.models.diffusers_first_stage import shape_of

        return shape_of(meta["config"]).downsample
    return int(meta["config"]["downsample"])


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak range 2)."""
    mse = F.mse_loss(reconstruction.clamp(-1, 1), reference).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)
