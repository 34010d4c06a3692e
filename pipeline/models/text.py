"""The CLIP text encoder: captions -> `Conditioning` (token embeddings, mask, pooled embedding).

Used by the encode stage (offline, once per caption) and by the sampler (prompts). The model is an
open_clip CLIP: either this project's tiny config, trained contrastively by the clip stage, or any
open_clip model name with a pretrained tag or a local checkpoint file. A saved encoder is a
directory with `model.json` (how to rebuild it) and `model.safetensors`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from pipeline.conditioning import Conditioning

# open_clip's BPE tokenizer pads with 0; every real sequence starts with <start_of_text>.
PAD_TOKEN_ID = 0
# CLIP's own normalisation constants (OpenAI CLIP), used for the tiny model too.
IMAGE_MEAN = open_clip.OPENAI_DATASET_MEAN
IMAGE_STD = open_clip.OPENAI_DATASET_STD


# clip.context_length=0 sizes the tiny model's context from its training captions: the token count
# that holds this fraction of them, within these bounds (77 is CLIP's own context).
AUTO_CONTEXT_QUANTILE = 0.99
AUTO_CONTEXT_MIN = 16
AUTO_CONTEXT_MAX = 77


def auto_context_length(counts: list[int]) -> int:
    """The text context for captions of these token counts (see AUTO_CONTEXT_QUANTILE)."""
    if not counts:
        return AUTO_CONTEXT_MIN
    ordered = sorted(counts)
    covered = ordered[min(len(ordered) - 1, math.ceil(AUTO_CONTEXT_QUANTILE * len(ordered)) - 1)]
    return max(AUTO_CONTEXT_MIN, min(AUTO_CONTEXT_MAX, covered))


@dataclass
class TinyClipConfig:
    """A small CLIP for CPU training; sizes follow open_clip's CLIPVisionCfg/CLIPTextCfg."""

    image_size: int = 32
    """The side of the square images the vision tower sees (the pipeline's `data.image_size`)."""
    patch_size: int = 4
    context_length: int = 16
    width: int = 128
    layers: int = 2
    embed_dim: int = 128

    def build(self) -> open_clip.CLIP:
        heads = max(1, self.width // 64)
        return open_clip.CLIP(
            embed_dim=self.embed_dim,
            vision_cfg={
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.width,
                "layers": self.layers,
                "head_width": self.width // heads,
            },
            text_cfg={
                "context_length": self.context_length,
                "width": self.width,
                "heads": heads,
                "layers": self.layers,
            },
        )


class TextEncoder(torch.nn.Module):
    """An open_clip model's text tower plus its tokenizer."""

    def __init__(self, clip_model, tokenizer, spec: dict):
        super().__init__()
        self.clip = clip_model
        self.tokenizer = tokenizer
        self.spec = spec  # how to rebuild: {"kind": "tiny", "config": {...}} or {"kind": "open_clip", ...}

    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    @property
    def token_dim(self) -> int:
        return int(self.clip.token_embedding.embedding_dim)

    @property
    def pooled_dim(self) -> int:
        proj = self.clip.text_projection
        return int(proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1])

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions -> token ids (B, context_length); longer captions are truncated."""
        return self.tokenizer(list(captions), context_length=self.context_length)

    def token_counts(self, captions: list[str]) -> list[int]:
        """Tokens per caption before truncation, start and end tokens included.

        Exact for open_clip's BPE tokenizer (the tiny model's and most CLIPs'); with another
        tokenizer the count is capped at `context_length + 1`, which still tells a cut caption.
        """
        return token_counts(self.tokenizer, captions, self.context_length + 1)

    def truncated(self, captions: list[str]) -> list[bool]:
        """Whether each caption has more tokens than the context holds (its tail is cut)."""
        return [n > self.context_length for n in self.token_counts(captions)]

    def encode_tokens(self, text: torch.Tensor) -> Conditioning:
        """Token ids -> Conditioning. Tokens are the final layer's (after ln_final) features."""
        clip = self.clip
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(text).to(cast_dtype)  # (B, L, D)
        x = x + clip.positional_embedding.to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        tokens = clip.ln_final(x)  # (B, L, D)
        pooled = open_clip.transformer.text_global_pool(
            tokens, text, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None)
        )
        proj = clip.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return Conditioning(tokens=tokens, mask=text != PAD_TOKEN_ID, pooled=pooled)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> Conditioning:
        """Captions -> Conditioning, in inference mode."""
        return self.encode_tokens(self.tokenize(captions))

    def null(self) -> Conditioning:
        """The null condition of classifier-free guidance: the encoding of the empty caption."""
        return self.encode([""])

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.json").write_text(json.dumps(self.spec, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.clip.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))

    @classmethod
    def load(cls, directory: str | Path) -> "TextEncoder":
        directory = Path(directory)
        meta_path = directory / "model.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"not a text encoder directory (no model.json): {directory}")
        spec = json.loads(meta_path.read_text())
        encoder = build_text_encoder(spec, pretrained=None)
        encoder.clip.load_state_dict(load_file(str(directory / "model.safetensors")))
        return encoder.eval()


def token_counts(tokenizer, captions: list[str], cap: int) -> list[int]:
    """Tokens per caption before truncation (start and end included); see `TextEncoder.token_counts`."""
    if isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        return [len(tokenizer.encode(caption)) + 2 for caption in captions]
    return [int(n) for n in (tokenizer(list(captions), context_length=cap) != PAD_TOKEN_ID).sum(dim=1)]


def truncation(counts: list[int], context_length: int, stage: str = "clip") -> dict[str, float]:
    """`captions_truncated`, the fraction of captions (of these token counts) longer than the
    context; says so when there are any, naming the key that sets the context."""
    cut = sum(n > context_length for n in counts)
    if cut:
        print(f"[{stage}] {cut} of {len(counts)} captions have more than {context_length} tokens and lose their "
              f"tails; clip.context_length sets the tiny model's context (0: sized from the captions)", flush=True)
    return {"captions_truncated": cut / len(counts) if counts else 0.0}


def build_text_encoder(spec: dict, pretrained: str | None = None) -> TextEncoder:
    """Build from a spec: {"kind": "tiny", "config": {...}} or {"kind": "open_clip", "model": NAME}.

    `pretrained` is an open_clip pretrained tag (named models) or a local checkpoint file
    (.safetensors, or a torch state dict loaded with weights_only=True).
    """
    if spec["kind"] == "tiny":
        cfg = TinyClipConfig(**spec["config"])
        model = cfg.build()
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)
        if pretrained:
            if not Path(pretrained).is_file():
                raise FileNotFoundError(f"clip.pretrained for the tiny model must be a checkpoint file: {pretrained}")
            open_clip.load_checkpoint(model, pretrained, weights_only=True)
    elif spec["kind"] == "open_clip":
        name = spec["model"]
        if pretrained and not Path(pretrained).is_file() and "/" in pretrained:
            raise FileNotFoundError(f"clip.pretrained: no such file {pretrained}")
        model = open_clip.create_model(name, pretrained=pretrained or None)
        tokenizer = open_clip.get_tokenizer(name)
    else:
        raise ValueError(f"unknown text encoder kind {spec['kind']!r}")
    if not hasattr(model, "token_embedding"):
        raise ValueError(
            f"open_clip model {spec.get('model')!r} has a custom text tower; only CLIP-style text towers "
            "(token_embedding + transformer) are supported"
        )
    return TextEncoder(model, tokenizer, spec)


def clip_image_preprocess(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> CLIP's normalised input at the same size."""
    x = (images + 1) / 2
    mean = torch.tensor(IMAGE_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(IMAGE_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


def resize_for_clip(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a batch to the vision tower's input size when the data size differs."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
