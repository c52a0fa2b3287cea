"""workers.tracking against a real (sqlite) MLflow store: metrics, params, the spec, pictures, run lookup."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import yaml

from workers import settings
from workers.tracking import (
    JOB_ID_TAG,
    MlflowRun,
    ensure_experiment,
    flatten,
    param_value,
    start_or_resume_run,
    use_tracking_uri,
)


def test_flatten_nested_sections_and_keeps_lists():
    spec = {
        "model": {"beta": 4.0, "corruption": {"kind": "mask", "level": 0.5}, "hidden_dims": [512, 256]},
        "register": None,
        "empty": {},
    }
    assert flatten(spec) == {
        "model.beta": 4.0,
        "model.corruption.kind": "mask",
        "model.corruption.level": 0.5,
        "model.hidden_dims": [512, 256],
        "register": None,
        "empty": {},
    }


def test_param_values_read_back_as_json():
    assert param_value("builtin:dsprites") == "builtin:dsprites"
    assert param_value(6.0) == "6.0"
    assert param_value(True) == "true"
    assert param_value(None) == "null"
    assert param_value([512, 256]) == "[512, 256]"
    assert param_value("x" * 10_000).endswith("...")
    assert len(param_value("x" * 10_000)) <= 6000


def test_experiment_artifacts_go_under_aeforge_home(mlflow_sqlite):
    experiment_id = ensure_experiment("btcvae-dsprites")
    assert ensure_experiment("btcvae-dsprites") == experiment_id  # found, not created twice
    location = mlflow.MlflowClient(mlflow_sqlite).get_experiment(experiment_id).artifact_location
    assert location == f"{settings.mlflow_artifact_root()}/btcvae-dsprites"
    assert location.startswith(settings.home().as_uri())


def test_deleted_experiment_is_a_clear_error(mlflow_sqlite):
    experiment_id = ensure_experiment("gone")
    mlflow.MlflowClient(mlflow_sqlite).delete_experiment(experiment_id)
    with pytest.raises(ValueError, match="'gone'.*deleted"):
        ensure_experiment("gone")


def test_start_or_resume_run_returns_the_same_run_for_a_job_id(mlflow_sqlite):
    experiment_id = ensure_experiment("resume")
    first = start_or_resume_run(experiment_id, "job-a", run_name="job-a")
    other = start_or_resume_run(experiment_id, "job-b")
    assert other != first
    run = mlflow.MlflowClient(mlflow_sqlite).get_run(first)
    assert run.data.tags[JOB_ID_TAG] == "job-a"
    assert run.info.run_name == "job-a"

    MlflowRun(first).terminate("FAILED")
    assert start_or_resume_run(experiment_id, "job-a") == first
    # A failed run that is run again is running again; a finished one keeps its status.
    assert mlflow.MlflowClient(mlflow_sqlite).get_run(first).info.status == "RUNNING"
    MlflowRun(first).terminate("FINISHED")
    assert start_or_resume_run(experiment_id, "job-a") == first
    assert mlflow.MlflowClient(mlflow_sqlite).get_run(first).info.status == "FINISHED"


def test_nested_run_points_at_its_parent(mlflow_sqlite):
    experiment_id = ensure_experiment("sweep")
    parent = start_or_resume_run(experiment_id, "sweep-1")
    child = start_or_resume_run(experiment_id, "sweep-1-t0", parent_run_id=parent)
    assert mlflow.MlflowClient(mlflow_sqlite).get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert start_or_resume_run(experiment_id, "sweep-1-t0", parent_run_id=parent) == child


def test_metrics_params_spec_and_pictures_round_trip(mlflow_sqlite, tmp_path):
    experiment_id = ensure_experiment("roundtrip")
    run = MlflowRun(start_or_resume_run(experiment_id, "job-1"), mlflow_sqlite)
    run.log_metrics({"train/loss": 3.5, "train/kl": 1.25}, step=10)
    run.log_metrics({"train/loss": 2.5, "eval/mig": 0.125}, step=20)
    spec = {
        "name": "roundtrip",
        "model": {"variant": "beta_vae", "beta": 4.0, "hidden_dims": [512, 256]},
        "train": {"optimizer": {"lr": 1e-4}},
        "register": None,
    }
    run.log_spec(spec)
    run.set_tags({"aeforge.kind": "train", "aeforge.workers": 2})
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "samples.png").write_bytes(b"\x89PNG fake")
    (pictures / "traversal.png").write_bytes(b"\x89PNG other")
    run.log_artifacts(pictures, "pictures")

    client = mlflow.MlflowClient(mlflow_sqlite)
    data = client.get_run(run.run_id).data
    history = client.get_metric_history(run.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 3.5), (20, 2.5)]
    assert run.final_metrics() == {"train/loss": 2.5, "train/kl": 1.25, "eval/mig": 0.125}
    assert data.params["model.beta"] == "4.0"
    assert data.params["model.variant"] == "beta_vae"
    assert data.params["model.hidden_dims"] == "[512, 256]"
    assert data.params["train.optimizer.lr"] == "0.0001"
    assert data.params["register"] == "null"
    assert data.tags["aeforge.kind"] == "train" and data.tags["aeforge.workers"] == "2"

    local = Path(client.download_artifacts(run.run_id, "spec.yaml", str(tmp_path / "dl")))
    assert yaml.safe_load(local.read_text()) == spec
    names = sorted(Path(f.path).name for f in client.list_artifacts(run.run_id, "pictures"))
    assert names == ["samples.png", "traversal.png"]
    # The artifacts live under AEFORGE_HOME (the embedded default), not in the working directory.
    assert client.get_run(run.run_id).info.artifact_uri.startswith(settings.mlflow_artifact_root())

    # Logging the same spec again (a resumed job) is fine; changing a param is an error naming it.
    run.log_spec(spec)
    with pytest.raises(ValueError, match="'model.beta' is already '4.0'"):
        run.log_params({"model.beta": 8.0})


def test_many_params_go_in_batches(mlflow_sqlite):
    run = MlflowRun(start_or_resume_run(ensure_experiment("batches"), "job-1"))
    run.log_params({f"p{i:03d}": i for i in range(250)})
    params = mlflow.MlflowClient(mlflow_sqlite).get_run(run.run_id).data.params
    assert len(params) == 250 and params["p249"] == "249"


@pytest.mark.parametrize("key", ["aws.secret_key", "db.PASSWORD", "api_token", "s3.access_key_id"])
def test_secret_looking_params_are_refused(mlflow_sqlite, key):
    run = MlflowRun(start_or_resume_run(ensure_experiment("secrets"), "job-1"))
    with pytest.raises(ValueError, match="secrets"):
        run.log_params({"model.beta": 1.0, key: "hunter2"})
    assert mlflow.MlflowClient(mlflow_sqlite).get_run(run.run_id).data.params == {}


def test_bad_metric_value_names_the_metric(mlflow_sqlite):
    run = MlflowRun(start_or_resume_run(ensure_experiment("bad"), "job-1"))
    with pytest.raises(ValueError, match="'eval/mig'"):
        run.log_metrics({"eval/mig": "high"}, step=1)


def test_log_artifacts_needs_a_folder(mlflow_sqlite, tmp_path):
    run = MlflowRun(start_or_resume_run(ensure_experiment("art"), "job-1"))
    with pytest.raises(ValueError, match="not a folder"):
        run.log_artifacts(tmp_path / "missing", "pictures")


def test_use_tracking_uri_restores_the_environment(mlflow_sqlite, tmp_path):
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with use_tracking_uri(other):
        assert mlflow.get_tracking_uri() == other
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_sqlite
