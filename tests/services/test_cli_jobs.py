"""The queue commands (services.cli_jobs) against the API in-process: what they print and their exit codes."""

from __future__ import annotations

import json
import threading

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from services import cli_jobs
from services.api import create_app
from services.client import AeforgeClient
from services.dispatcher import Dispatcher
from services.settings import Principal, ServiceSettings
from services.store import Store
from tests.services.fakes import FakeCluster, FakeLauncher
from workers.protocol import trial_line

SPEC = "name: cli-test\nmodel: {variant: ae, architecture: mlp, latent_dim: 2}\ntrain: {steps: 3, batch_size: 4}\n"


@pytest.fixture
def setup(tmp_path, monkeypatch):
    store = Store(f"sqlite:///{tmp_path / 'cli.db'}")
    launcher = FakeLauncher()
    settings = ServiceSettings(home=tmp_path, db_url="unused", tokens=(Principal("carol", "user", "carol-token-1"),))
    app = typer.Typer()
    cli_jobs.register(app)
    with TestClient(create_app(store, settings, launcher=launcher)) as http:
        monkeypatch.setattr(
            cli_jobs, "make_client", lambda: AeforgeClient("http://testserver", "carol-token-1", http=http)
        )
        spec_path = tmp_path / "spec.yaml"
        spec_path.write_text(SPEC)
        yield app, store, launcher, spec_path
    store.close()


def run(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "160"})


def test_submit_list_status_cancel_retry(setup):
    app, store, _, spec_path = setup
    refused = run(app, "submit", spec_path, "--priority", "3")
    assert refused.exit_code != 0 and "a raw priority is for admins" in refused.output
    submitted = run(app, "submit", spec_path, "--class", "normal", "--idempotency-key", "k")
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.strip()
    assert store.get(job_id).priority == 0
    assert run(app, "submit", spec_path, "--idempotency-key", "k").output.strip() == job_id
    listing = run(app, "jobs", "--state", "queued")
    assert listing.exit_code == 0 and job_id in listing.output and "queued" in listing.output
    status = run(app, "status", job_id)
    assert status.exit_code == 0 and "submitted by carol in class normal (priority 0)" in status.output
    cancelled = run(app, "cancel", job_id)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.output
    retried = run(app, "retry", job_id)
    assert retried.exit_code == 0 and "queued" in retried.output
    assert store.get(job_id).state == "queued"


def test_errors_print_one_message_and_exit_2(setup, tmp_path):
    app, store, _, spec_path = setup
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.replace("latent_dim: 2", "latent_dim: -1"))
    result = run(app, "submit", bad)
    assert result.exit_code == 2 and "model.latent_dim" in result.output and "Traceback" not in result.output
    missing = run(app, "submit", tmp_path / "nope.yaml")
    assert missing.exit_code == 2 and "cannot read" in missing.output
    unknown = run(app, "status", "no-such-job")
    assert unknown.exit_code == 2 and "no job no-such-job" in unknown.output
    assert store.list_jobs()[1] == 0


def test_an_unreachable_service_is_a_plain_error(setup, monkeypatch):
    app, _, _, spec_path = setup
    monkeypatch.setattr(cli_jobs, "make_client", lambda: AeforgeClient("http://127.0.0.1:9", "t"))
    result = run(app, "jobs")
    assert result.exit_code == 2 and "cannot reach the aeforge service" in result.output


RESULT = {
    "mlflow_run_id": "r1",
    "metrics": {"eval/recon": 0.1234, "eval/mig": 0.25},
    "pictures": "s3://bucket/aeforge/runs/the-job/pictures",
    "model": {
        "name": "carol-ae",
        "version": 3,
        "alias": "latest",
        "model_uri": "models:/carol-ae/3",
        "logged_model_uri": "models:/m-123",
        "run_id": "r1",
    },
}


@pytest.mark.timeout(60)
def test_submit_follow_shows_progress_logs_and_the_outcome_not_protocol_lines(setup):
    app, store, launcher, spec_path = setup
    dispatcher = Dispatcher(store, FakeCluster({"CPU": 2}), launcher, environ={})
    stop = threading.Event()
    progress = 'AEFORGE_PROGRESS {"step": %d, "total": 3, "metrics": {"loss": 0.5}, "images_per_second": 1234.5}\n'

    def cluster():  # the dispatcher and a Ray that runs each job through PENDING, RUNNING, SUCCEEDED
        while not stop.wait(0.1):
            dispatcher.tick()
            for sid, job in list(launcher.jobs.items()):
                if job["status"] == "PENDING":
                    launcher.set(
                        sid,
                        "RUNNING",
                        logs="\x1b[32mhello\x1b[0m from the job\n"
                        + progress % 1
                        + trial_line("t03", "finished", metrics={"eval/mig": 0.41})
                        + "\n",
                    )
                elif job["status"] == "RUNNING":
                    launcher.set(
                        sid, "SUCCEEDED", logs=job["logs"] + progress % 3 + f"AEFORGE_RESULT {json.dumps(RESULT)}\n"
                    )

    thread = threading.Thread(target=cluster, daemon=True)
    thread.start()
    try:
        result = run(app, "submit", spec_path, "--follow")
    finally:
        stop.set()
        thread.join()
    assert result.exit_code == 0, result.output
    out = result.output
    assert "hello from the job" in out and "\x1b[32m" not in out
    assert "AEFORGE_PROGRESS" not in out and "AEFORGE_RESULT" not in out  # they drive the bar and the summary
    for state in ("queued", "starting", "running", "succeeded"):
        assert state in out
    assert out.index("starting") < out.index("running") < out.rindex("succeeded")
    assert "3/3" in out and "1,234 images/s" in out and "loss 0.5000" in out
    assert "trial t03 finished: eval/mig 0.41" in out and "AEFORGE_TRIAL" not in out
    # The outcome comes after the end: the metrics table, then where the model and the pictures are.
    outcome = out[out.rindex("succeeded") :]
    assert "final metrics" in outcome and "eval/recon" in outcome and "0.1234" in outcome and "0.2500" in outcome
    assert "carol-ae version 3 @latest" in outcome
    assert "models:/carol-ae/3" in outcome and "models:/carol-ae@latest" in outcome
    assert "s3://bucket/aeforge/runs/the-job/pictures" in outcome and "MLflow run" in outcome


def test_a_service_that_takes_a_submission_and_does_not_answer_in_time_is_not_called_unreachable():
    """A read timeout is not 'cannot reach': the service took the request, and a submission may have been queued."""
    import httpx

    from services.client import AeforgeClient, ApiError

    def no_answer(request):
        raise httpx.ReadTimeout("timed out", request=request)

    http = httpx.Client(base_url="http://service:8765", transport=httpx.MockTransport(no_answer), timeout=30.0)
    client = AeforgeClient("http://service:8765", None, http=http)
    with pytest.raises(ApiError) as raised:
        client._request("POST", "/jobs", json={"spec": "name: x"})
    text = str(raised.value)
    assert "did not answer within 30 s" in text and "aeforge jobs" in text and "cannot reach" not in text
    with pytest.raises(ApiError, match="did not answer within 30 s; try again"):
        client._request("GET", "/jobs")
