"""The embedded demo data (pipeline/data/demo.py) and its pixel evaluator (pipeline/data/demo_eval.py)."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipeline.data.demo import (
    CAPTION_TEMPLATES,
    DEMO_COLOURS,
    DEMO_POSITIONS,
    DEMO_SHAPES,
    DemoSpec,
    caption_template,
    caption_to_spec,
    demo_sample,
    render,
    spec_to_caption,
)
from pipeline.data.demo_eval import adherence, classify, judge

ALL_SPECS = [DemoSpec(*combo) for combo in itertools.product(DEMO_SHAPES, DEMO_COLOURS, DEMO_POSITIONS)]


def test_same_index_and_seed_give_the_same_sample():
    image_a, caption_a, spec_a = demo_sample(17, seed=3, image_size=32)
    image_b, caption_b, spec_b = demo_sample(17, seed=3, image_size=32)
    assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
    assert (caption_a, spec_a) == (caption_b, spec_b)


def test_samples_do_not_depend_on_which_other_samples_were_drawn():
    # Shards may be written in any order or in parallel; sample 5 must not change with that.
    first = np.asarray(demo_sample(5, seed=0, image_size=32)[0])
    for index in (0, 9, 4):
        demo_sample(index, seed=0, image_size=32)
    assert np.array_equal(first, np.asarray(demo_sample(5, seed=0, image_size=32)[0]))


def test_different_seeds_and_indices_give_different_samples():
    base = np.asarray(demo_sample(0, seed=0, image_size=32)[0])
    assert not np.array_equal(base, np.asarray(demo_sample(0, seed=1, image_size=32)[0]))
    assert not np.array_equal(base, np.asarray(demo_sample(1, seed=0, image_size=32)[0]))


@pytest.mark.parametrize("image_size", [32, 48, 64, 96])
def test_samples_are_rgb_images_of_the_requested_size(image_size):
    image, caption, spec = demo_sample(0, seed=0, image_size=image_size)
    assert image.mode == "RGB" and image.size == (image_size, image_size)
    assert caption_to_spec(caption) == spec


def test_sizes_below_32_are_refused():
    with pytest.raises(ValueError, match="image_size"):
        demo_sample(0, seed=0, image_size=16)


def test_every_combination_and_template_occurs_in_a_modest_sample():
    # The text must matter: all 60 combinations and every caption wording show up in the data.
    specs, captions = set(), set()
    for index in range(1500):
        _, caption, spec = demo_sample(index, seed=0, image_size=32)
        specs.add(spec)
        captions.add(caption)
    assert specs == set(ALL_SPECS)
    templates_seen = {
        template_index
        for template_index in range(len(CAPTION_TEMPLATES))
        for spec in ALL_SPECS
        if spec_to_caption(spec, template_index) in captions
    }
    assert templates_seen == set(range(len(CAPTION_TEMPLATES)))


def test_a_caption_names_one_content_and_every_wording_carries_every_word():
    """One wording per content, so a held-out caption has one right kind of image (retrieval by
    exact caption is well-posed); each wording is used with every shape, colour and position word,
    so the text encoder can learn the words rather than whole captions."""
    by_caption = {}
    for index in range(600):
        _, caption, spec = demo_sample(index, seed=1, image_size=32)
        assert caption == spec_to_caption(spec, caption_template(spec))
        assert by_caption.setdefault(caption, spec) == spec
    assert len(by_caption) == len(ALL_SPECS)
    for template_index in range(len(CAPTION_TEMPLATES)):
        specs = [spec for spec in ALL_SPECS if caption_template(spec) == template_index]
        assert len(specs) == len(ALL_SPECS) // len(CAPTION_TEMPLATES)
        for part, vocabulary in (("shape", DEMO_SHAPES), ("colour", DEMO_COLOURS), ("position", DEMO_POSITIONS)):
            assert {getattr(spec, part) for spec in specs} == set(vocabulary)


def test_images_of_one_spec_vary_in_size_position_and_shade():
    rng = np.random.default_rng(0)
    spec = DemoSpec("circle", "red", "left")
    images = [np.asarray(render(spec, 32, rng), dtype=np.int16) for _ in range(8)]
    assert all(not np.array_equal(images[0], other) for other in images[1:])


@pytest.mark.parametrize("template_index", range(len(CAPTION_TEMPLATES)))
def test_caption_round_trips_through_every_template(template_index):
    for spec in ALL_SPECS:
        caption = spec_to_caption(spec, template_index)
        assert caption_to_spec(caption) == spec, caption
        assert caption_to_spec(caption.upper()) == spec  # prompts typed by users are not lower-case


def test_caption_example_from_the_docs():
    assert spec_to_caption(DemoSpec("circle", "red", "left")) == "a red circle on the left"


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a photo of a dog",
        "a red circle",
        "a red blue circle on the left",
        "a red circle on the left or right",
    ],
)
def test_captions_outside_the_demo_vocabulary_parse_to_none(caption):
    assert caption_to_spec(caption) is None


def test_invalid_spec_values_are_refused():
    with pytest.raises(ValueError, match="colour"):
        DemoSpec("circle", "magenta", "left")
    with pytest.raises(ValueError, match="template_index"):
        spec_to_caption(DemoSpec("circle", "red", "left"), len(CAPTION_TEMPLATES))


def _blurred_and_noisy(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """What a VQ-decoded diffusion sample looks like at worst mildly: soft edges and pixel noise."""
    radius = 0.8 * image.width / 32
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    return np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)


def _accuracy(images, specs) -> float:
    return adherence(images, specs)["all"]


@pytest.mark.parametrize("image_size", [32, 64])
def test_evaluator_is_right_on_real_demo_images(image_size):
    samples = [demo_sample(index, seed=11, image_size=image_size) for index in range(500)]
    accuracy = _accuracy([image for image, _, _ in samples], [spec for _, _, spec in samples])
    print(f"evaluator accuracy on 500 clean demo images at {image_size} px: {accuracy:.3f}")
    assert accuracy >= 0.98


@pytest.mark.parametrize("image_size", [32, 64])
def test_evaluator_tolerates_blur_and_noise(image_size):
    rng = np.random.default_rng(0)
    samples = [demo_sample(index, seed=12, image_size=image_size) for index in range(500)]
    degraded = [_blurred_and_noisy(image, rng) for image, _, _ in samples]
    accuracy = _accuracy(degraded, [spec for _, _, spec in samples])
    print(f"evaluator accuracy on 500 blurred+noisy demo images at {image_size} px: {accuracy:.3f}")
    assert accuracy >= 0.95


def test_evaluator_tolerates_jpeg_and_a_stray_speckle():
    rng = np.random.default_rng(1)
    correct = 0
    for index in range(100):
        image, _, spec = demo_sample(index, seed=13, image_size=32)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=70)
        pixels = np.asarray(Image.open(buffer)).copy()
        y, x = rng.integers(0, 32, 2)
        pixels[y, x] = (20, 20, 20)  # a dark one-pixel speckle: not the shape
        correct += judge(pixels, spec)["ok"]
    assert correct >= 95


def test_judge_reports_each_attribute_separately():
    image, _, spec = demo_sample(0, seed=0, image_size=32)
    other_colour = next(colour for colour in DEMO_COLOURS if colour != spec.colour)
    verdict = judge(image, DemoSpec(spec.shape, other_colour, spec.position))
    assert verdict == {"shape_ok": True, "colour_ok": False, "position_ok": True, "ok": False}
    assert judge(np.asarray(image), spec)["ok"]


def test_blank_image_shows_nothing():
    blank = np.full((32, 32, 3), 235, dtype=np.uint8)
    assert classify(blank) is None
    assert judge(blank, DemoSpec("circle", "red", "left")) == {
        "shape_ok": False,
        "colour_ok": False,
        "position_ok": False,
        "ok": False,
    }
