"""Job stores as the released aeforge made them before Alembic (schema versions 1 and 2), for the upgrade tests.

A frozen copy of that code path: its table definitions (services/store.py at schema version 2), created with
``create_all`` and marked in ``aeforge_schema`` as it did; version 1 is the same without ``wait_reason`` (which
version 2's migration added with ALTER TABLE). Rows go in with plain INSERTs, as that aeforge wrote them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    insert,
)


def _tables(version: int) -> MetaData:
    metadata = MetaData()
    jobs = Table(
        "aeforge_jobs",
        metadata,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("id", String(128), nullable=False, unique=True),
        Column("name", String(100), nullable=False, index=True),
        Column("owner", String(100), nullable=False, index=True),
        Column("kind", String(16), nullable=False),
        Column("spec_text", Text, nullable=False),
        Column("spec_json", Text, nullable=False),
        Column("priority", Integer, nullable=False, default=0),
        Column("resources", JSON, nullable=False),
        Column("state", String(16), nullable=False),
        Column("cancel_requested_by", String(100)),
        Column("attempts", Integer, nullable=False, default=0),
        Column("max_attempts", Integer, nullable=False),
        Column("ray_submission_id", String(160)),
        Column("mlflow_run_id", String(64)),
        Column("model_version", String(64)),
        Column("result", JSON),
        Column("error", Text),
        *([Column("wait_reason", Text)] if version >= 2 else []),
        Column("idempotency_key", String(200)),
        Column("created_at", DateTime, nullable=False),
        Column("updated_at", DateTime, nullable=False),
        Column("started_at", DateTime),
        Column("finished_at", DateTime),
        UniqueConstraint("owner", "idempotency_key", name="uq_aeforge_jobs_owner_idempotency_key"),
    )
    Index("ix_aeforge_jobs_queue", jobs.c.state, jobs.c.priority.desc(), jobs.c.seq)
    Table(
        "aeforge_job_events",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(128), ForeignKey("aeforge_jobs.id", ondelete="CASCADE"), nullable=False, index=True),
        Column("at", DateTime, nullable=False),
        Column("from_state", String(16)),
        Column("to_state", String(16), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("reason", Text, nullable=False),
    )
    Table(
        "aeforge_schema",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("version", Integer, nullable=False),
        Column("migrated_at", DateTime, nullable=False),
    )
    return metadata


def make_legacy_store(url: str, version: int) -> dict[str, str]:
    """A store at schema ``version`` (1 or 2) holding a finished job (two attempts, its events) and a queued one;
    returns {name: job id}."""
    metadata = _tables(version)
    jobs, events, schema = (metadata.tables[n] for n in ("aeforge_jobs", "aeforge_job_events", "aeforge_schema"))
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = [
        dict(
            id="finished-0001",
            name="finished",
            owner="alice",
            kind="train",
            state="succeeded",
            attempts=2,
            ray_submission_id="finished-0001-attempt-2",
            mlflow_run_id="0123abcd",
            result={"loss": 0.25},
            started_at=now - timedelta(minutes=9),
            finished_at=now - timedelta(minutes=1),
            idempotency_key="k-1",
        ),
        dict(id="queued-0002", name="queued", owner="bob", kind="sweep", state="queued", attempts=0),
    ]
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)
            conn.execute(insert(schema).values(id=1, version=version, migrated_at=now))
            for row in rows:
                conn.execute(
                    insert(jobs).values(
                        spec_text=f"name: {row['name']}\n",
                        spec_json=f'{{"name": "{row["name"]}"}}',
                        priority=3,
                        resources={"CPU": 1.0, "GPU": 0.0},
                        max_attempts=3,
                        created_at=now - timedelta(minutes=10),
                        updated_at=now,
                        **row,
                    )
                )
            conn.execute(
                insert(events),
                [
                    dict(job_id="finished-0001", at=now, from_state=None, to_state="queued", attempt=0, reason="x"),
                    dict(
                        job_id="finished-0001",
                        at=now,
                        from_state="running",
                        to_state="succeeded",
                        attempt=2,
                        reason="y",
                    ),
                    dict(job_id="queued-0002", at=now, from_state=None, to_state="queued", attempt=0, reason="z"),
                ],
            )
    finally:
        engine.dispose()
    return {row["name"]: row["id"] for row in rows}
