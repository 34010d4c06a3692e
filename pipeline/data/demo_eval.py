"""Judge from pixels whether a demo-style image shows the shape, colour and position its prompt names.

This sits at the end of the demo flow: the samples stage generates images for demo prompts, parses
each prompt with `caption_to_spec` (pipeline/data/demo.py) and calls `judge`; the fraction judged
`ok` is the prompt-adherence figure of a run. Generated samples are small, blurry and noisy (VQ
decodes of diffusion samples at 32 px), so every measurement here is a robust one: the background
is the median colour, the foreground is the largest blob clearly apart from it, and the shape is
read from moments of the blob's coverage (a triangle's vertical skew, a square's corners), which a
blur barely changes, rather than from its edges.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.demo import COLOUR_RGB, DemoSpec

# A foreground this close to the background (RGB distance) is no shape at all: the lightest demo
# colour (yellow) is ~200 away from the background, generator noise a few tens.
MIN_FOREGROUND_CONTRAST = 40.0
# Pixels at or above half the shape's contrast form the blob mask: half-max is where a blurred edge
# crosses the true boundary, so the mask keeps the true extent under blur.
BLOB_MASK_FRACTION = 0.5
# The blob's blurred rim is kept this many pixels (at 32 px; scaled with the image) around the blob
# mask; a wider rim adds more background noise than rim signal to the moments below.
RIM_PIXELS_AT_32 = 2
# Below this fraction of the shape's contrast a pixel counts as background for the skew measure.
SOFT_MASK_FLOOR = 0.15
# Skewness of the vertical mass distribution: 0 for circle and square, about -0.57 for an apex-up
# triangle (its mass sits near the base). Blur pulls it towards 0 (about -0.3 at a 1.5 px blur at
# 32 px) while circles and squares stay within +-0.1 even after blur, noise and JPEG.
TRIANGLE_MAX_VERTICAL_SKEW = -0.15
# Corner ratio (see ForegroundMeasurement): 2 for an axis-aligned square, 1 for a disc; the
# threshold sits at their geometric mean.
SQUARE_MIN_CORNER_RATIO = 1.4

_REFERENCE_HUES = {
    name: colorsys.rgb_to_hsv(*(channel / 255 for channel in rgb))[0] for name, rgb in COLOUR_RGB.items()
}


@dataclass(frozen=True)
class ForegroundMeasurement:
    """Features of the main foreground blob of an image.

    corner_ratio: the fourth cumulant of the blob's mass along the x and y axes over that along the
        two diagonals. A square's mass is uniform along its sides and bunched along its diagonals
        (ratio 2); a disc looks the same in every direction (ratio 1). A Gaussian blur adds nothing
        to fourth cumulants, so unlike a fill ratio this cue survives blur.
    vertical_skew: skewness of the blob's mass along y, the triangle cue.
    centre_x, centre_y: centre of the blob's bounding box as fractions of width/height.
    hue: hue in [0, 1) of the blob's core pixels.
    """

    corner_ratio: float
    vertical_skew: float
    centre_x: float
    centre_y: float
    hue: float

    def shape(self) -> str:
        """The shape these features indicate."""
        if self.vertical_skew < TRIANGLE_MAX_VERTICAL_SKEW:
            return "triangle"
        return "square" if self.corner_ratio >= SQUARE_MIN_CORNER_RATIO else "circle"

    def colour(self) -> str:
        """The demo colour whose hue is nearest (on the hue circle) to the blob's."""

        def hue_distance(name: str) -> float:
            gap = abs(self.hue - _REFERENCE_HUES[name])
            return min(gap, 1 - gap)

        return min(_REFERENCE_HUES, key=hue_distance)

    def position(self) -> str:
        """The region (left/right/top/bottom) of the blob's centre, by its larger offset."""
        offset_x, offset_y = self.centre_x - 0.5, self.centre_y - 0.5
        if abs(offset_x) >= abs(offset_y):
            return "left" if offset_x < 0 else "right"
        return "top" if offset_y < 0 else "bottom"


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in 0..255 from a PIL image or an HxWx3 uint8 array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {array.shape}")
    return array.astype(np.float64)


def _neighbourhood_views(array: np.ndarray, fill: int | bool) -> list[np.ndarray]:
    """The 9 shifted copies of `array` that line up each pixel with its 8 neighbours and itself.

    Pixels shifted in from beyond the border take the value `fill`.
    """
    height, width = array.shape
    padded = np.full((height + 2, width + 2), fill, dtype=array.dtype)
    padded[1:-1, 1:-1] = array
    return [padded[dy : dy + height, dx : dx + width] for dy in (0, 1, 2) for dx in (0, 1, 2)]


def _largest_component(mask: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The 8-connected component of `mask` with the largest total `weight`, as a bool mask."""
    # Label propagation: every mask pixel starts with its own index and repeatedly takes the
    # smallest label among its neighbours, until each component carries one label. Vectorised,
    # it needs as many rounds as the longest blob is long (tens at these image sizes).
    outside = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), outside)
    while True:
        smallest = np.minimum.reduce(_neighbourhood_views(labels, outside))
        spread = np.where(mask, smallest, outside)
        if np.array_equal(spread, labels):
            break
        labels = spread
    component_ids, component_of_pixel = np.unique(labels[mask], return_inverse=True)
    totals = np.bincount(component_of_pixel, weights=weight[mask])
    return labels == component_ids[np.argmax(totals)]


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a bool mask by `steps` pixels (8-neighbourhood)."""
    grown = mask
    for _ in range(steps):
        grown = np.logical_or.reduce(_neighbourhood_views(grown, False))
    return grown


def _central_moments(mass: np.ndarray, coordinate: np.ndarray) -> tuple[float, float, float]:
    """Second, third and fourth central moments of `coordinate` under the weights `mass`."""
    total = mass.sum()
    if total <= 0:  # nothing above the noise floor: no spread, no skew
        return 0.0, 0.0, 0.0
    centred = coordinate - (mass * coordinate).sum() / total
    return tuple(float((mass * centred**order).sum() / total) for order in (2, 3, 4))


def _fourth_cumulant(mass: np.ndarray, coordinate: np.ndarray) -> float:
    second, _, fourth = _central_moments(mass, coordinate)
    return fourth - 3 * second**2


def measure(image: Image.Image | np.ndarray) -> ForegroundMeasurement | None:
    """Features of the main foreground blob, or None when nothing stands out from the background."""
    pixels = _as_rgb_array(image)
    height, width, _ = pixels.shape
    # The shape covers at most ~13% of a demo image, so the per-channel median is background.
    background = np.median(pixels.reshape(-1, 3), axis=0)
    distance = np.linalg.norm(pixels - background, axis=2)
    # A high percentile rather than the max, so a single hot pixel does not set the scale; at
    # 99.5% the percentile still lies inside the smallest demo shape at 32 px (~60 of 1024 px).
    peak = float(np.percentile(distance, 99.5))
    if peak < MIN_FOREGROUND_CONTRAST:
        return None
    blob = _largest_component(distance >= BLOB_MASK_FRACTION * peak, distance)
    # The blob's own contrast, so a faint shape is measured against itself, not against a speckle.
    contrast = float(np.percentile(distance[blob], 90))
    # Core pixels carry the colour; blurred rim pixels are mixed with the background.
    core = blob & (distance >= 0.75 * contrast)
    foreground = pixels[core if core.any() else blob].mean(axis=0)
    hue = colorsys.rgb_to_hsv(*(foreground / 255))[0]

    # Coverage of each pixel by the shape: the projection of its colour on the background->shape
    # colour line. It is linear in pixel values, so a blur of the image is the same blur of the
    # coverage, and zero-mean noise stays zero-mean (a distance would turn it into positive mass).
    direction = foreground - background
    coverage = (pixels - background) @ direction / max(float(direction @ direction), 1e-9)
    rim_pixels = max(RIM_PIXELS_AT_32, round(RIM_PIXELS_AT_32 * max(height, width) / 32))
    # Only the blob and its rim count: other blobs and far-away noise are not the shape.
    region = _dilate(blob, rim_pixels)
    coverage = coverage[region]
    ys, xs = (axis.astype(np.float64) for axis in np.nonzero(region))
    diagonal_cumulants = _fourth_cumulant(coverage, (xs + ys) / np.sqrt(2)) + _fourth_cumulant(
        coverage, (xs - ys) / np.sqrt(2)
    )
    axis_cumulants = _fourth_cumulant(coverage, xs) + _fourth_cumulant(coverage, ys)
    # Compact shapes have negative fourth cumulants; anything else is no square.
    corner_ratio = axis_cumulants / diagonal_cumulants if diagonal_cumulants < 0 else 0.0

    soft = np.clip((coverage - SOFT_MASK_FLOOR) / (1 - SOFT_MASK_FLOOR), 0, 1)
    second, third, _ = _central_moments(soft, ys)
    vertical_skew = third / max(second, 1e-9) ** 1.5

    blob_rows, blob_cols = np.nonzero(blob)
    centre_x = (blob_cols.min() + blob_cols.max() + 1) / 2 / width
    centre_y = (blob_rows.min() + blob_rows.max() + 1) / 2 / height
    return ForegroundMeasurement(
        float(corner_ratio), float(vertical_skew), float(centre_x), float(centre_y), hue
    )


def classify(image: Image.Image | np.ndarray) -> DemoSpec | None:
    """The DemoSpec an image shows, or None when it shows no foreground shape."""
    measurement = measure(image)
    if measurement is None:
        return None
    return DemoSpec(measurement.shape(), measurement.colour(), measurement.position())


def judge(image: Image.Image | np.ndarray, spec: DemoSpec) -> dict[str, bool]:
    """Whether `image` shows `spec`: {"shape_ok", "colour_ok", "position_ok", "ok"} (ok = all three)."""
    shown = classify(image)
    if shown is None:
        return {"shape_ok": False, "colour_ok": False, "position_ok": False, "ok": False}
    verdict = {
        "shape_ok": shown.shape == spec.shape,
        "colour_ok": shown.colour == spec.colour,
        "position_ok": shown.position == spec.position,
    }
    verdict["ok"] = all(verdict.values())
    return verdict


def adherence(images: Iterable[Image.Image | np.ndarray], specs: Iterable[DemoSpec]) -> dict[str, float]:
    """Fractions of images whose shape, colour, position and all three match their spec.

    Keys: "shape", "colour", "position", "all"; the headline prompt-adherence figure is "all".
    """
    return adherence_of([judge(image, spec) for image, spec in zip(images, specs, strict=True)])


def adherence_of(verdicts: list[dict[str, bool]]) -> dict[str, float]:
    """`adherence` from `judge`'s verdicts, for callers that also score subsets of the same images."""
    if not verdicts:
        raise ValueError("adherence needs at least one image")
    return {part: sum(v[key] for v in verdicts) / len(verdicts)
            for part, key in (("shape", "shape_ok"), ("colour", "colour_ok"), ("position", "position_ok"), ("all", "ok"))}
