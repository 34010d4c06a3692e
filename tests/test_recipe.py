"""The ldm budget where the config leaves it to the data (pipeline/recipe.py): on two encoded sets of
other sizes and vocabularies, what is chosen and why, and that a budget set by hand is kept."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.recipe import EPOCHS_DISTINCT, EPOCHS_REPEATED, latent_set_counts, with_ldm_budget


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
