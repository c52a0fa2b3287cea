"""The queue's entry point (`python -m jobs.run <job id>`) ends with the result line the dispatcher stores as the
job's result: the MLflow run, the model, the final metrics and where the pictures are (a sweep's: its best
trial's metrics and name; a train job's steps and the step it resumed from). `aeforge status` and `submit --follow`
show them."""

from __future__ import annotations

import json

import pytest

from jobs import run as job_run
from jobs.spec import parse_spec
from workers.protocol import parse_result

SPEC = "name: result-line\nmodel: {variant: vae, architecture: mlp, latent_dim: 2}\ntrain: {steps: 3, batch_size: 4}\n"
MODEL = {"name": "alice-vae", "version": 2, "alias": "latest", "model_uri": "models:/alice-vae/2"}


@pytest.fixture
def job_spec(monkeypatch):
    monkeypatch.setenv("AEFORGE_JOB_SPEC", json.dumps(parse_spec(SPEC).model_dump(mode="json")))


def test_a_train_job_result_carries_its_metrics_and_pictures(job_spec, monkeypatch, capsys):
    outcome = {
        "mlflow_run_id": "run-1",
        "model": MODEL,
        "metrics": {"eval/recon": 0.25, "train/loss": 3.5},
        "pictures": "s3://bucket/aeforge/runs/j/pictures",
        "checkpoint": "/somewhere",
        "steps": 3,
        "resumed_from_step": 2,
    }
    monkeypatch.setattr(job_run, "run_job", lambda spec, job_id, **kwargs: outcome)
    assert job_run.main(["j"]) == 0
    result = parse_result(capsys.readouterr().out)
    assert result == {
        "mlflow_run_id": "run-1",
        "model": MODEL,
        "metrics": {"eval/recon": 0.25, "train/loss": 3.5},
        "pictures": "s3://bucket/aeforge/runs/j/pictures",
        "best_trial": None,
        "steps": 3,
        "resumed_from_step": 2,
    }


def test_a_sweep_result_carries_its_best_trials_metrics(job_spec, monkeypatch, capsys):
    best = {
        "run_name": "j-t03",
        "beta": 4.0,
        "latent_dim": 10,
        "status": "finished",
        "step": 3,
        "eval/mig": 0.4,
        "eval/recon": 0.5,
        "checkpoint_path": "/x",
    }
    outcome = {
        "mlflow_run_id": "parent",
        "trials": [best],
        "best": best,
        "model": None,
        "pictures": "s3://bucket/aeforge/runs/j/pictures",
    }
    monkeypatch.setattr(job_run, "run_job", lambda spec, job_id, **kwargs: outcome)
    assert job_run.main(["j"]) == 0
    result = parse_result(capsys.readouterr().out)
    assert result["metrics"] == {"eval/mig": 0.4, "eval/recon": 0.5} and result["best_trial"] == "j-t03"
    assert result["pictures"] == "s3://bucket/aeforge/runs/j/pictures"


def test_a_sweep_without_a_healthy_trial_says_why_in_its_result_and_status(job_spec, monkeypatch, capsys):
    from services.cli_jobs import model_rows

    line = "sweep j: no healthy trial, so no @best: 2 of 2 trials collapsed (eval/active_units 0, eval/kl 0.001)"
    model = {**MODEL, "alias": None, "decision": "not offered @best: no trial is healthy (collapsed: ...)"}
    outcome = {"mlflow_run_id": "parent", "trials": [], "no_best": line, "model": model, "pictures": "s3://b/p"}
    monkeypatch.setattr(job_run, "run_job", lambda spec, job_id, **kwargs: outcome)
    assert job_run.main(["j"]) == 0
    result = parse_result(capsys.readouterr().out)
    assert result["no_best"] == line and result["best_trial"] is None
    rows = dict(model_rows({"result": result, "mlflow_run_id": "parent"}))
    assert rows["best trial"] == line and rows["alias"] == model["decision"]
    assert rows["model"] == "alice-vae version 2"  # no alias on it
