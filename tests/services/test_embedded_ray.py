"""The embedded Ray head of `aeforge serve` without RAY_ADDRESS (services/embedded_ray.py) and the interpreter its
jobs run with.

The unit tests stand in for a head with a process group of `sleep`s and, where a healthy head is needed, a small
HTTP app answering the two health checks. The end-to-end test runs the real thing: `.venv/bin/aeforge serve` with a
PATH that holds neither the venv nor a `python` that could run a job, jobs submitted, the service SIGKILLed and
started again at once (it takes its head over), then the service and its head killed together (it starts a new
head on free ports while the old one's processes may still hold theirs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from services.dispatcher import LauncherUnavailable, RayJobLauncher, entrypoint_for
from services.embedded_ray import (
    RECORD_NAME,
    EmbeddedRay,
    EmbeddedRayError,
    HeadRecord,
    group_members,
    process_started,
    same_process,
)
from services.settings import ServiceSettings, SettingsError
from tests.fixtures.processes import serving_in_thread, wait_for
from tests.fixtures.s3 import free_port

REPO = Path(__file__).resolve().parents[2]


def fake_head(tmp_path: Path) -> subprocess.Popen:
    """A process group standing in for `ray start --block` and one of its processes: on SIGTERM it stops the
    process and exits, as `ray start` does."""
    script = 'sleep 300 & child=$!; trap "kill $child; exit 0" TERM; wait'
    return subprocess.Popen(["sh", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL)


def record_for(proc: subprocess.Popen, tmp_path: Path, dashboard_port: int, agent_port: int, **service) -> HeadRecord:
    temp_dir = tmp_path / "ray-temp"
    temp_dir.mkdir(exist_ok=True)
    wait_for(lambda: len(group_members(proc.pid)) == 2, 10, "the fake head's two processes")
    return HeadRecord(
        pid=proc.pid,
        pid_started=process_started(proc.pid),
        service_pid=service.get("service_pid", 999_999_999),
        service_started=service.get("service_started"),
        gcs_address="127.0.0.1:1",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        agent_port=agent_port,
        temp_dir=str(temp_dir),
    )


@pytest.fixture
def head_proc(tmp_path):
    proc = fake_head(tmp_path)
    yield proc
    if group_members(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_an_unhealthy_head_a_crashed_service_left_is_killed_with_its_group(tmp_path, head_proc):
    record = record_for(head_proc, tmp_path, free_port(), free_port())  # nothing answers there
    record.write(tmp_path)
    members = group_members(head_proc.pid)
    assert EmbeddedRay(tmp_path, take_over_patience_s=1).take_over() is None
    head_proc.wait(10)
    assert not group_members(head_proc.pid) and all(process_started(pid) is None for pid in members)
    assert not (tmp_path / RECORD_NAME).exists() and not Path(record.temp_dir).exists()


def test_a_healthy_head_is_taken_over_and_a_clean_stop_ends_it(tmp_path, head_proc):
    app = FastAPI()
    app.get("/api/gcs_healthz", response_class=PlainTextResponse)(lambda: "success")
    app.get("/api/healthz", response_class=PlainTextResponse)(lambda: "raylet: success\ngcs: success")
    with serving_in_thread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        record_for(head_proc, tmp_path, port, port).write(tmp_path)
        ray = EmbeddedRay(tmp_path)
        assert ray.start() == url
        taken = HeadRecord.read(tmp_path)
        assert taken.pid == head_proc.pid and taken.service_pid == os.getpid()
        assert head_proc.poll() is None  # left running: its jobs go on
        ray.stop()
    head_proc.wait(10)
    assert not group_members(head_proc.pid) and not (tmp_path / RECORD_NAME).exists()


def test_a_head_whose_service_still_runs_is_not_touched(tmp_path, head_proc):
    service = subprocess.Popen(["sleep", "60"])
    try:
        record = record_for(
            head_proc,
            tmp_path,
            free_port(),
            free_port(),
            service_pid=service.pid,
            service_started=process_started(service.pid),
        )
        record.write(tmp_path)
        with pytest.raises(EmbeddedRayError, match=f"another aeforge serve \\(process {service.pid}\\)"):
            EmbeddedRay(tmp_path).take_over()
        assert head_proc.poll() is None and (tmp_path / RECORD_NAME).exists()
    finally:
        service.kill()
        service.wait(10)


def test_a_record_of_a_head_long_gone_or_a_recycled_id_is_dropped(tmp_path, head_proc):
    gone = subprocess.Popen(["true"], start_new_session=True)
    gone.wait(10)
    record = HeadRecord(
        pid=gone.pid,
        pid_started=1,
        service_pid=gone.pid,
        service_started=1,
        gcs_address="127.0.0.1:1",
        dashboard_url="http://127.0.0.1:1",
        agent_port=1,
        temp_dir=str(tmp_path / "gone"),
    )
    record.write(tmp_path)
    assert EmbeddedRay(tmp_path).take_over() is None and not (tmp_path / RECORD_NAME).exists()
    # A live process under the recorded id but with another start time is someone else's: left alone.
    recycled = record_for(head_proc, tmp_path, 1, 1)
    HeadRecord(**{**recycled.__dict__, "pid_started": recycled.pid_started - 1}).write(tmp_path)
    assert EmbeddedRay(tmp_path).take_over() is None
    time.sleep(0.5)
    assert head_proc.poll() is None and len(group_members(head_proc.pid)) == 2
    (tmp_path / RECORD_NAME).write_text("{not json")
    assert HeadRecord.read(tmp_path) is None


def test_token_mode_makes_the_local_heads_token_when_there_is_none(tmp_path):
    """`ray start` in token mode refuses to start without a token; ray.init, which the embedded head used before,
    made one. The embedded head makes it too (in a process with its own HOME: Ray writes ~/.ray/auth_token)."""

    def run_with_home(home: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env |= {"HOME": str(home), "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}
        code = "from services.embedded_ray import ensure_local_auth_token; ensure_local_auth_token()"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    run_with_home(tmp_path / "fresh")
    assert len((tmp_path / "fresh" / ".ray" / "auth_token").read_text().strip()) >= 32
    kept = tmp_path / "kept" / ".ray" / "auth_token"
    kept.parent.mkdir(parents=True)
    kept.write_text("the-clusters-own-token-0123456789abcdef")
    run_with_home(tmp_path / "kept")
    assert kept.read_text() == "the-clusters-own-token-0123456789abcdef"


def test_the_jobs_interpreter_is_the_services_own_for_the_embedded_head_else_a_setting(tmp_path):
    home = {"AEFORGE_HOME": str(tmp_path)}
    assert ServiceSettings.load(home).job_interpreter() == sys.executable
    assert ServiceSettings.load(home | {"RAY_ADDRESS": "10.0.0.1:6379"}).job_interpreter() == "python"
    chosen = home | {"RAY_ADDRESS": "10.0.0.1:6379", "AEFORGE_JOB_PYTHON": "/opt/env with space/bin/python"}
    assert ServiceSettings.load(chosen).job_interpreter() == "/opt/env with space/bin/python"
    assert (
        entrypoint_for("j-1", "jobs.run", "/opt/env with space/bin/python")
        == "'/opt/env with space/bin/python' -m jobs.run j-1"
    )
    with pytest.raises(SettingsError, match="AEFORGE_JOB_PYTHON"):
        ServiceSettings.load(home | {"AEFORGE_JOB_PYTHON": "python\nrm -rf /"})


class RefusingClient:
    def __init__(self, message: str):
        self.message = message

    def submit_job(self, **kwargs):
        raise RuntimeError(self.message)


@pytest.mark.parametrize(
    "message",
    [
        "Request failed with status code 500: No available agent to submit job, please try again later.",
        "Request failed with status code 500: Timed out waiting for an available job agent to submit the job.",
    ],
)
def test_a_head_without_a_job_agent_is_unavailable_not_a_failed_attempt(message):
    launcher = RayJobLauncher("http://127.0.0.1:1")
    launcher._client = RefusingClient(message)
    with pytest.raises(LauncherUnavailable, match="not ready yet"):
        launcher.submit("job-1", "python -m jobs.run job-1", {}, "{}")
    launcher._client = RefusingClient("Request failed with status code 400: bad runtime_env")
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        launcher.submit("job-1", "python -m jobs.run job-1", {}, "{}")


# --- end to end ---------------------------------------------------------------------------------------------------

TOKEN = "embedded-admin-token"
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def fake_spec(name: str, steps: int) -> str:
    return (
        f"name: {name}\nmodel: {{variant: ae, architecture: mlp, latent_dim: 2}}\n"
        f"train: {{steps: {steps}, batch_size: 4}}\nresources: {{workers: 1, cpus_per_worker: 1}}\n"
    )


class EmbeddedService:
    """`<venv>/bin/aeforge serve` (no RAY_ADDRESS) with a PATH that has neither the venv nor a usable `python`."""

    def __init__(self, home: Path, bin_dir: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "service.log"
        machine = {k: v for k, v in os.environ.items() if not k.startswith(("AEFORGE_", "AWS_", "RAY_", "MLFLOW_"))}
        self.env = (
            machine
            | RAY_ENV
            | {
                "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
                "AEFORGE_HOME": str(home),
                "AEFORGE_TOKENS": f"{TOKEN}:tester:admin",
                "AEFORGE_JOB_MODULE": "tests.services.fake_job",
                "AEFORGE_DISPATCH_INTERVAL": "0.3",
                "PYTHONPATH": str(REPO),
            }
        )
        self.env.pop("VIRTUAL_ENV", None)
        self.proc: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    def start(self, workers: int = 1) -> EmbeddedService:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "aeforge"), "serve", "--port", str(self.port)]
                + ["--workers", str(workers)],
                env=self.env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"the service exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                return self.http.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 300, "the embedded service to answer /healthz", interval=0.3, detail=self.tail)
        return self

    def tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-40:])

    def submit(self, spec: str) -> str:
        response = self.http.post("/jobs", json={"spec": spec})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/jobs/{job_id}").json()

    def wait_ended(self, job_id: str, timeout: float = 300) -> dict:
        def ended():
            job = self.job(job_id)
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        return wait_for(ended, timeout, f"job {job_id} to end", interval=0.5, detail=self.tail)


def kill_recorded_head(home: Path) -> None:
    record = HeadRecord.read(home)
    if record is not None and same_process(record.pid, record.pid_started):
        os.killpg(record.pid, signal.SIGKILL)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_embedded_service_runs_jobs_without_its_venv_on_path_and_comes_back_from_sigkills(tmp_path):
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    # The `python` a PATH without the venv finds: one that cannot run a job (as a system Python without torch).
    (bin_dir / "python").write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    (bin_dir / "python").chmod(0o755)
    svc = EmbeddedService(home, bin_dir)
    try:
        svc.start()
        first_head = HeadRecord.read(home)
        assert first_head is not None and first_head.agent_port != 52365
        jobs = [svc.submit(fake_spec(f"crash-{i}", steps=20)) for i in range(3)]
        wait_for(lambda: svc.job(jobs[0])["state"] != "queued", 60, "the first job to be claimed", detail=svc.tail)
        svc.proc.send_signal(signal.SIGKILL)  # while jobs are queued, starting or running
        svc.proc.wait(30)
        svc.start()  # at once, as a process supervisor would
        assert HeadRecord.read(home).pid == first_head.pid  # the healthy head was taken over
        for job_id in jobs:
            job = svc.wait_ended(job_id)
            assert job["state"] == "succeeded" and job["attempts"] == 1, (job, svc.tail())

        # The service and its head killed together: the next start reaps what is left and starts a new head on
        # free ports, and a new job runs on it. This start runs two API processes (`--workers 2`): the job is
        # dispatched by a worker given the head's address, and still runs with the service's own interpreter.
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait(30)
        kill_recorded_head(home)
        svc.start(workers=2)
        wait_for(lambda: "with 2 worker processes" in svc.log_path.read_text(), 30, "the supervisor's record")
        second_head = HeadRecord.read(home)
        assert second_head.pid != first_head.pid and second_head.agent_port != first_head.agent_port
        last = svc.wait_ended(svc.submit(fake_spec("after-the-head-died", steps=2)))
        assert last["state"] == "succeeded" and last["attempts"] == 1, (last, svc.tail())

        # A clean stop ends the head.
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(90) in (0, -signal.SIGTERM)
        wait_for(lambda: not group_members(second_head.pid), 30, "the head's processes to end")
        assert not (home / RECORD_NAME).exists()
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait(30)
        kill_recorded_head(home)
        svc.http.close()
