"""Image tensors <-> uint8 pixels: what the readers, the encoders and the served model share.

No Ray here: the served model (and its MLflow pyfunc) converts images without importing Ray Data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def images_to_tensor(images) -> "torch.Tensor":
    """(B, H, W, 3) uint8 (numpy or torch) -> (B, 3, H, W) float in [-1, 1]."""
    import torch

    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(x: "torch.Tensor") -> np.ndarray:
    """The inverse of `images_to_tensor`: (B, 3, H, W) in about [-1, 1] -> (B, H, W, 3) uint8, clamped."""
    import torch

    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays stacked when they share a shape, else an object array of them (a batch of images
    or latents in several aspect-ratio buckets; Ray Data stores it as a variable-shaped tensor column)."""
    if len({array.shape for array in arrays}) <= 1:
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def tile(images: list[np.ndarray], ncol: int = 0, pad: int = 2, min_side: int = 128) -> np.ndarray:
    """(H, W, 3) uint8 images tiled row by row on white, `ncol` a row (0: a near-square grid),
    tiles smaller than `min_side` upscaled by a whole factor (nearest pixel) so they can be seen."""
    if not images:
        raise ValueError("no images to tile")
    h, w = images[0].shape[:2]
    scale = max(1, -(-min_side // max(1, min(h, w))))
    ncol = ncol or int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // ncol)
    th, tw = h * scale, w * scale
    grid = np.full((rows * (th + pad) + pad, ncol * (tw + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        if image.shape[:2] != (h, w):
            raise ValueError(f"image {i} is {image.shape[1]}x{image.shape[0]}, the first {w}x{h}: tiles share one size")
        r, c = divmod(i, ncol)
        grid[pad + r * (th + pad):pad + r * (th + pad) + th, pad + c * (tw + pad):pad + c * (tw + pad) + tw] = \
            image.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def captioned_tile(images: list[np.ndarray], captions: list[str], ncol: int = 0, min_side: int = 128,
                   font_size: int = 12) -> np.ndarray:
    """`tile` with each image's caption written under it (wrapped to the tile's width): a grid
    people read at a glance, the prompt beside what it gave."""
    from PIL import Image, ImageDraw, ImageFont

    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    grid = tile(images, ncol, pad=0, min_side=min_side)
    ncol = ncol or int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // ncol)
    th, tw = grid.shape[0] // rows, grid.shape[1] // ncol
    font = ImageFont.load_default(size=font_size)
    chars = max(8, int(tw / (0.55 * font_size)))
    wrapped = [_wrap(caption, chars) for caption in captions]
    band = (max(len(lines) for lines in wrapped) * (font_size + 2)) + 6
    pad = 4
    canvas = Image.new("RGB", (ncol * (tw + pad) + pad, rows * (th + band + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, lines in enumerate(wrapped):
        r, c = divmod(i, ncol)
        x, y = pad + c * (tw + pad), pad + r * (th + band + pad)
        canvas.paste(Image.fromarray(grid[r * th:(r + 1) * th, c * tw:(c + 1) * tw]), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + th + 3 + j * (font_size + 2)), line, fill=(20, 20, 20), font=font)
    return np.asarray(canvas)


def _wrap(text: str, width: int, max_lines: int = 3) -> list[str]:
    import textwrap

    lines = textwrap.wrap(text, width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:max(0, width - 1)] + "…"
    return lines


def grid_columns(prompts: int, per_prompt: int) -> int:
    """Columns of a near-square grid that keeps each prompt's images side by side in one row."""
    per_prompt = max(1, per_prompt)
    return per_prompt * max(1, int(np.ceil(np.sqrt(prompts / per_prompt))))
