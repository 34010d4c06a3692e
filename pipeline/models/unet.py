"""The conditioned latent UNet: eps_theta(z_t, t, c) (or v_theta) of the [ldm] stage.

The network only: it knows nothing of data, noise schedules or training. It maps a noisy latent
(B, C, H, W), its timesteps (B,) and a `Conditioning` to an output of the latent's shape. Text
enters twice: the token embeddings through cross-attention in the spatial transformer blocks (with
the padding mask), and the pooled embedding, if `pooled_dim > 0`, added to the timestep embedding.
The architecture is LDM's (Rombach et al. 2022): ResNet blocks, spatial transformers, a down path
whose activations are skipped to the up path, and a middle block.

A checkpoint stores `dataclasses.asdict(model.config)`, so `UNet(UNetConfig(**saved))` rebuilds the
model without the training config. Named sizes live in `UNET_PRESETS`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.conditioning import Conditioning

# The Transformer / DDPM choice of the longest sinusoid period for the timestep embedding.
TIMESTEP_MAX_PERIOD = 10_000
# Width of the timestep embedding relative to base_channels (DDPM, LDM and SD all use 4).
TIME_EMBED_MULT = 4
# Hidden width of the transformer feed-forward relative to the channels (Vaswani et al.; SD uses 4).
FF_MULT = 4


@dataclass
class UNetConfig:
    """The UNet's architecture; everything needed to rebuild it from a checkpoint."""

    in_channels: int = 4
    """Latent channels in and out (the first stage's latent channels)."""

    base_channels: int = 32
    """Channels at the first resolution level; level i has base_channels * channel_mult[i]."""

    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    """Channel multiplier per resolution level; each level after the first halves H and W, so
    latent sides must be multiples of 2 ** (len(channel_mult) - 1)."""

    num_res_blocks: int = 1
    """ResNet blocks per level on the down path (the up path has one more, for the extra skip)."""

    attention_levels: list[int] = field(default_factory=lambda: [1, 2])
    """Indices of the levels whose ResNet blocks are followed by a spatial transformer (the middle
    block always has one). Attention at full resolution costs (H*W)^2."""

    num_heads: int = 4
    """Attention heads; must divide the channels of every level with attention."""

    context_dim: int = 64
    """Width D of the text token embeddings `cond.tokens` (B, L, D); set to the text encoder's."""

    pooled_dim: int = 0
    """Width E of `cond.pooled` (B, E), projected and added to the timestep embedding; 0 ignores it."""

    dropout: float = 0.0
    """Dropout probability inside the ResNet blocks."""

    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass (less memory, ~30% more compute)."""

    transformer_depth: int = 1
    """Transformer layers per spatial transformer block (SD 1.x: 1)."""

    norm_groups: int = 32
    """GroupNorm groups (32 as in DDPM/LDM); must divide the channels of every level."""

    def __post_init__(self):
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("in_channels", "base_channels", "num_res_blocks", "num_heads", "context_dim",
                     "transformer_depth", "norm_groups"):
            positive_int(name)
        if not isinstance(self.pooled_dim, int) or self.pooled_dim < 0:
            raise ValueError(f"pooled_dim must be an int >= 0 (0 = unused), got {self.pooled_dim!r}")
        if self.base_channels % 2:
            raise ValueError(f"base_channels must be even (it is the sinusoidal embedding width), got {self.base_channels}")
        self.channel_mult = list(self.channel_mult)
        self.attention_levels = list(self.attention_levels)
        if not self.channel_mult or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {self.channel_mult!r}")
        levels = len(self.channel_mult)
        if any(not isinstance(i, int) or not 0 <= i < levels for i in self.attention_levels):
            raise ValueError(f"attention_levels must be level indices in [0, {levels - 1}], got {self.attention_levels!r}")
        if len(set(self.attention_levels)) != len(self.attention_levels):
            raise ValueError(f"attention_levels has duplicates: {self.attention_levels!r}")
        for level, mult in enumerate(self.channel_mult):
            channels = self.base_channels * mult
            if channels % self.norm_groups:
                raise ValueError(f"norm_groups ({self.norm_groups}) must divide the {channels} channels of level {level}")
            # The middle block, at the last level, always has attention.
            if (level in self.attention_levels or level == levels - 1) and channels % self.num_heads:
                raise ValueError(f"num_heads ({self.num_heads}) must divide the {channels} channels of level {level}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def downsample_factor(self) -> int:
        """How much the UNet shrinks H and W; latent sides must be multiples of it."""
        return 2 ** (len(self.channel_mult) - 1)


UNET_PRESETS: dict[str, UNetConfig] = {
    # CPU demo: about 1M parameters, for 4x8x8 to 4x16x16 latents. Two levels with cross-attention at
    # the lower one and in the middle: 1.4x the training throughput of three levels on a CPU core.
    "tiny": UNetConfig(base_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                       num_heads=4, context_dim=64, norm_groups=8),
    # A single-GPU model: about 45M parameters, for 32x32 latents.
    "medium": UNetConfig(base_channels=96, channel_mult=[1, 2, 2, 4], num_res_blocks=1, attention_levels=[1, 2, 3],
                         num_heads=8, context_dim=512, norm_groups=32),
    # Stable Diffusion 1.5's UNet shape (859.5M parameters, as diffusers' SD 1.5 UNet), for 64x64 latents.
    "sd": UNetConfig(base_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_levels=[0, 1, 2],
                     num_heads=8, context_dim=768, norm_groups=32),
}


def unet_config(preset: str, **overrides) -> UNetConfig:
    """The config of a named preset with some fields overridden (e.g. `context_dim=512`)."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; known presets: {sorted(UNET_PRESETS)}")
    known = {f.name for f in fields(UNetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown UNet config keys {unknown}; known: {sorted(known)}")
    return UNetConfig(**{**asdict(UNET_PRESETS[preset]), **overrides})


def build_unet(preset: str, **overrides) -> "UNet":
    """A freshly initialised UNet of a named preset, e.g. `build_unet("tiny", context_dim=32)`."""
    return UNet(unet_config(preset, **overrides))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of (possibly fractional) timesteps, cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(TIMESTEP_MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so the residual branch it ends starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the (time + pooled text) embedding added in between."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast over H, W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention of queries x over a context (x itself for self-attention)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C), context (B, L, D), mask (B, L) bool True = attend. Returns (B, T, C)."""
        batch, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.to_q(x).view(batch, length, heads, head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.to_k(context).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, nh, L, hs)
        v = self.to_v(context).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, nh, L, hs)
        attn_mask = None
        has_keys = None
        if mask is not None:
            # A row with no real token would softmax over nothing (NaN). Let it attend to its
            # padding, then zero its output: a context without tokens contributes nothing.
            has_keys = mask.any(dim=1)  # (B,)
            attn_mask = (mask | ~has_keys[:, None])[:, None, None, :]  # (B, 1, 1, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hs)
        y = self.to_out(y.transpose(1, 2).reshape(batch, length, dim))  # (B, T, C)
        if has_keys is not None:
            y = y * has_keys[:, None, None].to(y.dtype)
        return y


class GEGLU(nn.Module):
    """Gated-GELU feed-forward (Shazeer 2020), as in LDM's transformer blocks."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, hidden * 2)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(value * F.gelu(gate))


class TransformerLayer(nn.Module):
    """Pre-norm self-attention, cross-attention over the text tokens, and feed-forward."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, dim, num_heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, context_dim, num_heads)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = GEGLU(dim, FF_MULT * dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm_cross(x), context, mask)
        return x + self.ff(self.norm_ff(x))


class SpatialTransformer(nn.Module):
    """Transformer layers over the H*W positions of a feature map, as a zero-initialised residual."""

    def __init__(self, channels: int, context_dim: int, num_heads: int, depth: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # LDM's SpatialTransformer value
        self.proj_in = nn.Linear(channels, channels)
        self.layers = nn.ModuleList(TransformerLayer(channels, context_dim, num_heads) for _ in range(depth))
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        h = self.proj_in(h)
        for layer in self.layers:
            h = layer(h, context, mask)
        h = self.proj_out(h).transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        return x + h


class ResAttnBlock(nn.Module):
    """A ResBlock, optionally followed by a SpatialTransformer: one unit of the down or up path."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, cfg: UNetConfig, attention: bool):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, emb_dim, cfg.dropout, cfg.norm_groups)
        self.attn = (
            SpatialTransformer(out_channels, cfg.context_dim, cfg.num_heads, cfg.transformer_depth, cfg.norm_groups)
            if attention
            else None
        )

    def forward(self, x, emb, context, mask):
        x = self.res(x, emb)
        return self.attn(x, context, mask) if self.attn is not None else x


class MiddleBlock(nn.Module):
    """ResBlock, SpatialTransformer, ResBlock at the lowest resolution."""

    def __init__(self, channels: int, emb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.res1 = ResBlock(channels, channels, emb_dim, cfg.dropout, cfg.norm_groups)
        self.attn = SpatialTransformer(channels, cfg.context_dim, cfg.num_heads, cfg.transformer_depth, cfg.norm_groups)
        self.res2 = ResBlock(channels, channels, emb_dim, cfg.dropout, cfg.norm_groups)

    def forward(self, x, emb, context, mask):
        return self.res2(self.attn(self.res1(x, emb), context, mask), emb)


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 conv (exact for even sides)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The conditioned latent UNet; `forward(x, t, cond)` returns a tensor shaped like x."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        emb_dim = TIME_EMBED_MULT * cfg.base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.pooled_proj = nn.Linear(cfg.pooled_dim, emb_dim) if cfg.pooled_dim > 0 else None
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)

        # Down path: remember each output's channels, the up path consumes them as skips in reverse.
        channels = cfg.base_channels
        skip_channels = [channels]
        last_level = len(cfg.channel_mult) - 1
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out = cfg.base_channels * mult
                self.down.append(ResAttnBlock(channels, out, emb_dim, cfg, level in cfg.attention_levels))
                channels = out
                skip_channels.append(channels)
            if level != last_level:
                self.down.append(Downsample(channels))
                skip_channels.append(channels)

        self.middle = MiddleBlock(channels, emb_dim, cfg)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                out = cfg.base_channels * mult
                in_channels = channels + skip_channels.pop()
                self.up.append(ResAttnBlock(in_channels, out, emb_dim, cfg, level in cfg.attention_levels))
                channels = out
            if level != 0:
                self.up.append(Upsample(channels))

        self.norm_out = nn.GroupNorm(cfg.norm_groups, channels)
        # Zero output: the untrained model predicts 0 (the mean of eps and of v), a stable start.
        self.conv_out = zero_init(nn.Conv2d(channels, cfg.in_channels, 3, padding=1))

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x (B, C, H, W) noisy latents, t (B,) timesteps, cond a batch-B Conditioning -> (B, C, H, W)."""
        cfg = self.config
        batch, channels, height, width = x.shape
        factor = cfg.downsample_factor
        if channels != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} latent channels, got {channels}")
        if height % factor or width % factor:
            raise ValueError(f"latent size {height}x{width} must be a multiple of {factor} for this UNet")
        if cond.tokens.shape[-1] != cfg.context_dim:
            raise ValueError(f"cond.tokens has width {cond.tokens.shape[-1]}, the UNet expects context_dim={cfg.context_dim}")
        if len(cond) != batch or t.shape != (batch,):
            raise ValueError(f"x has batch {batch} but t has shape {tuple(t.shape)} and cond batch {len(cond)}")

        emb = self.time_embed(timestep_embedding(t, cfg.base_channels).to(x.dtype))  # (B, 4*base)
        if self.pooled_proj is not None:
            emb = emb + self.pooled_proj(cond.pooled.to(device=x.device, dtype=x.dtype))
        context = cond.tokens.to(device=x.device, dtype=x.dtype)  # (B, L, D)
        mask = cond.mask.to(device=x.device, dtype=torch.bool)  # (B, L)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else self._run(block, h, emb, context, mask)
            skips.append(h)
        h = self._run(self.middle, h, emb, context, mask)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, mask)  # (B, C_h + C_skip, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))
