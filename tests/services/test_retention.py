"""Retention (AEFORGE_RETENTION_DAYS): finished jobs older than the age go with their events, in batches, on SQLite
and PostgreSQL; queued, running, recent and retried jobs stay; the archive is written first or nothing is deleted."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from services.retention import Retention
from services.settings import ServiceSettings, SettingsError
from services.store import events_table, jobs_table, utcnow
from tests.services.test_store import start_all, submit


def finish(store, job, state="succeeded", days_ago=0.0):
    """Run ``job`` to ``state`` and date its end ``days_ago``."""
    store.admit(start_all)
    store.transition(job.id, "running", "test", expect=("starting",))
    store.transition(job.id, state, "test", expect=("running",))
    with store.engine.begin() as conn:
        conn.execute(
            update(jobs_table).where(jobs_table.c.id == job.id).values(finished_at=utcnow() - timedelta(days=days_ago))
        )


def event_count(store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(events_table)).scalar_one()


def test_old_finished_jobs_go_in_batches_with_their_events_and_the_rest_stays(store, tmp_path):
    old = [submit(store, name=f"old{i}") for i in range(5)]
    for i, job in enumerate(old):
        finish(store, job, state=("succeeded", "failed", "cancelled")[i % 3], days_ago=40)
    recent = submit(store, name="recent")
    finish(store, recent, days_ago=2)
    retried = submit(store, name="retried")
    finish(store, retried, state="failed", days_ago=40)
    store.retry(retried.id, by="alice")  # queued again: not finished any more
    queued = submit(store, name="queued")
    events_before = event_count(store)

    archive = tmp_path / "archive"
    retention = Retention(store, days=30, batch=2, archive_dir=archive)
    assert retention.run_once(threading.Event()) == 5
    left = {j.id for j in store.list_jobs(limit=100)[0]}
    assert left == {recent.id, retried.id, queued.id}
    assert event_count(store) == events_before - 5 * 4  # queued, starting, running, finished per old job
    assert [e.to_state for e in store.events(retried.id)][-1] == "queued"
    [day] = archive.glob("jobs-*.jsonl")
    records = [json.loads(line) for line in day.read_text().splitlines()]
    assert sorted(r["job"]["id"] for r in records) == sorted(j.id for j in old)
    assert all(r["job"]["spec_text"] and len(r["events"]) == 4 for r in records)
    assert retention.run_once() == 0


def test_a_failing_archive_deletes_nothing(store, tmp_path):
    job = submit(store)
    finish(store, job, days_ago=10)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the archive folder should be")
    with pytest.raises(OSError):
        Retention(store, days=1, archive_dir=blocked).run_once()
    assert store.get(job.id).state == "succeeded" and len(store.events(job.id)) == 4


def test_the_retention_setting(tmp_path):
    base = {"AEFORGE_HOME": str(tmp_path)}
    assert ServiceSettings.load(base).retention_days is None
    assert ServiceSettings.load(base | {"AEFORGE_RETENTION_DAYS": "30"}).retention_days == 30.0
    with pytest.raises(SettingsError, match="AEFORGE_RETENTION_DAYS must be a positive number"):
        ServiceSettings.load(base | {"AEFORGE_RETENTION_DAYS": "-1"})
