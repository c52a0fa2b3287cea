"""`aeforge admin db upgrade | current | history` on SQLite and PostgreSQL, from a store made before Alembic."""

from __future__ import annotations

import logging
import re

from typer.testing import CliRunner

from services.cli import app
from services.store import Store, migration_history
from tests.services.legacy_store import make_legacy_store

HEAD = migration_history()[-1].id


def admin(*args):
    return CliRunner().invoke(app, ["admin", "db", *args], env={"COLUMNS": "160"})


def test_admin_db_upgrades_a_version_1_store_and_says_where_it_is(store_url, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AEFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AEFORGE_DB_URL", store_url)
    assert "no aeforge tables yet" in admin("current").output
    ids = make_legacy_store(store_url, 1)

    current = admin("current")
    assert current.exit_code == 0 and f"revision 0001; the newest is {HEAD}" in current.output, current.output
    with caplog.at_level(logging.INFO):
        upgraded = admin("upgrade")
    assert upgraded.exit_code == 0 and f"migrated from revision 0001 to {HEAD}" in upgraded.output, upgraded.output
    # Alembic's own INFO lines ("Context impl", "Running upgrade") are kept off the screen.
    assert not [r for r in caplog.records if r.name.startswith("alembic") and r.levelno < logging.WARNING]
    assert "Running upgrade" not in upgraded.output
    assert f"already at revision {HEAD}" in admin("upgrade").output
    assert f"revision {HEAD} (the newest)" in admin("current").output
    history = admin("history")
    assert history.exit_code == 0
    lines = [line for line in history.output.splitlines() if re.search(r"│ \d{4} ", line)]
    assert [re.search(r"\b\d{4}\b", line).group() for line in lines] == [r.id for r in migration_history()]
    assert "newest" in lines[-1] and "wait_reason" in lines[1]
    store = Store(store_url)
    assert store.get(ids["finished"]).state == "succeeded" and store.get(ids["queued"]).state == "queued"
    store.close()


def test_admin_db_refuses_a_store_newer_than_this_aeforge(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'aeforge.db'}"
    monkeypatch.setenv("AEFORGE_HOME", str(tmp_path))
    monkeypatch.setenv("AEFORGE_DB_URL", url)
    store = Store(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE aeforge_alembic_version SET version_num = '0099'")
    store.close()
    for command in ("upgrade", "current"):
        result = admin(command)
        assert result.exit_code == 2, result.output
        assert f"schema version 0099, newer than this aeforge understands ({HEAD}); upgrade aeforge" in result.output
        assert "Traceback" not in result.output
