"""`aeforge doctor` against real components: a moto S3 server, an MLflow server or sqlite store, a sqlite job store,
the queue's API served over HTTP, and (in the slow test) a Ray head in a process of its own; and against dead and
silent endpoints, which must fail by name within the timeout, never hang.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time

import pytest
import yaml
from typer.testing import CliRunner

from services import cli
from services.cli_doctor import Check, CheckFailed, check_job_python, ray_auth, redact_url, run_checks
from services.settings import Principal, ServiceSettings
from services.store import Store
from tests.fixtures.s3 import free_port
from tests.services.test_e2e import ray_client

TOKEN = "doctor-admin-token-42"
CHECKS = [
    "aeforge",
    "torch",
    "ray package",
    "mlflow package",
    "Ray cluster",
    "job interpreter",
    "Ray nodes",
    "storage",
    "MLflow tracking",
    "job store",
    "queue policy",
    "API",
]
# Seconds a doctor may take beyond its --timeout: imports already done, the checks run side by side.
SLACK_S = 20


def doctor(*args: str, env: dict | None = None):
    started = time.monotonic()
    result = CliRunner().invoke(cli.app, ["doctor", *args], env={"COLUMNS": None, **(env or {})})
    return result, time.monotonic() - started


def lines_by_check(output: str) -> dict[str, str]:
    """{check name: its line} from the doctor's table (piped: one line per check)."""
    found = {}
    for line in output.splitlines():
        for name in CHECKS:
            if re.match(rf"(OK|FAIL|SKIP) +{re.escape(name)} +\d+\.\d\d s ", line):
                found[name] = line
    return found


@pytest.fixture(autouse=True)
def no_settings_from_outside(monkeypatch):
    """None of the machine's aeforge, Ray or MLflow settings."""
    for name in (
        "RAY_ADDRESS",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "MLFLOW_TRACKING_URI",
        "AEFORGE_STORAGE",
        "AEFORGE_S3_ENDPOINT_URL",
        "AEFORGE_DB_URL",
        "AEFORGE_API_URL",
        "AEFORGE_API_TOKEN",
        "AEFORGE_TOKENS",
        "AEFORGE_TOKENS_FILE",
        "AEFORGE_SETTINGS_FILE",
        "AEFORGE_JOB_PYTHON",
        "AEFORGE_JOB_MODULE",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh AEFORGE_HOME."""
    home = tmp_path / "doctor-home"
    home.mkdir()
    monkeypatch.setenv("AEFORGE_HOME", str(home))
    return home


@pytest.fixture
def api_server(tmp_path):
    """The queue's API (its real FastAPI app over a sqlite store, a stand-in launcher) served by uvicorn on a free
    port in a thread; yields its URL."""
    from services.api import create_app
    from tests.fixtures.processes import serving_in_thread
    from tests.services.fakes import FakeLauncher

    store = Store(f"sqlite:///{tmp_path / 'api.db'}")
    settings = ServiceSettings(home=tmp_path, db_url="unused", tokens=(Principal("doc", "admin", TOKEN),))
    try:
        with serving_in_thread(create_app(store, settings, launcher=FakeLauncher())) as url:
            yield url
    finally:
        store.close()


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers (a hung server, a firewall that holds packets)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        sock.close()


def test_all_ok_on_s3_an_mlflow_server_a_store_and_the_api(s3_env, mlflow_server, api_server, monkeypatch):
    db = s3_env.home / "queue.db"
    Store(f"sqlite:///{db}").close()  # the store `aeforge serve` would have made
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(mlflow_server))
    monkeypatch.setenv("AEFORGE_DB_URL", f"sqlite:///{db}")
    monkeypatch.setenv("AEFORGE_API_URL", api_server)
    monkeypatch.setenv("AEFORGE_API_TOKEN", TOKEN)

    result, seconds = doctor("--timeout", "20")  # generous: a busy test machine, not a hang
    assert result.exit_code == 0, result.output
    lines = lines_by_check(result.output)
    assert list(lines) == CHECKS, result.output
    assert all(line.startswith("OK ") for line in lines.values()), result.output
    assert f"{s3_env.storage_uri}" in lines["storage"] and s3_env.endpoint_url in lines["storage"]
    assert str(mlflow_server) in lines["MLflow tracking"] and "answers" in lines["MLflow tracking"]
    assert "schema version" in lines["job store"]
    assert api_server in lines["API"] and "token of doc (admin)" in lines["API"]
    assert "no RAY_ADDRESS" in lines["Ray cluster"] and "auth disabled" in lines["Ray cluster"]
    assert "all 12 checks passed" in result.output
    assert seconds < 20 + SLACK_S

    as_json = json.loads(doctor("--timeout", "20", "--output", "json", env={"COLUMNS": "60"})[0].output)
    assert as_json["ok"] is True and [c["name"] for c in as_json["checks"]] == CHECKS
    assert all(c["status"] == "OK" and c["seconds"] >= 0 for c in as_json["checks"])


def test_a_fresh_home_is_ok_and_creates_nothing(home):
    """The embedded defaults before the first run: file storage, no MLflow store or job store yet (the first run
    and `aeforge serve` create them; the doctor does not), no service (skipped, not failed)."""
    result, _ = doctor()
    assert result.exit_code == 0, result.output
    lines = lines_by_check(result.output)
    assert "no store yet" in lines["MLflow tracking"] and "no store yet" in lines["job store"]
    assert lines["API"].startswith("SKIP") and "no service configured" in lines["API"]
    assert lines["storage"].startswith("OK") and (home / "storage").as_uri() in lines["storage"]
    assert not (home / "mlflow.db").exists() and not (home / "aeforge.db").exists()


def test_dead_mlflow_and_dead_storage_fail_by_name_in_bounded_time(s3_env, monkeypatch):
    dead_mlflow = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead_mlflow)
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")

    result, seconds = doctor("--timeout", "3")
    assert result.exit_code == 1, result.output
    lines = lines_by_check(result.output)
    assert lines["MLflow tracking"].startswith("FAIL") and dead_mlflow in lines["MLflow tracking"]
    assert lines["storage"].startswith("FAIL") and "s3://" in lines["storage"]
    assert lines["job store"].startswith("OK") and lines["aeforge"].startswith("OK")
    assert "2 of 12 checks failed: storage, MLflow tracking" in result.output
    assert seconds < 3 + SLACK_S

    as_json = json.loads(doctor("--timeout", "3", "-o", "json")[0].output)
    assert as_json["ok"] is False
    assert {c["name"] for c in as_json["checks"] if c["status"] == "FAIL"} == {"storage", "MLflow tracking"}


def test_endpoints_that_never_answer_fail_when_their_time_is_up(home, silent_port, monkeypatch):
    silent = f"http://127.0.0.1:{silent_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", silent)
    monkeypatch.setenv("AEFORGE_API_URL", silent)
    monkeypatch.setenv("RAY_ADDRESS", silent)  # a dashboard address that never answers

    result, seconds = doctor("--timeout", "2")
    assert result.exit_code == 1, result.output
    lines = lines_by_check(result.output)
    for name in ("MLflow tracking", "API", "Ray cluster"):
        assert lines[name].startswith("FAIL"), result.output
    assert "no answer within 2 s" in result.output or "timed out" in result.output.lower()
    assert seconds < 2 + SLACK_S


def test_a_configured_service_that_is_down_or_refuses_the_token_fails(home, api_server, monkeypatch):
    monkeypatch.setenv("AEFORGE_API_URL", f"http://127.0.0.1:{free_port()}")
    down = lines_by_check(doctor()[0].output)["API"]
    assert down.startswith("FAIL") and "cannot reach the aeforge service" in down

    monkeypatch.setenv("AEFORGE_API_URL", api_server)
    monkeypatch.setenv("AEFORGE_API_TOKEN", "not-a-token-it-knows")
    result, _ = doctor()
    refused = lines_by_check(result.output)["API"]
    assert result.exit_code == 1 and refused.startswith("FAIL") and "refuses this token" in refused
    assert "not-a-token-it-knows" not in result.output

    monkeypatch.delenv("AEFORGE_API_TOKEN")
    no_token = lines_by_check(doctor()[0].output)["API"]
    assert no_token.startswith("OK") and "no token" in no_token


def test_a_job_store_newer_than_this_aeforge_fails(home, monkeypatch):
    from sqlalchemy import create_engine, text

    db = home / "aeforge.db"
    Store(f"sqlite:///{db}").close()
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE aeforge_alembic_version SET version_num = '0099'"))
    engine.dispose()
    result, _ = doctor()
    line = lines_by_check(result.output)["job store"]
    assert result.exit_code == 1 and line.startswith("FAIL") and "schema version 0099 is newer" in line


def test_a_postgres_password_is_not_shown(home, monkeypatch):
    monkeypatch.setenv("AEFORGE_DB_URL", f"postgresql+psycopg://user:hunter2secret@127.0.0.1:{free_port()}/db")
    result, _ = doctor("--timeout", "3")
    line = lines_by_check(result.output)["job store"]
    assert line.startswith("FAIL") and "user:***@127.0.0.1" in line and "hunter2secret" not in result.output
    assert redact_url("http://u:pw@host:5000/x") == "http://u:***@host:5000/x"


def test_ray_at_a_dead_address_and_token_mode_without_a_token_fail(home, tmp_path, monkeypatch):
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    result, seconds = doctor("--timeout", "3")
    line = lines_by_check(result.output)["Ray cluster"]
    assert result.exit_code == 1 and line.startswith("FAIL") and f"nothing answers at 127.0.0.1:{port}" in line
    assert seconds < 3 + SLACK_S

    missing = tmp_path / "no-token"
    with pytest.raises(Exception, match="RAY_AUTH_MODE=token but there is no token"):
        ray_auth({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(missing)})
    missing.write_text("t0ken")
    assert ray_auth({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(missing)}) == f"auth token (from {missing})"
    assert ray_auth({}) == "auth disabled"


def test_checks_run_side_by_side_and_each_has_its_deadline():
    release = threading.Event()

    def hangs() -> str:
        release.wait(30)
        return "late"

    started = time.monotonic()
    results = run_checks([Check("slow-a", hangs, 0.5), Check("slow-b", hangs, 0.5), Check("fast", lambda: "fine", 5)])
    release.set()
    assert time.monotonic() - started < 2  # not 0.5 + 0.5 one after the other, and not 30
    assert [(r.name, r.status) for r in results] == [("slow-a", "FAIL"), ("slow-b", "FAIL"), ("fast", "OK")]
    assert results[0].detail == "no answer within 0.5 s" and results[2].detail == "fine"


def test_the_jobs_interpreter_is_checked_here_for_the_embedded_head(home, tmp_path, monkeypatch):
    """Without RAY_ADDRESS the embedded head's jobs run with this interpreter (or AEFORGE_JOB_PYTHON): it must
    import torch and the job module; a `python` without them fails, with what it said and the setting to change."""
    assert check_job_python(10, 120)().startswith(f"{sys.executable} (this interpreter, which the embedded head's")
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("AEFORGE_JOB_PYTHON", str(broken))
    with pytest.raises(CheckFailed) as failed:
        check_job_python(10, 120)()
    assert f"{broken} (from AEFORGE_JOB_PYTHON) on this machine cannot run aeforge's jobs" in str(failed.value)
    assert "No module named 'torch'" in str(failed.value) and "set AEFORGE_JOB_PYTHON" in str(failed.value)
    monkeypatch.setenv("AEFORGE_JOB_PYTHON", str(tmp_path / "missing"))
    with pytest.raises(CheckFailed, match="does not exist"):
        check_job_python(10, 120)()


# --- against a real Ray head ------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_doctor_and_validate_against_a_ray_head(home, ray_head, tmp_path, monkeypatch):
    """A Ray head of 2 CPUs and no GPU in a process of its own: the doctor sees its node and resources through the
    Jobs API, and `validate` warns that a spec asking for a GPU could not start there."""
    monkeypatch.setenv("RAY_ADDRESS", ray_head.address)
    result, _ = doctor("--timeout", "10")
    line = lines_by_check(result.output)["Ray cluster"]
    assert line.startswith("OK"), result.output
    assert f"cluster at {ray_head.address}" in line and "1 node" in line and "CPU 2" in line and "GPU 0" in line

    spec = tmp_path / "gpu.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "gpu-on-cpu-cluster",
                "model": {"variant": "vae", "architecture": "mlp", "latent_dim": 4},
                "data": {"source": "builtin:dsprites"},
                "train": {"steps": 10},
                "resources": {"workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 1},
            }
        )
    )
    # The jobs' interpreter, run as a Ray job: the head's `python` is the venv's; a missing one is named.
    interpreter = lines_by_check(result.output)["job interpreter"]
    assert interpreter.startswith("OK") and f"python ({sys.executable}) on the cluster at" in interpreter, interpreter
    monkeypatch.setenv("AEFORGE_JOB_PYTHON", "/opt/no-such-env/bin/python")
    with pytest.raises(CheckFailed, match="/opt/no-such-env/bin/python on the cluster at .* cannot run aeforge's jobs"):
        check_job_python(10, 60)()
    probes = [job for job in ray_client(ray_head).list_jobs() if job.submission_id.startswith("aeforge-doctor-")]
    # doctor's two cluster probes (the job interpreter, every node's environment) and the failed interpreter check
    assert len(probes) == 3 and all(job.status.is_terminal() for job in probes)

    validated = CliRunner().invoke(cli.app, ["validate", "--no-data", str(spec)], env={"COLUMNS": None})
    assert validated.exit_code == 0, validated.output
    assert "warning: the spec asks for 1 GPU" in validated.output
    assert f"the Ray cluster at {ray_head.address} (RAY_ADDRESS) has none" in validated.output


def test_node_findings_name_each_node_and_what_it_lacks():
    from services.cli_doctor import node_findings

    fine = {"node_id": "a" * 28, "address": "10.0.0.1", "head": True, "gpus": 0, "aeforge": "0.1.0", "torch": "2.13.0"}
    gpu = {"node_id": "b" * 28, "address": "10.0.0.2", "gpus": 2, "aeforge": "0.1.0", "torch": "2.13.0+cpu"}
    gpu |= {"cuda": None, "cuda_gpus": 0}
    cuda = gpu | {"node_id": "c" * 28, "address": "10.0.0.3", "torch": "2.13.0", "cuda": "12.8", "cuda_gpus": 2}
    broken = {
        "node_id": "d" * 28,
        "address": "10.0.0.4",
        "gpus": 0,
        "error": "ModuleNotFoundError: No module named 'torch'",
    }
    seen, problems = node_findings({"driver": {"python": "3.11.7"}, "nodes": [fine, gpu, cuda, broken]})
    assert seen == [
        "head node 10.0.0.1 (aaaaaaaa): aeforge 0.1.0, torch 2.13.0, Python None",
        "node 10.0.0.3 (cccccccc): aeforge 0.1.0, torch 2.13.0, Python None, CUDA 12.8 with 2 GPU(s)",
    ]
    assert problems == [
        "node 10.0.0.2 (bbbbbbbb) has 2 GPU(s) for Ray but its torch 2.13.0+cpu sees no CUDA GPU; install a CUDA build "
        "of torch there",
        "node 10.0.0.4 (dddddddd): ModuleNotFoundError: No module named 'torch'",
    ]
