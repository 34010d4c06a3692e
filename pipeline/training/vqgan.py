"""The VQGAN objective of the vq stage (`vq.loss=vqgan`; Esser et al. 2021, the LDM paper's first stage).

On top of the plain loss (pixel MSE + commitment):

- a **patch discriminator** (pix2pix's PatchGAN: strided 4x4 convolutions, one logit per patch)
  trained with the **hinge loss**, and the generator's adversarial term -mean(D(x̂)), switched on
  after `vq.disc_start` steps (the warm-up: first learn to reconstruct at all);
- its weight **adapted** as in taming-transformers: ||∇ rec|| / ||∇ adv|| at the decoder's last
  layer, times `vq.disc_weight`, so the adversarial gradient never swamps the reconstruction's;
- a **perceptual term** without downloaded weights (no LPIPS here): the L1 distance between the
  discriminator's own intermediate features of the image and of its reconstruction (feature
  matching, pix2pixHD), weighted by `vq.perceptual_weight` and normalised per layer. Before the
  warm-up ends the discriminator is a fixed random network, whose features still compare local
  structure rather than single pixels.

The discriminator is training-only: the saved first stage is the VQ model alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class VQLoss:
    """The vq stage's objective (fields of `pipeline.config.training.VQConfig`)."""

    loss: str = "mse"
    """'mse': pixel MSE + commitment (the plain VQ-VAE); 'vqgan': plus the patch discriminator and
    its feature-matching perceptual term (this module)."""
    disc_start: int = 400
    """vqgan: steps of reconstruction-only warm-up before the adversarial terms start."""
    disc_weight: float = 0.1
    """vqgan: scale of the adaptive adversarial weight."""
    perceptual_weight: float = 1.0
    """vqgan: weight of the discriminator feature-matching term (0: none)."""
    disc_channels: int = 32
    """vqgan: width of the discriminator's first layer (doubled per layer)."""
    disc_layers: int = 2
    """vqgan: strided layers of the discriminator (its patch: 16 px at 2, 34 px at 3)."""

    def __post_init__(self):
        if self.loss not in ("mse", "vqgan"):
            raise ValueError(f"loss must be 'mse' or 'vqgan', got {self.loss!r}")
        for name in ("disc_start", "disc_channels", "disc_layers"):
            if getattr(self, name) < (0 if name == "disc_start" else 1):
                raise ValueError(f"{name} must be {'>= 0' if name == 'disc_start' else '>= 1'}, "
                                 f"got {getattr(self, name)}")
        if self.disc_weight < 0 or self.perceptual_weight < 0:
            raise ValueError(f"disc_weight and perceptual_weight must be >= 0, got {self.disc_weight}, "
                             f"{self.perceptual_weight}")


class PatchDiscriminator(nn.Module):
    """PatchGAN: `layers` stride-2 4x4 convolutions (GroupNorm, LeakyReLU 0.2), then two stride-1
    ones down to one logit per patch. `features(x)` also returns every block's activation."""

    def __init__(self, channels: int = 32, layers: int = 2, in_channels: int = 3):
        super().__init__()
        blocks, width = [nn.Sequential(nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2))], channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            blocks.append(nn.Sequential(nn.Conv2d(width, out, 4, stride, 1), nn.GroupNorm(min(32, out // 4), out),
                                        nn.LeakyReLU(0.2)))
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(width, 1, 4, 1, 1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return self.head(x), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def feature_matching(real_feats: list[torch.Tensor], fake_feats: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the L1 distance between features, each layer scaled by its real features'
    mean magnitude (so no layer dominates by its scale alone)."""
    terms = [(f - r.detach()).abs().mean() / (r.detach().abs().mean() + 1e-6) for r, f in zip(real_feats, fake_feats)]
    return torch.stack(terms).mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """taming-transformers' weight: ||d rec / d W|| / ||d adv / d W|| at the last layer W, clamped."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (adv_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * scale


class VQGANObjective:
    """The generator's loss and the discriminator's step, one batch at a time."""

    def __init__(self, cfg: VQLoss, device: torch.device, lr: float, wrap=lambda m: m):
        self.cfg = cfg
        self.core = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers).to(device)
        self.disc = wrap(self.core)  # DistributedDataParallel on several workers: its step all-reduces
        self.optimizer = torch.optim.Adam(self.disc.parameters(), lr=lr, betas=(0.5, 0.9))
        self.step = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def adversarial(self) -> bool:
        return self.step >= self.cfg.disc_start

    def generator_loss(self, images: torch.Tensor, recon: torch.Tensor, rec_loss: torch.Tensor,
                       last_layer: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """rec_loss (the plain loss) + perceptual + (after the warm-up) the adaptively weighted
        adversarial term; returns it and its parts' metrics.
        The discriminator runs unwrapped here: its gradients from this pass are discarded."""
        nll, metrics = rec_loss, {}
        self._pending = (images.detach(), recon.detach())
        adversarial = self.adversarial and self.cfg.disc_weight > 0
        if not (adversarial or self.cfg.perceptual_weight):
            return nll, metrics  # neither term is on yet: no discriminator pass at all
        fake_logits, fake_feats = self.core.features(recon)
        if self.cfg.perceptual_weight:
            with torch.no_grad():  # the real images' features: only the perceptual term reads them
                _, real_feats = self.core.features(images)
            perceptual = feature_matching(real_feats, fake_feats)
            nll = nll + self.cfg.perceptual_weight * perceptual
            metrics["perceptual_loss"] = perceptual.item()
        loss = nll
        if adversarial:
            g_loss = -fake_logits.mean()
            weight = adaptive_weight(nll, g_loss, last_layer, self.cfg.disc_weight)
            loss = loss + weight * g_loss
            metrics |= {"g_loss": g_loss.item(), "adv_weight": weight.item()}
        return loss, metrics

    def discriminator_step(self) -> dict[str, float]:
        """After the generator's step: one hinge-loss step of the discriminator on the same batch."""
        images, recon = self._pending
        self._pending = None
        adversarial, self.step = self.adversarial, self.step + 1
        if not adversarial:
            return {}
        self.optimizer.zero_grad(set_to_none=True)
        # One forward over both halves (GroupNorm is per sample): DDP expects one forward per backward.
        real_logits, fake_logits = self.disc(torch.cat([images, recon])).chunk(2)
        d_loss = hinge_d_loss(real_logits, fake_logits)
        d_loss.backward()
        self.optimizer.step()
        return {"d_loss": d_loss.item()}
