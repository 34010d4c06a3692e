"""The cluster path, as users run it: a multi-node Ray cluster started with `ray start` on this
machine (a head with no CPUs for work and three one-CPU worker nodes, token authentication on),
jobs sent with `ray job submit --working-dir .`, read back through the Job API and the state API.

One cluster for the module. Two jobs submitted at once on one workdir run the whole workflow (one
waits for the other's stages); then a third trains a new UNet on the same workdir while one worker
node is killed (a spot reclaim), and must still succeed with every step logged once.
"""

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.localcluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.demo_num_samples=192", "data.demo_shard_size=64", "vq.max_steps=8", "vq.batch_size=16",
        "clip.max_steps=8", "clip.batch_size=32", "ldm.max_steps=6", "ldm.checkpoint_every=3", "ldm.sample_every=3",
        "ldm.batch_size=8", "ldm.log_every=2", "samples.steps=3", "samples.num_per_prompt=2",
        "samples.adherence_images=12", "samples.prompts=[a red circle on the left,a blue square on the right]"]
STAGES = ("shards", "vq", "clip", "encode", "ldm", "samples")
# The driver imports torch, Ray, DeepSpeed and MLflow (about 1.05 GB here) and computes nothing:
# a driver that ran the first stage's evaluation or the adherence sampling would grow past this.
DRIVER_PEAK_RSS_MB = 1500
JOB_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def cluster():
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="ldmc-", dir="/tmp")  # short: Ray's socket paths live under it
    cluster = LocalCluster.up(root, workers=3, worker_cpus=1)
    yield cluster
    cluster.down()
    shutil.rmtree(root, ignore_errors=True)


def api(cluster: LocalCluster, path: str, token: bool = True, data: bytes | None = None):
    request = urllib.request.Request(cluster.address + path, data=data, headers=cluster.auth_headers() if token else {},
                                     method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())


def submit(cluster: LocalCluster, submission_id: str, *overrides: str, env: dict | None = None):
    """`ray job submit --no-wait --working-dir .` as a user types it; returns the finished process."""
    return subprocess.run(
        ["ray", "job", "submit", "--address", cluster.address, "--submission-id", submission_id, "--no-wait",
         "--working-dir", ".", "--", "python", "jobs/train_ldm.py", "--config", "jobs/configs/local-cluster.yaml",
         *overrides],
        cwd=ROOT, env=env or cluster.client_env(), capture_output=True, text=True, timeout=300)


def job(cluster: LocalCluster, submission_id: str) -> dict:
    return api(cluster, f"/api/jobs/{submission_id}")


def logs(cluster: LocalCluster, submission_id: str) -> str:
    return api(cluster, f"/api/jobs/{submission_id}/logs")["logs"]


def wait_for(cluster: LocalCluster, submission_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := job(cluster, submission_id)["status"]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {submission_id} still {status} after {timeout_s:.0f} s:\n"
                                 f"{logs(cluster, submission_id)[-5000:]}")
        time.sleep(2)
    return status


def state(cluster: LocalCluster, kind: str) -> list[dict]:
    return api(cluster, f"/api/v0/{kind}?limit=10000&detail=true")["data"]["result"]["result"]


@pytest.fixture(scope="module")
def two_jobs(cluster, tmp_path_factory):
    """Two jobs submitted at once with the same workdir and config, both waited for."""
    workdir = tmp_path_factory.mktemp("cluster-work") / "work"
    ids = ["two-jobs-a", "two-jobs-b"]
    for submission_id in ids:
        proc = submit(cluster, submission_id, f"workdir={workdir}", *TINY)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    statuses = {submission_id: wait_for(cluster, submission_id) for submission_id in ids}
    return {"workdir": workdir, "ids": ids, "statuses": statuses,
            "logs": {submission_id: logs(cluster, submission_id) for submission_id in ids},
            "summary": json.loads((workdir / "summary.json").read_text())}


def test_two_jobs_on_one_workdir_both_succeed_and_each_stage_runs_once(two_jobs):
    assert set(two_jobs["statuses"].values()) == {"SUCCEEDED"}, {i: log[-3000:] for i, log in two_jobs["logs"].items()}
    for stage in STAGES:
        ran = [i for i, log in two_jobs["logs"].items() if f"== stage {stage}: ran in" in log]
        cached = [i for i, log in two_jobs["logs"].items() if f"== stage {stage}: cached in" in log]
        assert len(ran) == 1 and len(cached) == 1, (stage, ran, cached)
    assert any("waiting for another run to finish this stage" in log for log in two_jobs["logs"].values())
    summary = two_jobs["summary"]
    assert list(summary["stages"]) == list(STAGES)
    assert summary["model_uri"].startswith("models:/ldm-pipeline/")
    assert summary["stages"]["encode"]["metrics"]["samples"] == 192
    assert summary["stages"]["ldm"]["metrics"]["world_sizes"] == [2]
    assert summary["stages"]["ldm"]["metrics"]["worker_group_restarts"] == 0
    versions = MlflowClient(summary["tracking_uri"]).search_model_versions("name='ldm-pipeline'")
    assert len(versions) == 1  # registered once, by the run that trained it


def test_the_work_runs_on_worker_nodes_and_the_driver_only_coordinates(cluster, two_jobs):
    """Train workers, the encoders' actor pool, the Serve replica and every evaluation task run on
    worker nodes (from Ray's state, not the config); the driver ran on the head, under a fixed RSS."""
    placed = {}
    for actor in state(cluster, "actors"):
        placed.setdefault(actor["class_name"], set()).add(cluster.node_name(actor["node_id"]))
    for task in state(cluster, "tasks"):
        if task["type"] == "NORMAL_TASK" and task.get("node_id"):
            placed.setdefault(task["name"], set()).add(cluster.node_name(task["node_id"]))
    for name in ("RayTrainWorker", "MapWorker(MapBatches(FrozenEncoders))", "ServeReplica:ldm:Sampler",
                 "write_demo_shards", "finish_vq", "heldout_retrieval", "save_null_condition",
                 "demo_adherence_at_scales"):
        assert name in placed, (name, sorted(placed))
        assert placed[name] and all(node and node.startswith("worker-") for node in placed[name]), (name, placed[name])
    driver = two_jobs["summary"]["driver"]
    assert cluster.node_name(driver["node_id"]) == "head"
    assert 0 < driver["peak_rss_mb"] < DRIVER_PEAK_RSS_MB, driver


def test_a_job_without_the_token_is_refused(cluster, tmp_path):
    with pytest.raises(urllib.error.HTTPError) as refused:
        api(cluster, "/api/jobs/", token=False,
            data=json.dumps({"entrypoint": "python -c 'print(1)'"}).encode())
    assert refused.value.code == 401
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    proc = submit(cluster, "no-token", "workdir=/nonexistent", env=cluster.client_env(RAY_AUTH_TOKEN_PATH=str(wrong)))
    assert proc.returncode != 0
    said = (proc.stdout + proc.stderr).lower()
    assert "401" in said or "unauthorized" in said or "authentication" in said, said[-2000:]
    with pytest.raises(urllib.error.HTTPError):
        job(cluster, "no-token")  # never created


def test_a_lost_worker_node_costs_a_restart_not_the_run(cluster, two_jobs):
    """ldm on 2 of the 3 worker nodes; a node holding a train worker is killed (its raylet first) after
    the first checkpoint. Ray Train restarts the group on the two nodes left, resumes from the
    checkpoint, reads its input again from the shared workdir, and the job succeeds; the loss
    history holds every step exactly once."""
    steps, every = 60, 10
    submission_id = "node-loss"
    proc = submit(cluster, submission_id, f"workdir={two_jobs['workdir']}", *TINY, f"ldm.max_steps={steps}",
                  f"ldm.checkpoint_every={every}", "ldm.batch_size=32", "ldm.log_every=1", "ldm.sample_every=0",
                  "ldm.max_failures=2", "samples.adherence_images=0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while f"[ldm] step {every + 3}/{steps}" not in logs(cluster, submission_id):
        assert job(cluster, submission_id)["status"] in ("PENDING", "RUNNING"), logs(cluster, submission_id)[-5000:]
        assert time.monotonic() < deadline, logs(cluster, submission_id)[-5000:]
        time.sleep(0.5)
    workers = [cluster.node_name(a["node_id"]) for a in state(cluster, "actors")
               if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"]
    victim = sorted(workers)[0]
    cluster.kill_node(victim)
    try:
        status = wait_for(cluster, submission_id)
        text = logs(cluster, submission_id)
        assert status == "SUCCEEDED", text[-6000:]
        assert f"[ldm] resumed from step {every}" in text or f"[ldm] resumed from step {2 * every}" in text
        summary = json.loads((two_jobs["workdir"] / "summary.json").read_text())
        ldm = summary["stages"]["ldm"]["metrics"]
        assert ldm["worker_group_restarts"] >= 1 and ldm["world_sizes"] == [2], ldm
        client = MlflowClient(summary["tracking_uri"])
        run_id = json.loads((Path(summary["stages"]["ldm"]["output"]) / "registered.json").read_text())["run_id"]
        history = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert sorted(history) == list(range(1, steps + 1)), history
    finally:
        cluster.add_worker(1)  # back to three worker nodes for whatever runs next
