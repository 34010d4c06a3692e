"""The conditioned latent UNet: eps_theta(z_t, t, c) (or v_theta) of the [ldm] stage.

The network only: it knows nothing of data, noise schedules or training. It maps a noisy latent
(B, C, H, W), its timesteps (B,) and a `Conditioning` to an output of the latent's shape. Text
enters twice: the token embeddings through cross-attention in the spatial transformer blocks (with
the padding mask), and the pooled embedding, if `pooled_dim > 0`, added to the timestep embedding.
The architecture is LDM's (Rombach et al. 2022): ResNet blocks, spatial transformers, a down path
whose activations are skipped to the up path, and a middle block.

A checkpoint stores `dataclasses.asdict(model.config)`, so `UNet(UNetConfig(**saved))` rebuilds the
model without the training config. Named sizes live in `UNET_PRESETS`.

Shortcuts that leave the function (and the checkpoint layout) unchanged, measured on CPU against
diffusers' UNet2DConditionModel (`pipeline/benchmarks/unet.py`): the text side of a pass (masks,
the context cut after the last real token) is prepared once per forward pass, and by `bind` once
per sampling run together with every cross-attention layer's keys and values; attention projects
q, k, v (or k, v) in one matmul; `Upsample` convolves the un-doubled input (sub-pixel form).
A bound function that keeps being called at the same shapes in eval mode without autograd (a
sampler's steps, a serving replica's batches) runs a TorchScript trace of the network: the same
kernels on the same weights, without the Python between them (`TracedDenoise`).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

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
# A bound UNet traces its network once it has been called this many times with the same input shapes
# (one default 50-step sampling run): tracing costs about as much as 30 calls of the tiny preset, so
# a one-off run stays eager and repeated runs at one shape (serving, evaluation) get the trace.
TRACE_AFTER_CALLS = 50
# Traces kept per UNet, one per input layout; the least recently used goes first.
TRACE_CACHE_SIZE = 8


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


@dataclass
class TextContext:
    """The text condition as the cross-attention layers read it: prepared once per forward pass
    (`UNet.prepare_text`), not once per layer, or once per sampling run (`UNet.bind`)."""

    tokens: torch.Tensor
    """(B, L, D) token embeddings, on the model's device and dtype; L may be cut short (see
    `UNet.prepare_text`)."""

    attn_mask: torch.Tensor | None
    """(B, 1, 1, L) additive mask in the model's dtype, 0 = attend, -inf = padding (converted from
    the bool mask once, not by every attention call); None when every token is attended to."""

    has_keys: torch.Tensor | None
    """(B, 1, 1) in the model's dtype, 0 for rows whose caption has no real token (their
    cross-attention output is zeroed); None when every row has one."""

    pooled_emb: torch.Tensor | None
    """(B, 4 * base_channels) projection of the pooled embedding, added to the timestep embedding;
    None when the UNet has no `pooled_dim`."""

    keys_values: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per cross-attention layer, its keys and values (B, nh, L, hs) when precomputed (`UNet.bind`);
    None: each layer projects `tokens` itself."""

    def flat(self, layers: list[nn.Module]) -> tuple[tuple[bool, ...], list[torch.Tensor]]:
        """A bound context as tensors only (for a trace's inputs): which optional fields are set,
        and the tensors: each layer's keys and values, then the set optional fields."""
        optional = (self.attn_mask, self.has_keys, self.pooled_emb)
        tensors = [kv for layer in layers for kv in self.keys_values[layer]]
        return tuple(v is not None for v in optional), tensors + [v for v in optional if v is not None]

    @staticmethod
    def unflat(present: tuple[bool, ...], tensors: tuple[torch.Tensor, ...], layers: list[nn.Module]) -> "TextContext":
        """The inverse of `flat` (without `tokens`, which a bound context does not read)."""
        count = 2 * len(layers)
        keys_values = {layer: (tensors[2 * i], tensors[2 * i + 1]) for i, layer in enumerate(layers)}
        rest = iter(tensors[count:])
        attn_mask, has_keys, pooled_emb = (next(rest) if p else None for p in present)
        return TextContext(None, attn_mask, has_keys, pooled_emb, keys_values)


class Attention(nn.Module):
    """Multi-head self-attention of x, or cross-attention of x over a `TextContext`."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.fused = True
        """Whether q, k and v (or k and v) are projected as one matmul of the concatenated weights
        (see `UNet.use_fused_paths`)."""
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        # (B, N, parts * C) -> parts x (B, nh, N, hs)
        batch, length, _ = x.shape
        return x.view(batch, length, parts, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def project_context(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, nh, L, hs) of the context tokens (B, L, D)."""
        if not self.fused:
            return self._heads(self.to_k(tokens), 1) + self._heads(self.to_v(tokens), 1)
        # One matmul instead of two: the weights stay separate parameters (the checkpoint layout),
        # concatenated here at the cost of a weight-sized copy.
        return self._heads(F.linear(tokens, torch.cat([self.to_k.weight, self.to_v.weight])), 2)

    def forward(self, x: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        """x (B, T, C); self-attention when `text` is None, else cross-attention. Returns (B, T, C)."""
        batch, length, dim = x.shape
        if text is None and not self.fused:
            q, k, v = (self._heads(proj(x), 1)[0] for proj in (self.to_q, self.to_k, self.to_v))
            attn_mask = has_keys = None
        elif text is None:
            qkv = F.linear(x, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))  # (B, T, 3C)
            q, k, v = self._heads(qkv, 3)  # 3 x (B, nh, T, hs)
            attn_mask = has_keys = None
        else:
            (q,) = self._heads(self.to_q(x), 1)  # (B, nh, T, hs)
            if text.keys_values is not None:
                k, v = text.keys_values[self]
            else:
                k, v = self.project_context(text.tokens)  # 2 x (B, nh, L, hs)
            attn_mask, has_keys = text.attn_mask, text.has_keys
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hs)
        y = self.to_out(y.transpose(1, 2).reshape(batch, length, dim))  # (B, T, C)
        return y if has_keys is None else y * has_keys


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

    def forward(self, x: torch.Tensor, text: TextContext) -> torch.Tensor:
        x = x + self.self_attn(self.norm_self(x))
        x = x + self.cross_attn(self.norm_cross(x), text)
        return x + self.ff(self.norm_ff(x))


class SpatialTransformer(nn.Module):
    """Transformer layers over the H*W positions of a feature map, as a zero-initialised residual."""

    def __init__(self, channels: int, context_dim: int, num_heads: int, depth: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # LDM's SpatialTransformer value
        self.proj_in = nn.Linear(channels, channels)
        self.layers = nn.ModuleList(TransformerLayer(channels, context_dim, num_heads) for _ in range(depth))
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, text: TextContext) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        h = self.proj_in(h)
        for layer in self.layers:
            h = layer(h, text)
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

    def forward(self, x, emb, text):
        x = self.res(x, emb)
        return self.attn(x, text) if self.attn is not None else x


class MiddleBlock(nn.Module):
    """ResBlock, SpatialTransformer, ResBlock at the lowest resolution."""

    def __init__(self, channels: int, emb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.res1 = ResBlock(channels, channels, emb_dim, cfg.dropout, cfg.norm_groups)
        self.attn = SpatialTransformer(channels, cfg.context_dim, cfg.num_heads, cfg.transformer_depth, cfg.norm_groups)
        self.res2 = ResBlock(channels, channels, emb_dim, cfg.dropout, cfg.norm_groups)

    def forward(self, x, emb, text):
        return self.res2(self.attn(self.res1(x, emb), text), emb)


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 conv (exact for even sides)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# Which 3x3 taps read which pixel of the un-doubled input: after nearest-neighbour doubling, output
# row 2i + phase sees input rows (i - 1, i) through taps (0, 1 + 2) for phase 0, and rows (i, i + 1)
# through taps (0 + 1, 2) for phase 1; the same holds for columns. (phase, 2 rows read, 3 taps)
UPSAMPLE_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))
# Below this input side the sub-pixel form's (H + 1)^2 / H^2 border and small 2x2 convs cost more
# than its 16/36 of the FLOPs saves (measured on CPU: slower at 4x4, faster from 8x8).
SUBPIXEL_MIN_SIDE = 8


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.fused = True
        """Whether the upsampling runs as one sub-pixel conv of the conv's weight (see `UNet.use_fused_paths`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < SUBPIXEL_MIN_SIDE or not self.fused:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self._subpixel(x)

    def _subpixel(self, x: torch.Tensor) -> torch.Tensor:
        """The same function without building the doubled input: each of the four output phases
        is a 2x2 conv of x whose taps are sums of the 3x3 taps (16 multiply-adds per output pixel
        instead of 36), all four run as one conv with 4x the output channels."""
        batch, channels, height, width = x.shape
        weight = self.conv.weight  # (O, I, 3, 3)
        out_channels = weight.shape[0]
        taps = torch.tensor(UPSAMPLE_PHASE_TAPS, dtype=weight.dtype, device=weight.device)  # (2, 2, 3)
        # (O, row phase, col phase, I, 2, 2): phase kernels over the input rows/cols each phase reads
        phase_weight = torch.einsum("akr,bls,oirs->oabikl", taps, taps, weight).reshape(4 * out_channels, channels, 2, 2)
        bias = self.conv.bias.repeat_interleave(4)
        # Padded by one, output (i, j) of the 2x2 conv reads input rows/cols (i - 1, i), (j - 1, j).
        out = F.conv2d(x, phase_weight, bias, padding=1).view(batch, out_channels, 2, 2, height + 1, width + 1)
        # Phase (a, b) of output pixel (i, j) lands at (2i + a, 2j + b) and is read at (i + a, j + b).
        rows = [
            torch.stack([out[:, :, a, b, a : a + height, b : b + width] for b in (0, 1)], dim=-1)  # (B, O, H, W, 2)
            for a in (0, 1)
        ]
        return torch.stack(rows, dim=3).reshape(batch, out_channels, 2 * height, 2 * width)  # (B, O, H, 2, W, 2) -> (B, O, 2H, 2W)


class TracedDenoise(nn.Module):
    """`UNet._denoise` over a bound text context, as a module of tensor inputs only: what
    `torch.jit.trace` records. The trace holds the UNet's own parameters (not copies), so it computes
    with whatever weights the UNet has when it is called."""

    def __init__(self, unet: "UNet", present: tuple[bool, ...], layers: list[nn.Module]):
        super().__init__()
        self.unet = unet
        self.present = present
        self.layers = layers  # a plain list: these modules are the UNet's, registered there

    def forward(self, x: torch.Tensor, t: torch.Tensor, *text: torch.Tensor) -> torch.Tensor:
        return self.unet._denoise(x, t, TextContext.unflat(self.present, text, self.layers))


UNTRACEABLE = object()
"""`TraceCache`'s entry for a layout whose tracing failed: it stays eager."""


def _layout(tensors) -> tuple:
    """What a trace is specific to: each tensor's shape, dtype and device."""
    return tuple((v.shape, v.dtype, v.device) for v in tensors)


class TraceCache:
    """A UNet's traces of `TracedDenoise`, one per input layout (shapes, dtypes, devices, which
    optional text fields are set), made at the first call after a layout's `after_calls` eager ones.

    A trace replays the kernels its example inputs ran, so a layout is only ever served by its own
    trace. If tracing fails, the layout stays eager (with one warning).

    Why `torch.jit.trace`, which torch 2.14 marks deprecated: it is the one of torch's graph
    capturers that both gives bitwise the eager outputs (serving's promise) and runs faster than
    eager here. On the sampler benchmark's bound UNet (1 thread, 2026-12-02), per call: eager
    9.4-11.1 ms, jit trace 6.7-8.9 ms (capture 0.2 s), `torch.compile(backend="eager")` 9.1 ms
    and not bitwise (SDPA kernel choice; capture 1.9 s), `torch.export(...).module()` 10.2-10.7 ms
    (capture 2.5 s), `make_fx` 10.2 ms, inductor 8.3 ms after a 58 s compile. Should a torch drop
    `torch.jit`, `_trace` fails, and every layout stays eager: slower, never wrong."""

    def __init__(self, after_calls: int | None = TRACE_AFTER_CALLS, size: int = TRACE_CACHE_SIZE):
        self.after_calls = after_calls
        """Eager calls of one layout before it is traced; None never traces."""
        self.size = size
        self.calls: Counter = Counter()
        self.traces: OrderedDict = OrderedDict()

    def __call__(self, unet: "UNet", x: torch.Tensor, t: torch.Tensor, text: TextContext, layers: list[nn.Module],
                 flat: tuple[tuple[bool, ...], list[torch.Tensor], tuple]):
        """`unet._denoise(x, t, text)`, traced once its layout has been seen `after_calls` times.
        `flat` is `text.flat(layers)` and the text tensors' layout, made once per bound condition."""
        present, tensors, text_layout = flat
        key = (present, text_layout, _layout((x, t)))
        trace = self.traces.get(key)
        if trace is None:
            self.calls[key] += 1
            if self.after_calls is None or self.calls[key] <= self.after_calls:
                return unet._denoise(x, t, text)
            trace = self._trace(TracedDenoise(unet, present, layers), (x, t, *tensors))
            if len(self.calls) > 16 * self.size:  # many layouts seen once: forget the counts
                self.calls.clear()
            self.traces[key] = trace
            while len(self.traces) > self.size:
                self.traces.popitem(last=False)
        self.traces.move_to_end(key)
        if trace is UNTRACEABLE:
            return unet._denoise(x, t, text)
        return trace(x, t, *tensors)

    @staticmethod
    def _trace(module: TracedDenoise, inputs: tuple[torch.Tensor, ...]):
        try:
            with warnings.catch_warnings():
                # The trace is only replayed on the layout it was made with (the cache key), which
                # is what TracerWarnings warn about; torch 2.14 also flags torch.jit as deprecated.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
                return torch.jit.trace(module, inputs, check_trace=False)
        except Exception as exc:  # noqa: BLE001 - any tracer failure leaves the eager path, which works
            warnings.warn(f"UNet: tracing the bound network failed, staying eager at this shape: {exc}", RuntimeWarning)
            return UNTRACEABLE


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
        self.traces = TraceCache()
        """Traces of the network that bound functions use (see `bind`); `traces.after_calls = None`
        keeps every call eager."""
        self.fused = True

    def use_fused_paths(self, enabled: bool) -> "UNet":
        """Turn the fast paths that read a child module's weights outside its own call on or off:
        the fused q/k/v projections, the sub-pixel upsampling and the traces. Off is for wrappers
        that make a parameter whole only while its owning module runs (DeepSpeed ZeRO-3 gathers
        partitioned parameters in the module's forward hooks). The function is the same either way."""
        for module in self.modules():
            if isinstance(module, (Attention, Upsample, UNet)):
                module.fused = enabled
        return self

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickling) start without traces: a trace holds the original's parameters.
        state = dict(self.__dict__)
        state["traces"] = TraceCache(self.traces.after_calls, self.traces.size)
        return state

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x (B, C, H, W) noisy latents, t (B,) timesteps, cond a batch-B Conditioning -> (B, C, H, W)."""
        self._check_condition(cond)
        self._check_inputs(x, t, len(cond))
        return self._denoise(x, t, self.prepare_text(cond, x.device, x.dtype))

    def bind(self, cond: Conditioning, fixed_text: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """`lambda x, t: self(x, t, cond)`, with the work that depends on the text alone done once.

        Samplers call the network with one condition at every step: the bound function projects the
        tokens to every cross-attention layer's keys and values, builds the masks and projects the
        pooled embedding here, and each call runs only what depends on (x, t). For inference: the
        precomputed tensors do not follow later changes of the weights.

        In eval mode without autograd, calls go through `self.traces`: after `TRACE_AFTER_CALLS`
        eager calls at one input layout, later calls at that layout (in this or later bound
        functions) run its TorchScript trace, which gives the same result.

        `fixed_text` skips `prepare_text`'s batch-wide shortcuts, so that a row's output depends on
        its own condition only (serving's fixed-shape batches).
        """
        self._check_condition(cond)
        weight = self.conv_in.weight
        text = self.prepare_text(cond, weight.device, weight.dtype, fixed_text)
        layers = self._cross_attention_layers()
        text.keys_values = {layer: layer.project_context(text.tokens) for layer in layers}
        present, tensors = text.flat(layers)
        flat = (present, tensors, _layout(tensors))
        batch = len(cond)

        def bound(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self._check_inputs(x, t, batch)
            if self.training or torch.is_grad_enabled() or not self.fused:
                return self._denoise(x, t, text)
            return self.traces(self, x, t, text, layers, flat)

        return bound

    def prepare_text(self, cond: Conditioning, device: torch.device, dtype: torch.dtype,
                     fixed_text: bool = False) -> TextContext:
        """The text side of a forward pass, shared by all its cross-attention layers.

        When the mask is on the CPU (reading it costs no device sync), the tokens are cut after the
        last position that is real in some row: later positions are padding in every row, masked
        out, and would only cost time. For the same reason the mask is dropped when every kept
        token is real, and the zeroing of rows without any real token when there are none. These
        shortcuts are decided by the whole batch and change the attention's shapes and kernels (so
        the last bits of every row); `fixed_text` skips them: full length, mask always applied.
        """
        tokens, mask = cond.tokens, cond.mask.bool()  # (B, L, D), (B, L)
        every_row_has_keys = every_token_real = False
        if mask.device.type == "cpu" and not fixed_text:
            real_positions = mask.any(dim=0).nonzero()
            length = int(real_positions[-1]) + 1 if len(real_positions) else 1
            tokens, mask = tokens[:, :length], mask[:, :length]
            every_row_has_keys = bool(mask.any(dim=1).all())
            every_token_real = every_row_has_keys and bool(mask.all())
        mask = mask.to(device)
        attn_mask = has_keys = None
        if not every_token_real:
            attend = mask
            if not every_row_has_keys:
                # A row with no real token would softmax over nothing (NaN). Let it attend to its
                # padding, then zero its output: a context without tokens contributes nothing.
                row_has_keys = mask.any(dim=1)  # (B,)
                attend = mask | ~row_has_keys[:, None]
                has_keys = row_has_keys[:, None, None].to(dtype)  # (B, 1, 1)
            attn_mask = torch.zeros(attend.shape, device=device, dtype=dtype).masked_fill_(~attend, float("-inf"))
            attn_mask = attn_mask[:, None, None, :]  # (B, 1, 1, L)
        pooled_emb = None
        if self.pooled_proj is not None:
            pooled_emb = self.pooled_proj(cond.pooled.to(device=device, dtype=dtype))  # (B, 4*base)
        return TextContext(tokens.to(device=device, dtype=dtype), attn_mask, has_keys, pooled_emb)

    def _cross_attention_layers(self) -> list[Attention]:
        return [module.cross_attn for module in self.modules() if isinstance(module, TransformerLayer)]

    def _check_condition(self, cond: Conditioning) -> None:
        if cond.tokens.shape[-1] != self.config.context_dim:
            raise ValueError(
                f"cond.tokens has width {cond.tokens.shape[-1]}, the UNet expects context_dim={self.config.context_dim}"
            )

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, cond_batch: int) -> None:
        cfg = self.config
        batch, channels, height, width = x.shape
        factor = cfg.downsample_factor
        if channels != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} latent channels, got {channels}")
        if height % factor or width % factor:
            raise ValueError(f"latent size {height}x{width} must be a multiple of {factor} for this UNet")
        if cond_batch != batch or t.shape != (batch,):
            raise ValueError(f"x has batch {batch} but t has shape {tuple(t.shape)} and cond batch {cond_batch}")

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, text: TextContext) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(x.dtype))  # (B, 4*base)
        if text.pooled_emb is not None:
            emb = emb + text.pooled_emb
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else self._run(block, h, emb, text)
            skips.append(h)
        h = self._run(self.middle, h, emb, text)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, text)  # (B, C_h + C_skip, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))
