"""Benchmarks of the queue service (not tests), on SQLite and on PostgreSQL:

- ``throughput``: submissions per second through the HTTP API with 1, 8, 16 clients (each its own connection), against
  the service as it runs (``python -m services.api --no-dispatch --workers N``: its logging, its access log, N API
  processes on one port) for each ``--workers``; with the service's CPU per submission and how busy the machine's
  cores were (a rate limited by the cores shows them near 100%);
- ``listing``: ``GET /jobs`` (what `aeforge jobs` asks) p50/p99 with 1,000,000 finished jobs in the table (first
  page, a user's page, by state, a deep page by cursor and by offset), and the database size per 100,000 jobs
  (each with its four events);
- ``admission``: the dispatcher's time to choose the next job among 10,000 queued ones;
- ``soak``: a day of a 50-user team compressed into ``--minutes`` (submits, status polls, log follows, cancels,
  retries, listings) against one service, Ray simulated (:class:`SimulatedRay`); reports the service process's RSS,
  open files and database connections at start and end, the answers by status (no 5xx), and p99 per endpoint.

    python -m benchmarks.bench_queue [throughput listing admission soak] [--backends sqlite,postgresql] [...]

The service runs in its own process (``python -m benchmarks.bench_queue serve``: uvicorn, the real spec validator,
the dispatcher with a simulated Ray), so the clients in this process do not share its interpreter. For PostgreSQL
a temporary database (aeforge_bench_<random>) is made at --pg-admin-url and dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert, text

from services.job_states import ACTIVE_STATES
from services.store import Decision, Store, jobs_table, new_job_id, queue_kind_of, utcnow

SPEC = """\
name: bench
model: {variant: beta_vae, architecture: conv64, latent_dim: 10, beta: 4.0}
data: {source: 'builtin:dsprites'}
train: {steps: 1000, batch_size: 64}
resources: {workers: 2, cpus_per_worker: 2}
"""
TOKEN = "bench-token-0123456789"
USERS = 50


def user_token(i: int) -> str:
    return f"user{i:02d}-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_database(admin_url: str):
    import psycopg

    name = f"aeforge_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    try:
        yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database(backend: str, pg_admin_url: str):
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="aeforge-bench-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.db'}"
    else:
        with postgres_database(pg_admin_url) as url:
            yield url


def fill_queue(store: Store, count: int, active: int) -> None:
    """``count`` queued jobs with spread priorities and ``active`` running ones, inserted in bulk."""
    now = utcnow()
    rows = []
    for i in range(count + active):
        job_id = new_job_id(f"bench-{i}") + f"-{i}"
        rows.append(
            {
                "id": job_id,
                "name": f"bench-{i % 50}",
                "owner": f"user{i % 20}",
                "kind": "train",
                "spec_text": SPEC,
                "spec_json": json.dumps({"name": "bench"}),
                "priority": i % 10,
                "resources": {"CPU": 4.0, "GPU": 0.0},
                "queue_kind": queue_kind_of(job_id, "train", None, {"CPU": 4.0, "GPU": 0.0}),
                "state": "running" if i < active else "queued",
                "attempts": 1 if i < active else 0,
                "max_attempts": 3,
                "created_at": now,
                "updated_at": now,
            }
        )
    with store.engine.begin() as conn:
        for start in range(0, len(rows), 2000):
            conn.execute(insert(jobs_table), rows[start : start + 2000])
    # Planner statistics, as a live database has them (a bulk load leaves none until autovacuum comes by).
    with store.engine.connect() as conn:
        conn.execute(text("ANALYZE"))
        conn.commit()


def bench_admission(store: Store, repeats: int) -> dict[str, float]:
    """Milliseconds per admission transaction: when the head is started, and when it has to wait."""

    def timed(decide) -> list[float]:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            store.admit(decide)
            times.append((time.perf_counter() - start) * 1000)
        return times

    wait = timed(lambda job, holdings: Decision.wait("the cluster is full"))
    start = timed(lambda job, holdings: Decision.start("fits"))
    return {
        "wait_median_ms": statistics.median(wait),
        "wait_p95_ms": sorted(wait)[int(0.95 * (len(wait) - 1))],
        "start_median_ms": statistics.median(start),
        "start_p95_ms": sorted(start)[int(0.95 * (len(start) - 1))],
    }


# --- the service under test, in its own process ----------------------------------------------------------------


class SimulatedRay:
    """Ray's Jobs API and cluster for the soak: a job runs for a drawn number of (compressed) seconds, then succeeds,
    or fails (a tenth of attempts: retries); logs grow a line a second; ``stop`` ends it. Thread-safe."""

    def __init__(self, cpus: float = 64.0, gpus: float = 8.0, mean_run_s: float = 5.0, seed: int = 0):
        self.resources = {"CPU": cpus, "GPU": gpus}
        self.mean_run_s = mean_run_s
        self.random = random.Random(seed)
        self.jobs: dict[str, dict] = {}
        self.lock = threading.Lock()

    def total_resources(self) -> dict[str, float]:
        return dict(self.resources)

    def submit(self, submission_id, entrypoint, env_vars, spec_json):
        from services.dispatcher import SubmissionExists

        with self.lock:
            if submission_id in self.jobs:
                raise SubmissionExists(submission_id)
            run_s = self.random.expovariate(1 / self.mean_run_s)
            self.jobs[submission_id] = {
                "start": time.monotonic(),
                "end": time.monotonic() + run_s,
                "fails": self.random.random() < 0.1,
                "stopped": False,
            }

    def _status(self, job) -> str:
        if job["stopped"]:
            return "STOPPED"
        if time.monotonic() < job["end"]:
            return "RUNNING"
        return "FAILED" if job["fails"] else "SUCCEEDED"

    def info(self, submission_id):
        from services.dispatcher import RayJobInfo

        with self.lock:
            job = self.jobs.get(submission_id)
            if job is None:
                return None
            status = self._status(job)
        return RayJobInfo(status, "simulated worker failure" if status == "FAILED" else None)

    def stop(self, submission_id):
        with self.lock:
            if submission_id in self.jobs:
                self.jobs[submission_id]["stopped"] = True

    def logs(self, submission_id):
        with self.lock:
            job = self.jobs.get(submission_id)
            if job is None:
                return ""
            lines = int(min(time.monotonic(), job["end"]) - job["start"]) + 1
            done = self._status(job) == "SUCCEEDED"
        text = "".join(f"step {i}: loss {1.0 / (i + 1):.4f}\n" for i in range(lines))
        return text + ('AEFORGE_RESULT {"metrics": {"loss": 0.1}}\n' if done else "")

    async def tail(self, submission_id):
        import asyncio

        sent = 0
        while True:
            text = self.logs(submission_id)
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
            info = self.info(submission_id)
            if info is None or info.status in ("STOPPED", "SUCCEEDED", "FAILED"):
                return
            await asyncio.sleep(0.5)


def serve(db_url: str, port: int, home: Path, dispatch: bool) -> None:
    """The API (and with ``dispatch`` the dispatcher over a SimulatedRay) on 127.0.0.1:``port`` until SIGTERM."""
    import logging

    import uvicorn

    from services.api import create_app
    from services.dispatcher import Dispatcher
    from services.settings import Principal, ServiceSettings

    logging.basicConfig(level=logging.WARNING)
    tokens = (
        Principal("bench", "admin", TOKEN),
        *(Principal(f"user{i:02d}", "user", user_token(i)) for i in range(USERS)),
    )
    settings = ServiceSettings(
        home=home, db_url=db_url, tokens=tokens, dispatch_interval_s=0.5, retry_backoff_s=1.0, max_attempts=2
    )
    store = Store(db_url)
    ray = SimulatedRay()
    dispatcher = Dispatcher(store, ray, ray, retry_backoff_s=1.0) if dispatch else None
    app = create_app(store, settings, launcher=ray, dispatcher=dispatcher)
    # Keep-alive longer than uvicorn's 5 s default, as a proxy in front of the service would hold connections.
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, timeout_keep_alive=75)


@contextmanager
def service(db_url: str, dispatch: bool = False) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="aeforge-bench-home-") as home:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_queue", "serve", "--db-url", db_url, "--port", str(port)]
            + ["--home", home]
            + (["--dispatch"] if dispatch else []),
        )
        with serving(proc, f"http://127.0.0.1:{port}", stop_s=30) as url:
            yield url, proc


@contextmanager
def serving(proc: subprocess.Popen, url: str, stop_s: float) -> Iterator[str]:
    """``url`` once the service ``proc`` answers and its start-up work is done; SIGTERM after, SIGKILL past
    ``stop_s``."""
    try:
        wait_until_answers(url, proc)
        wait_until_idle(proc.pid)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(stop_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_until_answers(url: str, proc: subprocess.Popen, most_s: float = 120.0) -> None:
    deadline = time.monotonic() + most_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service did not answer /healthz in {most_s:g} s")
        time.sleep(0.2)


def wait_until_idle(pid: int, most_s: float = 120.0, window_s: float = 1.0, busy_share: float = 0.1) -> None:
    """Until the service process uses under ``busy_share`` of a core over ``window_s`` (a tenth over a second by
    default): it answers /healthz before its start-up work is done (services.door's warm-up imports torch in a
    thread, seconds of CPU), and timings taken meanwhile are of that, not of the requests."""
    deadline = time.monotonic() + most_s
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(window_s)
        if cpu_seconds(pid) - before < busy_share * window_s:
            return


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- throughput ------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children so far (Linux /proc): the service's supervisor and its
    worker processes together."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:  # exited meanwhile
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        total += sum(cpu_seconds(int(child)) for child in children)
    return total


def busy_cores() -> tuple[float, float]:
    """(busy, all) CPU time of the whole machine so far, in seconds (/proc/stat's first line)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle and iowait
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / ticks, sum(values) / ticks


def bench_submissions(url: str, total: int, clients: int, pid: int | None = None) -> dict[str, float]:
    """Submissions per second: ``clients`` threads, each with its own keep-alive connection, ``total`` POSTs in all;
    the p99 of one submission; the service's CPU time per submission (what the rate would be on free cores: a shared
    machine's load changes the rate, hardly the CPU time); the share of the machine's cores busy meanwhile, and this
    client's own CPU per submission. The client is http.client (0.4-0.6 ms of CPU a request, where httpx took 2):
    on a 2-core machine the client's cost comes out of the service's cores."""
    import http.client
    from urllib.parse import urlparse

    address = urlparse(url)
    body = json.dumps({"spec": SPEC, "priority": 1}).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    per_client = max(1, total // clients)
    latencies: list[float] = []

    def run(_):
        mine = []
        connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=60)
        try:
            for _ in range(per_client):
                start = time.perf_counter()
                connection.request("POST", "/jobs", body=body, headers=headers)
                response = connection.getresponse()
                answer = response.read()
                mine.append(time.perf_counter() - start)
                if response.status != 201:
                    raise RuntimeError(f"submission failed: {response.status} {answer[:500]!r}")
        finally:
            connection.close()
        latencies.extend(mine)

    cpu_before = cpu_seconds(pid) if pid else 0.0
    busy_before, all_before = busy_cores()
    own_before = time.process_time()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    elapsed = time.perf_counter() - start
    busy_after, all_after = busy_cores()
    done = per_client * clients
    cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / done if pid else float("nan")
    return {
        "rate": done / elapsed,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "cpu_ms": cpu_ms,
        "client_cpu_ms": (time.process_time() - own_before) * 1000 / done,
        "busy": (busy_after - busy_before) / max(1e-9, all_after - all_before),
    }


@contextmanager
def aeforge_service(db_url: str, workers: int) -> Iterator[tuple[str, subprocess.Popen]]:
    """The service as `aeforge serve --no-dispatch --workers N` runs it (python -m services.api), its log in a file;
    Ray is not needed to take submissions (RAY_ADDRESS names a port nothing listens on)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="aeforge-bench-home-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AEFORGE_", "PROMETHEUS_"))} | {
            "AEFORGE_HOME": home,
            "AEFORGE_DB_URL": db_url,
            "AEFORGE_TOKENS": json.dumps([{"token": TOKEN, "owner": "bench", "role": "admin"}]),
            "RAY_ADDRESS": "http://127.0.0.1:9",
        }
        with open(Path(home) / "service.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.api", "--port", str(port), "--no-dispatch"]
                + ["--workers", str(workers)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with serving(proc, f"http://127.0.0.1:{port}", stop_s=60) as url:
            yield url, proc


def settle(url: str, pid: int, timeout_s: float = 120.0) -> None:
    """Wait out the service's start before its CPU time is counted: the door's warm-up (torch's import, the first
    memory estimate) runs in a thread after /healthz answers, and the first submissions compile what later ones
    reuse. A few submissions (from 8 clients: every worker process gets some), then until the service is idle (under
    5% of a core over half a second)."""
    bench_submissions(url, 200, 8)
    wait_until_idle(pid, timeout_s, window_s=0.5, busy_share=0.05)


# --- listing at a million rows ---------------------------------------------------------------------------------


def fill_finished(store: Store, count: int) -> None:
    """``count`` finished jobs (8 in 10 succeeded), each with its 4 events, made by the database itself."""
    from jobs.spec import parse_spec

    spec_json = json.dumps(parse_spec(SPEC, "<bench>").model_dump(mode="json"), sort_keys=True)
    states = "CASE i % 10 WHEN 0 THEN 'failed' WHEN 1 THEN 'cancelled' ELSE 'succeeded' END"
    if store.dialect == "sqlite":
        series = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count) "
        at = "datetime('2026-01-01', '+' || i || ' seconds')"
        owner = "'user' || printf('%02d', i % 50)"
        source = "FROM n"
        resources = '\'{"CPU": 4.0, "GPU": 0.0}\''
    else:
        series = ""
        at = "timestamp '2026-01-01' + i * interval '1 second'"
        owner = "'user' || lpad((i % 50)::text, 2, '0')"
        source = "FROM generate_series(1, :count) AS n(i)"
        resources = '\'{"CPU": 4.0, "GPU": 0.0}\'::json'
    jobs_sql = (
        "INSERT INTO aeforge_jobs (id, name, owner, kind, spec_text, spec_json, priority, resources, state, attempts, "
        "max_attempts, ray_submission_id, mlflow_run_id, created_at, updated_at, started_at, finished_at) "
        f"{series}SELECT 'bench-' || i, 'bench-' || (i % 50), {owner}, 'train', :spec, :spec_json, 0, {resources}, "
        f"{states}, 1, 3, 'bench-' || i, 'run' || i, {at}, {at}, {at}, {at} {source}"
    )
    events_sql = (
        "INSERT INTO aeforge_job_events (job_id, at, from_state, to_state, attempt, reason) "
        "SELECT j.id, j.finished_at, s.from_state, s.to_state, 1, s.reason FROM aeforge_jobs j CROSS JOIN ("
        "SELECT NULL AS from_state, 'queued' AS to_state, 'submitted by someone with priority 0' AS reason "
        "UNION ALL SELECT 'queued', 'starting', 'admitted: asks for CPU 4, GPU 0; free: CPU 60, GPU 8' "
        "UNION ALL SELECT 'starting', 'running', 'Ray job is running' "
        "UNION ALL SELECT 'running', 'succeeded', 'Ray job succeeded') s"
    )
    with store.engine.begin() as conn:
        conn.execute(text(jobs_sql), {"count": count, "spec": SPEC, "spec_json": spec_json})
        conn.execute(text(events_sql))
    # What autovacuum leaves of a table that grew to a million jobs: planner statistics, and on PostgreSQL the
    # visibility map (a job that finished is not written again), without which a bounded count or a covering index
    # reads every row's heap page: a bulk load leaves neither until autovacuum comes by (the bench's server may run
    # without it).
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE)" if store.dialect == "postgresql" else "ANALYZE"))


def database_bytes(store: Store) -> int:
    with store.engine.connect() as conn:
        if store.dialect == "sqlite":
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
            pages = conn.execute(text("PRAGMA page_count")).scalar_one()
            return int(pages) * int(conn.execute(text("PRAGMA page_size")).scalar_one())
        return int(
            conn.execute(
                text(
                    "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c WHERE c.relkind = 'r' "
                    "AND c.relname IN ('aeforge_jobs', 'aeforge_job_events')"
                )
            ).scalar_one()
        )


def bench_listing(url: str, requests: int, pid: int | None = None) -> list[tuple[str, float, float, float]]:
    """(what, p50 ms, p99 ms, service CPU ms per request) of listing pages as `aeforge jobs` asks for them."""
    out = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
        first = http.get("/jobs", params={"limit": 50}).json()
        deep_cursor = "1001"  # the page after the 1,000 oldest jobs: as deep as a cursor walk gets
        cases: list[tuple[str, str, dict[str, Any]]] = [
            ("first page (admin, all jobs)", "/jobs", {"limit": 50}),
            ("a user's first page", "/jobs", {"limit": 50, "owner": "user07"}),
            ("state=failed, first page", "/jobs", {"limit": 50, "state": "failed"}),
            # user07 has no failed job (the fill fails every tenth, user07's are the 7th of 50): all of theirs are read
            # unless the owner's jobs in a state are an index range.
            ("a user's failed jobs, first page", "/jobs", {"limit": 50, "owner": "user07", "state": "failed"}),
            (
                "active jobs (queued, starting, running; none)",
                "/jobs",
                {"limit": 50, "state": ["queued", *ACTIVE_STATES]},
            ),
            ("second page by cursor", "/jobs", {"limit": 50, "cursor": first["next_cursor"]}),
            ("deepest page by cursor", "/jobs", {"limit": 50, "cursor": deep_cursor}),
            ("a user's page by cursor, deep", "/jobs", {"limit": 50, "owner": "user07", "cursor": deep_cursor}),
            ("page at offset 500,000 (for comparison)", "/jobs", {"limit": 50, "offset": 500_000}),
        ]
        with http.stream("GET", "/jobs", params={"limit": 1}) as warm:
            warm.read()
        for label, path, params in cases:
            times = []
            cpu_before = cpu_seconds(pid) if pid else 0.0
            for _ in range(requests if "offset" not in params else max(5, requests // 20)):
                start = time.perf_counter()
                response = http.get(path, params=params)
                times.append((time.perf_counter() - start) * 1000)
                if response.status_code != 200:
                    raise RuntimeError(f"{label}: {response.status_code} {response.text}")
            cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / len(times) if pid else float("nan")
            out.append((label, statistics.median(times), percentile(times, 0.99), cpu_ms))
    return out


# --- soak ------------------------------------------------------------------------------------------------------


def process_resources(pid: int, store_url: str) -> dict[str, float]:
    """RSS (MiB) and open files of the service process, and the database connections it holds."""
    rss_kib = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    open_files = len(os.listdir(f"/proc/{pid}/fd"))
    connections = float("nan")
    if store_url.startswith("postgresql"):
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url

        engine = create_engine(store_url)
        with engine.connect() as conn:
            connections = conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"),
                {"db": make_url(store_url).database},
            ).scalar_one()
        engine.dispose()
    return {"rss_mib": rss_kib / 1024, "open_files": open_files, "db_connections": connections}


def soak(url: str, pid: int, store_url: str, minutes: float, users: int = USERS, seed: int = 1) -> dict:
    """A simulated day of ``users`` researchers in ``minutes``: each submits ~12 jobs, polls their status, follows
    2 logs, cancels 2 (one just submitted, one earlier: about half of each), retries the failed ones and lists their
    jobs ~20 times; operations run at their (compressed)
    times from a pool of 16 client threads. Returns latencies per endpoint, answers by status, resources."""
    rng = random.Random(seed)
    span = minutes * 60
    plan: list[tuple[float, int, str]] = []
    for user in range(users):
        plan += [(rng.uniform(0, span * 0.9), user, "submit") for _ in range(12)]
        plan += [(rng.uniform(0, span), user, "list") for _ in range(20)]
        plan += [(rng.uniform(0, span), user, "status") for _ in range(40)]
        plan += [(rng.uniform(0.1 * span, span), user, "follow") for _ in range(2)]
        plan += [(rng.uniform(0.1 * span, span), user, "cancel") for _ in range(2)]
        plan += [(rng.uniform(0.2 * span, span), user, "retry") for _ in range(2)]
    plan.sort()
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    jobs_of: dict[int, list[str]] = defaultdict(list)
    lock = threading.Lock()
    local = threading.local()
    start = time.monotonic()
    samples = [process_resources(pid, store_url)]

    every_client: list[httpx.Client] = []

    def client(user: int) -> httpx.Client:
        if not hasattr(local, "clients"):
            local.clients = {}
        if user not in local.clients:
            local.clients[user] = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {user_token(user)}"}, timeout=120
            )
            with lock:
                every_client.append(local.clients[user])
        return local.clients[user]

    def note(endpoint: str, status: int, seconds: float) -> None:
        with lock:
            latencies[endpoint].append(seconds * 1000)
            statuses[endpoint][status] += 1

    transport_errors: dict[str, int] = defaultdict(int)

    def one(op: tuple[float, int, str]) -> None:
        at, user, what = op
        delay = start + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for _attempt in (1, 2):
            try:
                return operation(user, what)
            except httpx.TransportError as exc:
                # Not an answer: counted apart from the status codes (a keep-alive connection closed by the server
                # as the client reused it is retried once, as clients do).
                with lock:
                    transport_errors[f"{what}: {type(exc).__name__}"] += 1
                local.clients.pop(user, None)

    def operation(user: int, what: str) -> None:
        http = client(user)
        with lock:
            mine = list(jobs_of[user])
        began = time.perf_counter()
        if what == "submit":
            spec = SPEC.replace("name: bench", f"name: soak-{user}").replace("cpus_per_worker: 2", "cpus_per_worker: 1")
            response = http.post("/jobs", json={"spec": spec})
            note("POST /jobs", response.status_code, time.perf_counter() - began)
            if response.status_code == 201:
                with lock:
                    jobs_of[user].append(response.json()["id"])
        elif what == "list":
            response = http.get("/jobs", params={"limit": 20})
            note("GET /jobs", response.status_code, time.perf_counter() - began)
        elif not mine:
            return
        elif what == "status":
            response = http.get(f"/jobs/{rng.choice(mine)}")
            note("GET /jobs/{id}", response.status_code, time.perf_counter() - began)
        elif what == "follow":
            with http.stream("GET", f"/jobs/{mine[-1]}/logs", params={"follow": "true"}) as response:
                note("GET /jobs/{id}/logs?follow (to first byte)", response.status_code, time.perf_counter() - began)
                for _ in response.iter_bytes():
                    pass
        elif what == "cancel":
            # Half the cancels are of a job just submitted (a user who saw the mistake: queued or starting, so a
            # cancel that takes effect), half of an earlier one (often finished by now: a 409 that says so).
            if rng.random() < 0.5:
                spec = SPEC.replace("name: bench", f"name: oops-{user}")
                submitted = http.post("/jobs", json={"spec": spec})
                note("POST /jobs", submitted.status_code, time.perf_counter() - began)
                if submitted.status_code != 201:
                    return
                target = submitted.json()["id"]
                with lock:
                    jobs_of[user].append(target)
                began = time.perf_counter()
            else:
                target = rng.choice(mine)
            response = http.post(f"/jobs/{target}/cancel")
            note("POST /jobs/{id}/cancel", response.status_code, time.perf_counter() - began)
        elif what == "retry":
            failed = [j for j in mine[-5:] if http.get(f"/jobs/{j}").json().get("state") in ("failed", "cancelled")]
            if failed:
                began = time.perf_counter()
                response = http.post(f"/jobs/{failed[0]}/retry")
                note("POST /jobs/{id}/retry", response.status_code, time.perf_counter() - began)

    stop = threading.Event()

    def sampler():
        while not stop.wait(15):
            samples.append(process_resources(pid, store_url))

    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, plan))
    stop.set()
    # The clients hang up (their keep-alive connections are open files of the service) and the service's pool
    # settles: what is left open at the end is what the service holds on its own.
    for http in every_client:
        http.close()
    time.sleep(3)
    samples.append(process_resources(pid, store_url))
    return {
        "operations": len(plan),
        "seconds": time.monotonic() - start,
        "latencies": {k: (statistics.median(v), percentile(v, 0.99), len(v)) for k, v in latencies.items()},
        "statuses": {k: dict(v) for k, v in statuses.items()},
        "transport_errors": dict(transport_errors),
        "start": samples[0],
        "warm": samples[min(4, len(samples) - 1)],  # a minute in: imports and caches done
        "end": samples[-1],
        "peak_rss_mib": max(s["rss_mib"] for s in samples),
    }


# --- the command ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        parser = argparse.ArgumentParser(prog="bench_queue serve")
        parser.add_argument("--db-url", required=True)
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--home", type=Path, required=True)
        parser.add_argument("--dispatch", action="store_true")
        args = parser.parse_args(argv[1:])
        serve(args.db_url, args.port, args.home, args.dispatch)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "parts", nargs="*", default=["throughput", "admission"], help="throughput listing admission soak"
    )
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--submissions", type=int, default=2000, help="POSTs per throughput measurement")
    parser.add_argument("--clients", default="1,8,16", help="concurrent clients, comma-separated")
    parser.add_argument("--workers", default="1,2", help="the service's API processes (throughput), comma-separated")
    parser.add_argument("--rows", type=int, default=1_000_000, help="finished jobs for the listing benchmark")
    parser.add_argument("--requests", type=int, default=200, help="requests per listing case")
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--active", type=int, default=50, help="running jobs whose holdings admission adds up")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=60.0, help="the soak's length (a day compressed)")
    parser.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)

    class Results(list):
        """Printed as each comes (a long run interrupted keeps what it measured), and as a table at the end."""

        def append(self, row):
            super().append(row)
            print(" | ".join(row), flush=True)

    results: list[tuple[str, str, str]] = Results()
    load_before = os.getloadavg()[0]
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        try:
            context = database(backend, args.pg_admin_url)
            url = context.__enter__()
        except Exception as exc:
            print(f"{backend}: skipped ({exc})", file=sys.stderr)
            continue
        try:
            Store(url).close()  # the schema, before the service and the fills
            if "throughput" in args.parts:
                for workers in [int(w) for w in args.workers.split(",")]:
                    with aeforge_service(url, workers) as (api_url, proc):
                        settle(api_url, proc.pid)
                        for clients in [int(c) for c in args.clients.split(",")]:
                            got = bench_submissions(api_url, args.submissions, clients, proc.pid)
                            results.append(
                                (
                                    backend,
                                    f"submissions/s, {workers} API process(es), {clients} client(s) (p99 ms; "
                                    "service CPU ms each; client CPU ms each; machine's cores busy)",
                                    f"{got['rate']:,.0f} ({got['p99_ms']:.0f}; {got['cpu_ms']:.2f}; "
                                    f"{got['client_cpu_ms']:.2f}; {got['busy']:.0%})",
                                )
                            )
            if "soak" in args.parts:
                store = Store(url)
                with store.engine.begin() as conn:
                    conn.execute(text("DELETE FROM aeforge_job_events"))
                    conn.execute(jobs_table.delete())
                store.close()
                with service(url, dispatch=True) as (api_url, proc):
                    report = soak(api_url, proc.pid, url, args.minutes)
                print_soak(backend, args.minutes, report)
            if "listing" in args.parts:
                store = Store(url)
                with store.engine.begin() as conn:
                    conn.execute(text("DELETE FROM aeforge_job_events"))
                    conn.execute(jobs_table.delete())
                began = time.perf_counter()
                fill_finished(store, args.rows)
                size = database_bytes(store)
                results.append(
                    (
                        backend,
                        f"{args.rows:,} finished jobs (+4 events each) made in {time.perf_counter() - began:.0f} s; "
                        "MB per 100,000 jobs",
                        f"{size / 1e6 / (args.rows / 100_000):.1f}",
                    )
                )
                store.close()
                with service(url) as (api_url, proc):
                    for label, p50, p99, cpu_ms in bench_listing(api_url, args.requests, proc.pid):
                        results.append(
                            (
                                backend,
                                f"GET /jobs at {args.rows:,} rows: {label}, ms p50 / p99 (service CPU ms each)",
                                f"{p50:.1f} / {p99:.1f} ({cpu_ms:.1f})",
                            )
                        )
            if "admission" in args.parts:
                store = Store(url)
                with store.engine.begin() as conn:
                    conn.execute(text("DELETE FROM aeforge_job_events"))
                    conn.execute(jobs_table.delete())
                fill_queue(store, args.queued, args.active)
                timing = bench_admission(store, args.repeats)
                label = f"choose among {args.queued:,} queued ({args.active} running)"
                results.append(
                    (
                        backend,
                        f"{label}: head waits, ms (median / p95)",
                        f"{timing['wait_median_ms']:.2f} / {timing['wait_p95_ms']:.2f}",
                    )
                )
                results.append(
                    (
                        backend,
                        f"{label}: head starts, ms (median / p95)",
                        f"{timing['start_median_ms']:.2f} / {timing['start_p95_ms']:.2f}",
                    )
                )
                store.close()
        finally:
            context.__exit__(None, None, None)

    width = max(len(r[1]) for r in results) if results else 0
    for backend, what, value in results:
        print(f"{backend:<11} {what:<{width}}  {value}")
    print(f"load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f}, on {os.cpu_count()} CPUs")
    return 0


def print_soak(backend: str, minutes: float, report: dict) -> None:
    print(
        f"{backend}: soak, a day of {USERS} users in {minutes:g} min: {report['operations']} operations in {report['seconds']:.0f} s"
    )
    for key in ("rss_mib", "open_files", "db_connections"):
        print(
            f"  {key:<15} start {report['start'][key]:8.1f}   after a minute {report['warm'][key]:8.1f}"
            f"   end (clients gone) {report['end'][key]:8.1f}"
        )
    print(f"  peak RSS {report['peak_rss_mib']:.1f} MiB")
    errors = sum(n for codes in report["statuses"].values() for code, n in codes.items() if code >= 500)
    print(
        f"  5xx answers: {errors}; no answer (connection errors, each retried once): {report['transport_errors'] or 0}"
    )
    for endpoint, (p50, p99, n) in sorted(report["latencies"].items()):
        codes = ", ".join(f"{c}: {k}" for c, k in sorted(report["statuses"][endpoint].items()))
        print(f"  {endpoint:<45} n {n:5d}  p50 {p50:8.1f} ms  p99 {p99:8.1f} ms  ({codes})")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
