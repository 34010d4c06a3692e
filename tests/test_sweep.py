"""A small sweep through Ray Tune as `jobs/sweep.py` runs it: two trials over ldm.lr on the tiny
workflow's workdir, the shared stages found in its cache, each trial an MLflow run under the sweep's, the best sampled
and promoted; and the config errors a sweep gives before any stage runs."""

import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_workflow import tiny_overrides

from pipeline.config import ConfigError, load_config
from pipeline.sweep import parse_space, run_sweep

pytestmark = pytest.mark.slow

LRS = [1e-3, 4e-3]


@pytest.fixture(scope="module")
def sweep(demo_run):
    """On the tiny workflow's workdir (conftest's `demo_run`), under an experiment and a model name
    of its own: the shared stages are the workflow's, found in the cache."""
    from pipeline.sample_client import free_port

    overrides = tiny_overrides(Path(demo_run[0].workdir), free_port()) + [
        "mlflow.experiment_name=sweep", "mlflow.registered_model_name=sweep-ldm",
        "evaluate.num_images=16", "evaluate.guidance_scales=[1,3]",
        f"sweep.space.ldm.lr=[{LRS[0]},{LRS[1]}]", "sweep.num_samples=1"]
    path = run_sweep(None, overrides)
    return load_config(None, overrides), json.loads(path.read_text())


def test_each_trial_trains_its_own_ldm_on_stages_shared_from_the_cache(sweep):
    cfg, summary = sweep
    assert summary["shared_stages_until"] == "encode"
    trials = summary["trials"]
    assert sorted(t["params"]["ldm.lr"] for t in trials) == LRS  # a list is a grid: each value a trial
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_run(summary["mlflow_run_id"]).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    by_name = {run.info.run_name: run for run in children}
    assert "shared stages" in by_name
    for trial in trials:
        run = by_name[f"trial-{trial['trial_id']}"]
        assert float(run.data.params["ldm.lr"]) == trial["params"]["ldm.lr"]
        stages = {r.data.tags.get("stage"): r for r in client.search_runs(
            [experiment], f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
        for shared in ("vq", "clip", "encode"):  # trained once, before the trials
            assert stages[shared].data.tags["status"] == "cached", (trial["trial_id"], shared)
        assert "samples" not in stages  # a trial goes as far as its evaluation
        if trial["status"] == "finished":
            assert stages["ldm"].data.tags["status"] == "ran"
            assert run.info.status == "FINISHED"
            assert trial["final_fd"] > 0 and trial["model_version"]
            # ASHA's input: the in-training FD of each checkpoint, as the ldm run has it
            fd_name = next(k for k in stages["ldm"].data.metrics if k.startswith("fd_"))
            history = sorted(client.get_metric_history(stages["ldm"].info.run_id, fd_name), key=lambda m: m.step)
            assert [p["step"] for p in trial["in_training"]] == [m.step for m in history] == [3, 6]
            assert [p["fd"] for p in trial["in_training"]] == pytest.approx([m.value for m in history])
        else:  # stopped early by ASHA: its runs are closed, not left running
            assert trial["status"] == "stopped by ASHA", trial
            # KILLED when stopped mid-workflow; FINISHED when ASHA's stop came at a rung reported
            # after the workflow had ended (here the evaluations only run once training is done).
            assert run.info.status in ("KILLED", "FINISHED"), run.info.status
            assert not [r for r in stages.values() if r.info.status == "RUNNING"], stages
    # sweep.max_concurrent (1 here): the trials' ldm runs (a stopped one's ending at its last
    # metric) do not overlap in time.
    spans = sorted((r.info.start_time, r.info.end_time) for r in client.search_runs(
        [experiment], "tags.stage = 'ldm'") if r.data.tags.get("status") != "cached")
    assert len(spans) == len(trials)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans


def test_the_best_finished_trial_is_sampled_registered_and_goes_through_promotion(sweep):
    cfg, summary = sweep
    finished = [t for t in summary["trials"] if t["status"] == "finished"]
    assert finished, summary["trials"]
    best = summary["best"]
    assert best["final_fd"] == min(t["final_fd"] for t in finished)
    assert summary["best_model_uri"] == f"models:/{cfg.mlflow.registered_model_name}/{best['model_version']}"
    assert summary["promotion"]["decision"] == "promoted"  # the first version to hold production
    client = MlflowClient(cfg.tracking_uri)
    name = cfg.mlflow.registered_model_name
    assert str(client.get_model_version_by_alias(name, cfg.promote.alias).version) == str(best["model_version"])
    assert str(client.get_model_version_by_alias(name, cfg.mlflow.alias).version) == str(best["model_version"])
    whole = json.loads(open(summary["best_summary"]).read())
    assert whole["stages"]["ldm"]["status"] == "cached" and whole["stages"]["samples"]["status"] == "ran"
    sweep_run = client.get_run(summary["mlflow_run_id"])
    assert sweep_run.data.metrics["best_fd"] == pytest.approx(best["final_fd"])
    assert sweep_run.data.tags["sweep.best_trial"] == best["trial_id"]


@pytest.mark.parametrize("override, message", [
    ("sweep.space.ldm.lrr=[1e-3]", "sweep.space.ldm.lrr"),
    ("sweep.space.ldm.lr=logunif(1e-4,1e-3)", "neither a list nor one of loguniform"),
    ("sweep.space.ldm.lr=loguniform(1e-3,1e-4)", "two numbers a < b"),
    ("sweep.space.ldm.max_steps=[-1,10]", "ldm.max_steps and ldm.epochs must be >= 0"),
    ("sweep.space.mlflow.experiment_name=[a,b]", "not something a trial can vary"),
])
def test_a_bad_search_space_names_its_key_before_anything_runs(override, message):
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_space(cfg, None, [override])


def test_an_empty_search_space_is_an_error():
    with pytest.raises(ConfigError, match="sweep.space is empty"):
        parse_space(load_config(None, []), None, [])
