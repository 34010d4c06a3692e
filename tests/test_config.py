"""Config loading: shipped YAMLs load, overrides apply, mistakes are named before any work starts."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import CONFIG_DIR, ConfigError, PipelineConfig, load_config
from pipeline.tracking import to_flat_dict

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)


def test_defaults_are_the_demo_and_overrides_apply():
    cfg = load_config(None, ["ldm.max_steps=7", "data.image_size=64", "ldm.schedule.beta_schedule=cosine",
                             "samples.prompts=[a,b]"])
    assert cfg.ldm.max_steps == 7 and cfg.data.image_size == 64
    assert cfg.ldm.schedule.beta_schedule == "cosine"
    assert cfg.samples.prompts == ["a", "b"]
    assert cfg.data.shards == ""  # demo
    assert cfg.tracking_uri.startswith("sqlite:///") and cfg.tracking_uri.endswith("work/mlflow.db")


@pytest.mark.parametrize("override, named", [
    ("ldm.max_stepz=3", "ldm.max_stepz"),
    ("nosuch.key=1", "nosuch"),
    ("ldm.max_steps=many", "ldm.max_steps"),
    ("vq.use_gpu=perhaps", "vq.use_gpu"),
    ("ldm.zero_stage=5", "ldm.zero_stage"),
    ("ldm.precision=fp8", "ldm.precision"),
    ("ldm.lr_schedule=linear", "ldm.lr_schedule"),
    ("vq.downsample=3", "vq.downsample"),
    ("ldm.schedule.beta_schedule=wavy", "beta_schedule"),
    ("data.image_size=2", "data.image_size"),
    ("clip.warmup_steps=-1", "clip.warmup_steps"),
    ("clip.context_length=1", "clip.context_length"),
    ("data.image_size=36", "data.image_size=36 must be a multiple of 8"),
    ("ldm.preset=huge", "ldm.preset"),
    ("clip.context_length=-3", "clip.context_length"),
    ("ldm.max_steps", "key=value"),
    ("workdir=s3://ldm/work", "workdir='s3://ldm/work' must be a filesystem path"),
    ("ldm.stall_timeout_s=-1", "ldm.stall_timeout_s"),
    ("vq.eval_batch_size=0", "vq.eval_batch_size"),
    ("evaluate.guidance_scales=[]", "evaluate.guidance_scales"),
    ("evaluate.num_images=0", "evaluate.num_images"),
    ("promote.alias=candidate", "promote.alias and mlflow.alias are both 'candidate'"),
    ("mlflow.outage_wait_s=-1", "mlflow.outage_wait_s"),
])
def test_bad_overrides_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_yaml_file_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ldm:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"ldm\.batch_sise"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_flat_dict_has_every_leaf():
    flat = to_flat_dict(load_config())
    assert flat["ldm.schedule.num_train_timesteps"] == "1000"
    assert "mlflow.experiment_name" in flat


def test_force_promote_is_a_flag_of_the_jobs():
    from pipeline.cli import parse_job_args

    assert parse_job_args("train", ["ldm.max_steps=3"]).promote.force is False
    forced = parse_job_args("train", ["ldm.max_steps=3", "--force-promote"])
    assert forced.promote.force is True and forced.ldm.max_steps == 3


def test_job_rejects_a_bad_key_before_any_work(tmp_path):
    workdir = tmp_path / "wd"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train_ldm.py"), f"workdir={workdir}", "ldm.max_stepz=1"],
        capture_output=True, text=True, timeout=600,  # a guard against a hang, not a speed target
    )
    assert proc.returncode == 2
    assert "ldm.max_stepz" in proc.stderr
    assert not workdir.exists()  # nothing started


def test_first_stage_lr_warms_up_then_decays_to_zero():
    import torch

    from pipeline.training.first_stage import warmup_cosine

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = warmup_cosine(optimizer, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == [0.5, 1.0, 1.5, 2.0]  # the first step already trains, at lr / warmup
    assert lrs[4] == 2.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.2
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_ldm_lr_warms_up_then_follows_its_schedule(schedule):
    import torch

    from pipeline.training.ldm_loop import lr_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    scheduler = lr_scheduler(optimizer, warmup_steps=4, schedule=schedule, max_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == [0.5, 1.0, 1.5, 2.0]
    if schedule == "cosine":  # ldm.lr_schedule's default: to zero at ldm.max_steps
        assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    else:
        assert lrs[4:] == [2.0] * 8


def test_an_image_size_a_pretrained_vq_cannot_encode_for_the_unet_fails_before_any_read(tmp_path):
    """vq.pretrained brings its own downsampling: checked when the vq stage loads it, before it
    reads a shard (here there are none to read)."""
    from pipeline.models.vq import VQModel, VQModelConfig
    from pipeline.stages.vq import run_vq

    VQModel(VQModelConfig(hidden_channels=8, latent_channels=4, downsample=8, codebook_size=16)).save(tmp_path / "vq")
    cfg = load_config(None, [f"workdir={tmp_path}", f"vq.pretrained={tmp_path / 'vq'}", "data.image_size=40"])
    with pytest.raises(ConfigError, match=r"data\.image_size=40 must be a multiple of 16 \(the downsampling of vq\.pretrained"):
        run_vq(cfg, [], tmp_path / "out", None)
