"""Text conditioning passed to the latent UNet, and the one place the null condition is made.

The encode stage writes, per sample, the CLIP token embeddings of the caption, their padding mask
and the pooled embedding. The training loop and the samplers carry them as one `Conditioning`.
Conditioning dropout for classifier-free guidance replaces a sample's condition by the encoding of
the empty caption (`null`), and only `drop_to_null` does that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """A batch of text conditions.

    tokens: (B, L, D) token embeddings used as cross-attention context.
    mask:   (B, L) bool, True where a token is real (not padding).
    pooled: (B, E) pooled text embedding (CLIP's projected end-of-text feature).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device=None, dtype=None) -> "Conditioning":
        """Move to a device; `dtype` applies to the float tensors only."""
        return Conditioning(
            self.tokens.to(device=device, dtype=dtype),
            self.mask.to(device=device),
            self.pooled.to(device=device, dtype=dtype),
        )

    def expand(self, batch_size: int) -> "Conditioning":
        """Repeat a single condition (batch 1) to `batch_size`."""
        if len(self) != 1:
            raise ValueError(f"expand needs a batch of 1, got {len(self)}")
        return Conditioning(
            self.tokens.expand(batch_size, -1, -1),
            self.mask.expand(batch_size, -1),
            self.pooled.expand(batch_size, -1),
        )

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch dimension."""
        return Conditioning(
            torch.cat([c.tokens for c in items]),
            torch.cat([c.mask for c in items]),
            torch.cat([c.pooled for c in items]),
        )

    def index(self, idx) -> "Conditioning":
        return Conditioning(self.tokens[idx], self.mask[idx], self.pooled[idx])


def drop_to_null(
    cond: Conditioning, null: Conditioning, p_uncond: float, generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> Conditioning:
    """Replace each sample's condition by `null` (batch 1) with probability `p_uncond`: where a
    Uniform(0, 1) draw per sample (`uniform` (B,), else drawn from `generator`) is below it.

    This is the conditioning dropout of classifier-free guidance (Ho & Salimans 2022): the model
    learns the unconditional score on the same weights, so guidance needs no second model.
    """
    if p_uncond <= 0:
        return cond
    batch = len(cond)
    if uniform is None:
        uniform = torch.rand(batch, generator=generator, device="cpu")
    drop = uniform.to(cond.tokens.device) < p_uncond
    null = null.to(cond.tokens.device, cond.tokens.dtype).expand(batch)
    keep_tokens = (~drop)[:, None, None]
    return Conditioning(
        torch.where(keep_tokens, cond.tokens, null.tokens),
        torch.where((~drop)[:, None], cond.mask, null.mask),
        torch.where((~drop)[:, None], cond.pooled, null.pooled),
    )
