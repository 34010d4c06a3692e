"""What the config leaves to the data (pipeline/recipe.py): the ldm budget, the first stage's
capacity and the UNet: on data sets of other sizes and vocabularies, what is chosen and why, and that a choice
set by hand is kept."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.config.training import VQ_PRESETS
from pipeline.models.vq import VQModelConfig
from pipeline.recipe import (EPOCHS_DISTINCT, EPOCHS_REPEATED, latent_set_counts, with_latents_recipe, with_ldm_budget,
                             with_unet_preset, with_vq_preset)


def encoded_set(directory, captions: list[str], buckets: dict[str, int]):
    """An encode stage's output as the recipe reads it: the caption column and the buckets."""
    (directory / "data").mkdir(parents=True)
    pq.write_table(pa.table({"caption": captions}), directory / "data" / "part-0.parquet")
    (directory / "metadata.json").write_text(json.dumps(
        {"samples": len(captions), "buckets": {name: {"samples": n, "latent_shape": [4, 8, 8]}
                                              for name, n in buckets.items()}}))
    return directory


def demo_like(tmp_path):  # the demo: 60 captions over 4,000 square images
    return encoded_set(tmp_path / "demo", [f"a red circle, number {i % 60}" for i in range(4000)], {"32x32": 4000})


def icons_like(tmp_path):  # an icon set in two aspect ratios, every caption its own
    return encoded_set(tmp_path / "icons", [f"icon {i}" for i in range(1000)], {"32x64": 600, "64x32": 400})


@pytest.mark.parametrize("make, epochs, per_epoch", [
    (demo_like, EPOCHS_REPEATED + (EPOCHS_DISTINCT - EPOCHS_REPEATED) * 60 / 4000, 4000 // 64),
    (icons_like, EPOCHS_DISTINCT, 600 // 64 + 400 // 64),  # one bucket per batch: remainders wait
])
def test_the_data_chooses_the_ldm_budget_and_says_why(tmp_path, make, epochs, per_epoch):
    latents = make(tmp_path)
    cfg, budget = with_ldm_budget(load_config(None, []), latents)  # the default: ldm.max_steps=0, ldm.epochs=0
    assert budget.epochs == pytest.approx(epochs, abs=0.05) and budget.steps_per_epoch == per_epoch
    assert cfg.ldm.max_steps == budget.max_steps == pytest.approx(epochs * per_epoch, abs=per_epoch * 0.05 + 1)
    samples, distinct = latent_set_counts(latents)
    assert f"{distinct} distinct captions over {samples} samples" in budget.reason
    assert f"{budget.max_steps} steps" in budget.reason


def test_the_two_sizes_differ_as_their_vocabularies_do(tmp_path):
    demo = with_ldm_budget(load_config(None, []), demo_like(tmp_path))[1]
    icons = with_ldm_budget(load_config(None, []), icons_like(tmp_path))[1]
    assert (demo.samples, demo.distinct_captions) == (4000, 60) and (icons.samples, icons.distinct_captions) == (1000, 1000)
    assert icons.epochs > 3 * demo.epochs * 0.9  # every caption its own: about three times the passes


def test_a_budget_set_by_hand_is_kept(tmp_path):
    latents = icons_like(tmp_path)
    cfg, budget = with_ldm_budget(load_config(None, ["ldm.epochs=3"]), latents)
    assert cfg.ldm.max_steps == 3 * 15 and "ldm.epochs=3 is set" in budget.reason
    cfg, budget = with_ldm_budget(load_config(None, ["ldm.epochs=3", "ldm.max_steps=7"]), latents)
    assert cfg.ldm.max_steps == 7 and "ldm.max_steps=7 is set" in budget.reason


def test_a_small_set_counts_its_epochs_in_the_batches_it_can_fill(tmp_path):
    # 50 samples and a micro batch of 64: the batch shrinks to 50, one step an epoch.
    latents = encoded_set(tmp_path / "small", [f"photo {i}" for i in range(50)], {"32x32": 50})
    assert with_ldm_budget(load_config(None, ["ldm.epochs=4"]), latents)[0].ldm.max_steps == 4


@pytest.mark.parametrize("override", ["ldm.max_steps=-1", "ldm.epochs=-2"])
def test_a_negative_budget_is_an_error_naming_the_keys(override):
    with pytest.raises(ConfigError, match=r"ldm\.max_steps and ldm\.epochs must be >= 0"):
        load_config(None, [override])


# The first stage's capacity (vq.preset=auto, chosen when the vq stage has read its training set).

@pytest.mark.parametrize("size, samples, distinct, preset", [
    (32, 4000, 60, "plain"),        # the demo: 60 captions over 4,000 shapes, small images of a few kinds
    (32, 3499, 3499, "detailed"),   # the quality benchmark's emoji: every caption its own
    (64, 4000, 60, "detailed"),     # captions repeat, but at 64 px there is detail to keep
    (32, 7500, 3800, "detailed"),   # the artists' set of issue 21: half the captions distinct
])
def test_the_data_chooses_the_first_stage_and_says_why(size, samples, distinct, preset):
    cfg, why = with_vq_preset(load_config(None, [f"data.image_size={size}"]), samples, distinct)
    assert cfg.vq.preset == preset and why.startswith(f"{preset} (")
    assert f"{distinct} distinct captions over {samples} samples" in why
    for key, value in VQ_PRESETS[preset].items():
        assert getattr(cfg.vq, key) == value, key
    assert VQModelConfig.of(cfg.vq).num_quantizers == VQ_PRESETS[preset]["num_quantizers"]


@pytest.mark.parametrize("overrides, preset", [
    (["ldm.epochs=24"], "plain"),                          # a short budget: its time goes to ldm steps
    (["ldm.epochs=36"], "detailed"),                       # not short
    ([], "detailed"),                                      # the budget the captions choose (72 here)
    (["ldm.epochs=24", "data.image_size=64"], "detailed"),  # at 64 px the detail is worth its time
    (["ldm.epochs=24", "ldm.max_steps=500"], "detailed"),  # steps set by hand: epochs do not count
])
def test_a_short_ldm_budget_gets_the_plain_first_stage_on_small_images(overrides, preset):
    cfg, why = with_vq_preset(load_config(None, ["data.image_size=32", *overrides]), 3499, 3499)
    assert cfg.vq.preset == preset and cfg.vq.num_quantizers == VQ_PRESETS[preset]["num_quantizers"]
    assert ("ldm.epochs=24 is a short budget (< 36)" in why) == (overrides == ["ldm.epochs=24"]), why


def test_a_first_stage_set_by_hand_is_kept_and_named():
    cfg, why = with_vq_preset(load_config(None, ["vq.preset=plain"]), 3499, 3499)
    assert cfg.vq.num_quantizers == 1 and "vq.preset=plain is set" in why
    cfg, why = with_vq_preset(load_config(None, ["vq.num_quantizers=2", "vq.lr=1e-3", "vq.max_steps=300"]), 4000, 60)
    assert (cfg.vq.preset, cfg.vq.num_quantizers, cfg.vq.lr, cfg.vq.channel_mult, cfg.vq.max_steps) == (
        "plain", 2, 1e-3, [], 300)
    assert "vq.num_quantizers=2, vq.lr=0.001, vq.max_steps=300 as set" in why


def test_an_unknown_preset_is_named_before_any_work():  # (a bad field: tests/models/test_vq.py)
    with pytest.raises(ConfigError, match=r"vq\.preset must be 'auto' or one of \['detailed', 'plain'\], got 'huge'"):
        load_config(None, ["vq.preset=huge"])
    with pytest.raises(ConfigError, match=r"ldm\.preset must be 'auto' or one of \['medium', 'sd', 'tiny'\]"):
        load_config(None, ["ldm.preset=huge"])


# The UNet (ldm.preset=auto, chosen after the vq stage from where it trains and the set's size).

@pytest.mark.parametrize("gpu, samples, side, preset, reason", [
    (False, 50_000, 32, "tiny", "ldm.use_gpu=false"),                      # any size on CPUs
    (True, 3_499, 32, "tiny", "3499 training samples (< 10,000"),           # the emoji on a GPU
    (True, 40_000, 32, "medium", "40000 training samples (>= 10,000) on a GPU"),
    (True, 40_000, 12, "tiny", "12-wide latents do not halve 3 times"),    # 48 px images: too small to halve thrice
])
def test_the_data_and_the_hardware_choose_the_unet_and_say_why(gpu, samples, side, preset, reason):
    cfg, why = with_unet_preset(load_config(None, [f"ldm.use_gpu={str(gpu).lower()}"]), samples, side)
    assert cfg.ldm.preset == preset and why.startswith(f"{preset}: ldm.preset=auto") and reason in why


def test_a_unet_set_by_hand_is_kept_and_an_encoded_set_resolves_the_rest(tmp_path):
    cfg, why = with_unet_preset(load_config(None, ["ldm.preset=medium"]), 10, 8)
    assert cfg.ldm.preset == "medium" and why == "medium: ldm.preset=medium is set"
    cfg = with_latents_recipe(load_config(None, []), demo_like(tmp_path))  # what run_ldm resolves by itself
    assert cfg.ldm.preset == "tiny" and cfg.ldm.max_steps > 0
