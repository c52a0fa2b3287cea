"""`aeforge doctor`: is everything aeforge talks to there, and set up the way aeforge expects?

One line per check, OK or FAIL with the reason, and how long it took; exit code 1 when any check fails:

- the versions of aeforge, torch (and whether CUDA sees a GPU), Ray and MLflow;
- the interpreter the queue's jobs run with (AEFORGE_JOB_PYTHON, or this one for the embedded head) imports torch
  and the job module: on RAY_ADDRESS's cluster as a tiny Ray job, else on this machine;
- Ray: RAY_ADDRESS's cluster answers (its Jobs API and its nodes' resources), with the auth mode this process
  would use (RAY_AUTH_MODE, and where its token is); without RAY_ADDRESS, that this Ray can start one here (its
  train, tune and dashboard parts are installed);
- Ray nodes: a Ray job (services.node_probe) runs a small task on every alive node that imports aeforge and torch
  and reports their versions (and CUDA where the node has GPUs); a node that cannot fails the check with how to
  fix it;
- storage: the preflight every job makes (AEFORGE_STORAGE reachable and writable);
- MLflow: the tracking server (or store) answers a search;
- the queue's job store (AEFORGE_DB_URL): it answers, and its schema is one this aeforge reads (nothing is
  created or migrated: a store that does not exist yet is what the first ``aeforge serve`` creates);
- the queue's API (AEFORGE_API_URL, or the service ``aeforge serve`` recorded): /healthz, and /whoami when there
  is a token. Without a configured service, a service that does not answer at the default address is skipped,
  not failed: runs with ``aeforge run`` need none.

Every check runs in a thread of its own with a deadline (``--timeout``, 10 s by default): an endpoint that does not
answer is reported as such when its time is up, it never hangs the command. The checks run side by side, so the
command takes about as long as its slowest check.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse, urlunparse

import typer
from rich.text import Text

from services.cli_errors import handle_errors
from services.cli_output import (
    OutputFormat,
    make_console,
    new_table,
    number_column,
    output_option,
    print_json,
    text_column,
)
from workers.errors import AeforgeError

# Long enough for a busy machine's answer, short enough that a dead endpoint is reported without a long wait.
DEFAULT_TIMEOUT_S = 10.0
# Importing torch (to ask CUDA) reads a large library from disk: a slow import is not an endpoint that hangs.
IMPORT_TIMEOUT_S = 120.0

OK, FAIL, SKIP = "OK", "FAIL", "SKIP"
T = TypeVar("T")
STATUS_STYLES = {OK: "bold green", FAIL: "bold red", SKIP: "yellow"}


class CheckFailed(AeforgeError):
    """A check's finding that fails it (the message is its reason)."""


class Skipped(Exception):
    """A check that does not apply here (the message says why); it does not fail the command."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str
    detail: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[], str]  # returns the OK line's detail; raises to fail (Skipped to skip)
    timeout_s: float


def run_checks(checks: list[Check]) -> list[CheckResult]:
    """Run every check in a daemon thread of its own, all at once, and wait for each until its deadline; a check
    still running then fails as "no answer within N s" (its thread is left behind: it cannot be stopped, and a
    daemon thread does not keep the command from exiting)."""
    outcomes: dict[str, tuple[str, str, float]] = {}
    threads = []
    for check in checks:

        def target(check: Check = check) -> None:
            started = time.monotonic()
            try:
                status, detail = OK, check.run()
            except Skipped as exc:
                status, detail = SKIP, str(exc)
            except BaseException as exc:
                status, detail = FAIL, describe_error(exc)
            outcomes[check.name] = (status, detail, time.monotonic() - started)

        thread = threading.Thread(target=target, name=f"aeforge-doctor-{check.name}", daemon=True)
        threads.append((check, thread, time.monotonic()))
        thread.start()
    results = []
    for check, thread, started in threads:
        thread.join(max(0.0, started + check.timeout_s - time.monotonic()))
        if check.name in outcomes:
            status, detail, seconds = outcomes[check.name]
        else:
            status, detail, seconds = FAIL, f"no answer within {check.timeout_s:g} s", time.monotonic() - started
        results.append(CheckResult(check.name, status, detail, seconds))
    return results


def call_with_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    """``fn()``'s value (or its exception), run in a daemon thread; CheckFailed "no answer within N s" when it has
    not returned by then (the thread is left behind, as in :func:`run_checks`)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="aeforge-deadline", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    if "value" not in outcome:
        raise CheckFailed(f"no answer within {timeout_s:g} s")
    return outcome["value"]  # type: ignore[return-value]


def describe_error(exc: BaseException) -> str:
    """One line: an aeforge error's own message; anything else with its type, whitespace runs folded."""
    text = str(exc) if isinstance(exc, (AeforgeError, Skipped)) else f"{type(exc).__name__}: {exc}".rstrip(": ")
    return re.sub(r"\s+", " ", text).strip() or type(exc).__name__


def redact_url(url: str) -> str:
    """``url`` without the password of its user:password@ part."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = f"{parsed.username}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
    return urlunparse(parsed._replace(netloc=netloc))


# --- versions ------------------------------------------------------------------------------------------------


def _package_version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        raise CheckFailed(f"the {package} package is not installed") from None


def check_aeforge_version() -> str:
    import platform

    return f"{_package_version('aeforge')} (Python {platform.python_version()})"


def check_torch() -> str:
    version = _package_version("torch")
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"{version}; CUDA {torch.version.cuda}, {count} GPU{'s' if count != 1 else ''} ({torch.cuda.get_device_name(0)})"
    return f"{version}; no CUDA GPU on this machine"


def check_ray_version() -> str:
    return _package_version("ray")


def check_mlflow_version() -> str:
    return _package_version("mlflow")


# --- Ray -------------------------------------------------------------------------------------------------------


def ray_auth(environ: Mapping[str, str] | None = None) -> str:
    """This process's Ray auth mode and, in token mode, where its token comes from; CheckFailed when the mode asks
    for a token and there is none (Ray would refuse to connect)."""
    env = os.environ if environ is None else environ
    mode = env.get("RAY_AUTH_MODE") or "disabled"
    if mode != "token":
        return f"auth {mode}"
    if env.get("RAY_AUTH_TOKEN"):
        return "auth token (from RAY_AUTH_TOKEN)"
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if not path.is_file():
        raise CheckFailed(
            f"RAY_AUTH_MODE=token but there is no token: {path} does not exist "
            f"(set RAY_AUTH_TOKEN_PATH to the cluster's token file, or RAY_AUTH_TOKEN)"
        )
    return f"auth token (from {path})"


def _tcp_reachable(address: str, timeout_s: float) -> None:
    """CheckFailed unless something accepts a TCP connection at host:port (Ray's own client would retry a dead
    GCS for 40 s, logging a line every few seconds)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except OSError as exc:
        raise CheckFailed(f"nothing answers at {address} (RAY_ADDRESS): {exc.strerror or exc}") from None


def ray_cluster_resources(address: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[dict[str, float], int]:
    """(total resources, number of live nodes) of the Ray cluster at ``address`` (a GCS host:port or a dashboard's
    http:// address), through Ray's Jobs API and state API, without joining the cluster. CheckFailed when it does
    not answer or refuses this process's auth token."""
    from jobs.ray_train import check_ray_auth

    if re.fullmatch(r"[\w.-]+:\d+|\[[0-9a-fA-F:]+\]:\d+", address):
        _tcp_reachable(address, timeout_s)
        check_ray_auth(address)  # a RayAuthError names the setting to change
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes

    try:
        dashboard = JobSubmissionClient(address).get_address()
    except Exception as exc:  # refused, no dashboard, a version mismatch: Ray's message says which
        raise CheckFailed(f"Ray's Jobs API at {address} (RAY_ADDRESS) does not answer: {describe_error(exc)}") from None
    try:
        nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], timeout=max(1, int(timeout_s)))
    except Exception as exc:
        raise CheckFailed(f"cannot list the nodes of the Ray cluster at {dashboard}: {describe_error(exc)}") from None
    total: dict[str, float] = {}
    for node in nodes:
        for key, value in node.resources_total.items():
            if not key.startswith("node:"):
                total[key] = total.get(key, 0.0) + float(value)
    return total, len(nodes)


def check_ray(timeout_s: float) -> Callable[[], str]:
    def run() -> str:
        from jobs.ray_train import describe_resources
        from workers.settings import ray_address

        auth = ray_auth()
        address = ray_address()
        if address:
            total, nodes = ray_cluster_resources(address, timeout_s)
            return (
                f"cluster at {address} (RAY_ADDRESS): {nodes} node{'s' if nodes != 1 else ''}, "
                f"{describe_resources(total, also=('CPU', 'GPU'))}; {auth}"
            )
        import importlib.util

        missing = [
            m for m in ("ray.train", "ray.tune", "ray.dashboard", "aiohttp") if importlib.util.find_spec(m) is None
        ]
        if missing:
            raise CheckFailed(
                f"no RAY_ADDRESS, and this Ray cannot start a local cluster: {', '.join(missing)} "
                f"missing (install ray[default,train,tune])"
            )
        return (
            f"no RAY_ADDRESS: `aeforge run` starts a Ray on this machine ({os.cpu_count()} CPUs), and `aeforge "
            f"serve` a local head; {auth}"
        )

    return run


# --- the jobs' interpreter ---------------------------------------------------------------------------------------

# What a job's entry point needs: torch, and aeforge's job module. Printed on one line the check reads back.
PROBE_MARK = "AEFORGE_INTERPRETER_PROBE"


def interpreter_probe(job_module: str) -> str:
    """Python source that imports torch and ``job_module`` with the interpreter that runs it, and prints their
    versions after PROBE_MARK."""
    return (
        "import importlib, importlib.metadata as m, json, sys, torch; "
        f"importlib.import_module({job_module!r}); "
        f"print({PROBE_MARK!r}, json.dumps([sys.executable, torch.__version__, m.version('aeforge')]))"
    )


def read_probe(output: str, python: str, where: str) -> str:
    """The OK line's detail from the probe's output; CheckFailed with its last lines when it printed no result."""
    for line in output.splitlines():
        if line.startswith(PROBE_MARK + " "):
            executable, torch_version, aeforge_version = json.loads(line.split(" ", 1)[1])
            return f"{python} ({executable}) {where}: torch {torch_version}, aeforge {aeforge_version}"
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    # The line that says what went wrong (a traceback's last line, the shell's "not found"), else the last lines.
    telling = [line for line in lines if re.search(r"Error\b|[Nn]ot found|No such file|[Pp]ermission denied", line)]
    last = telling[-1] if telling else " | ".join(lines[-3:])
    raise CheckFailed(
        f"{python} {where} cannot run aeforge's jobs: {last or 'no output'} (set AEFORGE_JOB_PYTHON to the "
        f"interpreter of the environment where torch and aeforge are installed)"
    )


def check_job_python(contact_timeout_s: float, timeout_s: float) -> Callable[[], str]:
    """The interpreter the queue's jobs run with (services.settings.ServiceSettings.job_interpreter) imports torch
    and the job module: on the cluster, as a tiny Ray job of its own, when RAY_ADDRESS is set; here otherwise (the
    embedded head runs on this machine)."""

    def run() -> str:
        import shlex
        import subprocess

        from services.settings import ServiceSettings

        settings = ServiceSettings.load()
        python = settings.job_interpreter()
        probe = interpreter_probe(settings.job_module)
        source = "AEFORGE_JOB_PYTHON" if settings.job_python else "this interpreter"
        if settings.ray_address is None and python == sys.executable:
            # The embedded head's jobs run with this very interpreter: import here what a job imports.
            import importlib

            import torch

            try:
                importlib.import_module(settings.job_module)
            except Exception as exc:
                raise CheckFailed(
                    f"this interpreter ({python}) cannot import the job module: {describe_error(exc)}"
                ) from None
            return (
                f"{python} (this interpreter, which the embedded head's jobs run with): torch {torch.__version__}, "
                f"aeforge {_package_version('aeforge')}"
            )
        if settings.ray_address is None:
            try:
                done = subprocess.run(
                    [python, "-c", probe], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
                )
            except FileNotFoundError:
                raise CheckFailed(f"{python} (from {source}) does not exist") from None
            except subprocess.TimeoutExpired:
                raise CheckFailed(
                    f"{python} (from {source}) did not finish the import within {timeout_s:g} s"
                ) from None
            except OSError as exc:
                raise CheckFailed(f"{python} (from {source}) cannot be run: {exc.strerror or exc}") from None
            return read_probe(done.stdout + done.stderr, python, f"(from {source}) on this machine")
        return _probe_on_cluster(
            settings.ray_address, f"{shlex.quote(python)} -c {shlex.quote(probe)}", python, contact_timeout_s, timeout_s
        )

    return run


# How long the nodes' check may take: a Ray job, a worker process per node, and torch imported in each.
NODE_CHECK_TIMEOUT_S = 180.0
NODE_FIX = (
    "install aeforge and its dependencies (torch, ray[train,tune]) into the Python that Ray runs on that node (the "
    "`python` on the PATH of its `ray start`), or start the node from the environment that has them"
)


def node_findings(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(what each node has, what is wrong) from the node check's report (services.node_probe)."""
    seen, problems = [], []
    driver = report.get("driver") or {}
    if driver.get("error"):
        problems.append(f"the job driver's python ({driver.get('executable')}): {driver['error']}")
    for node in report.get("nodes") or []:
        where = f"{'head ' if node.get('head') else ''}node {node.get('address')} ({str(node.get('node_id'))[:8]})"
        if node.get("error"):
            problems.append(f"{where}: {node['error']}")
            continue
        text = f"{where}: aeforge {node.get('aeforge')}, torch {node.get('torch')}, Python {node.get('python')}"
        gpus = node.get("gpus") or 0
        if gpus:
            if not node.get("cuda_gpus"):
                problems.append(
                    f"{where} has {gpus:g} GPU(s) for Ray but its torch {node.get('torch')} sees no CUDA GPU; "
                    f"install a CUDA build of torch there"
                )
                continue
            text += f", CUDA {node.get('cuda')} with {node['cuda_gpus']} GPU(s)"
        seen.append(text)
    return seen, problems


def check_ray_nodes(contact_timeout_s: float, timeout_s: float) -> Callable[[], str]:
    """Every alive node of RAY_ADDRESS's cluster imports aeforge and torch (services.node_probe, run as a Ray job
    through the Jobs API, as the queue runs its jobs)."""

    def run() -> str:
        from workers.settings import ray_address

        address = ray_address()
        if not address:
            return "no RAY_ADDRESS: jobs run on this machine's Python, whose torch is checked above"
        return check_nodes_of(address, contact_timeout_s, timeout_s)

    return run


def _probe_on_cluster(address: str, entrypoint: str, python: str, contact_timeout_s: float, timeout_s: float) -> str:
    """Run ``entrypoint`` as a Ray job at ``address`` (the queue's jobs start the same way), wait for it to end,
    and read the probe from its log (it stays in Ray's job list as aeforge-doctor-<hex>). Reaching the Jobs API has
    ``contact_timeout_s`` (a cluster that does not answer fails as fast as the other checks); the job, with its
    start and imports, has ``timeout_s`` in all."""
    import secrets

    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.monotonic() + timeout_s - 1
    ended = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    submission_id = f"aeforge-doctor-{secrets.token_hex(4)}"

    def submit() -> JobSubmissionClient:
        client = JobSubmissionClient(address)
        client.submit_job(entrypoint=entrypoint, submission_id=submission_id)
        return client

    try:
        client = call_with_deadline(submit, contact_timeout_s)
    except CheckFailed as exc:
        raise CheckFailed(f"cannot submit a probe job to Ray at {address} (RAY_ADDRESS): {exc}") from None
    except Exception as exc:
        raise CheckFailed(
            f"cannot submit a probe job to Ray at {address} (RAY_ADDRESS): {describe_error(exc)}"
        ) from None
    try:
        while (status := client.get_job_status(submission_id)) not in ended:
            if time.monotonic() > deadline:
                raise CheckFailed(f"the probe job {submission_id} on Ray at {address} is still {status.value}")
            time.sleep(0.5)
        return read_probe(client.get_job_logs(submission_id), python, f"on the cluster at {address}")
    finally:
        # A probe still running (the deadline passed) is stopped. An ended one stays in Ray's job list: deleting it
        # races Ray's job monitor, which writes the record again when the probe's supervisor exits.
        with contextlib.suppress(Exception):
            if client.get_job_status(submission_id) not in ended:
                client.stop_job(submission_id)


def check_nodes_of(address: str, contact_timeout_s: float, timeout_s: float) -> str:
    import shlex
    import uuid

    from ray.job_submission import JobStatus, JobSubmissionClient

    from services import node_probe
    from services.job_log import readable_lines
    from services.settings import ServiceSettings

    python = ServiceSettings.load().job_interpreter()  # the interpreter the queue's jobs start with
    script = Path(node_probe.__file__).read_text()
    submission_id = f"aeforge-doctor-{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + timeout_s

    def submit() -> JobSubmissionClient:
        client = JobSubmissionClient(address)
        client.submit_job(entrypoint=f"{shlex.quote(python)} -c {shlex.quote(script)}", submission_id=submission_id)
        return client

    try:  # a cluster that does not answer fails as fast as the other checks; the job itself has timeout_s
        client = call_with_deadline(submit, contact_timeout_s)
    except Exception as exc:
        raise CheckFailed(
            f"cannot submit the node check to Ray at {address} (RAY_ADDRESS): {describe_error(exc)}"
        ) from None
    try:
        while (status := client.get_job_status(submission_id)) not in (
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.STOPPED,
        ):
            if time.monotonic() > deadline:
                raise CheckFailed(f"the node check (Ray job {submission_id}) did not finish within {timeout_s:g} s")
            time.sleep(0.5)
        logs = client.get_job_logs(submission_id)
    finally:
        if client.get_job_status(submission_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            client.stop_job(submission_id)
    report = None
    for line in reversed(logs.splitlines()):
        if line.startswith(node_probe.MARK):
            report = json.loads(line[len(node_probe.MARK) :])
            break
    if report is None:
        lines = [line for line in readable_lines(logs) if line.strip()]
        last = lines[-1] if lines else f"Ray job {submission_id} {status}"
        raise CheckFailed(
            f"the job driver's python on the cluster cannot run the node check: {last}. To fix: {NODE_FIX}"
        )
    seen, problems = node_findings(report)
    if problems:
        raise CheckFailed("; ".join(problems) + f". To fix: {NODE_FIX}")
    return "; ".join(seen)


# --- storage, MLflow, the job store, the API ---------------------------------------------------------------------


def check_storage() -> str:
    from workers.storage import Storage

    storage = Storage.from_settings()
    storage.preflight()  # no waiting: a doctor reports the outage at once
    endpoint = f" at S3 endpoint {storage.s3.endpoint_name}" if storage.bucket else ""
    return f"{storage.uri()}{endpoint}: reachable and writable"


def check_mlflow(timeout_s: float) -> Callable[[], str]:
    def run() -> str:
        from workers.settings import mlflow_tracking_uri

        uri = mlflow_tracking_uri()
        shown = redact_url(uri)
        parsed = urlparse(uri)
        if parsed.scheme.startswith("sqlite"):
            path = Path(uri.split(":///", 1)[-1])
            if not path.is_file():
                if not _creatable(path.parent):
                    raise CheckFailed(f"{shown}: the folder {path.parent} cannot be created or written")
                return f"{shown}: no store yet (the first run creates it)"
        import mlflow

        try:
            experiments = mlflow.MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:
            raise CheckFailed(f"{shown}: {describe_error(exc)}") from None
        return f"{shown}: answers ({'has experiments' if experiments else 'no experiments yet'})"

    return run


def _creatable(folder: Path) -> bool:
    """Whether ``folder`` exists and is writable, or could be made (its nearest existing parent is writable)."""
    folder = folder.resolve()
    while not folder.exists():
        if folder.parent == folder:
            return False
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK)


def check_store(timeout_s: float) -> Callable[[], str]:
    def run() -> str:
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url

        from services.settings import ServiceSettings
        from services.store import SchemaTooNew, current_revision, migration_history

        url = ServiceSettings.load().db_url
        try:
            parsed = make_url(url)
        except Exception as exc:
            raise CheckFailed(f"AEFORGE_DB_URL is not a database URL: {describe_error(exc)}") from None
        shown = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() == "sqlite":
            path = Path(parsed.database or "")
            if not parsed.database or parsed.database == ":memory:":
                raise CheckFailed(f"{shown}: give the job store a file (an in-memory database is not shared)")
            if not path.is_file():
                if not _creatable(path.parent):
                    raise CheckFailed(f"{shown}: the folder {path.parent} cannot be created or written")
                return f"{shown}: no store yet (the first `aeforge serve` creates it)"
            connect_args = {"timeout": timeout_s}
        elif parsed.get_backend_name() == "postgresql":
            if parsed.get_driver_name() != "psycopg":
                raise CheckFailed(f"{shown}: use the psycopg 3 driver, postgresql+psycopg://user@host:port/db")
            connect_args = {"connect_timeout": max(1, int(timeout_s))}
        else:
            raise CheckFailed(f"{shown}: unsupported database; use sqlite:/// or postgresql+psycopg://")
        engine = create_engine(url, connect_args=connect_args)
        try:
            with engine.connect() as conn:
                version = current_revision(conn)
        except SchemaTooNew as exc:
            raise CheckFailed(
                f"{shown}: schema version {exc.current} is newer than this aeforge reads ({exc.head}); upgrade aeforge"
            ) from None
        except Exception as exc:
            raise CheckFailed(f"{shown}: {describe_error(exc)}") from None
        finally:
            engine.dispose()
        if version is None:
            return f"{shown}: answers; no aeforge tables yet (the first `aeforge serve` creates them)"
        head = migration_history()[-1].id
        note = (
            ""
            if version == head
            else f" (the next `aeforge serve` or `aeforge admin db upgrade` migrates it to {head})"
        )
        return f"{shown}: answers, schema version {version}{note}"

    return run


def check_policy() -> str:
    """The queue policy AEFORGE_POLICY_FILE names, as the service reads it; a file that does not validate fails the
    check with each field's path (a running service keeps the last good policy it read, and says so in its log)."""
    from services.policy import Policy, PolicyError, describe_policy, load_policy_file
    from services.settings import ServiceSettings

    path = ServiceSettings.load().policy_file
    if path is None:
        return describe_policy(Policy())
    try:
        return describe_policy(load_policy_file(path))
    except PolicyError as exc:
        raise CheckFailed(f"{exc}\na running service keeps the last good policy it read") from None


def check_api(timeout_s: float) -> Callable[[], str]:
    def run() -> str:
        from services.client import AeforgeClient, ApiError
        from services.settings import ServiceSettings

        settings = ServiceSettings.load()
        source = getattr(settings, "api_url_source", "AEFORGE_API_URL")
        configured = not source.startswith("the default")
        client = AeforgeClient(settings.api_url, settings.client_token(), timeout=timeout_s)
        try:
            try:
                health = client.health()
            except ApiError as exc:
                if not configured and exc.status is None:
                    raise Skipped(
                        f"no service configured (no AEFORGE_API_URL, no running `aeforge serve` recorded) "
                        f"and none at {settings.api_url}: needed only for submit/jobs/status"
                    ) from None
                raise CheckFailed(f"{settings.api_url} (from {source}): {describe_error(exc)}") from None
            detail = (
                f"{settings.api_url}: {health.get('status', '?')}, database {health.get('database', '?')} "
                f"schema {health.get('schema_version', '?')}"
            )
            if not settings.client_token():
                return f"{detail}; no token (set AEFORGE_API_TOKEN to submit)"
            try:
                who = client.whoami()
            except ApiError as exc:
                raise CheckFailed(
                    f"{settings.api_url}: the service answers but refuses this token: {describe_error(exc)}"
                ) from None
            return f"{detail}; token of {who.get('owner')} ({who.get('role')})"
        finally:
            client.close()

    return run


def all_checks(timeout_s: float) -> list[Check]:
    return [
        Check("aeforge", check_aeforge_version, timeout_s),
        Check("torch", check_torch, max(timeout_s, IMPORT_TIMEOUT_S)),
        Check("ray package", check_ray_version, timeout_s),
        Check("mlflow package", check_mlflow_version, timeout_s),
        Check("Ray cluster", check_ray(timeout_s), timeout_s),
        # Starting an interpreter that imports torch takes seconds; on a cluster, a Ray job's start as well.
        Check(
            "job interpreter",
            check_job_python(timeout_s, max(timeout_s, IMPORT_TIMEOUT_S)),
            max(timeout_s, IMPORT_TIMEOUT_S),
        ),
        Check("Ray nodes", check_ray_nodes(timeout_s, NODE_CHECK_TIMEOUT_S), NODE_CHECK_TIMEOUT_S),
        Check("storage", check_storage, timeout_s),
        Check("MLflow tracking", check_mlflow(timeout_s), timeout_s),
        Check("job store", check_store(timeout_s), timeout_s),
        Check("queue policy", check_policy, timeout_s),
        Check("API", check_api(timeout_s), timeout_s),
    ]


def _preload() -> None:
    """Import the libraries the checks use before their clocks start: an import takes seconds on a busy machine,
    and it is not what a check's deadline is about."""
    import mlflow  # noqa: F401
    import ray.job_submission
    import ray.util.state  # noqa: F401
    import sqlalchemy  # noqa: F401

    import services.client
    import services.store  # noqa: F401
    import workers.storage  # noqa: F401


@handle_errors
def doctor(
    timeout: float = typer.Option(
        DEFAULT_TIMEOUT_S, "--timeout", min=0.1, help="seconds each check may take before it fails as not answering"
    ),
    output: OutputFormat = output_option(),
) -> None:
    """Check Ray, storage, MLflow, the queue's store and API, and the versions of torch, Ray and MLflow: one line
    each, OK or FAIL with the reason; exit code 1 if any check fails."""
    _preload()
    with _mlflow_http_limits(timeout):
        results = run_checks(all_checks(timeout))
    failed = [r for r in results if r.status == FAIL]
    if output is OutputFormat.json:
        print_json({"ok": not failed, "checks": [r.to_dict() for r in results]})
    else:
        table = new_table(box=None, show_header=False, pad_edge=False)
        text_column(table, "status")
        text_column(table, "check")
        number_column(table, "time")
        text_column(table, "detail")
        for r in results:
            table.add_row(
                Text(r.status, style=STATUS_STYLES[r.status]), Text(r.name), f"{r.seconds:.2f} s", Text(r.detail)
            )
        console = make_console()
        console.print(table)
        console.print(
            f"{len(failed)} of {len(results)} checks failed: " + ", ".join(r.name for r in failed)
            if failed
            else f"all {len(results)} checks passed",
            highlight=False,
            soft_wrap=True,
        )
    if failed:
        raise typer.Exit(1)


@contextmanager
def _mlflow_http_limits(timeout_s: float) -> Iterator[None]:
    """One try with a short timeout for MLflow's REST calls while the checks run (its defaults retry a dead server
    for minutes); the variables are as they were afterwards."""
    limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s)))}
    saved = {name: os.environ.get(name) for name in limits}
    os.environ.update(limits)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def register(app: typer.Typer) -> None:
    """Mount `aeforge doctor` on the main CLI."""
    app.command("doctor")(doctor)
