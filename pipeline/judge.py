"""Fidelity: does a generated image show the specific real image its caption names?

A judge that shares no weights with the model under test: the nearest neighbour, among every real
image of the data set (the gallery), in a fixed feature space (the image area-averaged to 16 x 16
RGB in [0, 1], compared by Euclidean distance). A generated image is right when the real image its
caption names is its nearest neighbour (ties with an identical image count as right). Chance is
1 / the gallery's size.

Pixels are the feature space on purpose: nothing is learnt, so the judge is the same for every run
and every model, and its calibration (the judge on real images themselves, and on them after the
first stage's round trip: the best a perfect diffusion model over that first stage could score) is
printed beside every figure it gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

FEATURE_SIDE = 16


def pixel_features(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3 * 16 * 16) float: each image area-averaged to 16 x 16 in [0, 1]."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return F.adaptive_avg_pool2d(x, FEATURE_SIDE).flatten(1)


@dataclass
class Verdicts:
    correct: np.ndarray
    """(N,) bool: the named image is the nearest real image."""
    top5: np.ndarray
    """(N,) bool: the named image is among the five nearest."""

    def figures(self, prefix: str = "") -> dict:
        """The shares right (named image nearest) and within the nearest five, the count, and the
        fidelity's standard error over these captions (binomial, sqrt(p (1 - p) / n)): how far
        another draw of as many captions could move it. Two runs' figures that differ by less than
        about twice their errors combined are not told apart by this judge; the run-to-run spread
        of training comes on top of it."""
        p, n = float(self.correct.mean()), int(len(self.correct))
        return {f"{prefix}fidelity": p, f"{prefix}fidelity_top5": float(self.top5.mean()), f"{prefix}n": n,
                f"{prefix}fidelity_se": float(np.sqrt(p * (1 - p) / n))}


class NearestImageJudge:
    """Nearest real image of the gallery in `pixel_features` space."""

    def __init__(self, gallery: np.ndarray, keys: list[str]):
        if len(gallery) != len(keys) or len(set(keys)) != len(keys):
            raise ValueError(f"the gallery needs one distinct key per image: {len(gallery)} images, "
                             f"{len(set(keys))} distinct keys of {len(keys)}")
        if len(keys) < 5:
            raise ValueError(f"the gallery has {len(keys)} images; the judge needs at least 5")
        self.features = pixel_features(gallery)
        self.index = {key: i for i, key in enumerate(keys)}
        self.image_size = gallery.shape[1:3]

    @property
    def chance(self) -> float:
        return 1.0 / len(self.index)

    def judge(self, images: np.ndarray, keys: list[str], batch_size: int = 512) -> Verdicts:
        """Verdicts for `images`, each meant to show the gallery image `keys[i]`."""
        if len(images) != len(keys):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise KeyError(f"keys not in the gallery: {missing[:5]}")
        if tuple(images.shape[1:3]) != tuple(self.image_size):
            raise ValueError(f"images are {images.shape[1:3]}, the gallery {tuple(self.image_size)}")
        correct, top5 = [], []
        target = torch.tensor([self.index[k] for k in keys])
        for i in range(0, len(images), batch_size):
            d = torch.cdist(pixel_features(images[i:i + batch_size]), self.features)
            t = target[i:i + batch_size]
            to_target = d.gather(1, t[:, None])
            # How many gallery images are strictly nearer than the named one (an identical image is
            # not: a duplicate in the gallery does not count against the model).
            nearer = (d < to_target - 1e-6).sum(dim=1)
            correct.append((nearer == 0).numpy())
            top5.append((nearer < 5).numpy())
        return Verdicts(np.concatenate(correct), np.concatenate(top5))
