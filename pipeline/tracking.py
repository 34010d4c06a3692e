"""MLflow plumbing shared by the stages: experiment set-up, the workflow's run tree, worker logging.

The workflow is one parent run with a child run per stage. Training workers log from rank 0 through
`MetricLogger`, addressed by run id, so they need only the tracking URI, never the driver's state.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


def setup_experiment(tracking_uri: str, experiment_name: str, workdir: str | Path) -> str:
    """Point MLflow at the tracking URI and return the experiment id, creating it if needed.

    With a local store (SQLite or files) the experiment's artifacts go under the workdir rather
    than under whatever directory the job happened to start in.
    """
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        artifact_location = None
        if tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
            artifact_location = (Path(workdir).resolve() / "mlartifacts").as_uri()
        experiment_id = mlflow.create_experiment(experiment_name, artifact_location=artifact_location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


class MetricLogger:
    """Metric logging to one run by id, for code that runs inside Ray workers.

    Metrics are buffered and sent by a background thread, so a slow tracking store (SQLite takes
    seconds for a few hundred metrics) never stalls a training step. A failure to reach the server
    must not stop training either: the batch is kept, retried with the next flush, and counted.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 250):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.flush_every = flush_every
        self.pending: list[Metric] = []
        self.failed_flushes = 0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
            if len(self.pending) >= self.flush_every:
                self._wake.set()

    def _send(self) -> bool:
        """Send what is pending; False if the store could not be reached."""
        with self._send_lock:  # the background thread and flush() never send the same chunk twice
            return self._send_locked()

    def _send_locked(self) -> bool:
        while True:
            with self._lock:
                chunk = self.pending[:1000]  # MLflow caps a log_batch call at 1000 metrics
            if not chunk:
                return True
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception:  # noqa: BLE001 - any tracking failure: keep the data, go on training
                self.failed_flushes += 1
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

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=60)
        self.flush()
