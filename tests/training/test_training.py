"""The ldm stage under failure, through the real components: Ray Train + DeepSpeed (gloo, 2 CPU
workers) on a tiny latent dataset written by Ray Data, metrics in a real MLflow store.

- a run that fails at step 5 and resumes logs exactly the losses of an uninterrupted run;
- a run resumes at another world size with the same losses, ZeRO-2/3 too (through DeepSpeed's
  universal checkpoint);
- ZeRO-3 resumes too, and its EMA (gathered across ranks) matches the ZeRO-0 run's;
- bf16 under ZeRO-2 trains as fp32 does (to bf16's rounding) and exports fp32 weights;
- ZeRO-2 resumes, and a non-finite loss skips its step and is counted;
- too many non-finite losses in a row stop the run with a clear error;
- a tracking server that goes away does not stop training; its metrics are kept and sent when it is back.
"""

import json
import math
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.stages.ldm import run_ldm
from pipeline.tiny_models import write_latent_dataset
from pipeline.tracking import setup_experiment

pytestmark = pytest.mark.slow  # whole stages, servers or clusters: `make test-fast` leaves them out

ROWS, LATENT, CONTEXT, WIDTH = 48, (4, 8, 8), 8, 32
STEPS, BATCH, CHECKPOINT_EVERY = 8, 4, 3  # 48 rows / (2 workers x 4) = 6 steps per epoch


@pytest.fixture(scope="module")
def latents_dir(ray_session, tmp_path_factory) -> Path:
    """A latent dataset as the encode stage writes it: Parquet rows, metadata, null condition."""
    return write_latent_dataset(tmp_path_factory.mktemp("latents"), ROWS, LATENT, context=CONTEXT, width=WIDTH)


def train(workdir: Path, latents_dir: Path, name: str, *overrides: str, tracking_uri: str = "",
          fresh_output: bool = True) -> tuple[dict, str, Path]:
    """run_ldm on a fresh MLflow run; returns (result, run id, output directory)."""
    cfg = load_config(None, [
        f"workdir={workdir}", f"ldm.max_steps={STEPS}", f"ldm.batch_size={BATCH}",
        f"ldm.checkpoint_every={CHECKPOINT_EVERY}", "ldm.log_every=1", "ldm.warmup_steps=2", "ldm.lr=3e-3",
        "ldm.keep_checkpoints=2", "ldm.num_workers=2", "ldm.cpus_per_worker=1",  # 2 ranks: the demo has 1
        *([f"mlflow.tracking_uri={tracking_uri}"] if tracking_uri else []), *overrides,
    ])
    setup_experiment(cfg.tracking_uri, "training-tests", workdir)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    out = workdir / name
    out.mkdir(parents=True, exist_ok=not fresh_output)
    return run_ldm(cfg, latents_dir, out, run_id, name=name), run_id, out


def losses(tracking_uri: str, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(tracking_uri).get_metric_history(run_id, "loss")]


@pytest.fixture(scope="module")
def uninterrupted(latents_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result, run_id, out = train(workdir, latents_dir, "ldm-a")
    uri = f"sqlite:///{workdir.resolve()}/mlflow.db"
    return {"result": result, "losses": dict(losses(uri, run_id)), "unet": load_file(str(out / "unet.safetensors"))}


def test_failure_at_step_5_resumes_with_the_same_per_step_losses(uninterrupted, latents_dir, tmp_path, monkeypatch):
    reference = uninterrupted["losses"]
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in reference.values())
    monkeypatch.setenv("LDM_FAIL_AT_STEP", "5")
    result, run_id, out = train(tmp_path, latents_dir, "ldm-b", "ldm.max_failures=1")
    logged = losses(f"sqlite:///{tmp_path.resolve()}/mlflow.db", run_id)
    # Steps 1-4 ran before the failure; the run resumed from the step-3 checkpoint and trained
    # step 4 again, but the history holds every step once. Each value equals the uninterrupted run's.
    assert [step for step, _ in logged] == list(range(1, STEPS + 1))
    assert result["worker_group_restarts"] == 1 and result["world_sizes"] == [2]
    for step, value in logged:
        assert value == reference[step], f"step {step}: {value} != {reference[step]}"
    assert (tmp_path / "ray_results" / "ldm-b" / "injected_failure").read_text() == "5"
    unet = load_file(str(out / "unet.safetensors"))
    assert all(torch.equal(unet[k], uninterrupted["unet"][k]) for k in unet)


def test_a_failed_job_run_again_with_the_same_workdir_resumes(uninterrupted, latents_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_FAIL_AT_STEP", "5")
    with pytest.raises(Exception, match="injected failure"):  # max_failures=0: the job fails
        train(tmp_path, latents_dir, "ldm-rerun")
    monkeypatch.delenv("LDM_FAIL_AT_STEP")
    result, run_id, out = train(tmp_path, latents_dir, "ldm-rerun", fresh_output=False)
    logged = losses(f"sqlite:///{tmp_path.resolve()}/mlflow.db", run_id)
    # the second job started from the step-3 checkpoint, not from scratch
    assert sorted(step for step, _ in logged) == list(range(4, STEPS + 1))
    for step, value in logged:
        assert value == uninterrupted["losses"][step], step
    unet = load_file(str(out / "unet.safetensors"))
    assert all(torch.equal(unet[k], uninterrupted["unet"][k]) for k in unet)


@pytest.mark.parametrize("first,then", [(2, 1)])  # growing: the ZeRO-3 case below (1 -> 2)
def test_a_run_failed_at_one_world_size_resumes_at_another(first, then, uninterrupted, latents_dir, tmp_path,
                                                          monkeypatch):
    """A job that failed on `first` workers (a node lost), run again on `then` with the same global
    batch: it resumes from the last checkpoint, and from there each step's loss is the uninterrupted
    2-worker run's (the same samples, order and noise; only float summation differs)."""
    def layout(workers):
        return f"ldm.num_workers={workers}", f"ldm.batch_size={BATCH * 2 // workers}"

    monkeypatch.setenv("LDM_FAIL_AT_STEP", "5")
    with pytest.raises(Exception, match="injected failure"):
        train(tmp_path, latents_dir, "ldm-resize", *layout(first))
    monkeypatch.delenv("LDM_FAIL_AT_STEP")
    result, run_id, out = train(tmp_path, latents_dir, "ldm-resize", *layout(then), fresh_output=False)
    logged = losses(f"sqlite:///{tmp_path.resolve()}/mlflow.db", run_id)
    assert sorted(step for step, _ in logged) == list(range(CHECKPOINT_EVERY + 1, STEPS + 1))
    for step, value in logged:
        assert value == pytest.approx(uninterrupted["losses"][step], rel=1e-3, abs=1e-5), step
    assert result["world_sizes"] == [first, then]
    unet = load_file(str(out / "unet.safetensors"))
    for name, value in unet.items():
        torch.testing.assert_close(value, uninterrupted["unet"][name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("stage,first,then", [(2, 2, 1), (3, 1, 2)])
def test_a_zero_partitioned_run_resumes_at_another_world_size(stage, first, then, uninterrupted, latents_dir,
                                                             tmp_path, monkeypatch):
    """ZeRO-2/3 state is split by rank: resumed at another world size it goes through DeepSpeed's
    universal checkpoint, and each step after the checkpoint follows the uninterrupted run's."""
    def layout(workers):
        return f"ldm.zero_stage={stage}", f"ldm.num_workers={workers}", f"ldm.batch_size={BATCH * 2 // workers}"

    monkeypatch.setenv("LDM_FAIL_AT_STEP", "5")
    with pytest.raises(Exception, match="injected failure"):
        train(tmp_path, latents_dir, "ldm-zero-resize", *layout(first))
    monkeypatch.delenv("LDM_FAIL_AT_STEP")
    result, run_id, out = train(tmp_path, latents_dir, "ldm-zero-resize", *layout(then), fresh_output=False)
    assert result["world_sizes"] == [first, then]
    logged = losses(f"sqlite:///{tmp_path.resolve()}/mlflow.db", run_id)
    assert sorted(step for step, _ in logged) == list(range(CHECKPOINT_EVERY + 1, STEPS + 1))
    for step, value in logged:  # the Adam moments came through: a fresh AdamW is off by 4% a step later
        assert value == pytest.approx(uninterrupted["losses"][step], rel=1e-3, abs=1e-5), step
    unet = load_file(str(out / "unet.safetensors"))
    for name, value in unet.items():
        torch.testing.assert_close(value, uninterrupted["unet"][name], rtol=1e-3, atol=1e-4, msg=name)


def test_zero3_resumes_and_its_ema_matches_zero0(uninterrupted, latents_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_FAIL_AT_STEP", "5")
    result, run_id, out = train(tmp_path, latents_dir, "ldm-z3", "ldm.zero_stage=3", "ldm.max_failures=1")
    assert (tmp_path / "ray_results" / "ldm-z3" / "injected_failure").is_file()
    unet = load_file(str(out / "unet.safetensors"))
    reference = uninterrupted["unet"]
    assert set(unet) == set(reference)
    for name, value in unet.items():  # the full tensors, not rank 0's partition
        assert value.shape == reference[name].shape, name
        torch.testing.assert_close(value, reference[name], rtol=1e-3, atol=1e-5, msg=name)
    logged = dict(losses(f"sqlite:///{tmp_path.resolve()}/mlflow.db", run_id))
    for step in range(1, STEPS + 1):
        assert logged[step] == pytest.approx(uninterrupted["losses"][step], rel=1e-3), step


def test_bf16_under_zero2_trains_as_fp32_does_and_exports_fp32_weights(uninterrupted, latents_dir, tmp_path):
    """bf16, what GPU runs use: DeepSpeed's bf16 wrapper steps the (fused) AdamW on fp32 master
    weights, so each step's loss follows the fp32 run's to bf16's rounding; the served UNet is fp32."""
    result, run_id, out = train(tmp_path, latents_dir, "ldm-bf16", "ldm.precision=bf16", "ldm.zero_stage=2")
    logged = dict(losses(f"sqlite:///{tmp_path.resolve()}/mlflow.db", run_id))
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert logged[step] == pytest.approx(uninterrupted["losses"][step], rel=2e-2), step
    assert logged[STEPS] < logged[1]
    unet = load_file(str(out / "unet.safetensors"))
    assert {v.dtype for v in unet.values()} == {torch.float32}
    for name, value in unet.items():
        torch.testing.assert_close(value, uninterrupted["unet"][name], rtol=0.05, atol=2e-3, msg=name)


def test_zero2_skips_and_counts_a_nonfinite_loss_and_resumes(latents_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_NONFINITE_AT_STEP", "2")
    monkeypatch.setenv("LDM_NONFINITE_REPEAT", "2")
    monkeypatch.setenv("LDM_FAIL_AT_STEP", "5")
    result, run_id, out = train(tmp_path, latents_dir, "ldm-z2", "ldm.zero_stage=2", "ldm.max_failures=1")
    assert result["nonfinite_steps"] == 2
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    logged = losses(client.tracking_uri, run_id)
    assert sorted({step for step, _ in logged}) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for _, v in logged)
    assert max(m.value for m in client.get_metric_history(run_id, "nonfinite_steps")) == 2
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "unet.safetensors")).values())


def test_streamed_latents_train_and_a_full_local_instance_is_refused_up_front(latents_dir, tmp_path):
    """`ldm.stream_latents`: Ray Data's dynamic split feeds the workers while they train. Its read
    tasks need a CPU the trainers do not hold; on the 2-CPU test instance 2 one-CPU workers leave
    none, which would wait forever, so that is an error naming the settings before any work."""
    with pytest.raises(ValueError, match=r"ldm.stream_latents=true .* 2 CPUs .* hold 2"):
        train(tmp_path, latents_dir, "ldm-stream-full", "ldm.stream_latents=true")
    assert not (tmp_path / "ray_results" / "ldm-stream-full").exists()
    result, run_id, out = train(tmp_path, latents_dir, "ldm-stream", "ldm.stream_latents=true", "ldm.num_workers=1")
    assert result["global_batch"] == BATCH and (out / "unet.safetensors").is_file()
    logged = losses(f"sqlite:///{tmp_path.resolve()}/mlflow.db", run_id)
    assert sorted(step for step, _ in logged) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for _, v in logged)


def test_nonfinite_losses_in_a_row_stop_the_run_with_a_clear_error(latents_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_NONFINITE_AT_STEP", "2")
    monkeypatch.setenv("LDM_NONFINITE_REPEAT", "5")
    with pytest.raises(Exception, match=r"3 non-finite losses in a row before step 2 \(ldm.max_nonfinite_steps=3\)"):
        train(tmp_path, latents_dir, "ldm-nan", "ldm.max_nonfinite_steps=3")
    assert not (tmp_path / "ldm-nan" / "unet.safetensors").exists()


def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--default-artifact-root", str(store / "art"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # a guard against a server that never starts, not a speed target
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("mlflow server did not start")


def test_training_survives_a_tracking_outage_and_sends_the_kept_metrics_once_the_server_is_back(
        latents_dir, tmp_path, free_port, capfd):
    """The server goes away after the run was created, before any metric; training goes on and
    keeps the metrics in the storage's fallback file; the server comes back once they are there,
    and the stage sends them (within `mlflow.outage_wait_s`): every step once, nothing left kept.
    (A server that stays away: tests/test_tracking.py.)"""
    store = tmp_path / "server"
    store.mkdir()
    uri = f"http://127.0.0.1:{free_port}"
    server = start_mlflow_server(store, free_port)
    try:
        cfg_workdir = tmp_path / "work"
        cfg_workdir.mkdir()
        setup_experiment(uri, "training-tests", cfg_workdir)
        with mlflow.start_run() as run:
            run_id = run.info.run_id
    finally:
        server.terminate()
        server.wait(timeout=30)
    kept = cfg_workdir / "ray_results" / "ldm-outage" / "unlogged_metrics.jsonl"
    back: dict = {}

    def restart_once_metrics_are_kept():
        deadline = time.time() + 600  # a guard against a test that never gets there
        while not kept.is_file() and time.time() < deadline:
            time.sleep(0.2)
        back["server"] = start_mlflow_server(store, free_port)

    restarter = threading.Thread(target=restart_once_metrics_are_kept, daemon=True)
    restarter.start()
    cfg = load_config(None, [
        f"workdir={cfg_workdir}", f"mlflow.tracking_uri={uri}", "ldm.max_steps=4", f"ldm.batch_size={BATCH}",
        "ldm.checkpoint_every=2", "ldm.log_every=1", "ldm.num_workers=2", "ldm.cpus_per_worker=1",
        "mlflow.outage_wait_s=300"])  # a guard too: the stage goes on as soon as the server answers
    out = cfg_workdir / "ldm-outage"
    out.mkdir()
    try:
        result = run_ldm(cfg, latents_dir, out, run_id, name="ldm-outage")
        restarter.join(timeout=60)
        assert (out / "unet.safetensors").is_file() and math.isfinite(result["final_loss"])
        assert "cannot reach the tracking server" in capfd.readouterr().out
        assert sorted(step for step, _ in losses(uri, run_id)) == [1, 2, 3, 4]
        assert kept.read_text() == ""  # all sent, none kept twice
    finally:
        if "server" in back:
            back["server"].terminate()
            back["server"].wait(timeout=30)


def test_local_workers_keep_the_pg_cleaners_errors_but_not_its_state_api_warnings():
    """A local instance runs without the dashboard, so Ray Train's placement-group cleaner cannot
    reach the state API and would warn once a second; the worker setup hook quiets exactly that
    logger. Its name is its module's: if Ray moves the module, this fails rather than the log filling."""
    import importlib
    import logging

    from pipeline.ray_runtime import LOCAL_NOISY_LOGGERS, quiet_logs_hook

    quiet_logs_hook()()
    for name in LOCAL_NOISY_LOGGERS:
        logger = importlib.import_module(name).logger
        assert logger.name == name
        assert logger.isEnabledFor(logging.ERROR) and not logger.isEnabledFor(logging.WARNING)


def test_a_fit_that_cannot_start_stops_with_an_error_naming_what_it_waits_for(latents_dir, tmp_path):
    """Three one-CPU workers on the two-CPU instance can never be placed. Instead of waiting forever
    the stage stops after ldm.stall_timeout_s, naming Ray's pending demand and the keys that free it,
    and leaves nothing behind that holds or asks for the CPUs."""
    from pipeline.training.progress import TrainingStalled

    with pytest.raises(TrainingStalled, match=r"before the first step.*placement group of 3 x \{CPU: 1\}.*"
                                              r"free now: 2 of 2 CPU.*ldm.num_workers x ldm.cpus_per_worker"):
        train(tmp_path, latents_dir, "ldm-stall", "ldm.num_workers=3", "ldm.stall_timeout_s=10")
    deadline = time.time() + 60
    while any(info["state"] != "REMOVED" for info in ray.util.placement_group_table().values()):
        assert time.time() < deadline, ray.util.placement_group_table()
        time.sleep(1)


def test_an_unplaced_placement_group_is_named_even_before_the_autoscaler_reports_it(ray_session):
    """The autoscaler's demand report lags behind the GCS (seconds on a loaded machine): a stall
    message read in that gap still names the group Ray cannot place, from the GCS's own table."""
    from pipeline.training.progress import _waiting_placement_groups

    group = ray.util.placement_group([{"CPU": 1}] * 5)
    try:
        assert "a placement group of 5 x {CPU: 1} (PENDING)" in _waiting_placement_groups()
    finally:
        ray.util.remove_placement_group(group)
    deadline = time.time() + 30
    while _waiting_placement_groups():
        assert time.time() < deadline, _waiting_placement_groups()
        time.sleep(0.5)
