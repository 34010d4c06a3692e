"""Aspect-ratio buckets: the training resolutions of about `data.image_size`² pixels, one per aspect.

Users' images are not square. Instead of cropping every image to a square (a portrait loses its
head, a panorama most of its width), the encode stage resizes each image to the bucket nearest its
aspect ratio, cropping only what separates its aspect from the bucket's, and the ldm stage draws
each global batch from one bucket (`pipeline.training.latents.GlobalOrder`). A model samples at any
of the buckets it was trained on.

The table: for every width `w` that is a multiple of `multiple` (what the VQ and the UNet need: the
VQ's downsampling times the UNet's), the height `h`, also a multiple, that brings `w * h` nearest to
`image_size²`, kept while neither side is more than `max_aspect` times the other. At
`image_size=32`, `multiple=8` and `max_aspect=2`: 24x48, 24x40, 32x32, 40x24, 48x24. The square
bucket is always in it. Images more elongated than `max_aspect` go to the most elongated bucket and
lose more to the crop (the crop is recorded for every image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Size = tuple[int, int]
"""(width, height) in pixels."""


def size_name(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def parse_size(text: str) -> Size:
    """'48x24' -> (48, 24); ValueError naming the text otherwise."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{text!r} is not a size WIDTHxHEIGHT (e.g. 48x24)") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"{text!r}: width and height must be > 0")
    return width, height


def bucket_table(image_size: int, multiple: int, max_aspect: float) -> list[Size]:
    """The buckets around `image_size`² pixels, sides multiples of `multiple`, sorted by aspect
    (tallest first). `max_aspect` 1 gives the square alone."""
    if image_size % multiple:
        raise ValueError(f"image size {image_size} is not a multiple of {multiple}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    area = image_size * image_size
    wide: set[Size] = {(image_size, image_size)}
    width = image_size + multiple
    while True:
        height = max(multiple, round(area / width / multiple) * multiple)
        if width / height > max_aspect + 1e-9:
            break
        wide.add((width, height))
        width += multiple
    return sorted(wide | {(h, w) for w, h in wide}, key=lambda s: s[0] / s[1])


def nearest_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    """The bucket whose aspect is nearest the image's, in log ratio (2:1 is as far from 1:1 as 1:2)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


@dataclass(frozen=True)
class Fit:
    """How an image of (width, height) goes into a bucket: the source box to keep (centred), and the
    fraction of its pixels that falls outside the box."""

    bucket: Size
    box: tuple[float, float, float, float]
    crop: float


def fit_to_bucket(width: int, height: int, bucket: Size) -> Fit:
    """The centred box of the bucket's aspect that covers as much of the image as it can."""
    bw, bh = bucket
    if width * bh > bw * height:  # wider than the bucket: keep the full height
        kept_w, kept_h = height * bw / bh, float(height)
    else:
        kept_w, kept_h = float(width), width * bh / bw
    left, top = (width - kept_w) / 2, (height - kept_h) / 2
    return Fit(bucket, (left, top, left + kept_w, top + kept_h), 1.0 - kept_w * kept_h / (width * height))


def max_crop(buckets: list[Size], max_aspect: float) -> float:
    """The largest crop fraction an image of aspect within [1/max_aspect, max_aspect] can get:
    at the aspect halfway (in log ratio) between two neighbouring buckets, or at the ends."""
    aspects = sorted(math.log(w / h) for w, h in buckets)
    edges = [-math.log(max_aspect), *[(a + b) / 2 for a, b in zip(aspects, aspects[1:])], math.log(max_aspect)]
    worst = 0.0
    for edge in edges:
        bucket = nearest_bucket(round(1e6 * math.exp(edge)), 1_000_000, buckets)
        worst = max(worst, fit_to_bucket(round(1e6 * math.exp(edge)), 1_000_000, bucket).crop)
    return worst


def latent_buckets(meta: dict) -> dict[str, dict]:
    """{'WxH': {samples, latent_shape}} of a latent dataset's metadata (one square bucket for
    latents encoded before buckets existed)."""
    if meta.get("buckets"):
        return meta["buckets"]
    side = meta["image_size"]
    return {f"{side}x{side}": {"samples": meta["samples"], "latent_shape": meta["latent_shape"]}}


def main_bucket(buckets: dict[str, dict]) -> str:
    """The bucket with the most samples (the nearest square of those tied): the default sampling size."""
    def squareness(name: str) -> float:
        width, height = parse_size(name)
        return -abs(math.log(width / height))

    return max(buckets, key=lambda name: (buckets[name]["samples"], squareness(name)))


def trained_sizes(buckets: dict[str, dict], global_batch: int) -> dict:
    """What a run with this global batch trains on per epoch: global batches per bucket, the samples
    left out (a bucket's last incomplete batch, or a bucket smaller than a batch), and the sizes
    it can sample at (buckets with at least one batch an epoch; the default the most populated)."""
    batches = {name: bucket["samples"] // global_batch for name, bucket in buckets.items()}
    trained = {name: buckets[name] for name, count in batches.items() if count}
    return {"bucket_batches_per_epoch": batches,
            "samples_unused_per_epoch": sum(b["samples"] for b in buckets.values()) - global_batch * sum(batches.values()),
            "sizes": list(trained), "default_size": main_bucket(trained)}


def training_buckets(data, multiple: int) -> list[tuple[int, int]]:
    """The (width, height) sizes the encode stage fits images to (`data.buckets` of a `DataConfig`), each side a
    multiple of `multiple` (the VQ's downsampling times the UNet's); ConfigError naming a size that is not."""
    from pipeline.config import ConfigError

    if data.buckets == "square":
        return [(data.image_size, data.image_size)]
    if data.buckets == "auto":
        return bucket_table(data.image_size, multiple, data.max_aspect)
    sizes = sorted({parse_size(part) for part in data.buckets.split(",")}, key=lambda s: s[0] / s[1])
    for width, height in sizes:
        if width % multiple or height % multiple:
            raise ConfigError(f"data.buckets: {width}x{height} has a side that is not a multiple of {multiple} "
                              f"(the VQ's downsampling times the UNet's)")
    return sizes
