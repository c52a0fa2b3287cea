"""`aeforge serve --workers N`: several API processes on one port (services.api.ServiceWorkers): one dispatching, the
others API only; one /metrics that adds up every worker's counters (prometheus_client's multiprocess directory); a
worker that dies is started again, its counts kept; SIGTERM stops them all and removes the service record."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from services.api import ServiceWorkers
from services.settings import SettingsError, read_service_record, service_record_path
from tests.fixtures.processes import stop, wait_for

REPO = Path(__file__).resolve().parents[2]
TOKEN = "workers-test-token-0123456789"
SPEC = """\
name: many
model: {variant: vae, architecture: mlp, latent_dim: 4}
data: {source: 'builtin:dsprites'}
train: {steps: 10, batch_size: 8}
"""


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def submissions_counted(url: str) -> float:
    # A fresh connection each time: whichever worker answers, the sum is every worker's.
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(r"^aeforge_job_submissions_total\{[^}]*\} (\S+)$", text, re.M))


def submit_many(url: str, count: int) -> list[int]:
    def one(i: int) -> int:
        # Each its own connection, so that the kernel hands them to either worker.
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
            return http.post("/jobs", json={"spec": SPEC.replace("many", f"many-{i}")}).status_code

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def start_service(home: Path, log: Path, args: list[str]) -> subprocess.Popen:
    """The service (``python <args>``) over ``home``, its output in ``log``; Ray at a port nothing listens on: the
    dispatcher's passes fail, the API does not care."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AEFORGE_", "PROMETHEUS_"))} | {
        "AEFORGE_HOME": str(home),
        "AEFORGE_TOKENS": json.dumps([{"token": TOKEN, "owner": "alice", "role": "admin"}]),
        "RAY_ADDRESS": "http://127.0.0.1:9",
        "PYTHONPATH": str(REPO),
    }
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.timeout(300)
def test_serve_with_two_workers_one_port_one_dispatcher_metrics_added_up_a_dead_worker_replaced(tmp_path):
    home, log = tmp_path / "home", tmp_path / "serve.log"
    proc = start_service(home, log, ["-m", "services.cli", "serve", "--port", "0", "--workers", "2"])
    try:
        record = wait_for(lambda: read_service_record(home), 120, "service.json", detail=log.read_text)
        url = record["url"]
        assert record["pid"] == proc.pid  # the supervisor's: the CLI's "has it exited" looks at it
        workers = children(proc.pid)
        assert len(workers) == 2
        text = log.read_text()
        assert f"API worker 0: pid {workers[0]} (dispatching)" in text
        assert f"API worker 1: pid {workers[1]}\n" in text
        metrics_dirs = {
            dict(v.split("=", 1) for v in Path(f"/proc/{w}/environ").read_text().split("\0") if "=" in v)[
                "PROMETHEUS_MULTIPROC_DIR"
            ]
            for w in workers
        }
        assert len(metrics_dirs) == 1  # one directory that both write to
        [metrics_dir] = metrics_dirs

        assert submit_many(url, 40) == [201] * 40
        for _ in range(4):
            assert submissions_counted(url) == 40
        listed = httpx.get(f"{url}/jobs", params={"limit": 100}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert listed.json()["total"] == 40
        # The dispatcher runs in worker 0 only: its passes (failing, no Ray here) are counted, by one process.
        wait_for(lambda: "aeforge_dispatcher_pass_failures_total" in httpx.get(f"{url}/metrics").text, 60, "a pass")

        os.kill(workers[1], signal.SIGKILL)
        wait_for(
            lambda: len(children(proc.pid)) == 2 and workers[1] not in children(proc.pid),
            60,
            "worker 1 started again",
            detail=log.read_text,
        )
        assert f"API worker 1 (pid {workers[1]}) exited with -9; starting it again" in log.read_text()
        [restarted] = [w for w in children(proc.pid) if w not in workers]
        workers.append(restarted)
        started = re.compile(rf"Started server process \[{restarted}\].*Application startup complete", re.S)
        wait_for(lambda: started.search(log.read_text()), 120, "the new worker to serve", detail=log.read_text)
        wait_for(lambda: submissions_counted(url) == 40, 60, "the new worker to answer")  # the dead one's count kept
        assert submit_many(url, 10) == [201] * 10
        assert submissions_counted(url) == 50
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]
    still_running = [w for w in workers if Path(f"/proc/{w}").exists()]
    assert not still_running
    assert not service_record_path(home).exists()
    assert not Path(metrics_dir).exists()
    text = log.read_text()
    assert f"Finished server process [{workers[0]}]" in text and f"Finished server process [{restarted}]" in text


def test_a_worker_that_keeps_exiting_at_its_start_stops_the_service(tmp_path, monkeypatch):
    import socket

    class FailingWorkers(ServiceWorkers):
        EARLY_EXIT_S = 30.0
        RESTART_DELAY_S = 0.05

        def _start(self, index, metrics_dir):
            import time

            return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]), time.monotonic()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        workers = FailingWorkers(sock, "http://127.0.0.1:9", tmp_path, "http://127.0.0.1:9", True, 2)
        with pytest.raises(SettingsError, match=r"API worker 0 exited with 3 3 times within 30 s of its start"):
            workers.run()
    assert not service_record_path(tmp_path).exists()


def test_workers_must_be_a_positive_number(tmp_path):
    from typer.testing import CliRunner

    from services.cli import app

    result = CliRunner().invoke(app, ["serve", "--workers", "0"], env={"AEFORGE_HOME": str(tmp_path)})
    assert result.exit_code == 2 and "--workers" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(
        app, ["serve", "--port", "0"], env={"AEFORGE_HOME": str(tmp_path), "AEFORGE_API_WORKERS": "two"}
    )
    assert result.exit_code == 2 and "AEFORGE_API_WORKERS must be a positive integer, got 'two'" in result.output


@pytest.mark.timeout(180)
def test_workers_stop_when_their_supervisor_is_killed_outright(tmp_path):
    home, log = tmp_path / "home", tmp_path / "serve.log"
    proc = start_service(home, log, ["-m", "services.api", "--port", "0", "--no-dispatch", "--workers", "2"])
    try:
        wait_for(lambda: read_service_record(home), 120, "service.json", detail=log.read_text)
        workers = children(proc.pid)
        assert len(workers) == 2
    finally:
        proc.kill()
        proc.wait(30)
    # Each notices within its poll (1 s) and stops as on SIGTERM: no worker is left serving with nobody to stop it.
    wait_for(lambda: not any(Path(f"/proc/{w}").exists() and _running(w) for w in workers), 60, "the workers to stop")
    assert log.read_text().count("supervisor (pid") == 2


def _running(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"  # a zombie has ended: nobody waits for it now that its parent is gone
