"""The local Ray head of an ``aeforge serve`` without RAY_ADDRESS: started, recorded, taken over after a crash.

The head is ``ray start --head --block`` in a process session of its own, run by the interpreter that runs the
service (so its workers and the jobs' entry points find the same packages), with every port chosen free when it
starts. Ray's fixed defaults are not used: the dashboard agent's 52365 may still be held by a Ray that has not
finished dying, or by another Ray on the machine, and an agent that cannot bind its port stays alive with its HTTP
service off, so the Jobs API answers "No available agent" for as long as the head runs.

Its process id, ports and temporary folder are recorded in AEFORGE_HOME/ray-head.json with the service's process
id. A clean stop of the service stops the head. A crash of the service does not: the head and its jobs keep running,
and the next ``aeforge serve`` over the same AEFORGE_HOME takes the head over when it is healthy (its jobs go on
without spending an attempt), or stops what is left of it and starts a new one when it is not. Healthy means the
dashboard answers with a live GCS behind it (``/api/gcs_healthz``) and the dashboard agent's own health check
(``/api/healthz`` on its HTTP port, the one the Jobs API submits through) answers 200. A new head that does not
become healthy is stopped and started once more on other ports; then the service fails, naming the head's log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.settings import process_alive, write_private
from workers.errors import AeforgeError

log = logging.getLogger(__name__)

RECORD_NAME = "ray-head.json"
LOG_NAME = "ray-head.log"
# A head starts in 5-20 s on an idle machine; a loaded 2-core machine has been seen to need a minute.
START_TIMEOUT_S = 180.0
# How long a head a crashed service left may take to pass its health checks before it is replaced: replacing it
# ends its running jobs, so a head slow to answer on a loaded machine is given time.
TAKE_OVER_PATIENCE_S = 20.0
# How long a clean stop waits for `ray start --block` to stop its processes before they are killed.
STOP_GRACE_S = 20.0
# The flags of `ray start` that take a port, each given a free one (the GCS's is --port).
PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
    "--node-manager-port",
    "--object-manager-port",
    "--ray-client-server-port",
)


class EmbeddedRayError(AeforgeError):
    """The embedded Ray head cannot be started or taken over (the message says why and where its log is)."""


@dataclass(frozen=True)
class HeadRecord:
    """AEFORGE_HOME/ray-head.json: which process is the head, which service runs it, and where to reach it. A
    process is named by its id and its start time (a recycled id is not the same process)."""

    pid: int
    pid_started: int | None
    service_pid: int
    service_started: int | None
    gcs_address: str
    dashboard_url: str
    agent_port: int
    temp_dir: str

    @classmethod
    def read(cls, home: Path) -> HeadRecord | None:
        path = home / RECORD_NAME
        try:
            data = json.loads(path.read_text())
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring %s: not a Ray head record (%s)", path, exc)
            return None

    def write(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        write_private(home / RECORD_NAME, json.dumps(asdict(self)) + "\n")


# --- processes --------------------------------------------------------------------------------------------------


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (the first is the state), or None when the process
    does not exist, is a zombie (it has exited; only its parent has not collected it yet), or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces and parentheses.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields


def process_started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot: field 22 of /proc/<pid>/stat), or None when it is not
    running or this system has no /proc."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def same_process(pid: int, started: int | None) -> bool:
    """Whether ``pid`` is still the process that was recorded with start time ``started``."""
    if not Path("/proc").is_dir():  # no /proc: the id alone
        return process_alive(pid)
    now = process_started(pid)
    return now is not None and now == started


def group_members(pgid: int) -> list[int]:
    """The running processes of process group ``pgid`` (from /proc; empty where there is none)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(entry.name)
            if fields is not None and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def leftovers(record: HeadRecord) -> list[int]:
    """The processes left of the recorded head: its process group (``ray start`` led it, in a session of its own).
    When the leader has exited, the group id is still ours while any member lives (Linux hands out no id that is in
    use as a group id); when the id now names another process, the group is someone else's: nothing is ours."""
    if not same_process(record.pid, record.pid_started) and process_started(record.pid) is not None:
        return []  # the id was recycled
    return group_members(record.pid)


def kill_head_group(record: HeadRecord) -> None:
    """SIGKILL what is left of the recorded head."""
    if leftovers(record):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, signal.SIGKILL)


def wait_gone(record: HeadRecord, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while leftovers(record):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on this machine now (held open together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


# --- health -----------------------------------------------------------------------------------------------------


def head_problem(record: HeadRecord, timeout_s: float = 5.0) -> str | None:
    """None when the head is healthy (its dashboard answers with a live GCS behind it, and its dashboard agent's
    health check answers 200); else what is wrong, in words."""
    checks = (
        ("the dashboard", f"{record.dashboard_url}/api/gcs_healthz"),
        ("the dashboard agent", f"http://127.0.0.1:{record.agent_port}/api/healthz"),
    )
    for what, url in checks:
        # urllib, not httpx: httpx logs every request at INFO, and this runs every half second while a head starts.
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace").strip()[:200]
            return f"{what} answers {exc.code} at {url}: {body}"
        except (OSError, ValueError) as exc:  # refused, reset, timed out
            return f"{what} does not answer at {url}: {getattr(exc, 'reason', None) or exc}"
    return None


def ensure_local_auth_token() -> None:
    """In Ray's token mode (RAY_AUTH_MODE=token) a new local head needs a token: one is made (~/.ray/auth_token) when
    there is none, as ray.init does for a local cluster it starts; `ray start` would only refuse to start."""
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled

    ensure_token_if_auth_enabled(None, create_token_if_missing=True)


# --- the head ---------------------------------------------------------------------------------------------------


class EmbeddedRay:
    """The local Ray head of one ``aeforge serve``: :meth:`start` (takes over a healthy head a crashed service left,
    else starts a new one) returns the dashboard URL, where the Jobs API is; :meth:`stop` stops it."""

    def __init__(
        self,
        home: Path,
        environ: Mapping[str, str] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        take_over_patience_s: float = TAKE_OVER_PATIENCE_S,
    ):
        self.home = home
        self.environ = dict(os.environ if environ is None else environ)
        self.start_timeout_s = start_timeout_s
        self.take_over_patience_s = take_over_patience_s
        self.record: HeadRecord | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.home / LOG_NAME

    def start(self) -> str:
        adopted = self.take_over()
        if adopted is not None:
            self.record = adopted
            return adopted.dashboard_url
        problem = None
        for _ in range(2):  # a head that does not come up healthy is started once more, on other ports
            record = self._launch()
            problem = self._wait_healthy(record)
            if problem is None:
                log.info("the embedded Ray head (process %d) is healthy at %s", record.pid, record.dashboard_url)
                return record.dashboard_url
            log.warning("the new embedded Ray head is not healthy (%s); stopping it", problem)
            self.stop()
        raise EmbeddedRayError(f"the embedded Ray head did not become healthy: {problem}; see {self.log_path}")

    def take_over(self) -> HeadRecord | None:
        """The head recorded in AEFORGE_HOME, recorded as this service's, when it is alive and healthy. One that is
        not is stopped (and None returned). EmbeddedRayError while the service that runs it is still alive."""
        old = HeadRecord.read(self.home)
        if old is None:
            return None
        if old.service_pid != os.getpid() and same_process(old.service_pid, old.service_started):
            raise EmbeddedRayError(
                f"another aeforge serve (process {old.service_pid}) runs its Ray head over {self.home} "
                f"(recorded in {self.home / RECORD_NAME}); stop it, or give this service another AEFORGE_HOME"
            )
        if same_process(old.pid, old.pid_started):
            problem = self._check_for(old, self.take_over_patience_s)
            if problem is None:
                record = HeadRecord(**(asdict(old) | self._service_identity()))
                record.write(self.home)
                log.warning(
                    "took over the Ray head (process %d at %s) that a stopped aeforge serve (process %d) left running; "
                    "its jobs go on",
                    old.pid,
                    old.dashboard_url,
                    old.service_pid,
                )
                return record
            log.warning("the Ray head (process %d) a stopped aeforge serve left is not healthy (%s)", old.pid, problem)
        self._reap(old)
        return None

    def stop(self) -> None:
        """Stop this service's head (SIGTERM to `ray start`, which stops its processes; SIGKILL for what is left
        after STOP_GRACE_S), remove its temporary folder and its record."""
        record, self.record = self.record, None
        if record is None:
            return
        if same_process(record.pid, record.pid_started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(record.pid, signal.SIGTERM)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(STOP_GRACE_S)
            self._proc = None
        self._reap(record, grace_s=STOP_GRACE_S)

    # --- inside -------------------------------------------------------------------------------------------------
    def _service_identity(self) -> dict[str, Any]:
        return {"service_pid": os.getpid(), "service_started": process_started(os.getpid())}

    def _reap(self, record: HeadRecord, grace_s: float = 0.0) -> None:
        if grace_s:
            wait_gone(record, grace_s)
        kill_head_group(record)
        if not wait_gone(record, 10):
            log.warning("processes of the Ray head %d are still alive after SIGKILL", record.pid)
        shutil.rmtree(record.temp_dir, ignore_errors=True)
        current = HeadRecord.read(self.home)
        if current is not None and current.pid == record.pid:
            with contextlib.suppress(FileNotFoundError):
                (self.home / RECORD_NAME).unlink()

    def _launch(self) -> HeadRecord:
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        # Short and outside AEFORGE_HOME: Ray's socket paths under it have a length limit.
        temp_dir = tempfile.mkdtemp(prefix="aeforge-ray-")
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        env = {k: v for k, v in self.environ.items() if k != "RAY_ADDRESS"}
        if env.get("RAY_AUTH_MODE", "").lower() == "token":
            ensure_local_auth_token()
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            out.flush()
            # A session of its own: the head outlives a crash of the service (the next one takes it over), and its
            # processes form one group to stop.
            proc = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._proc = proc
        record = HeadRecord(
            pid=proc.pid,
            pid_started=process_started(proc.pid),
            gcs_address=f"127.0.0.1:{ports['--port']}",
            dashboard_url=f"http://127.0.0.1:{ports['--dashboard-port']}",
            agent_port=ports["--dashboard-agent-listen-port"],
            temp_dir=temp_dir,
            **self._service_identity(),
        )
        record.write(self.home)  # at once: a crash while it starts leaves a head the next start can find
        self.record = record
        log.info("starting an embedded Ray head (process %d; log %s)", proc.pid, self.log_path)
        return record

    def _wait_healthy(self, record: HeadRecord) -> str | None:
        return self._check_for(record, self.start_timeout_s)

    def _check_for(self, record: HeadRecord, patience_s: float) -> str | None:
        """None as soon as the head is healthy; else, after ``patience_s`` or once its process has exited, what is
        wrong."""
        deadline = time.monotonic() + patience_s
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                return f"`ray start` exited with code {self._proc.returncode}:\n{self._log_tail()}"
            if not same_process(record.pid, record.pid_started):
                return f"its process {record.pid} has exited"
            problem = head_problem(record)
            if problem is None:
                return None
            if time.monotonic() > deadline:
                return f"{problem} after {patience_s:g} s"
            time.sleep(0.5)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
