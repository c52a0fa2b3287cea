"""Fixtures of the queue-service tests: a store on SQLite or on PostgreSQL (127.0.0.1:5432).

PostgreSQL: one fresh database per test run (aeforge_test_<random>, dropped at the end), and one fresh schema
per test inside it, so every test starts from an empty store. If the server is down, the fixture starts the
local cluster; if it cannot be reached at all, the PostgreSQL cases are skipped and say why.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from urllib.parse import quote

import pytest

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_USERS = ("postgres", "root")


def _connect(user: str, dbname: str = "postgres"):
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=dbname, connect_timeout=3, autocommit=True)


def _find_user() -> str | None:
    import psycopg

    for user in PG_USERS:
        try:
            with _connect(user):
                return user
        except psycopg.OperationalError:
            continue
    return None


@pytest.fixture(scope="session")
def postgres_database():
    """(user, database) of a fresh database for this test run."""
    pytest.importorskip("psycopg")
    user = _find_user()
    if user is None and shutil.which("pg_ctlcluster"):
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "start"], capture_output=True, timeout=60
        )
        for _ in range(20):
            user = _find_user()
            if user is not None:
                break
            time.sleep(0.5)
    if user is None:
        pytest.skip(
            f"no PostgreSQL at {PG_HOST}:{PG_PORT} for users {', '.join(PG_USERS)} (and it could not be started)"
        )
    name = f"aeforge_test_{secrets.token_hex(4)}"
    with _connect(user) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield user, name
    finally:
        with _connect(user) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_database):
    """A SQLAlchemy URL whose connections work in a schema of their own (dropped after the test)."""
    user, name = postgres_database
    schema = f"t_{secrets.token_hex(4)}"
    with _connect(user, name) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    options = quote(f"-csearch_path={schema}")
    try:
        yield f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{name}?options={options}"
    finally:
        with _connect(user, name) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'aeforge.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url):
    from services.store import Store

    s = Store(store_url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A test that runs `serve` in-process configures the root logger (INFO, the service's handler); later tests'
    CLI output would then carry httpx's INFO lines. Each test gets the root logger back as it found it."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="package")
def ray_head():
    """One `ray start --head` with 2 CPUs (tests.services.test_e2e.started_ray_head) for the modules of this package
    that need a plain head: the queue's end-to-end tests, preemption, doctor. Each of their tests leaves no job running
    on it; it is stopped when the package's tests end."""
    from tests.services.test_e2e import started_ray_head

    with started_ray_head() as head:
        yield head
