"""The job store on SQLite and PostgreSQL: submission, idempotency, listing, state machine, admission order and
atomicity, schema creation and migration."""

from __future__ import annotations

import shutil
import threading

import pytest
from sqlalchemy import inspect, select, text

from services.store import (
    LEGACY_MARKER,
    MIGRATIONS_DIR,
    VERSION_TABLE,
    Decision,
    InvalidTransition,
    JobNotFound,
    SchemaTooNew,
    Store,
    make_engine,
    metadata,
    migration_history,
    queue_kind_of,
    schema_table,
    submission_id_for,
)
from tests.services.legacy_store import make_legacy_store


def submit(store: Store, name="job", owner="alice", priority=0, cpus=1.0, key=None, max_attempts=3):
    job, _ = store.submit(
        name=name,
        owner=owner,
        kind="train",
        spec_text=f"name: {name}\n",
        spec_json=f'{{"name": "{name}"}}',
        resources={"CPU": cpus, "GPU": 0.0},
        priority=priority,
        max_attempts=max_attempts,
        idempotency_key=key,
    )
    return job


def start_all(job, holdings):
    return Decision.start("test: start everything")


def test_submit_makes_a_queued_job_with_its_first_event(store):
    job = submit(store, name="My Job_1", priority=4)
    assert job.state == "queued" and job.priority == 4 and job.attempts == 0 and job.max_attempts == 3
    assert job.id.startswith("my-job-1-")
    assert job.resources == {"CPU": 1.0, "GPU": 0.0}
    assert job.created_at.tzinfo is not None
    assert store.get(job.id) == job
    [event] = store.events(job.id)
    assert (event.from_state, event.to_state, event.attempt) == (None, "queued", 0)
    assert "alice" in event.reason and "priority 4" in event.reason
    shown = job.to_dict()
    assert shown["created_at"].endswith("Z") and "spec_text" not in shown
    assert job.to_dict(include_spec=True)["spec_text"] == "name: My Job_1\n"


def test_unknown_job_raises_not_found(store):
    with pytest.raises(JobNotFound):
        store.get("nope")
    with pytest.raises(JobNotFound):
        store.request_cancel("nope", by="alice")
    with pytest.raises(JobNotFound):
        store.transition("nope", "starting", "x", expect=("queued",))


def test_idempotency_key_returns_the_same_job_per_owner(store):
    first, created = store.submit(
        name="a", owner="alice", kind="train", spec_text="x", spec_json="{}", resources={"CPU": 1}, idempotency_key="k1"
    )
    again, created_again = store.submit(
        name="a", owner="alice", kind="train", spec_text="x", spec_json="{}", resources={"CPU": 1}, idempotency_key="k1"
    )
    other_owner, created_other = store.submit(
        name="a", owner="bob", kind="train", spec_text="x", spec_json="{}", resources={"CPU": 1}, idempotency_key="k1"
    )
    assert created and not created_again and created_other
    assert again.id == first.id and other_owner.id != first.id
    assert store.list_jobs()[1] == 2


def test_racing_submissions_with_one_key_make_one_job(store_url):
    stores = [Store(store_url) for _ in range(4)]
    results, barrier = [], threading.Barrier(4)

    def worker(s):
        barrier.wait()
        results.append(
            s.submit(
                name="race",
                owner="alice",
                kind="train",
                spec_text="x",
                spec_json="{}",
                resources={"CPU": 1},
                idempotency_key="same",
            )
        )

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert stores[0].list_jobs()[1] == 1
    for s in stores:
        s.close()


def test_concurrent_submissions_are_committed_together_each_with_its_own_job_and_event(store, monkeypatch):
    """Group commit: while one submission is being written, the others that arrive wait and are written together in
    the next transaction; each caller still gets its own job (and seq) only once it is committed. Two of them share
    an idempotency key: their group fails on the unique index, is written one by one, and the key makes one job."""
    groups: list[int] = []
    write_group = store._write_group
    first_group_may_write = threading.Event()

    def counted(group):
        groups.append(len(group))
        if len(groups) == 1:  # hold the first group until every other caller waits for the next one
            first_group_may_write.wait(30)
        write_group(group)

    monkeypatch.setattr(store, "_write_group", counted)
    callers = 12
    results: dict[int, tuple] = {}

    def caller(i):
        results[i] = store.submit(
            name=f"g{i}",
            owner="alice",
            kind="train",
            spec_text=f"name: g{i}\n",
            spec_json="{}",
            resources={"CPU": 1},
            idempotency_key="shared" if i in (3, 7) else None,
        )

    first = threading.Thread(target=caller, args=(0,))
    first.start()
    while not groups:
        threading.Event().wait(0.01)
    rest = [threading.Thread(target=caller, args=(i,)) for i in range(1, callers)]
    for t in rest:
        t.start()
    while len(store._submissions) < callers - 1:
        threading.Event().wait(0.01)
    assert not results  # nobody has an answer before their commit
    first_group_may_write.set()
    for t in [first, *rest]:
        t.join(30)
    assert groups[:2] == [1, callers - 1]  # the second group is every caller that waited
    assert groups[2:] == [1] * (callers - 1)  # it failed on the shared key: written one by one
    assert sorted(results) == list(range(callers))
    shared = {results[3][0].id, results[7][0].id}
    assert len(shared) == 1 and sorted([results[3][1], results[7][1]]) == [False, True]
    created = [job for job, made in results.values() if made]
    assert len(created) == callers - 1 and len({job.seq for job in created}) == callers - 1
    for job in created:
        assert store.get(job.id) == job
        [event] = store.events(job.id)
        assert (event.from_state, event.to_state) == (None, "queued")
    assert store.list_jobs()[1] == callers - 1
    assert not store._submissions and not store._submissions_leader


def test_a_group_commit_that_fails_fails_each_of_its_submissions_and_the_next_one_writes(store, monkeypatch):
    from contextlib import contextmanager

    from sqlalchemy.exc import OperationalError

    real_tx = store._tx
    calls = []

    @contextmanager
    def down_once(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise OperationalError("BEGIN", {}, Exception("the database is down"))
        with real_tx(**kwargs) as conn:
            yield conn

    monkeypatch.setattr(store, "_tx", down_once)
    with pytest.raises(OperationalError, match="down"):
        submit(store, name="lost")
    assert not store._submissions_leader  # the lead was given up: the next submission is not left waiting
    job = submit(store, name="kept")
    assert [j.name for j in store.list_jobs()[0]] == ["kept"] and store.get(job.id) == job


def test_list_filters_and_pages_newest_first(store):
    ids = [submit(store, name=f"n{i % 2}", owner="alice" if i < 5 else "bob").id for i in range(7)]
    store.request_cancel(ids[0], by="alice")
    page, total = store.list_jobs(limit=3)
    assert total == 7 and [j.id for j in page] == ids[::-1][:3]
    page2, _ = store.list_jobs(limit=3, offset=3)
    assert [j.id for j in page2] == ids[::-1][3:6]
    assert store.list_jobs(owner="bob")[1] == 2
    assert {j.name for j in store.list_jobs(name="n1")[0]} == {"n1"}
    assert [j.id for j in store.list_jobs(states=["cancelled"])[0]] == [ids[0]]
    assert store.list_jobs(states=["queued"], owner="alice")[1] == 4
    with pytest.raises(ValueError, match="unknown state"):
        store.list_jobs(states=["done"])


def test_listing_by_several_states_merges_them_newest_first(store):
    """Each state's page is read on its own (an index range) and the pages merged: the same jobs, in the same
    order, by offset and by cursor, as one filter over all of them would give."""
    ids = [submit(store, name=f"j{i}", owner="alice" if i % 3 else "bob").id for i in range(9)]
    for i in (1, 4, 6):
        store.request_cancel(ids[i], by="alice")
    store.admit(start_all)  # the oldest queued job starts
    states = {j.id: j.state for j in store.list_jobs(limit=20)[0]}
    assert sorted(set(states.values())) == ["cancelled", "queued", "starting"]
    newest_first = ids[::-1]
    wanted = [i for i in newest_first if states[i] in ("cancelled", "starting")]
    page, total = store.list_jobs(states=["starting", "cancelled"], limit=2)
    assert [j.id for j in page] == wanted[:2] and total == len(wanted) == 4
    assert [j.id for j in store.list_jobs(states=["cancelled", "starting"], limit=2, offset=2)[0]] == wanted[2:4]
    after = store.get(wanted[1]).seq
    assert [j.id for j in store.list_jobs(states=["starting", "cancelled"], before_seq=after)[0]] == wanted[2:]
    mine = [i for i in wanted if i in {j.id for j in store.list_jobs(owner="alice", limit=20)[0]}]
    page, total = store.list_jobs(states=["starting", "cancelled", "failed"], owner="alice")
    assert [j.id for j in page] == mine and total == len(mine)
    assert store.list_jobs(states=["cancelled", "cancelled"], limit=1)[0][0].state == "cancelled"


def test_admission_follows_priority_then_submission_order(store):
    low = submit(store, name="low", priority=0)
    high1 = submit(store, name="high1", priority=5)
    mid = submit(store, name="mid", priority=2)
    high2 = submit(store, name="high2", priority=5)
    order = []
    while (admission := store.admit(start_all)).started is not None:
        order.append(admission.started.id)
    assert order == [high1.id, high2.id, mid.id, low.id]
    started = store.get(high1.id)
    assert started.state == "starting" and started.attempts == 1
    assert started.ray_submission_id == submission_id_for(high1.id, 1) == high1.id


def test_admission_sees_what_admitted_jobs_hold_and_waits_at_the_head(store):
    big = submit(store, name="big", cpus=2, priority=1)
    small = submit(store, name="small", cpus=1)
    seen = []

    def two_cpus(job, holdings):
        seen.append((job.name, holdings.resources.get("CPU", 0.0), holdings.active_jobs))
        free = 2.0 - holdings.resources.get("CPU", 0.0)
        return Decision.start("fits") if job.resources["CPU"] <= free else Decision.wait("no room")

    assert store.admit(two_cpus).started.id == big.id
    admission = store.admit(two_cpus)
    # The head waits; the small job behind it is not looked at, let alone started.
    assert admission.started is None and admission.waiting.id == small.id and admission.wait_reason == "no room"
    assert seen == [("big", 0.0, 0), ("small", 2.0, 1)]
    assert store.holdings().resources["CPU"] == 2.0


def test_rejected_jobs_fail_with_the_reason_and_admission_goes_on(store):
    huge = submit(store, name="huge", cpus=64, priority=9)
    fine = submit(store, name="fine", cpus=1)

    def decide(job, holdings):
        if job.resources["CPU"] > 4:
            return Decision.reject("asks for CPU 64 but the cluster has CPU 4")
        return Decision.start("fits")

    admission = store.admit(decide)
    assert [j.id for j in admission.rejected] == [huge.id]
    assert admission.started.id == fine.id
    failed = store.get(huge.id)
    assert failed.state == "failed" and "CPU 64" in failed.error and failed.finished_at is not None
    assert store.events(huge.id)[-1].reason == "asks for CPU 64 but the cluster has CPU 4"


def test_transitions_are_guarded_and_each_writes_an_event(store):
    submit(store)
    job = store.admit(lambda j, h: Decision.start("go")).started
    assert store.transition(job.id, "running", "ray says running", expect=("queued",)) is None  # it is starting
    assert store.transition(job.id, "running", "stale attempt", expect=("starting",), attempt=2) is None
    running = store.transition(job.id, "running", "ray says running", expect=("starting",), attempt=1)
    assert running.state == "running" and running.started_at is not None
    with pytest.raises(InvalidTransition):
        store.transition(job.id, "starting", "backwards", expect=("running",))
    done = store.transition(
        job.id,
        "succeeded",
        "finished",
        expect=("running",),
        mlflow_run_id="abc",
        model_version="3",
        result={"mlflow_run_id": "abc"},
    )
    assert done.state == "succeeded" and done.finished_at >= done.started_at
    assert (done.mlflow_run_id, done.model_version, done.result) == ("abc", "3", {"mlflow_run_id": "abc"})
    assert [(e.from_state, e.to_state) for e in store.events(job.id)] == [
        (None, "queued"),
        ("queued", "starting"),
        ("starting", "running"),
        ("running", "succeeded"),
    ]
    assert [e.reason for e in store.events(job.id)][1:] == ["go", "ray says running", "finished"]
    with pytest.raises(ValueError, match="not job columns"):
        store.transition(job.id, "failed", "x", expect=("succeeded",), colour="red")


def test_cancel_queued_at_once_running_by_request_finished_refused(store):
    queued = submit(store, name="q")
    cancelled = store.request_cancel(queued.id, by="alice")
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None
    assert "alice" in store.events(queued.id)[-1].reason
    with pytest.raises(InvalidTransition, match="already cancelled"):
        store.request_cancel(queued.id, by="alice")

    running = submit(store, name="r")
    store.admit(start_all)
    store.transition(running.id, "running", "up", expect=("starting",))
    marked = store.request_cancel(running.id, by="root")
    assert marked.state == "running" and marked.cancel_requested_by == "root"
    assert store.request_cancel(running.id, by="alice").cancel_requested_by == "root"  # the first asker is kept


def test_retry_requeues_a_failed_job_with_one_more_attempt(store):
    job = submit(store, max_attempts=1)
    store.admit(start_all)
    store.transition(job.id, "failed", "boom", expect=("starting",), error="boom")
    with pytest.raises(InvalidTransition):
        store.retry(submit(store, name="other").id, by="alice")  # queued: nothing to retry
    again = store.retry(job.id, by="alice")
    assert again.state == "queued" and again.max_attempts == 2 and again.error is None and again.finished_at is None
    started = store.admit(start_all).started
    assert started.id == job.id and started.attempts == 2
    assert started.ray_submission_id == f"{job.id}-attempt-2"
    assert store.events(job.id)[-2].reason == "retried by alice"


NEW_REVISION = '''"""a note per job

Revision ID: 0099
Revises: {head}
"""
import sqlalchemy as sa
from alembic import op

revision = "0099"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("aeforge_jobs") as batch:
        batch.add_column(sa.Column("note", sa.String(20)))
'''


def schema_differences(store: Store) -> list:
    """What Alembic's autogenerate finds between the database and the tables services.store describes."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, "compare_type": True})
        return [d for d in compare_metadata(context, metadata) if not _is_sqlite_desc_index_noise(d)]


def _is_sqlite_desc_index_noise(difference) -> bool:
    # SQLite's reflection loses an index's DESC; Alembic then reports the queue index as changed on SQLite alone.
    return (
        isinstance(difference, tuple)
        and difference[0] in ("add_index", "remove_index")
        and (difference[1].name == "ix_aeforge_jobs_queue")
    )


def test_a_new_store_is_at_the_newest_revision_and_matches_the_tables(store):
    head = migration_history()[-1]
    assert head.is_head and store.schema_version == head.id
    assert [r.id for r in migration_history()][:3] == ["0001", "0002", "0003"]
    assert schema_differences(store) == []
    with store.engine.connect() as conn:
        # The marker the runner before Alembic reads: it refuses a database past its version 2.
        assert conn.execute(select(schema_table.c.version)).scalar_one() == LEGACY_MARKER


def test_a_new_revision_runs_once_and_a_database_newer_than_the_code_is_refused(store_url, tmp_path):
    first = Store(store_url)
    job = submit(first)
    first.close()
    newer = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, newer, ignore=shutil.ignore_patterns("__pycache__"))
    head = migration_history()[-1].id
    (newer / "versions" / "0099_note.py").write_text(NEW_REVISION.format(head=head))
    migrated = Store(store_url, migrations=newer)
    assert migrated.schema_version == "0099"
    with migrated.engine.connect() as conn:
        assert "note" in {c["name"] for c in inspect(conn).get_columns("aeforge_jobs")}
    assert migrated.get(job.id).id == job.id
    migrated.close()
    again = Store(store_url, migrations=newer)  # adding the column twice would fail: it runs once
    assert again.schema_version == "0099"
    again.close()
    with pytest.raises(SchemaTooNew, match=f"at schema version 0099, newer than this aeforge understands \\({head}\\)"):
        Store(store_url)


def test_the_owner_state_index_gets_planner_statistics_where_the_others_have_them(tmp_path):
    """Revision 0008 on an analyzed SQLite store: the new index is analyzed too. Among indexes with statistics one
    without looks as selective as (owner, seq) for a plain owner listing, which would then sort all of the owner's
    jobs for every page."""
    url = f"sqlite:///{tmp_path / 'analyzed.db'}"
    before = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, before, ignore=shutil.ignore_patterns("__pycache__", "0008_*"))
    old = Store(url, migrations=before)
    assert old.schema_version == "0007"
    for i in range(40):
        submit(old, name=f"j{i}", owner=f"user{i % 4}")
    with old.engine.connect() as conn:
        conn.execute(text("ANALYZE"))
        conn.commit()
    old.close()
    store = Store(url)
    try:
        assert store.schema_version == "0008"
        with store.engine.connect() as conn:
            analyzed = {r[0] for r in conn.execute(text("SELECT idx FROM sqlite_stat1 WHERE tbl = 'aeforge_jobs'"))}
            listing = "SELECT * FROM aeforge_jobs WHERE owner = 'user1' ORDER BY seq DESC LIMIT 51"
            plan = " ".join(str(r[-1]) for r in conn.execute(text(f"EXPLAIN QUERY PLAN {listing}")))
        assert "ix_aeforge_jobs_owner_seq" in plan and "TEMP B-TREE" not in plan, plan
        assert {"ix_aeforge_jobs_owner_seq", "ix_aeforge_jobs_owner_state_seq"} <= analyzed
    finally:
        store.close()


@pytest.mark.parametrize("version", [1, 2])
def test_a_store_made_before_alembic_upgrades_to_the_newest_revision_with_its_jobs(store_url, version):
    ids = make_legacy_store(store_url, version)
    store = Store(store_url)
    try:
        assert store.schema_version == migration_history()[-1].id
        assert schema_differences(store) == []
        finished = store.get(ids["finished"])
        assert (finished.state, finished.attempts, finished.result) == ("succeeded", 2, {"loss": 0.25})
        assert finished.ray_submission_id == "finished-0001-attempt-2" and finished.wait_reason is None
        assert [e.to_state for e in store.events(ids["finished"])] == ["queued", "succeeded"]
        assert store.submit(
            name="again",
            owner="alice",
            kind="train",
            spec_text="",
            spec_json="{}",
            resources={},
            idempotency_key="k-1",
        ) == (finished, False)  # the old idempotency key still finds its job
        # Revision 0006 gave the queued job its kind: a pass that reads the first of each kind reads it.
        with store.engine.connect() as conn:
            (row,) = [r for r in store._queued_rows(conn, 1) if r.id == ids["queued"]]
        assert row.queue_kind == queue_kind_of(row.id, row.kind, row.priority_class, row.resources)
        admission = store.admit(lambda job, holdings: Decision.wait("needs CPU 4, GPU 0; free CPU 2, GPU 0"))
        assert admission.waiting.id == ids["queued"]
    finally:
        store.close()
    reopened = Store(store_url)  # a restarted service reads the reason the last pass stored
    assert reopened.get(ids["queued"]).wait_reason == "needs CPU 4, GPU 0; free CPU 2, GPU 0"
    reopened.close()


def test_an_unknown_pre_alembic_version_is_refused_untouched(store_url):
    make_legacy_store(store_url, 2)
    engine = make_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE aeforge_schema SET version = 7"))
    with pytest.raises(SchemaTooNew, match="at schema version 7, newer than this aeforge understands"):
        Store(store_url)
    with engine.connect() as conn:
        assert not inspect(conn).has_table(VERSION_TABLE)
    engine.dispose()


def test_wait_reasons_are_written_once_kept_for_judged_jobs_and_cleared_otherwise(store):
    head = submit(store, name="head", priority=5)
    backing_off = submit(store, name="backing-off", priority=9)
    behind = submit(store, name="behind", priority=0)

    def decide(job, holdings):
        if job.id == backing_off.id:
            return Decision.skip("attempt 2 waits until 12:00:00 UTC (back-off after a failed attempt)")
        return Decision.wait("no room")

    store.admit(decide)
    assert store.get(backing_off.id).wait_reason.startswith("attempt 2 waits")
    assert store.get(head.id).wait_reason == "no room" and store.get(behind.id).wait_reason is None
    updated = store.get(head.id).updated_at
    store.admit(decide)  # the same reason again: nothing is written (no event, no new updated_at)
    assert store.get(head.id).updated_at == updated and len(store.events(head.id)) == 1
    # Where each one stands: the head has its own reason; the job behind it waits on the head.
    assert store.queue_place(store.get(backing_off.id)).jobs_ahead == 0
    assert store.queue_place(store.get(head.id)).jobs_ahead == 1
    place = store.queue_place(store.get(behind.id))
    assert place.jobs_ahead == 2 and place.blocked_by.id == head.id

    # A job submitted ahead of the head becomes the head: the old head's reason is cleared by the next pass.
    urgent = submit(store, name="urgent", priority=7)
    store.admit(lambda job, holdings: decide(job, holdings) if job.id != urgent.id else Decision.wait("urgent waits"))
    assert store.get(urgent.id).wait_reason == "urgent waits" and store.get(head.id).wait_reason is None
    assert store.queue_place(store.get(head.id)).blocked_by.id == urgent.id
    # Cancelling is a state change: the reason goes with it.
    assert store.request_cancel(urgent.id, by="alice").wait_reason is None


def test_a_postgres_url_without_the_psycopg_driver_is_refused():
    from services.store import StoreError

    with pytest.raises(StoreError, match="postgresql\\+psycopg"):
        Store("postgresql://u@localhost/db")


@pytest.mark.timeout(120)
def test_racing_admissions_start_each_job_once_and_never_overcommit(store_url):
    """Four stores (as four dispatchers would) claim from one queue at the same time."""
    setup = Store(store_url)
    ids = {submit(setup, name=f"j{i}", cpus=1).id for i in range(24)}
    capacity = 5.0

    def decide(job, holdings):
        if holdings.resources.get("CPU", 0.0) + job.resources["CPU"] <= capacity:
            return Decision.start("fits")
        return Decision.wait("full")

    claimed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def dispatcher():
        s = Store(store_url)
        barrier.wait()
        for _ in range(10):
            admission = s.admit(decide)
            if admission.started is not None:
                with lock:
                    claimed.append(admission.started.id)
        s.close()

    threads = [threading.Thread(target=dispatcher) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == len(set(claimed)) == capacity  # no job twice, and no more than fits
    assert set(claimed) <= ids
    assert setup.holdings().active_jobs == capacity

    # Now every job can start: all 24 are claimed exactly once between the four.
    claimed.clear()
    decide_all = start_all
    barrier = threading.Barrier(4)

    def greedy():
        s = Store(store_url)
        barrier.wait()
        while (admission := s.admit(decide_all)).started is not None:
            with lock:
                claimed.append(admission.started.id)
        s.close()

    threads = [threading.Thread(target=greedy) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == len(set(claimed)) == 24 - capacity
    with setup.engine.connect() as conn:
        states = conn.execute(text("SELECT state, count(*) FROM aeforge_jobs GROUP BY state")).all()
    assert dict(states) == {"starting": 24}
    for job_id in ids:
        assert [e.to_state for e in setup.events(job_id)] == ["queued", "starting"]
    setup.close()


def test_text_no_backend_stores_is_refused_or_matches_nothing_alike(store):
    """PostgreSQL refuses NUL in text and every backend refuses lone surrogates: the store answers for both, the
    same way on SQLite and PostgreSQL, instead of letting a driver error through."""
    from services.store import InvalidValue

    job = submit(store, key="good")
    for bad in ("\x00", f"{job.id}\x00", "a\ud800"):
        with pytest.raises(JobNotFound):
            store.get(bad)
        with pytest.raises(JobNotFound):
            store.request_cancel(bad, by="alice")
        with pytest.raises(JobNotFound):
            store.retry(bad, by="alice")
        with pytest.raises(JobNotFound):
            store.transition(bad, "starting", "x", expect=("queued",))
        assert store.events(bad) == []
        assert store.list_jobs(owner=bad) == ([], 0) and store.list_jobs(name=bad) == ([], 0)
    for field in ("name", "spec_text", "spec_json", "idempotency_key"):
        kwargs = dict(
            name="n",
            owner="alice",
            kind="train",
            spec_text="name: n\n",
            spec_json="{}",
            resources={"CPU": 1.0},
            idempotency_key="k",
        )
        kwargs[field] = "x\x00y"
        with pytest.raises(InvalidValue, match=field):
            store.submit(**kwargs)
    with pytest.raises(InvalidValue, match="owner"):
        store.submit(name="n", owner="a\ud800", kind="train", spec_text="x", spec_json="{}", resources={"CPU": 1.0})
    assert store.list_jobs() == ([store.get(job.id)], 1)


def test_listing_refuses_a_limit_or_offset_beyond_64_bits(store):
    from services.store import MAX_SQL_INT, InvalidValue

    job = submit(store)
    for kwargs in ({"offset": 2**63}, {"limit": 2**64}, {"offset": -1}, {"limit": -1}):
        with pytest.raises(InvalidValue, match=next(iter(kwargs))):
            store.list_jobs(**kwargs)
    assert store.list_jobs(offset=MAX_SQL_INT) == ([], 1)
    assert store.list_jobs(limit=MAX_SQL_INT) == ([job], 1)
