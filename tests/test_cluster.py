"""The cluster path, as users run it, on the production stack: a multi-node Ray cluster started with
`ray start` on this machine (a head with no CPUs for work and three one-CPU worker nodes, token
authentication on), real PostgreSQL, an S3-protocol endpoint and `mlflow server` (basic auth) on
127.0.0.1 (pipeline.localservices); shards in the bucket, checkpoints in the bucket, runs on the
server. Jobs are sent with `ray job submit --working-dir .` and read back through the Job API, the
state API, MLflow's REST API and the bucket.

One stack and one cluster for the module. Two jobs submitted at once on one workdir run the whole
workflow (one waits for the other's stages); then a shard object is replaced and a third job
retrains from it while a worker node is killed (a spot reclaim), and then, while it trains on, the
tracking server is stopped and started again. Each must succeed with every step logged once.
"""

import datetime
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.localcluster import LocalCluster
from pipeline.localservices import BUCKET, LocalServices

pytestmark = pytest.mark.slow  # whole stages, servers or clusters: `make test-fast` leaves them out

ROOT = Path(__file__).resolve().parent.parent
SHARDS = f"s3://{BUCKET}/shards/{{00000..00002}}.tar"  # the demo's 192 samples, uploaded by the fixture
TINY = [f"data.shards={SHARDS}", f"ldm.storage_path=s3://{BUCKET}/ray-train", "vq.max_steps=8", "vq.batch_size=16",
        "clip.max_steps=8", "clip.batch_size=32", "ldm.max_steps=6", "ldm.checkpoint_every=3", "ldm.sample_every=3",
        "ldm.batch_size=8", "ldm.log_every=2", "samples.steps=3", "samples.num_per_prompt=2",
        "samples.adherence_images=12", "samples.prompts=[a red circle on the left,a blue square on the right]"]
STAGES = ("vq", "clip", "encode", "ldm", "samples", "evaluate", "promote")
# The driver imports torch, Ray, DeepSpeed and MLflow (about 1.05 GB here) and computes nothing:
# a driver that ran the first stage's evaluation or the adherence sampling would grow past this.
DRIVER_PEAK_RSS_MB = 1500
JOB_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """PostgreSQL + S3 endpoint + mlflow server, the demo's shards in the bucket; this process gets
    the clients' environment (the credentials) for the module."""
    import shutil
    import tempfile

    from pipeline.data.shards import write_demo_shards

    root = tempfile.mkdtemp(prefix="ldms-", dir="/tmp")  # the postgres user must be able to enter it
    stack = LocalServices.up(root)
    shards = tmp_path_factory.mktemp("shards")
    for path in write_demo_shards(shards, 192, 32, 0, 64):
        stack.s3_client().upload_file(str(path), BUCKET, f"shards/{Path(path).name}")
    with pytest.MonkeyPatch.context() as env:
        for name, value in stack.client_env().items():
            env.setenv(name, value)
        yield stack
    stack.down()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(services):
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="ldmc-", dir="/tmp")  # short: Ray's socket paths live under it
    cluster = LocalCluster.up(root, workers=3, worker_cpus=1, node_env=services.client_env())
    yield cluster
    import psutil

    started = cluster.pids()  # with the agents, whose titles Ray rewrites (ray::DashboardAgent)
    assert any("DashboardAgent" in " ".join(psutil.Process(pid).cmdline()) for pid in started)
    cluster.down()
    left = []
    for pid in started:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert not left, f"cluster.down() left processes running: {left}"
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
def two_jobs(cluster, services, tmp_path_factory):
    """Two jobs submitted at once with the same workdir and config, both waited for."""
    workdir = tmp_path_factory.mktemp("cluster-work") / "work"
    ids = ["two-jobs-a", "two-jobs-b"]
    for submission_id in ids:
        proc = submit(cluster, submission_id, f"workdir={workdir}", f"mlflow.tracking_uri={services.tracking_uri}",
                      *TINY)
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
    # A training worker's progress lines reach the job's log once each (Ray Train's print patch doubled them).
    progress = [[line for line in log.splitlines() if "] step " in line and "img/s" in line]
                for log in two_jobs["logs"].values()]
    assert any(progress) and all(len(lines) == len(set(lines)) for lines in progress), progress
    summary = two_jobs["summary"]
    assert list(summary["stages"]) == list(STAGES)
    assert summary["model_uri"].startswith("models:/ldm-pipeline/")
    encode = summary["stages"]["encode"]["metrics"]
    assert encode["samples"] + encode["heldout_samples"] == 192 and encode["heldout_samples"] > 0
    assert summary["stages"]["ldm"]["metrics"]["world_sizes"] == [2]
    assert summary["stages"]["ldm"]["metrics"]["worker_group_restarts"] == 0


def test_the_tracking_server_has_the_runs_and_the_bucket_the_artifacts(two_jobs, services):
    """Read back through MLflow's REST API (with the basic-auth credentials) and the bucket: params,
    per-step metrics, grids, the registered models with their alias, artifacts and checkpoints as
    objects, on PostgreSQL (the server's only store)."""
    summary = two_jobs["summary"]
    assert summary["tracking_uri"] == services.tracking_uri
    client = MlflowClient(services.tracking_uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.params["ldm.max_steps"] == "6" and parent.data.params["data.shards"] == SHARDS
    children = {run.data.tags["stage"]: run for run in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(children) == set(STAGES)
    # The run that trained (the other job's ldm run found the stage cached and logged no steps).
    ldm_run = json.loads((Path(summary["stages"]["ldm"]["output"]) / "registered.json").read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(ldm_run, "loss")] == [1, 2, 3, 4, 5, 6]
    assert [a.path for a in client.list_artifacts(ldm_run, "samples")] == ["samples/step_000003.png",
                                                                         "samples/step_000006.png"]
    for name in ("ldm-pipeline", "ldm-pipeline-vq", "ldm-pipeline-clip"):
        (version,) = client.search_model_versions(f"name='{name}'")  # registered once, by the run that trained it
        assert client.get_model_version_by_alias(name, "candidate").version == version.version
    keys = []
    for page in services.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    assert any(k.startswith("mlartifacts/") and k.endswith("unet.safetensors") for k in keys)
    assert any(k.startswith("mlartifacts/") and k.endswith("samples/step_000006.png") for k in keys)
    assert any(k.startswith("ray-train/ldm-") and "checkpoint" in k for k in keys)
    with pytest.raises(urllib.error.HTTPError) as refused:  # the server wants its credentials
        urllib.request.urlopen(f"{services.tracking_uri}/api/2.0/mlflow/runs/get?run_id={ldm_run}", timeout=30)
    assert refused.value.code == 401


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
                 "finish_vq", "heldout_retrieval", "save_null_condition"):
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


def ldm_losses(summary: dict) -> list:
    run_id = json.loads((Path(summary["stages"]["ldm"]["output"]) / "registered.json").read_text())["run_id"]
    return MlflowClient(summary["tracking_uri"]).get_metric_history(run_id, "loss")


def wait_for_log(cluster: LocalCluster, submission_id: str, text: str, after: str = "") -> None:
    """Until the job's log holds `text` (after the first `after`, where given)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        said = logs(cluster, submission_id)
        if text in (said.partition(after)[2] if after else said):
            return
        assert job(cluster, submission_id)["status"] in ("PENDING", "RUNNING"), logs(cluster, submission_id)[-5000:]
        assert time.monotonic() < deadline, logs(cluster, submission_id)[-5000:]
        time.sleep(0.5)


def wait_for_registered_checkpoint(s3, since, timeout_s: float = 120.0) -> None:
    """Until Ray Train has registered a checkpoint of a run started after `since` (its checkpoint
    manager then writes its snapshot to the bucket): a node killed before that leaves nothing to resume."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="ray-train/"):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("checkpoint_manager_snapshot.json") and obj["LastModified"] >= since:
                    return
        time.sleep(1)
    raise AssertionError(f"no checkpoint registered in s3://{BUCKET}/ray-train/ within {timeout_s:.0f} s")


def test_a_replaced_shard_a_lost_worker_node_and_a_tracking_outage(cluster, services, two_jobs):
    """One shard object is replaced by another's bytes: the next job's vq, clip and encode run again
    (the cache keys the objects by size and modification time, not by name). That job's ldm runs on
    2 of the 3 worker nodes and a node holding a train worker is killed after the first checkpoint:
    Ray Train restarts the group on the two nodes left from the checkpoint it reads back from the
    bucket, the workers read their input again from the shared workdir. Once the new group trains,
    the real mlflow server is stopped and started again: training goes on, what could not be sent is
    kept and sent when the server is back. The job succeeds and the PostgreSQL-backed run holds
    every step's loss exactly once. (One job for both faults: each job costs minutes of start-up.)"""
    s3 = services.s3_client()
    s3.copy_object(Bucket=BUCKET, Key="shards/00001.tar", CopySource={"Bucket": BUCKET, "Key": "shards/00000.tar"})
    steps, every = 60, 10
    submission_id = "node-loss-and-outage"
    submitted = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=2)
    proc = submit(cluster, submission_id, f"workdir={two_jobs['workdir']}", f"mlflow.tracking_uri={services.tracking_uri}",
                  *TINY, f"ldm.max_steps={steps}", f"ldm.checkpoint_every={every}", "ldm.batch_size=32",
                  "ldm.log_every=1", "ldm.sample_every=0", "ldm.max_failures=2", "evaluate.every=0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for_log(cluster, submission_id, f"[ldm] step {every + 3}/{steps}")
    wait_for_registered_checkpoint(s3, submitted)
    workers = [cluster.node_name(a["node_id"]) for a in state(cluster, "actors")
               if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"]
    cluster.kill_node(sorted(workers)[0])
    try:
        # A step after the resume: the new group has read the run's metrics back (to log no step
        # twice) and trains on.
        wait_for_log(cluster, submission_id, f"/{steps} |", after="[ldm] resumed from step")
        services.stop_mlflow()
        try:
            wait_for_log(cluster, submission_id, "cannot reach the tracking server")  # and trains on
        finally:
            services.start_mlflow()
        status = wait_for(cluster, submission_id)
        text = logs(cluster, submission_id)
        assert status == "SUCCEEDED", text[-6000:]
        for stage in ("vq", "clip", "encode"):
            assert f"== stage {stage}: ran in" in text, stage
        resumed = [int(step) for step in re.findall(r"\[ldm\] resumed from step (\d+)", text)]
        assert resumed and all(step > 0 and step % every == 0 for step in resumed), (  # from a checkpoint
            resumed, workers, [line for line in text.splitlines() if "[ldm]" in line or "Error" in line][-40:])
        summary = json.loads((two_jobs["workdir"] / "summary.json").read_text())
        encode = summary["stages"]["encode"]["metrics"]  # shard 0 twice: its keys count twice
        assert encode["samples"] + encode["heldout_samples"] == 192
        ldm = summary["stages"]["ldm"]["metrics"]
        assert ldm["worker_group_restarts"] >= 1 and ldm["world_sizes"] == [2], ldm
        logged = sorted(m.step for m in ldm_losses(summary))
        if logged != list(range(1, steps + 1)):
            pytest.fail(f"logged steps {logged}; the job said:\n" + "\n".join(
                line for line in text.splitlines() if "mlflow" in line.lower() or "[ldm] resumed" in line))
    finally:
        cluster.add_worker(1)  # back to three worker nodes for whatever runs next


def test_bad_shards_on_the_object_store_are_named_before_any_work(services, monkeypatch):
    """What the workflow checks before its first stage (the shards' fingerprints for the cache key):
    a missing object, a missing bucket, an empty prefix, refused credentials and an endpoint that
    does not answer are each an error naming data.shards (and what to check), never a hang."""
    from pipeline.data import locate
    from pipeline.data.locate import resolve_shards, shard_fingerprints

    assert len(set(shard_fingerprints(resolve_shards(SHARDS)))) == 3
    assert resolve_shards(f"s3://{BUCKET}/shards/") == [f"s3://{BUCKET}/shards/{i:05d}.tar" for i in range(3)]
    with pytest.raises(FileNotFoundError, match=rf"data.shards: s3://{BUCKET}/shards/00003.tar does not exist"):
        shard_fingerprints(resolve_shards(f"s3://{BUCKET}/shards/{{00000..00009}}.tar"))
    with pytest.raises(FileNotFoundError, match="no such bucket"):
        shard_fingerprints(["s3://no-such-bucket/shards/00000.tar"])
    with pytest.raises(FileNotFoundError, match="data.shards"):
        resolve_shards(f"s3://{BUCKET}/nothing-here/")
    with monkeypatch.context() as wrong:
        wrong.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(PermissionError, match="refuses the credentials"):
            shard_fingerprints(resolve_shards(SHARDS))
    with monkeypatch.context() as gone:
        gone.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
        gone.setattr(locate, "STORE_BACKOFF_S", 0.1)
        with pytest.raises(OSError, match=r"cannot reach the object store at http://127.0.0.1:9 .* after 3 attempts"):
            shard_fingerprints(resolve_shards(SHARDS))


def test_a_shard_object_that_is_not_a_tar_or_is_cut_short_is_a_counted_skip(services):
    """The shard reader on the object store's bytes: an HTML error page stored as a shard, and a
    shard cut in half, are counted as `truncated_tar` (the samples before the cut kept)."""
    import pyarrow.fs

    from pipeline.data.reader import new_counts, parse_shard

    s3 = services.s3_client()
    whole = s3.get_object(Bucket=BUCKET, Key="shards/00002.tar")["Body"].read()
    s3.put_object(Bucket=BUCKET, Key="bad/error-page.tar", Body=b"<html><body>503 Slow Down</body></html>")
    s3.put_object(Bucket=BUCKET, Key="bad/cut.tar", Body=whole[: len(whole) // 2])
    kept = {}
    for name in ("error-page", "cut"):
        filesystem, path = pyarrow.fs.FileSystem.from_uri(f"s3://{BUCKET}/bad/{name}.tar")
        counts = new_counts()
        with filesystem.open_input_stream(path) as stream:
            kept[name] = len(list(parse_shard(stream, 32, counts)))
        assert counts["truncated_tar"] == 1, (name, counts)
    assert kept["error-page"] == 0 and 0 < kept["cut"] < 64


def test_a_read_only_identity_cannot_move_the_production_alias(services, two_jobs, monkeypatch):
    """As infra/ sets it up: users get READ by default; the identity that registered a model (here
    the admin the jobs log as; `trainer` on Kubernetes) may move its aliases, a serving identity not."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    AuthServiceClient(services.tracking_uri).create_user("serving", "serving-password")
    name, version = two_jobs["summary"]["model_uri"].split("/")[1:]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "serving")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "serving-password")
    client = MlflowClient(services.tracking_uri)
    assert int(client.get_model_version_by_alias(name, "candidate").version) >= int(version)  # it may read
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403|Permission denied"):
        client.set_registered_model_alias(name, "production", version)
