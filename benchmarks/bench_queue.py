"""Benchmarks of the queue service (not tests): submissions per second through the HTTP API, and the dispatcher's
time to choose the next job among 10,000 queued ones, on SQLite and on PostgreSQL.

    python -m benchmarks.bench_queue [--submissions 300] [--clients 1,8] [--queued 10000] [--backends sqlite,postgresql]

The API runs under uvicorn in this process, on a free local port, with the real spec validator; clients send
over HTTP. For PostgreSQL a temporary database (aeforge_bench_<random>) is made at --pg-admin-url and dropped at
the end. The admission timing is one :meth:`Store.admit` transaction as the dispatcher runs it: the advisory lock
(PostgreSQL) or BEGIN IMMEDIATE (SQLite), the holdings of the admitted jobs, and the queue's head.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
from sqlalchemy import insert, text

from services.api import create_app
from services.settings import Principal, ServiceSettings
from services.store import Decision, Store, jobs_table, new_job_id, utcnow

SPEC = """\
name: bench
model: {variant: beta_vae, architecture: conv64, latent_dim: 10, beta: 4.0}
data: {source: 'builtin:dsprites'}
train: {steps: 1000, batch_size: 64}
resources: {workers: 2, cpus_per_worker: 2}
"""
TOKEN = "bench-token-0123456789"


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


@contextmanager
def api_server(store: Store, home: Path):
    import uvicorn

    settings = ServiceSettings(home=home, db_url=store.url, tokens=(Principal("bench", "admin", TOKEN),))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(store, settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def bench_submissions(url: str, total: int, clients: int) -> float:
    """Submissions per second: ``clients`` threads, each with its own connection, ``total`` POSTs in all."""
    per_client = total // clients

    def run(_):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
            for _ in range(per_client):
                response = http.post("/jobs", json={"spec": SPEC, "priority": 1})
                if response.status_code != 201:
                    raise RuntimeError(f"submission failed: {response.status_code} {response.text}")

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    return per_client * clients / (time.perf_counter() - start)


def fill_queue(store: Store, count: int, active: int) -> None:
    """``count`` queued jobs with spread priorities and ``active`` running ones, inserted in bulk."""
    now = utcnow()
    rows = []
    for i in range(count + active):
        rows.append(
            {
                "id": new_job_id(f"bench-{i}") + f"-{i}",
                "name": f"bench-{i % 50}",
                "owner": f"user{i % 20}",
                "kind": "train",
                "spec_text": SPEC,
                "spec_json": json.dumps({"name": "bench"}),
                "priority": i % 10,
                "resources": {"CPU": 4.0, "GPU": 0.0},
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--submissions", type=int, default=300, help="POSTs per measurement")
    parser.add_argument("--clients", default="1,8", help="concurrent clients, comma-separated")
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--active", type=int, default=50, help="running jobs whose holdings admission adds up")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)

    results = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        try:
            context = database(backend, args.pg_admin_url)
            url = context.__enter__()
        except Exception as exc:
            print(f"{backend}: skipped ({exc})", file=sys.stderr)
            continue
        try:
            store = Store(url)
            with tempfile.TemporaryDirectory() as home, api_server(store, Path(home)) as api_url:
                for clients in [int(c) for c in args.clients.split(",")]:
                    rate = bench_submissions(api_url, args.submissions, clients)
                    results.append((backend, f"submissions/s through the API, {clients} client(s)", f"{rate:,.0f}"))
            with store.engine.begin() as conn:
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
