"""What `aeforge logs`, `status` and `jobs` print (services.cli_jobs against the API in-process): logs without colour
codes or protocol lines and with --tail; status with the model, progress, latest metrics and why a queued job
waits; --output json; tables that never cut a name, piped or on a narrow terminal."""

from __future__ import annotations

import json
import re

import pytest
import typer
from fastapi.testclient import TestClient
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from services import cli_jobs
from services.api import create_app
from services.client import AeforgeClient, WaitTimeout
from services.dispatcher import Dispatcher
from services.settings import Principal, ServiceSettings
from services.store import Store
from tests.services.fakes import FakeCluster, FakeLauncher

LONG_NAME = "dae-digits-beta-sweep-with-a-rather-long-name-0123456789"


def spec(name: str = "status-test", cpus: float = 1) -> str:
    return (
        f"name: {name}\nmodel: {{variant: ae, architecture: mlp, latent_dim: 2}}\n"
        f"train: {{steps: 3, batch_size: 4}}\nresources: {{cpus_per_worker: {cpus}}}\n"
    )


@pytest.fixture
def env(tmp_path, monkeypatch):
    """The API over a SQLite store with a fake Ray of 4 CPUs, the dispatcher driven by hand, and the CLI."""
    store = Store(f"sqlite:///{tmp_path / 'status.db'}")
    launcher = FakeLauncher()
    dispatcher = Dispatcher(store, FakeCluster({"CPU": 4, "GPU": 0}), launcher, environ={})
    settings = ServiceSettings(home=tmp_path, db_url="unused", tokens=(Principal("carol", "user", "carol-token-1"),))
    app = typer.Typer()
    cli_jobs.register(app)
    with TestClient(create_app(store, settings, launcher=launcher)) as http:
        client = AeforgeClient("http://testserver", "carol-token-1", http=http)
        monkeypatch.setattr(cli_jobs, "make_client", lambda: client)

        class Env:
            pass

        e = Env()
        e.app, e.store, e.launcher, e.dispatcher, e.client, e.tmp = app, store, launcher, dispatcher, client, tmp_path
        yield e
    store.close()


def cli(app, *args, columns: int = 200):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def submit(e, text: str | None = None, **kwargs) -> str:
    return e.client.submit(text or spec(**kwargs))["id"]


def make_running(e, job_id: str, logs: str) -> None:
    e.dispatcher.tick()
    e.launcher.set(e.store.get(job_id).ray_submission_id, "RUNNING", logs=logs)
    e.dispatcher.tick()
    assert e.store.get(job_id).state == "running"


RESULT = {
    "mlflow_run_id": "run-abc",
    "metrics": {"eval/recon": 0.03125, "eval/mig": 0.5, "train/loss": 12.5},
    "pictures": "s3://bucket/aeforge/runs/the-job/pictures",
    "model": {
        "name": "carol-dae",
        "version": 7,
        "alias": "latest",
        "model_uri": "models:/carol-dae/7",
        "logged_model_uri": "models:/m-1",
        "run_id": "run-abc",
    },
}


# --- logs ----------------------------------------------------------------------------------------------------


LOG = (
    "\x1b[36m(RayTrainWorker pid=42)\x1b[0m starting\n"
    '(RayTrainWorker pid=42) AEFORGE_PROGRESS {"step": 1, "total": 3}\n'
    "line 1\n\x1b[1;31mline 2 in red\x1b[0m\r\n"
    '(RayTrainWorker pid=42) AEFORGE_PROGRESS {"step": 3, "total": 3}\n'
    "line 3\n"
    'AEFORGE_RESULT {"mlflow_run_id": "run-abc"}\n'
)

# The readable log: colour codes and the result line gone, progress lines as step lines.
READABLE = ["(RayTrainWorker pid=42) starting", "step 1/3", "line 1", "line 2 in red", "step 3/3", "line 3"]


def test_logs_drop_colour_codes_and_protocol_lines_and_tail_keeps_the_last_lines(env):
    job_id = submit(env)
    make_running(env, job_id, LOG)
    out = cli(env.app, "logs", job_id)
    assert out.splitlines() == READABLE
    assert "\x1b" not in out and "AEFORGE_" not in out
    assert cli(env.app, "logs", job_id, "--tail", "2").splitlines() == ["step 3/3", "line 3"]
    assert cli(env.app, "logs", job_id, "--full") == LOG.replace("\r\n", "\n")  # Ray's log, line by line
    assert cli(env.app, "logs", job_id, "-n", "0") == ""
    assert cli(env.app, "logs", job_id, "--tail", "99").splitlines()[0] == "(RayTrainWorker pid=42) starting"


@pytest.mark.timeout(60)
def test_logs_follow_is_clean_and_tail_with_follow_shows_the_last_lines_then_the_rest(env):
    job_id = submit(env)
    make_running(env, job_id, LOG)
    sid = env.store.get(job_id).ray_submission_id
    env.launcher.set(sid, "SUCCEEDED", logs=LOG + "\x1b[32mdone\x1b[0m")  # the last line has no newline
    env.dispatcher.tick()
    followed = cli(env.app, "logs", job_id, "--follow")
    assert followed.splitlines() == [*READABLE, "done"]
    # --tail with --follow: the last N lines of what is there, then what the stream adds after it (nothing twice).
    assert cli(env.app, "logs", job_id, "--follow", "--tail", "1").splitlines() == ["done"]


# --- status --------------------------------------------------------------------------------------------------


def test_status_of_a_queued_job_says_why_it_waits_with_numbers(env):
    running = submit(env, cpus=3)
    head = submit(env, cpus=4)
    behind = submit(env, cpus=1)
    env.dispatcher.tick()
    assert env.store.get(running).state == "starting"
    reason = env.store.get(head).wait_reason
    assert reason == "needs CPU 4, GPU 0; free CPU 1, GPU 0"
    out = cli(env.app, "status", head)
    assert "needs CPU 4, GPU 0; free CPU 1, GPU 0; 0 jobs ahead" in out
    # The job behind has a reason of its own: it would fit, but it has no train.max_hours to backfill with.
    behind_reason = f"behind {head}, which waits for capacity; a job without train.max_hours does not overtake it"
    out = cli(env.app, "status", behind)
    assert f"{behind_reason}; 1 job ahead" in out
    data = json.loads(cli(env.app, "status", behind, "--output", "json"))
    assert data["queue"] == {"jobs_ahead": 1, "reason": behind_reason, "blocked_by": None, "blocked_by_reason": None}
    assert data["wait_reason"] == behind_reason
    assert json.loads(cli(env.app, "status", head, "-o", "json"))["queue"]["reason"] == reason


def test_a_wait_reason_survives_a_restart_of_the_service(env):
    submit(env, cpus=3)
    head = submit(env, cpus=4)
    env.dispatcher.tick()
    url = env.store.url
    env.store.close()
    reopened = Store(url)  # a new service process over the same database, before its dispatcher has run
    settings = ServiceSettings(home=env.tmp, db_url=url, tokens=(Principal("carol", "user", "carol-token-1"),))
    with TestClient(create_app(reopened, settings, launcher=FakeLauncher())) as http:
        job = AeforgeClient("http://testserver", "carol-token-1", http=http).get(head)
    reopened.close()
    assert job["queue"]["reason"] == "needs CPU 4, GPU 0; free CPU 1, GPU 0" and job["queue"]["jobs_ahead"] == 0


def test_a_queue_with_no_live_ray_node_says_so(env):
    head = submit(env)
    env.dispatcher.cluster.down = True
    env.dispatcher.tick()
    assert "Ray is not reachable" in cli(env.app, "status", head)


def test_status_of_a_running_job_shows_progress_and_the_latest_metrics(env):
    job_id = submit(env)
    make_running(
        env,
        job_id,
        'AEFORGE_PROGRESS {"step": 50, "total": 200, "images_per_second": 2345.6, '
        '"metrics": {"train/loss": 0.75, "train/kl": 0.125}}\n',
    )
    out = cli(env.app, "status", job_id)
    assert "step 50 of 200 (25%) · 2,346 images/s" in out
    assert "latest metrics (step 50)" in out and "train/loss" in out and "0.7500" in out and "0.1250" in out
    data = json.loads(cli(env.app, "status", job_id, "--output", "json"))
    assert data["progress"]["metrics"] == {"train/loss": 0.75, "train/kl": 0.125} and data["queue"] is None


def test_status_of_a_finished_job_shows_the_model_metrics_and_pictures(env):
    job_id = submit(env, name=LONG_NAME)
    make_running(env, job_id, "")
    env.launcher.set(
        env.store.get(job_id).ray_submission_id, "SUCCEEDED", logs=f"AEFORGE_RESULT {json.dumps(RESULT)}\n"
    )
    env.dispatcher.tick()
    out = cli(env.app, "status", job_id)
    assert "carol-dae version 7 @latest" in out and "models:/carol-dae/7" in out and "models:/carol-dae@latest" in out
    assert "s3://bucket/aeforge/runs/the-job/pictures" in out and "run-abc" in out
    assert "final metrics" in out and "eval/recon" in out and "0.0312" in out and "12.5000" in out
    data = json.loads(cli(env.app, "status", job_id, "--output", "json"))
    assert data["result"]["metrics"] == RESULT["metrics"] and data["result"]["pictures"] == RESULT["pictures"]
    assert data["model_version"] == "7" and data["name"] == LONG_NAME


# --- --output json -------------------------------------------------------------------------------------------


def test_jobs_json_is_the_api_page_with_full_values_and_stable_keys(env):
    ids = [submit(env, name=LONG_NAME), submit(env)]
    raw = cli(env.app, "jobs", "--output", "json", columns=40)
    assert "[cyan]" not in raw and "\x1b" not in raw  # no rich markup, no colour
    page = json.loads(raw)
    assert set(page) == {"items", "total", "total_exact", "limit", "offset", "next_offset", "next_cursor"}
    assert page["total"] == 2 and page["total_exact"] is True
    assert [job["id"] for job in page["items"]] == ids[::-1]
    assert page["items"][1]["name"] == LONG_NAME  # in full, though the terminal is 40 columns
    keys = [sorted(job) for job in page["items"]]
    assert keys[0] == keys[1] and {"state", "wait_reason", "result", "resources", "model_version"} <= set(keys[0])
    again = json.loads(cli(env.app, "jobs", "-o", "JSON"))
    assert [sorted(job) for job in again["items"]] == keys


def test_an_unknown_output_format_is_refused(env):
    result = CliRunner().invoke(env.app, ["jobs", "--output", "yaml"])
    assert result.exit_code == 2 and "yaml" in result.output


# --- tables that never cut ------------------------------------------------------------------------------------


def test_jobs_piped_is_as_wide_as_the_table_and_cuts_nothing(env):
    job_id = submit(env, name=LONG_NAME)
    out = cli(env.app, "jobs", columns=60)  # CliRunner's output is not a terminal: piped
    assert LONG_NAME in out and job_id in out and "…" not in out
    row = next(line for line in out.splitlines() if job_id in line)
    assert LONG_NAME in row and len(row) > 60


def _folded_cell(lines: list[str], header: str, row: int) -> str:
    """The cell of column ``header`` in the (last) table row, which starts at line ``row``: its folded pieces, one
    under the other, joined."""
    column = next(line for line in lines if f" {header} " in line).index(f" {header} ") + 1
    joined = ""
    for line in lines[row:]:
        piece = line[column:].split(" ")[0] if len(line) > column else ""
        if not piece:
            break
        joined += piece
    return joined


@pytest.mark.parametrize("width", [60, 100])
def test_jobs_on_a_narrow_terminal_fold_ids_and_names_instead_of_cutting_them(env, monkeypatch, width):
    job_id = submit(env, name=LONG_NAME)
    monkeypatch.setattr(cli_jobs, "console", Console(force_terminal=True, width=width, color_system=None))
    out = Text.from_ansi(CliRunner().invoke(env.app, ["jobs"]).output).plain
    lines = out.splitlines()
    assert all(len(line) <= width for line in lines) and "…" not in out
    assert not any(job_id in line for line in lines)  # too narrow for the whole id: it is folded, not cut
    row = next(i for i, line in enumerate(lines) if line.startswith(" " + job_id[:5]))
    assert _folded_cell(lines, "id", row) == job_id
    assert _folded_cell(lines, "name", row) == LONG_NAME
    for header in ("state", "prio", "tries", "age"):  # the short columns keep their headers whole
        assert f" {header}" in lines[next(i for i, line in enumerate(lines) if " id " in line)]


def test_status_piped_keeps_long_values_whole(env):
    job_id = submit(env, name=LONG_NAME)
    make_running(env, job_id, "")
    long_uri = "s3://a-bucket-with-a-long-name/aeforge/runs/" + "x" * 80 + "/pictures"
    result = dict(RESULT, pictures=long_uri)
    env.launcher.set(
        env.store.get(job_id).ray_submission_id, "SUCCEEDED", logs=f"AEFORGE_RESULT {json.dumps(result)}\n"
    )
    env.dispatcher.tick()
    out = cli(env.app, "status", job_id, columns=60)
    assert long_uri in out and LONG_NAME in out and "…" not in out


# --- waiting from Python ------------------------------------------------------------------------------------


def test_client_wait_returns_the_finished_job_and_times_out_naming_its_state(env):
    job_id = submit(env)
    with pytest.raises(WaitTimeout, match=re.escape(f"job {job_id} is still queued after 0.2 s")) as caught:
        env.client.wait(job_id, timeout_s=0.2, poll_s=0.05)
    assert caught.value.job["state"] == "queued"
    seen = []

    def advance(job):  # each poll moves the fake cluster on
        seen.append(job["state"])
        env.dispatcher.tick()
        sid = env.store.get(job_id).ray_submission_id
        if sid and env.launcher.jobs.get(sid, {}).get("status") == "PENDING":
            env.launcher.set(sid, "SUCCEEDED", logs=f"AEFORGE_RESULT {json.dumps(RESULT)}\n")

    final = env.client.wait(job_id, poll_s=0.01, on_poll=advance)
    assert final["state"] == "succeeded" and final["result"]["metrics"] == RESULT["metrics"]
    assert seen[0] == "queued" and seen[-1] == "succeeded"


def test_status_names_the_phase_a_job_is_in_with_its_progress_and_eta(env):
    from workers.protocol import phase_line, progress_line

    job_id = submit(env)
    log = progress_line(200, 200, images_per_second=900.0) + "\n"
    log += phase_line("evaluating", detail="eval/mig", done=4, total=11, eta_s=40) + "\n"
    make_running(env, job_id, log)
    out = cli(env.app, "status", job_id)
    assert "evaluating eval/mig (4 of 11)  ETA 40s" in out
    assert "step 200 of 200 (100%)" in out  # the training it finished
