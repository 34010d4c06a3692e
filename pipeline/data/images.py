"""Image tensors <-> uint8 pixels: what the readers, the encoders and the served model share.

No Ray here: the served model (and its MLflow pyfunc) converts images without importing Ray Data.
"""

from __future__ import annotations

import numpy as np


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
