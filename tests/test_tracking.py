"""MLflow set-up: a workflow's runs and its registered models go to the store it is given; metrics
a worker could not send are kept and sent later."""

import json

import mlflow

from pipeline.sample_client import free_port
from pipeline.tracking import MetricLogger, replay_metrics, replay_when_back, setup_experiment


def test_a_second_workflow_in_one_process_registers_in_its_own_store(tmp_path):
    first, second = (f"sqlite:///{tmp_path / name}.db" for name in ("first", "second"))
    setup_experiment(first, "e", tmp_path)
    mlflow.set_registry_uri(first)  # as resolving the first workflow's models:/ URI leaves it
    setup_experiment(second, "e", tmp_path)
    assert mlflow.get_tracking_uri() == second and mlflow.get_registry_uri() == second
    mlflow.MlflowClient().create_registered_model("m")
    assert [m.name for m in mlflow.MlflowClient(second, second).search_registered_models()] == ["m"]
    assert mlflow.MlflowClient(first, first).search_registered_models() == []


def test_the_experiment_opens_in_the_model_training_view_unless_its_kind_is_set(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    created = setup_experiment(uri, "ours", tmp_path)
    assert client.get_experiment(created).tags["mlflow.experimentKind"] == "custom_model_development"
    theirs = client.create_experiment("theirs", tags={"mlflow.experimentKind": "genai_development"})
    assert setup_experiment(uri, "theirs", tmp_path) == theirs
    assert client.get_experiment(theirs).tags["mlflow.experimentKind"] == "genai_development"


def test_metrics_of_a_server_that_stays_away_are_kept_in_the_file_and_sent_later(tmp_path, capsys):
    """The end of training with the server still away: the logger keeps its metrics in the
    fallback file, the stage's wait (`mlflow.outage_wait_s`) gives up with the file as it was, and
    `replay_metrics` sends that run's metrics to a store that answers, and only those."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(store)
    experiment = client.create_experiment("e")
    ours, other = (client.create_run(experiment).info.run_id for _ in range(2))
    away = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    kept = tmp_path / "unlogged_metrics.jsonl"
    kept.write_text(json.dumps({"run_id": other, "key": "loss", "value": 9.0, "timestamp": 0, "step": 1}) + "\n")
    logger = MetricLogger(away, ours, fallback_path=str(kept))
    for step in (1, 2, 3):
        logger.log({"loss": 1.0 / step, "lr": 0.1}, step)
    assert logger.close() == 6
    assert replay_when_back(away, kept, ours, wait_s=1.0, poll_s=0.5) == 0
    assert "still does not answer after 1 s (mlflow.outage_wait_s)" in capsys.readouterr().out
    assert len(kept.read_text().splitlines()) == 7
    assert replay_metrics(store, kept, run_id=ours) == 6
    assert [(m.step, m.value) for m in client.get_metric_history(ours, "loss")] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert client.get_metric_history(other, "loss") == []
    assert [json.loads(line)["run_id"] for line in kept.read_text().splitlines()] == [other]
