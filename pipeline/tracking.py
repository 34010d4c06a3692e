"""MLflow plumbing shared by the stages: experiment set-up, the workflow's run tree, worker logging.

The workflow is one parent run with a child run per stage. Training workers log from rank 0 through
`MetricLogger`, addressed by run id, so they need only the tracking URI, never the driver's state.
"""

from __future__ import annotations

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
    """Buffered metric logging to one run by id, for code that runs inside Ray workers.

    A failure to reach the tracking server must not stop training: the batch is kept and retried
    with the next flush, and the number of failed flushes is counted.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 250):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.flush_every = flush_every
        self.pending: list[Metric] = []
        self.failed_flushes = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        # MLflow caps a log_batch call at 1000 metrics.
        while self.pending:
            chunk = self.pending[:1000]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception:  # noqa: BLE001 - any tracking failure: keep the data, go on training
                self.failed_flushes += 1
                return
            del self.pending[:1000]
