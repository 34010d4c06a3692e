"""The stages' cache keys are complete: every config field is in the key of exactly the stages that
declare it (a section or the field itself), or it is named, with its reason, as in no key. A field
that changes what a stage computes but is missing from its key (as `data.max_image_pixels` once
was from vq's and clip's) would serve a stale result for the new config."""

import copy
import dataclasses

import pytest

from pipeline.config import PipelineConfig, load_config
from pipeline.workflow import NOT_IN_ANY_KEY, STAGE_BY_NAME, STAGES, config_key, config_value


def leaf_fields(node, prefix=""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        # 7 is a valid element of an empty list of either kind (ints, or strings: "7").
        return [*value, 7 if not value or isinstance(value[0], (int, float)) else "another prompt"]
    if isinstance(value, dict):
        return {**value, "another": [1, 2]}
    raise TypeError(f"no changed value for {value!r}: extend the test")


def with_field(cfg: PipelineConfig, path: str, value) -> PipelineConfig:
    cfg = copy.deepcopy(cfg)
    *parents, name = path.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, name, value)
    return cfg


def declares(stage, path: str) -> bool:
    return any(path == read or path.startswith(read + ".") for read in stage.reads)


def derives(stage, path: str) -> bool:
    """Whether a layout field of the stage moves one of its derived values."""
    base = {name: fn(CFG) for name, fn in stage.derived}
    other = with_field(CFG, path, other_value(path))
    return any(fn(other) != base[name] for name, fn in stage.derived)


CFG = load_config(None, [])
FIELDS = dict(leaf_fields(CFG))
# Fields left at null (their preset's value) by default, and a value to set them to.
SET_FROM_NULL = {"vq.channel_mult": [1, 2], "vq.num_quantizers": 2, "vq.lr": 1e-3, "vq.max_steps": 1200}


def other_value(path: str):
    return SET_FROM_NULL[path] if FIELDS[path] is None else changed(FIELDS[path])


@pytest.mark.parametrize("path", sorted(FIELDS))
def test_a_config_field_changes_exactly_the_keys_of_the_stages_that_read_it(path):
    before = {stage.name: config_key(CFG, stage) for stage in STAGES}
    other = with_field(CFG, path, other_value(path))
    moved = {stage.name for stage in STAGES if config_key(other, stage) != before[stage.name]}
    readers = {stage.name for stage in STAGES
               if declares(stage, path) and (path not in stage.layout or derives(stage, path))}
    assert moved == readers, (path, moved, readers)
    if not readers and not any(path in stage.layout for stage in STAGES):
        assert path.split(".")[0] in NOT_IN_ANY_KEY, (
            f"{path} is in no stage's key: declare it in a Stage's reads in pipeline/workflow.py, or name it in "
            f"NOT_IN_ANY_KEY with the reason the results do not depend on it")


def test_the_fields_named_in_no_key_are_really_read_by_no_stage():
    for section in NOT_IN_ANY_KEY:
        config_value(CFG, section)  # exists
        assert not [stage.name for stage in STAGES if any(read.split(".")[0] == section for read in stage.reads)]


def test_a_stage_reads_only_earlier_stages_and_known_inputs():
    seen = set()
    for stage in STAGES:
        for read in stage.reads:
            config_value(CFG, read)  # a path that exists
        for name in stage.inputs:
            assert name in ("shards", "prompts") or name in seen, (stage.name, name)
        seen.add(stage.name)
    assert set(STAGE_BY_NAME) == seen


def test_what_changes_what_a_stage_computes_is_in_its_key():
    """The holes there were, by name: the pixel limit changes which images vq and clip train on;
    the sampling defaults are baked into the ldm stage's package."""
    vq, clip, ldm = (STAGE_BY_NAME[name] for name in ("vq", "clip", "ldm"))
    assert declares(vq, "data.max_image_pixels") and declares(clip, "data.max_image_pixels")
    for path in ("samples.guidance_scale", "samples.steps", "samples.sampler"):
        assert declares(ldm, path)


def test_the_ldm_key_holds_the_global_batch_not_the_world_size_or_the_micro_batch():
    """A run that failed on 2 workers of 32 is resumed by the same job on 1 worker of 64 (or 4 x 16,
    or 2 x 16 x 2 accumulated): the same global batch, the same stage, its checkpoints found."""
    ldm = STAGE_BY_NAME["ldm"]

    def key(workers, batch, accum=1, cpus=1.0):
        return config_key(load_config(None, [f"ldm.num_workers={workers}", f"ldm.batch_size={batch}",
                                             f"ldm.grad_accum={accum}", f"ldm.cpus_per_worker={cpus}"]), ldm)

    assert key(2, 32) == key(1, 64) == key(4, 16) == key(2, 16, 2) == key(2, 32, cpus=4)
    assert key(2, 32) != key(2, 64) and key(2, 32) != key(1, 32)
    assert all(path in FIELDS for path in ldm.layout)


def test_the_workflow_run_carries_each_stages_time_and_headline_figures_at_any_guidance_scale():
    from pathlib import Path

    from pipeline.stages.cache import StageResult
    from pipeline.workflow import headline_metrics

    samples = StageResult("samples", "k", Path("."), "ran", 12.5, {
        "images": 32, "adherence_g5": 0.9, "adherence_g5_shape": 1.0, "grid_adherence_g5": 0.75, "img_per_s": 4.0})
    assert headline_metrics(STAGE_BY_NAME["samples"], samples) == {
        "samples.seconds": 12.5, "samples.adherence_g5": 0.9, "samples.grid_adherence_g5": 0.75}
    vq = StageResult("vq", "k", Path("."), "cached", 0.1, {"psnr": 30.5, "model_version": 3})  # no codebook usage
    assert headline_metrics(STAGE_BY_NAME["vq"], vq) == {"vq.seconds": 0.1, "vq.psnr": 30.5}


def test_a_sweep_over_the_ldm_budget_still_shares_the_first_stages():
    """vq reads ldm.epochs only as whether the budget is short: sweeping it (or the steps) keeps the
    vq, clip and encode stages shared by the trials; sweeping a field vq computes with does not."""
    from pipeline.sweep import shared_until

    demo = load_config(None, ["data.shards=/data/shards"])
    assert shared_until(demo, ["ldm.epochs"]) == shared_until(demo, ["ldm.max_steps"]) == "encode"
    assert shared_until(demo, ["ldm.lr"]) == "encode"
    assert shared_until(demo, ["vq.codebook_size"]) is None
    assert shared_until(demo, ["clip.lr"]) == "vq"
