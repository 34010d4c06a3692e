"""MLflow set-up: a workflow's runs and its registered models go to the store it is given."""

import mlflow

from pipeline.tracking import setup_experiment


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
