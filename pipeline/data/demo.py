"""The embedded demo data: captioned images of one coloured shape on a plain light background.

This is the source end of the demo flow: `write_demo_shards` (pipeline/data/shards.py) turns these
samples into WebDataset shards, the pipeline trains on them, and `pipeline/data/demo_eval.py` judges
generated images against the `DemoSpec` parsed from their prompt. Because the ground truth is known,
prompt adherence of a trained model can be measured from pixels.

Every caption names a shape, a colour and a position ("a red circle on the left"); nothing else in
the image is described, so a model must read the text to get all three right. Size, exact position,
colour shade and background tint vary so that a model cannot get them right by memorising a handful
of images.

Caption wording varies across the data set, but each content has one wording (`caption_template`):
a caption then names exactly one kind of image, so held-out caption -> image retrieval has a right
answer (with a random wording per image, the right content in another wording is an equally good
image, and exact-caption retrieval is capped near 0.6 on 100 samples). Every template carries every
shape, colour and position word, so the text encoder learns the words, not whole captions; the
adherence evaluation prompts most contents in a wording the training data never pairs with them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

DEMO_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DEMO_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
DEMO_POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")

# Base RGB per colour. Their hues (about 0, 130, 226, 48 and 279 degrees) are at least ~50 degrees
# apart, so the colour survives blur into the background and per-image jitter; the evaluator
# classifies by nearest hue to these.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 30),
    "purple": (140, 50, 190),
}

# Range of the shape's centre per position, as fractions of the image side: (x_lo, x_hi, y_lo, y_hi).
# The gap to the image centre is wide, so the named region is unambiguous even for a blurry sample.
POSITION_CENTRE_RANGE: dict[str, tuple[float, float, float, float]] = {
    "left": (0.20, 0.30, 0.38, 0.62),
    "right": (0.70, 0.80, 0.38, 0.62),
    "top": (0.38, 0.62, 0.20, 0.30),
    "bottom": (0.38, 0.62, 0.70, 0.80),
}

# Shape extent (circle diameter, square side, triangle base) as a fraction of the image side. The
# lower bound keeps shapes at least ~9 px wide at 32 px, where circle and square still differ; the
# upper bound keeps a shape inside the image at the most extreme centre above.
SHAPE_SIZE_RANGE = (0.28, 0.36)
COLOUR_JITTER = 12  # per channel, +-; small against the ~50 degree hue gaps above
BACKGROUND_GREY_RANGE = (225, 245)
BACKGROUND_TINT = 6  # per channel, +-; keeps the background near-neutral and light
SUPERSAMPLE = 4  # draw at 4x and box-downsample, so edges are anti-aliased like a real photo's

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} on the {position}",
    "a {colour} {shape} at the {position}",
    "{colour} {shape}, {position} side",
    "a {shape} in {colour} on the {position}",
    "{position}: a {colour} {shape}",
    "a picture of a {colour} {shape} on the {position} side",
)


@dataclass(frozen=True)
class DemoSpec:
    """What a demo image shows: one of DEMO_SHAPES, DEMO_COLOURS and DEMO_POSITIONS each."""

    shape: str
    colour: str
    position: str

    def __post_init__(self) -> None:
        for field_name, value, allowed in (
            ("shape", self.shape, DEMO_SHAPES),
            ("colour", self.colour, DEMO_COLOURS),
            ("position", self.position, DEMO_POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"DemoSpec.{field_name}={value!r} is not one of {allowed}")

    def to_dict(self) -> dict[str, str]:
        """The spec as a plain dict (what the demo shards store in `<key>.json`)."""
        return asdict(self)


def caption_template(spec: DemoSpec) -> int:
    """The index into CAPTION_TEMPLATES of the demo data's wording for `spec`.

    (shape + colour + 3 * position) mod 6 gives each template 10 of the 60 contents, with every
    shape, colour and position among them.
    """
    index = (DEMO_SHAPES.index(spec.shape) + DEMO_COLOURS.index(spec.colour)
             + 3 * DEMO_POSITIONS.index(spec.position))
    return index % len(CAPTION_TEMPLATES)


def spec_to_caption(spec: DemoSpec, template_index: int = 0) -> str:
    """The caption for `spec` in the wording of CAPTION_TEMPLATES[template_index]."""
    if not 0 <= template_index < len(CAPTION_TEMPLATES):
        raise ValueError(
            f"template_index={template_index} is out of range 0..{len(CAPTION_TEMPLATES) - 1}"
        )
    return CAPTION_TEMPLATES[template_index].format(
        shape=spec.shape, colour=spec.colour, position=spec.position
    )


def caption_to_spec(caption: str) -> DemoSpec | None:
    """Parse a caption in any template (or free wording) back to its spec.

    The caption must name exactly one shape, one colour and one position word; otherwise (an empty
    caption, a prompt outside the demo vocabulary, two colours) the answer is None.
    """
    words = re.findall(r"[a-z]+", caption.lower())
    found: list[str | None] = []
    for vocabulary in (DEMO_SHAPES, DEMO_COLOURS, DEMO_POSITIONS):
        matches = {word for word in words if word in vocabulary}
        found.append(matches.pop() if len(matches) == 1 else None)
    shape, colour, position = found
    if shape is None or colour is None or position is None:
        return None
    return DemoSpec(shape, colour, position)


def render(spec: DemoSpec, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `spec` as an RGB image of side `image_size` (>= 32), with size/place/shade from `rng`."""
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is below 32; shapes are not recognisable there")
    grey = rng.integers(BACKGROUND_GREY_RANGE[0], BACKGROUND_GREY_RANGE[1] + 1)
    background = np.clip(grey + rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, 3), 0, 255)
    base = np.array(COLOUR_RGB[spec.colour])
    colour = np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)

    size = rng.uniform(*SHAPE_SIZE_RANGE)
    x_lo, x_hi, y_lo, y_hi = POSITION_CENTRE_RANGE[spec.position]
    centre_x, centre_y = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)

    canvas_side = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (canvas_side, canvas_side), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(canvas)
    fill = tuple(int(c) for c in colour)
    half = size / 2
    left, right = (centre_x - half) * canvas_side, (centre_x + half) * canvas_side
    if spec.shape == "triangle":
        # Apex up; a height of 0.85-1.0 of the base spans equilateral (0.87) to slightly tall.
        half_height = size * rng.uniform(0.85, 1.0) / 2
        top, bottom = (centre_y - half_height) * canvas_side, (centre_y + half_height) * canvas_side
        draw.polygon([(centre_x * canvas_side, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        top, bottom = (centre_y - half) * canvas_side, (centre_y + half) * canvas_side
        if spec.shape == "circle":
            draw.ellipse([left, top, right, bottom], fill=fill)
        else:
            draw.rectangle([left, top, right, bottom], fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def demo_sample(index: int, seed: int, image_size: int) -> tuple[Image.Image, str, DemoSpec]:
    """Sample number `index` of the demo data set `seed`: (image, caption, spec).

    Deterministic per (index, seed) and independent of every other index, so shards can be written
    in parallel or in any order and still hold the same data.
    """
    if index < 0:
        raise ValueError(f"index={index} must be >= 0")
    rng = np.random.default_rng([seed, index])
    spec = DemoSpec(
        shape=DEMO_SHAPES[rng.integers(len(DEMO_SHAPES))],
        colour=DEMO_COLOURS[rng.integers(len(DEMO_COLOURS))],
        position=DEMO_POSITIONS[rng.integers(len(DEMO_POSITIONS))],
    )
    caption = spec_to_caption(spec, caption_template(spec))
    return render(spec, image_size, rng), caption, spec
