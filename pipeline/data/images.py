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
