"""MLflow plumbing shared by the stages: experiment set-up, the workflow's run tree, worker logging.

The workflow is one parent run with a child run per stage. Training workers log from rank 0 through
`MetricLogger`, addressed by run id, so they need only the tracking URI, never the driver's state.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import mlflow
from omegaconf import OmegaConf
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


# The experiment tag the MLflow UI reads to choose between its model-training and GenAI views.
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def setup_experiment(tracking_uri: str, experiment_name: str, workdir: str | Path) -> str:
    """Point MLflow at the tracking URI and return the experiment id, creating it if needed (marked
    as a model-training experiment unless it has a kind already).

    With a local store (SQLite or files) the experiment's artifacts go under the workdir rather
    than under whatever directory the job happened to start in.
    """
    mlflow.set_tracking_uri(tracking_uri)
    # Models register in the same store. A registry URI set earlier in this process (resolving a
    # models:/ URI sets one) would otherwise stay, and this run's models would land in that store.
    mlflow.set_registry_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        artifact_location = None
        if tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
            artifact_location = (Path(workdir).resolve() / "mlartifacts").as_uri()
        try:
            experiment_id = mlflow.create_experiment(experiment_name, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException:  # another run on the same store created it meanwhile
            experiment = mlflow.get_experiment_by_name(experiment_name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    else:
        experiment_id = experiment.experiment_id
    if EXPERIMENT_KIND_TAG not in (experiment.tags if experiment else {}):
        # The MLflow UI opens an experiment of no kind in its GenAI mode (traces, no metric charts).
        try:
            MlflowClient(tracking_uri).set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        except mlflow.exceptions.MlflowException:
            # Two jobs started at once on a new experiment both tag it, and a server on PostgreSQL
            # refuses the second insert (a unique key): the tag the other job set is as good.
            if EXPERIMENT_KIND_TAG not in mlflow.get_experiment(experiment_id).tags:
                raise
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


class MetricLogger:
    """Metric logging to one run by id, for code that runs inside Ray workers.

    Metrics are buffered and sent by a background thread, so a slow tracking store (SQLite takes
    seconds for a few hundred metrics) never stalls a training step. A failure to reach the server
    must not stop training either: the batch is kept, retried with the next flush, and counted;
    whatever still cannot be sent when the logger closes is written to `fallback_path` (JSON lines,
    one metric each; `replay_metrics` sends them later) and the logger says so.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 250, fallback_path: str | None = None,
                 system_metrics: bool = False):
        # Fail fast on an unreachable server (MLflow's default retries back off for minutes); the
        # background thread retries on its next flush anyway.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = MlflowClient(tracking_uri)
        self.fallback_path = fallback_path
        self.unlogged = 0
        self._monitor = _start_system_metrics(tracking_uri, run_id) if system_metrics else None
        self.run_id = run_id
        self.flush_every = flush_every
        self.pending: list[Metric] = []
        self.logged_up_to: dict[str, int] = {}
        """Per key, the last step the run already has from before a restart (see `resume_after`)."""
        self.failed_flushes = 0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        # Metrics an earlier attempt of this run (or this logger, in an outage) kept in the fallback
        # file are sent as soon as the server answers again.
        self._kept = bool(fallback_path) and Path(fallback_path).is_file()
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def resume_after(self, step: int, keys: tuple[str, ...]) -> None:
        """A worker group restarted from the checkpoint of `step` retrains the steps after it, some
        of which the run may already have (sent before the failure): those are not logged twice.
        Everything up to `step` was made durable by `commit` when that checkpoint was written."""
        try:
            for key in keys:
                last = max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=step)
                if last > step:
                    self.logged_up_to[key] = last
        except Exception as error:  # noqa: BLE001 - an outage now: the steps may be logged twice
            print(f"[mlflow] could not read the run's metrics to resume ({type(error).__name__}); steps after "
                  f"{step} may be logged twice", flush=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()
                             if step > self.logged_up_to.get(k, -1)]
            if len(self.pending) >= self.flush_every:
                self._wake.set()

    def _send(self) -> bool:
        """Send what is pending, then what was kept during an outage; False if the store could not
        be reached."""
        with self._send_lock:  # the background thread and flush() never send the same chunk twice
            sent = self._send_locked()
            if sent and self._kept:
                self._replay_kept()
            return sent

    def _replay_kept(self) -> None:
        try:
            count = replay_metrics(self.client.tracking_uri, self.fallback_path, run_id=self.run_id)
        except Exception as error:  # noqa: BLE001 - still unreachable: they stay kept, and are retried
            print(f"[mlflow] kept metrics not sent yet ({type(error).__name__}); retried later", flush=True)
            return
        self._kept = False
        if count:
            print(f"[mlflow] the tracking server answers again: sent the {count} metrics kept in {self.fallback_path}",
                  flush=True)

    def _send_locked(self) -> bool:
        while True:
            with self._lock:
                chunk = self.pending[:1000]  # MLflow caps a log_batch call at 1000 metrics
            if not chunk:
                return True
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as error:  # noqa: BLE001 - any tracking failure: keep the data, go on training
                self.failed_flushes += 1
                if self.failed_flushes == 1:
                    print(f"[mlflow] cannot reach the tracking server ({type(error).__name__}); training goes on, "
                          f"metrics are kept and retried", flush=True)
                return False
            with self._lock:
                del self.pending[:len(chunk)]

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=30)
            self._wake.clear()
            self._send()

    def flush(self) -> None:
        """Send everything pending now (blocking); used at the end of training."""
        self._send()

    def commit(self) -> None:
        """Before a checkpoint: everything logged so far is sent, or else kept in the fallback file, so
        that a worker killed after the checkpoint loses no metric of a step the checkpoint holds."""
        if self._send():
            return
        with self._lock:
            left, self.pending = self.pending, []
        self._keep(left)

    def _keep(self, metrics: list[Metric]) -> None:
        """Append metrics that could not be sent to the fallback file (or drop them, and say so)."""
        if not metrics:
            return
        where = "dropped (no fallback path)"
        if self.fallback_path:
            Path(self.fallback_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.fallback_path, "a") as f:
                for m in metrics:
                    f.write(json.dumps({"run_id": self.run_id, "key": m.key, "value": m.value,
                                        "timestamp": m.timestamp, "step": m.step}) + "\n")
            where = f"kept in {self.fallback_path}; send them later with pipeline.tracking.replay_metrics"
        self.unlogged += len(metrics)
        self._kept = bool(self.fallback_path)
        print(f"[mlflow] the tracking server was unreachable: {len(metrics)} metrics not logged, {where}", flush=True)

    def close(self) -> int:
        """Stop the thread and send what is left; returns how many metrics could not be sent."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=60)
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001
                pass
        self.flush()
        with self._lock:
            left, self.pending = self.pending, []
        self._keep(left)
        return self.unlogged


def replay_metrics(tracking_uri: str, path: str | Path, run_id: str | None = None) -> int:
    """Send metrics a `MetricLogger` kept locally during a tracking outage (only `run_id`'s, when
    given) and remove them from the file; returns how many were sent."""
    path = Path(path)
    if not path.is_file():
        return 0
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chosen = [r for r in records if run_id is None or r["run_id"] == run_id]
    by_run: dict[str, list[Metric]] = {}
    for m in chosen:
        by_run.setdefault(m["run_id"], []).append(Metric(m["key"], m["value"], m["timestamp"], m["step"]))
    client = MlflowClient(tracking_uri)
    for run, metrics in by_run.items():
        for i in range(0, len(metrics), 1000):
            client.log_batch(run, metrics=metrics[i:i + 1000])
    rest = [r for r in records if not (run_id is None or r["run_id"] == run_id)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rest))
    return len(chosen)


def server_answers(tracking_uri: str, timeout_s: float = 5.0) -> bool:
    """Whether an HTTP tracking server answers its (unauthenticated) health route within
    `timeout_s`; a local store (SQLite, files) always does. One bounded request, never MLflow's own
    retries, which back off for minutes per call against a server that is away."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        return requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout_s).ok
    except requests.RequestException:
        return False


def replay_when_back(tracking_uri: str, path: str | Path, run_id: str, wait_s: float = 30.0, poll_s: float = 5.0) -> int:
    """After a fit: send what rank 0 kept in `path` for `run_id` (it ended while the tracking server
    was away), asking every `poll_s` for up to `wait_s` (`mlflow.outage_wait_s`) whether the server
    answers again; returns how many were sent. Still unreachable: they stay in the file, and the
    message says how to send them later."""
    if not Path(path).is_file():
        return 0
    deadline = time.monotonic() + wait_s
    while True:
        if server_answers(tracking_uri, timeout_s=poll_s):
            try:
                sent = replay_metrics(tracking_uri, path, run_id=run_id)
            except Exception as error:  # noqa: BLE001 - it went away again between the probe and the send
                print(f"[mlflow] sending the kept metrics failed ({type(error).__name__}); retrying", flush=True)
            else:
                if sent:
                    print(f"[mlflow] sent the {sent} metrics kept during the tracking outage", flush=True)
                return sent
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(poll_s, left))
    print(f"[mlflow] the tracking server {tracking_uri} still does not answer after {wait_s:g} s "
          f"(mlflow.outage_wait_s): the kept metrics stay in {path}; send them with "
          f"pipeline.tracking.replay_metrics", flush=True)
    return 0


def _start_system_metrics(tracking_uri: str, run_id: str):
    """MLflow's system metrics (CPU, memory, GPU when present) for the run, sampled every 10 s."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, samples_before_logging=1,
                                       tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as error:  # noqa: BLE001 - optional: psutil missing, or an outage at start
        print(f"[mlflow] system metrics are off: {error}", flush=True)
        return None


def to_flat_dict(cfg) -> dict[str, str]:
    """Flatten a config to {'ldm.max_steps': '1500', ...} for MLflow params."""
    flat: dict[str, str] = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                flat[name] = str(value)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return flat
