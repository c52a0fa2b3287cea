"""The job table: jobs, their state changes, and the atomic claim that admits a job to the cluster.

SQLite (a file under AEFORGE_HOME) by default, PostgreSQL through AEFORGE_DB_URL (``postgresql+psycopg://``).
The service creates the schema on first use and upgrades it itself at start: Alembic revisions in
services/migrations (version table ``aeforge_alembic_version``), under a PostgreSQL advisory lock so that two
processes starting at once migrate once; ``aeforge admin db upgrade | current | history`` does the same by hand.

Every state change goes through :meth:`Store.transition` or one of the methods built on it, in one transaction
with its event row. Admission (:meth:`Store.admit`) reads what the admitted jobs hold and claims the next job in
the same transaction: on PostgreSQL under a transaction-level advisory lock plus ``FOR UPDATE SKIP LOCKED`` on
the queued rows, on SQLite inside ``BEGIN IMMEDIATE`` (one writer at a time). Two dispatchers therefore never
start the same job, nor admit two jobs into the same free resources.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    cast,
    column,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

from services import metrics
from services.job_states import ACTIVE_STATES, STATES, TERMINAL_STATES
from workers.errors import AeforgeError
from workers.protocol import new_job_id

log = logging.getLogger(__name__)
# Alembic says "Context impl ...", "Running upgrade ..." at INFO; the store logs what a migration did itself.
logging.getLogger("alembic").setLevel(logging.WARNING)

# The state machine. queued -> failed is a job that can never fit the cluster; starting/running -> queued is a
# failed attempt with attempts left; failed/cancelled -> queued is a retry asked for by a user.
TRANSITIONS: dict[str | None, frozenset[str]] = {
    None: frozenset({"queued"}),
    "queued": frozenset({"starting", "cancelled", "failed"}),
    "starting": frozenset({"running", "succeeded", "failed", "cancelled", "queued"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "queued"}),
    "succeeded": frozenset(),
    "failed": frozenset({"queued"}),
    "cancelled": frozenset({"queued"}),
}

# Alembic's version table: not ``alembic_version``, which MLflow's tables use when both share one database.
VERSION_TABLE = "aeforge_alembic_version"
# The Alembic revisions (services/migrations), and the revision each schema version of the runner that came before
# Alembic (the ``aeforge_schema`` table) corresponds to; a database it made is stamped at that revision first.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
LEGACY_REVISIONS = {1: "0001", 2: "0002"}
# What revisions from 0003 on leave in ``aeforge_schema.version``: an aeforge from before Alembic refuses it.
LEGACY_MARKER = 3
# The largest LIMIT/OFFSET both backends take (a signed 64-bit integer: SQLite's and PostgreSQL's bigint).
MAX_SQL_INT = 2**63 - 1
# The largest job seq (aeforge_jobs.seq is INTEGER: 32 bits on PostgreSQL).
MAX_SEQ = 2**31 - 1
# Transaction-level advisory lock keys (PostgreSQL): admission decisions, schema migrations.
ADMISSION_LOCK_KEY = 0x6165_0001
# A scheduling pass that read only the first queued jobs of each kind reads more of the kinds whose unread jobs could
# matter at most this many times (16 times as many each time), then every queued job (Store.schedule).
MAX_REREADS = 3
MIGRATION_LOCK_KEY = 0x6165_0002
# Where a transaction keeps the state changes it made until it commits (Connection.info).
_CHANGES = "aeforge_state_changes"


class StoreError(AeforgeError):
    """Base of the store's errors; the message names the job, the state or the AEFORGE_DB_URL problem."""


class JobNotFound(StoreError):
    def __init__(self, job_id: str):
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class InvalidTransition(StoreError):
    """A state change the job's current state does not allow (cancel a finished job, retry a running one)."""


class SchemaTooNew(StoreError):
    """The database is at a schema revision this aeforge does not know: a newer aeforge made it."""

    def __init__(self, current: object, head: str):
        super().__init__(
            f"the job database is at schema version {current}, newer than this aeforge understands ({head}); "
            "upgrade aeforge"
        )
        self.current = current
        self.head = head


class InvalidValue(StoreError, ValueError):
    """A value the store cannot take: text no backend stores (a NUL, which PostgreSQL refuses; a lone surrogate,
    which is not UTF-8), a LIMIT/OFFSET past 64 bits. ``field`` names it, and so does the message."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def storable(value: str) -> bool:
    """Whether every backend stores (and so can look up) this text: no NUL, and encodable as UTF-8. A key or id that
    is not storable matches no row, on SQLite and on PostgreSQL alike."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone; values are stored as UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC times")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return None if value is None else value.replace(tzinfo=UTC)


metadata = MetaData()

jobs_table = Table(
    "aeforge_jobs",
    metadata,
    # seq orders submissions (strictly increasing); id is the job id users and Ray see.
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(128), nullable=False, unique=True),
    Column("name", String(100), nullable=False),
    Column("owner", String(100), nullable=False),
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
    # The last failed attempt's error: kept while the job is retried, cleared when it succeeds or a user retries it.
    Column("error", Text),
    # Why a queued job has not started, as the dispatcher's last admission pass judged it ("needs CPU 4, GPU 0;
    # free CPU 2, GPU 0"); set only on the jobs that pass looked at (the waiting head, jobs backing off), cleared
    # by every state change. Stored so that any API process, and one started after a restart, can say why.
    Column("wait_reason", Text),
    # The queue policy's priority class the job was submitted in (None: an admin's raw priority, or a job from
    # before classes); its value is ``priority``.
    Column("priority_class", String(64)),
    # train.max_hours of the spec, for backfill (a job with a known end may start ahead of a waiting head).
    Column("max_hours", Float),
    # A running job asked to checkpoint and stop for this queued job (preemption); cleared when it is re-queued.
    Column("preempted_by", String(128)),
    # A queued job that a preemption re-queued: the job that preempted it and the step of the checkpoint it wrote
    # (None when its log said none); cleared by its next state change, whose start event says it resumed after it.
    Column("last_preempted_by", String(128)),
    Column("last_preempted_step", Integer),
    # What a scheduling pass judges a queued job by, but its max_hours and past attempts (queue_kind_of): a pass
    # reads of each owner's jobs alike only the first few (Store.schedule). NULL (none given): read by every pass.
    Column("queue_kind", Text),
    Column("idempotency_key", String(200)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    UniqueConstraint("owner", "idempotency_key", name="uq_aeforge_jobs_owner_idempotency_key"),
)
Index("ix_aeforge_jobs_queue", jobs_table.c.state, jobs_table.c.priority.desc(), jobs_table.c.seq)
# Each owner's queued jobs alike, in submission order: what a scheduling pass numbers to read the first few of.
Index(
    "ix_aeforge_jobs_queue_kind",
    jobs_table.c.state,
    jobs_table.c.owner,
    jobs_table.c.priority,
    jobs_table.c.queue_kind,
    jobs_table.c.seq,
)
# Keyset listing, newest first, under each filter (Store.list_jobs); retention's scan of old finished jobs.
Index("ix_aeforge_jobs_state_seq", jobs_table.c.state, jobs_table.c.seq)
Index("ix_aeforge_jobs_owner_seq", jobs_table.c.owner, jobs_table.c.seq)
# A user's listing is always by owner: `aeforge jobs --state failed` of one owner among a million jobs.
Index("ix_aeforge_jobs_owner_state_seq", jobs_table.c.owner, jobs_table.c.state, jobs_table.c.seq)
Index("ix_aeforge_jobs_name_seq", jobs_table.c.name, jobs_table.c.seq)
Index("ix_aeforge_jobs_finished_at", jobs_table.c.finished_at)

events_table = Table(
    "aeforge_job_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(128), ForeignKey("aeforge_jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("at", UTCDateTime, nullable=False),
    Column("from_state", String(16)),
    Column("to_state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("reason", Text, nullable=False),
)

# The two INSERTs of a submission, built once with their values given at execution: a statement built per call
# with .values(...) is compiled from the cache, but its cache key is walked over every value each time.
_INSERT_JOB = insert(jobs_table)
_INSERT_EVENT = insert(events_table)
# Several submissions' jobs in one statement, their seqs back in the order given (SQLAlchemy's "insertmanyvalues").
_INSERT_JOBS = insert(jobs_table).returning(jobs_table.c.seq, sort_by_parameter_order=True)
# The most submissions one group commit writes: a bound on one transaction's size and on the last one's wait.
GROUP_COMMIT_MAX = 64

schema_table = Table(
    "aeforge_schema",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("migrated_at", UTCDateTime, nullable=False),
)


@dataclass(frozen=True)
class Job:
    seq: int
    id: str
    name: str
    owner: str
    kind: str
    spec_text: str
    spec_json: str
    priority: int
    resources: dict[str, float]
    state: str
    cancel_requested_by: str | None
    attempts: int
    max_attempts: int
    ray_submission_id: str | None
    mlflow_run_id: str | None
    model_version: str | None
    result: dict | None
    error: str | None
    wait_reason: str | None
    priority_class: str | None
    max_hours: float | None
    preempted_by: str | None
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row) -> Job:
        mapping = row._mapping  # a new view at each access of the attribute
        return cls(**{k: mapping[k] for k in cls.__dataclass_fields__})

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self, *, include_spec: bool = False) -> dict[str, Any]:
        # The fields as they are, not dataclasses.asdict's deep copy (a page of 50 jobs spent 4 ms CPU copying):
        # what is made here is serialized, not changed.
        left_out = ("seq", "spec_json") if include_spec else ("seq", "spec_json", "spec_text")
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in left_out}
        for key in ("created_at", "updated_at", "started_at", "finished_at"):
            out[key] = _iso(out[key])
        return out


@dataclass(frozen=True)
class Event:
    id: int
    job_id: str
    at: datetime
    from_state: str | None
    to_state: str
    attempt: int
    reason: str

    @classmethod
    def from_row(cls, row) -> Event:
        return cls(**{k: row._mapping[k] for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["at"] = _iso(self.at)
        return out


@dataclass(frozen=True)
class Holdings:
    """What the admitted (starting or running) jobs hold, as the admission transaction sees it."""

    resources: dict[str, float]
    active_jobs: int


@dataclass(frozen=True)
class Decision:
    """What the dispatcher's policy says about the head of the queue: start it, wait, or fail it for good."""

    action: str  # "start" | "wait" | "reject" | "skip" (not yet: let the jobs behind it be considered)
    reason: str

    @classmethod
    def start(cls, reason: str) -> Decision:
        return cls("start", reason)

    @classmethod
    def wait(cls, reason: str) -> Decision:
        return cls("wait", reason)

    @classmethod
    def reject(cls, reason: str) -> Decision:
        return cls("reject", reason)

    @classmethod
    def skip(cls, reason: str) -> Decision:
        return cls("skip", reason)


@dataclass(frozen=True)
class Admission:
    started: Job | None
    rejected: tuple[Job, ...] = ()
    waiting: Job | None = None
    wait_reason: str | None = None


@dataclass(frozen=True)
class QueuePlace:
    """Where a queued job stands: how many queued jobs go before it (priority, then submission order), and the
    job among them that the dispatcher's last pass stopped at (the waiting head), if that is not the job itself."""

    jobs_ahead: int
    blocked_by: Job | None


@dataclass(frozen=True)
class QueuedRow:
    """The columns of a queued job a scheduling pass reads (its spec only for a sweep)."""

    seq: int
    id: str
    owner: str
    kind: str
    priority: int
    priority_class: str | None
    resources: dict[str, float]
    max_hours: float | None
    attempts: int
    updated_at: datetime
    wait_reason: str | None
    # The failed attempt's error that re-queued it; None for a new job or one queued again by `aeforge retry`.
    error: str | None
    queue_kind: str | None = None
    # Set when a preemption re-queued it (the columns of the same names).
    last_preempted_by: str | None = None
    last_preempted_step: int | None = None
    spec_json: str | None = None
    # Set when the read left later queued jobs of this row's kind unread (Store.schedule's ``window``): the kind's
    # id, its first job's seq (services.scheduler.QueuedJob.unread_group); and the wait reasons stored on the first
    # and the last of those unread (so that a reason they all have already is not written again).
    unread_group: int | None = None
    unread_reasons: tuple[str | None, str | None] = (None, None)
    # With unread_group: how many of the kind's queued jobs the read left unread.
    unread_count: int = 0


@dataclass(frozen=True)
class Unread:
    """The queued jobs of one kind that a windowed read left unread: how many, and the wait reasons stored on the
    first and the last of them."""

    count: int
    first_reason: str | None
    last_reason: str | None


@dataclass(frozen=True)
class ActiveRow:
    """The columns of an admitted (starting or running) job a scheduling pass and the queue's report read."""

    seq: int
    id: str
    owner: str
    state: str
    priority: int
    priority_class: str | None
    resources: dict[str, float]
    max_hours: float | None
    preempted_by: str | None
    started_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True)
class UsageRow:
    """A finished job's holding over its last attempt: what recent usage is made of."""

    id: str
    owner: str
    resources: dict[str, float]
    started_at: datetime
    finished_at: datetime


@dataclass(frozen=True)
class QueueSnapshot:
    queued: tuple[QueuedRow, ...]
    active: tuple[ActiveRow, ...]
    history: tuple[UsageRow, ...] = ()


@dataclass(frozen=True)
class Scheduled:
    """What a scheduling pass did: the jobs it started and refused, the running jobs it newly asked to stop; and the
    jobs that were admitted (starting or running) when it began."""

    started: list[Job]
    rejected: list[Job]
    preempted: list[str]
    plan: Any
    active: tuple[ActiveRow, ...] = ()


def queue_kind_of(job_id: str, kind: str, priority_class: str | None, resources: dict[str, float]) -> str:
    """What a scheduling pass judges a queued job by, but its max_hours and past attempts: two jobs of one owner and
    priority with the same kind ask for the same and may preempt alike. A sweep's is its own (its resources depend on
    the cluster). The resources as stored (JSON, as the 0006 migration reads them back): equal texts are equal
    resources, and equal resources written in another key order only make two kinds of one."""
    if kind == "sweep":
        return f"sweep:{job_id}"
    return f"{kind}|{priority_class or ''}|{json.dumps(resources)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def submission_id_for(job_id: str, attempt: int) -> str:
    """The Ray submission id of an attempt. Deterministic, so a dispatcher that restarts between claiming and
    submitting finds (or re-creates) exactly one Ray job per attempt; Ray refuses a second one with the same id."""
    return job_id if attempt == 1 else f"{job_id}-attempt-{attempt}"


def add_resources(total: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    out = dict(total)
    for key, value in more.items():
        out[key] = out.get(key, 0.0) + float(value)
    return out


@dataclass(eq=False)
class _PendingSubmission:
    """One submission waiting for a group commit (Store._write_submission)."""

    job: dict[str, Any]
    event: dict[str, Any]
    change: dict[str, Any]
    ready: threading.Event = dataclass_field(
        default_factory=threading.Event
    )  # written (or failed), or this one now leads
    leads: bool = False
    done: bool = False
    seq: int | None = None
    error: BaseException | None = None


class Store:
    """The job table. Thread-safe: each method runs in its own transaction on a pooled connection, but for
    submissions, which concurrent callers commit together (:meth:`_write_submission`)."""

    def __init__(self, url: str, *, migrations: Path = MIGRATIONS_DIR, echo: bool = False):
        self.url = url
        self.engine: Engine = make_engine(url, echo=echo)
        self.dialect = self.engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise StoreError(
                f"AEFORGE_DB_URL: unsupported database {self.dialect!r}; use sqlite:/// or postgresql+psycopg://"
            )
        self.schema_version = migrate(self.engine, migrations)
        self._submissions: list[_PendingSubmission] = []  # waiting for the next group commit, oldest first
        self._submissions_lock = threading.Lock()
        self._submissions_leader = False  # a caller is writing a group now

    def close(self) -> None:
        self.engine.dispose()

    # --- transactions --------------------------------------------------------------------------------------
    @contextmanager
    def _tx(self, *, write: bool = True, lock_key: int | None = None) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            if write and self.dialect == "sqlite":
                # Take SQLite's write lock at BEGIN: a read-then-write transaction that upgraded later could fail
                # with SQLITE_BUSY instead of waiting.
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            # The state changes this transaction makes, counted in the metrics once it has committed.
            changes: list[dict[str, Any]] = []
            conn.info[_CHANGES] = changes
            try:
                with conn.begin():
                    if lock_key is not None and self.dialect == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})
                    yield conn
            finally:
                conn.info.pop(_CHANGES, None)
        for change in changes:
            metrics.record_transition(**change)

    @staticmethod
    def _note_change(conn: Connection, **change: Any) -> None:
        pending = conn.info.get(_CHANGES)
        if pending is not None:
            pending.append(change)

    def _lock_job(self, conn: Connection, job_id: str):
        if not storable(job_id):
            raise JobNotFound(job_id)
        query = select(jobs_table).where(jobs_table.c.id == job_id)
        if self.dialect == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise JobNotFound(job_id)
        return row

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # --- submission ----------------------------------------------------------------------------------------
    def submit(
        self,
        *,
        name: str,
        owner: str,
        kind: str,
        spec_text: str,
        spec_json: str,
        resources: dict[str, float],
        priority: int = 0,
        priority_class: str | None = None,
        max_hours: float | None = None,
        max_attempts: int = 3,
        idempotency_key: str | None = None,
    ) -> tuple[Job, bool]:
        """A new queued job and its first event; with an idempotency key already used by this owner, the job
        made then (and False)."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        for field, value in (
            ("name", name),
            ("owner", owner),
            ("kind", kind),
            ("spec_text", spec_text),
            ("spec_json", spec_json),
            ("idempotency_key", idempotency_key),
        ):
            if value is not None and not storable(value):
                raise InvalidValue(field, "cannot be stored: it holds a NUL (\\x00) or a lone surrogate")
        if idempotency_key is not None:
            existing = self._by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                return existing, False
        now = utcnow()
        job_id = new_job_id(name)
        values: dict[str, Any] = dict(
            id=job_id,
            name=name,
            owner=owner,
            kind=kind,
            spec_text=spec_text,
            spec_json=spec_json,
            priority=int(priority),
            priority_class=priority_class,
            max_hours=max_hours,
            resources={k: float(v) for k, v in resources.items()},
            state="queued",
            attempts=0,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            created_at=now,
            updated_at=now,
        )
        queue_kind = queue_kind_of(job_id, kind, priority_class, values["resources"])
        how = f"in class {priority_class} (priority {priority})" if priority_class else f"with priority {priority}"
        pending = _PendingSubmission(
            job={**values, "queue_kind": queue_kind},
            event=dict(
                job_id=job_id,
                at=now,
                from_state=None,
                to_state="queued",
                attempt=0,
                reason=f"submitted by {owner} {how}",
            ),
            change=dict(
                from_state=None,
                to_state="queued",
                kind=kind,
                owner=owner,
                at=now,
                created_at=now,
                queued_since=None,
                started_at=None,
                attempt=0,
            ),
        )
        try:
            seq = self._write_submission(pending)
        except IntegrityError:
            # Two submissions with the same key raced; the one that committed first is the job.
            if idempotency_key is not None:
                existing = self._by_idempotency_key(owner, idempotency_key)
                if existing is not None:
                    return existing, False
            raise
        # The row as written (no second query: a submission is one transaction and nothing more).
        unset: dict[str, Any] = {
            name: None for name in Job.__dataclass_fields__ if name not in values and name != "seq"
        }
        return Job(seq=int(seq), **unset, **values), True

    def _write_submission(self, pending: _PendingSubmission) -> int:
        """Group commit: ``pending`` is written with every submission that waits beside it, in one transaction and
        one fsync (SQLite's FULL sync; PostgreSQL's WAL flush), and returns its seq once that has committed: a 201
        still means stored. One caller at a time leads: it takes up to GROUP_COMMIT_MAX waiting submissions (its own
        the first), writes them, then hands the lead to the oldest still waiting, so no caller writes for others
        longer than one group. Alone, a submission is one transaction as before; concurrent ones share the
        commit's cost and stop queueing on SQLite's write lock, whose busy handler sleeps (1-100 ms) between
        tries."""
        with self._submissions_lock:
            self._submissions.append(pending)
            if not self._submissions_leader:
                self._submissions_leader = pending.leads = True
        if not pending.leads:
            pending.ready.wait()
        if not pending.done:  # this caller leads now: the oldest waiting, so its own submission is in this group
            with self._submissions_lock:
                group = self._submissions[:GROUP_COMMIT_MAX]
                del self._submissions[:GROUP_COMMIT_MAX]
            try:
                self._write_group(group)
            finally:
                with self._submissions_lock:
                    following = self._submissions[0] if self._submissions else None
                    if following is None:
                        self._submissions_leader = False
                    else:
                        following.leads = True
                for written in group:
                    written.done = True
                    written.ready.set()
                if following is not None:
                    following.ready.set()
        if pending.error is not None:
            raise pending.error
        assert pending.seq is not None, "a written submission has its seq"
        return pending.seq

    def _write_group(self, group: list[_PendingSubmission]) -> None:
        """Writes each submission's job and first event, all in one transaction; if that fails on a constraint (an
        idempotency key two of them share, or one already stored) each is written alone, so that only the one at
        fault fails."""
        try:
            with self._tx() as conn:
                seqs = conn.execute(_INSERT_JOBS, [p.job for p in group]).scalars().all()
                conn.execute(_INSERT_EVENT, [p.event for p in group])
                for p in group:
                    self._note_change(conn, **p.change)
        except IntegrityError as exc:
            if len(group) == 1:
                group[0].error = exc
                return
            for p in group:
                self._write_group([p])
            return
        except BaseException as exc:  # the database is down, say: every submission in the group gets the error
            for p in group:
                p.error = exc
            return
        for p, seq in zip(group, seqs, strict=True):
            p.seq = int(seq)

    def _by_idempotency_key(self, owner: str, key: str) -> Job | None:
        if not (storable(owner) and storable(key)):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                select(jobs_table).where(jobs_table.c.owner == owner, jobs_table.c.idempotency_key == key)
            ).first()
        return None if row is None else Job.from_row(row)

    # --- reading -------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        if not storable(job_id):  # an id that cannot exist (PostgreSQL would refuse the query itself)
            raise JobNotFound(job_id)
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(job_id)
        return Job.from_row(row)

    def events(self, job_id: str) -> list[Event]:
        if not storable(job_id):
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(events_table).where(events_table.c.job_id == job_id).order_by(events_table.c.id)
            ).all()
        return [Event.from_row(r) for r in rows]

    def list_jobs(
        self,
        *,
        states: Iterable[str] | None = None,
        owner: str | None = None,
        name: str | None = None,
        limit: int = 50,
        offset: int = 0,
        before_seq: int | None = None,
        count_up_to: int | None = None,
    ) -> tuple[list[Job], int]:
        """Newest first; returns one page and the number of jobs that match.

        ``before_seq`` pages by key (the jobs submitted before the one with that ``seq``: the last of the previous
        page), which costs the same at any depth, where ``offset`` reads and skips every row before the page.
        ``count_up_to`` bounds the count (the total is then at most that many: counting a million finished jobs
        for every page costs more than the page)."""
        for field, value in (
            ("limit", limit),
            ("offset", offset),
            ("cursor", before_seq),
            ("count_up_to", count_up_to),
        ):
            if value is None:
                continue
            if not 0 <= value <= MAX_SQL_INT:
                raise InvalidValue(field, f"must be between 0 and {MAX_SQL_INT}, got {value}")
        if any(v is not None and not storable(v) for v in (owner, name)):
            return [], 0  # no stored job has such an owner or name
        c = jobs_table.c
        wanted = sorted(set(states or ()))
        unknown = sorted(set(wanted) - set(STATES))
        if unknown:
            raise ValueError(f"unknown state(s) {', '.join(unknown)}; states are {', '.join(STATES)}")
        conditions: list[ColumnElement[bool]] = []
        if owner is not None:
            conditions.append(c.owner == owner)
        if name is not None:
            conditions.append(c.name == name)
        page_conditions = list(conditions)
        # seq is a 32-bit integer on PostgreSQL: a cursor past its range is before no job (and a bigger parameter is
        # an error there), so it sets no bound.
        if before_seq is not None and before_seq <= MAX_SEQ:
            page_conditions.append(c.seq < before_seq)
        counted = select(c.seq).where(*conditions, *([c.state.in_(wanted)] if wanted else []))
        if count_up_to is not None:
            counted = counted.limit(count_up_to)

        def newest(*where: ColumnElement[bool], rows: int):
            return select(jobs_table).where(*page_conditions, *where).order_by(c.seq.desc()).limit(rows)

        if len(wanted) <= 1:
            page = newest(*(c.state == s for s in wanted), rows=limit).offset(offset)
        else:
            # Each state's newest jobs are an index range ((state, seq), (owner, state, seq)); "state IN (...)
            # ORDER BY seq" is not one, and walks the table newest first until a page matches (the whole table,
            # for the few active jobs among a million finished). So: each state's page, merged.
            # Only the seqs go through the merge (a statement of whole rows three times over cost 3 ms CPU to build).
            rows = min(offset + limit, MAX_SQL_INT)
            per_state = [
                select(c.seq).where(*page_conditions, c.state == s).order_by(c.seq.desc()).limit(rows).subquery()
                for s in wanted
            ]
            merged = union_all(*(select(p.c.seq) for p in per_state)).subquery()
            chosen = select(merged.c.seq).order_by(merged.c.seq.desc()).limit(limit).offset(offset)
            page = select(jobs_table).where(c.seq.in_(chosen)).order_by(c.seq.desc())
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(counted.subquery())).scalar_one()
            found = conn.execute(page).all()
        return [Job.from_row(r) for r in found], int(total)

    def purge_finished(
        self,
        finished_before: datetime,
        batch: int = 500,
        before_delete: Callable[[list[tuple[Job, list[Event]]]], None] | None = None,
    ) -> int:
        """Delete up to ``batch`` jobs that finished before ``finished_before``, oldest first, with their events, in
        one short transaction (no admission lock: the dispatcher's passes go on between batches); returns how many.
        ``before_delete`` gets the jobs and events first (an archive): if it raises, nothing is deleted. A job
        retried since it finished is queued again and is not touched."""
        query = (
            select(jobs_table)
            .where(jobs_table.c.finished_at < finished_before, jobs_table.c.state.in_(TERMINAL_STATES))
            .order_by(jobs_table.c.finished_at)
            .limit(batch)
        )
        if self.dialect == "postgresql":
            # Rows a retry holds are left for the next batch; those taken here cannot be retried meanwhile.
            query = query.with_for_update(skip_locked=True)
        with self._tx() as conn:
            rows = conn.execute(query).all()
            if not rows:
                return 0
            ids = [r.id for r in rows]
            if before_delete is not None:
                events = conn.execute(
                    select(events_table).where(events_table.c.job_id.in_(ids)).order_by(events_table.c.id)
                ).all()
                by_job: dict[str, list[Event]] = {job_id: [] for job_id in ids}
                for row in events:
                    by_job[row.job_id].append(Event.from_row(row))
                before_delete([(Job.from_row(r), by_job[r.id]) for r in rows])
            conn.execute(delete(events_table).where(events_table.c.job_id.in_(ids)))
            conn.execute(
                delete(jobs_table).where(
                    jobs_table.c.seq.in_([r.seq for r in rows]), jobs_table.c.state.in_(TERMINAL_STATES)
                )
            )
        return len(rows)

    def active_counts(self) -> list[tuple[str, str, str, str | None, int]]:
        """(state, owner, kind, priority class, jobs) for the queued, starting and running jobs: one grouped count
        per state, each over the queue index, whatever the number of finished jobs."""
        c = jobs_table.c
        query = union_all(
            *(
                select(c.state, c.owner, c.kind, c.priority_class, func.count())
                .where(c.state == state)
                .group_by(c.state, c.owner, c.kind, c.priority_class)
                for state in ("queued", *ACTIVE_STATES)
            )
        )
        with self.engine.connect() as conn:
            return [(r[0], r[1], r[2], r[3], int(r[4])) for r in conn.execute(query).all()]

    def active_jobs(self) -> list[Job]:
        with self.engine.connect() as conn:
            rows = conn.execute(_per_active_state(select(jobs_table))).all()
        return sorted((Job.from_row(r) for r in rows), key=lambda job: job.seq)

    # --- state changes -------------------------------------------------------------------------------------
    def transition(
        self,
        job_id: str,
        to_state: str,
        reason: str,
        *,
        expect: Iterable[str],
        attempt: int | None = None,
        **fields: Any,
    ) -> Job | None:
        """Move a job to ``to_state`` if it is in one of ``expect`` (and, given ``attempt``, still on that
        attempt); returns the updated job, or None when it had moved on (another dispatcher got there first)."""
        if to_state not in STATES:
            raise ValueError(f"unknown state {to_state!r}")
        unknown_fields = set(fields) - set(jobs_table.c.keys())
        if unknown_fields:
            raise ValueError(f"not job columns: {', '.join(sorted(unknown_fields))}")
        expect = tuple(expect)
        with self._tx() as conn:
            row = self._lock_job(conn, job_id)
            if row.state not in expect or (attempt is not None and row.attempts != attempt):
                return None
            self._apply(conn, row, to_state, reason, fields)
        return self.get(job_id)

    def _apply(self, conn: Connection, row, to_state: str, reason: str, fields: dict[str, Any]) -> None:
        if to_state not in TRANSITIONS[row.state]:
            raise InvalidTransition(f"job {row.id} cannot go from {row.state} to {to_state}")
        now = utcnow()
        values: dict[str, Any] = {
            "state": to_state,
            "updated_at": now,
            "wait_reason": None,
            "preempted_by": None,
            "last_preempted_by": None,
            "last_preempted_step": None,
        }
        if to_state == "running":
            values["started_at"] = now
        if to_state in TERMINAL_STATES:
            values["finished_at"] = now
        if to_state == "queued":
            values["finished_at"] = None
        values.update(fields)
        attempts = values.get("attempts", row.attempts)
        result = conn.execute(
            update(jobs_table).where(jobs_table.c.id == row.id, jobs_table.c.state == row.state).values(**values)
        )
        if result.rowcount != 1:  # unreachable while the row is locked; kept so a lost update cannot pass silently
            raise StoreError(f"job {row.id} changed during its own transition")
        self._event(conn, row.id, row.state, to_state, attempts, reason, now)
        self._note_change(
            conn,
            from_state=row.state,
            to_state=to_state,
            kind=row.kind,
            owner=row.owner,
            at=now,
            created_at=row.created_at,
            queued_since=row.updated_at if row.state == "queued" else None,  # a queued row changes only on leaving
            started_at=values.get("started_at", row.started_at),
            attempt=attempts,
        )

    def _event(
        self,
        conn: Connection,
        job_id: str,
        from_state: str | None,
        to_state: str,
        attempt: int,
        reason: str,
        at: datetime,
    ) -> None:
        conn.execute(
            _INSERT_EVENT,
            {
                "job_id": job_id,
                "at": at,
                "from_state": from_state,
                "to_state": to_state,
                "attempt": attempt,
                "reason": reason,
            },
        )

    def request_cancel(self, job_id: str, by: str) -> Job:
        """A queued job is cancelled at once; a starting or running one is marked for the dispatcher to stop."""
        with self._tx() as conn:
            row = self._lock_job(conn, job_id)
            if row.state == "queued":
                self._apply(conn, row, "cancelled", f"cancelled by {by} while queued", {})
            elif row.state in ACTIVE_STATES:
                if row.cancel_requested_by is None:
                    conn.execute(
                        update(jobs_table)
                        .where(jobs_table.c.id == job_id)
                        .values(cancel_requested_by=by, updated_at=utcnow())
                    )
            else:
                raise InvalidTransition(f"job {job_id} is already {row.state}")
        return self.get(job_id)

    def retry(self, job_id: str, by: str) -> Job:
        """A failed or cancelled job back to the queue with one more attempt; it resumes from its checkpoint."""
        with self._tx() as conn:
            row = self._lock_job(conn, job_id)
            if row.state not in ("failed", "cancelled"):
                raise InvalidTransition(f"only a failed or cancelled job can be retried; job {job_id} is {row.state}")
            self._apply(
                conn,
                row,
                "queued",
                f"retried by {by}",
                {
                    "max_attempts": max(row.max_attempts, row.attempts + 1),
                    "cancel_requested_by": None,
                    "error": None,
                },
            )
        return self.get(job_id)

    # --- admission -----------------------------------------------------------------------------------------
    def admit(self, decide: Callable[[Job, Holdings], Decision], batch: int = 8) -> Admission:
        """Walk the queue (priority, higher first, then submission order) and let ``decide`` start, reject or
        wait on each head in turn; at most one job is started per call. Atomic across dispatchers.

        The reason of each "wait" or "skip" is stored on its job (``wait_reason``, written only when it changed);
        a walk that ends without starting a job clears the reasons left on jobs it did not reach, so that only the
        jobs this walk judged carry one."""
        rejected: list[Job] = []
        skipped: list[int] = []
        with self._tx(lock_key=ADMISSION_LOCK_KEY) as conn:
            holdings = self._holdings(conn)
            while True:
                query = (
                    select(jobs_table)
                    .where(jobs_table.c.state == "queued")
                    .order_by(jobs_table.c.priority.desc(), jobs_table.c.seq)
                    .limit(batch)
                )
                if skipped:
                    query = query.where(jobs_table.c.seq.not_in(skipped))
                if self.dialect == "postgresql":
                    query = query.with_for_update(skip_locked=True)
                rows = conn.execute(query).all()
                if not rows:
                    self._clear_wait_reasons(conn, keep=skipped)
                    return Admission(started=None, rejected=tuple(rejected))
                for row in rows:
                    job = Job.from_row(row)
                    decision = decide(job, holdings)
                    if decision.action == "reject":
                        self._apply(conn, row, "failed", decision.reason, {"error": decision.reason})
                        rejected.append(job)
                        continue
                    if decision.action == "skip":
                        self._note_wait(conn, job, decision.reason)
                        skipped.append(row.seq)
                        continue
                    if decision.action == "wait":
                        self._note_wait(conn, job, decision.reason)
                        self._clear_wait_reasons(conn, keep=[*skipped, row.seq])
                        return Admission(
                            started=None, rejected=tuple(rejected), waiting=job, wait_reason=decision.reason
                        )
                    if decision.action != "start":
                        raise ValueError(f"unknown admission decision {decision.action!r}")
                    attempt = row.attempts + 1
                    self._apply(
                        conn,
                        row,
                        "starting",
                        decision.reason,
                        {
                            "attempts": attempt,
                            "ray_submission_id": submission_id_for(row.id, attempt),
                        },
                    )
                    started = Job.from_row(conn.execute(select(jobs_table).where(jobs_table.c.id == row.id)).one())
                    return Admission(started=started, rejected=tuple(rejected))

    def schedule(
        self,
        plan_for: Callable[[QueueSnapshot], Any],
        *,
        history_since: datetime | None = None,
        window: int | None = None,
    ) -> Scheduled:
        """One scheduling pass, atomic across dispatchers: read the queue, the admitted jobs and (from
        ``history_since``) the finished ones, let ``plan_for`` decide (a services.scheduler.Plan), and apply the
        decision in the same transaction: start, refuse, mark running jobs to be preempted, store every reason.

        Only what a pass needs is read of the queued jobs (not their specs, but a sweep's, whose concurrency depends
        on the cluster), so that a pass over ten thousand queued jobs stays short. With ``window``, of each owner's
        queued jobs alike (priority and queue_kind: class, kind, resources) only the first ``window`` are read;
        where the plan says that those unread could have changed it (``plan.reread``: kinds), the pass is made
        again with sixteen times as many of those kinds read (after MAX_REREADS rounds, with every queued job). The
        jobs left unread get the reason the plan gives for them (``plan.unread_waits``), written where it changed."""
        with self._tx(lock_key=ADMISSION_LOCK_KEY) as conn:
            snapshot = self._snapshot(conn, history_since, window=window)
            plan = plan_for(snapshot)
            wider: dict[tuple, int] = {}  # (owner, priority, queue_kind): how many to read of it
            rounds = 0
            while window is not None and plan.reread:
                rounds += 1
                if rounds > MAX_REREADS:
                    window = None
                else:
                    for row in snapshot.queued:
                        if row.unread_group in plan.reread:
                            wider[(row.owner, row.priority, row.queue_kind)] = window * 16**rounds
                queued = self._queued_rows(conn, window, wider, _stopping_for(snapshot.active))
                snapshot = QueueSnapshot(queued=queued, active=snapshot.active, history=snapshot.history)
                plan = plan_for(snapshot)
            queued = snapshot.queued
            by_id = {row.id: row for row in queued}
            started: list[Job] = []
            rejected: list[Job] = []
            for start in plan.starts:
                row = self._lock_job(conn, start.job_id)
                if row.state != "queued":  # cancelled meanwhile (under its own row lock)
                    continue
                attempt = row.attempts + 1
                self._apply(
                    conn,
                    row,
                    "starting",
                    start.reason,
                    {"attempts": attempt, "ray_submission_id": submission_id_for(row.id, attempt)},
                )
                started.append(Job.from_row(conn.execute(select(jobs_table).where(jobs_table.c.id == row.id)).one()))
            for job_id, reason in plan.rejects.items():
                row = self._lock_job(conn, job_id)
                if row.state == "queued":
                    self._apply(conn, row, "failed", reason, {"error": reason})
                    rejected.append(Job.from_row(row))
            preempted: list[str] = []
            if plan.preemptions:  # one statement: a pass may preempt hundreds of jobs at once
                preemptor = {p.victim_id: p.by_job_id for p in plan.preemptions}
                marked = set(
                    conn.execute(
                        update(jobs_table)
                        .where(
                            jobs_table.c.id.in_(list(preemptor)),
                            jobs_table.c.state.in_(ACTIVE_STATES),
                            jobs_table.c.preempted_by.is_(None),
                        )
                        .values(preempted_by=case(preemptor, value=jobs_table.c.id))
                        .returning(jobs_table.c.id)
                    ).scalars()
                )
                preempted = [p.victim_id for p in plan.preemptions if p.victim_id in marked]
            changed = [
                {"b_seq": waiting.seq, "b_reason": reason}
                for job_id, reason in plan.waits.items()
                if (waiting := by_id.get(job_id)) is not None and waiting.wait_reason != reason
            ]
            if changed:  # one statement, many parameter sets: a pass may change thousands of reasons
                conn.execute(
                    update(jobs_table)
                    .where(jobs_table.c.seq == bindparam("b_seq"), jobs_table.c.state == "queued")
                    .values(wait_reason=bindparam("b_reason"))
                    .execution_options(synchronize_session=False),
                    changed,
                )
            last_read: dict[int, QueuedRow] = {}
            for row in queued:  # in submission order: the last one of each kind stays
                if row.unread_group is not None:
                    last_read[row.unread_group] = row
            unread = []
            for group, reason in plan.unread_waits.items():
                last = last_read[group]
                if last.unread_reasons != (reason, reason):
                    unread.append(
                        {
                            "b_owner": last.owner,
                            "b_priority": last.priority,
                            "b_kind": last.queue_kind,
                            "b_after": last.seq,
                            "b_reason": reason,
                        }
                    )
            if unread:  # the jobs of a kind the pass did not read wait behind the last one it read
                conn.execute(
                    update(jobs_table)
                    .where(
                        jobs_table.c.state == "queued",
                        jobs_table.c.owner == bindparam("b_owner"),
                        jobs_table.c.priority == bindparam("b_priority"),
                        jobs_table.c.queue_kind == bindparam("b_kind"),
                        jobs_table.c.seq > bindparam("b_after"),
                    )
                    .values(wait_reason=bindparam("b_reason"))
                    .execution_options(synchronize_session=False),
                    unread,
                )
                # A job read on its own among them (one running jobs stop for) keeps the reason the pass gave it.
                kinds = {(u["b_owner"], u["b_priority"], u["b_kind"]): u["b_after"] for u in unread}
                own = [
                    {"b_seq": row.seq, "b_reason": plan.waits[row.id]}
                    for row in queued
                    if row.unread_group is None
                    and row.id in plan.waits
                    and row.seq > kinds.get((row.owner, row.priority, row.queue_kind), row.seq)
                ]
                if own:
                    conn.execute(
                        update(jobs_table)
                        .where(jobs_table.c.seq == bindparam("b_seq"))
                        .values(wait_reason=bindparam("b_reason"))
                        .execution_options(synchronize_session=False),
                        own,
                    )
        return Scheduled(started=started, rejected=rejected, preempted=preempted, plan=plan, active=snapshot.active)

    def snapshot(self, *, history_since: datetime | None = None) -> QueueSnapshot:
        """What a scheduling pass would see now, read without deciding anything (``aeforge queue``, GET /queue)."""
        with self.engine.connect() as conn:
            return self._snapshot(conn, history_since)

    def _snapshot(
        self, conn: Connection, history_since: datetime | None, *, window: int | None = None
    ) -> QueueSnapshot:
        active = tuple(
            sorted(
                (
                    # By position: a Row's mapping costs more than the rest of the pass's reading of it.
                    # (mypy cannot count a Row's columns: _ACTIVE_COLUMNS lists them in ActiveRow's order.)
                    ActiveRow(*r[:_ACTIVE_RESOURCES], resources_of(r[_ACTIVE_RESOURCES]), *r[_ACTIVE_RESOURCES + 1 :])  # type: ignore[call-arg]
                    for r in conn.execute(_per_active_state(select(*_ACTIVE_COLUMNS))).all()
                ),
                key=lambda job: job.seq,
            )
        )
        queued = self._queued_rows(conn, window, stopping_for=_stopping_for(active))
        history: tuple[UsageRow, ...] = ()
        if history_since is not None:
            history = tuple(
                UsageRow(*r)
                for r in conn.execute(
                    select(
                        jobs_table.c.id,
                        jobs_table.c.owner,
                        jobs_table.c.resources,
                        jobs_table.c.started_at,
                        jobs_table.c.finished_at,
                    ).where(
                        jobs_table.c.state.in_(TERMINAL_STATES),
                        jobs_table.c.finished_at > history_since,
                        jobs_table.c.started_at.is_not(None),
                    )
                ).all()
            )
        return QueueSnapshot(queued=queued, active=active, history=history)

    def _queued_rows(
        self,
        conn: Connection,
        window: int | None,
        wider: dict[tuple, int] | None = None,
        stopping_for: Sequence[str] = (),
    ) -> tuple[QueuedRow, ...]:
        """The queued jobs in submission order; with ``window``, of each owner's jobs alike (priority, queue_kind)
        only the first ``window`` (``wider``: more of some kinds), and every job with no queue_kind or that running
        jobs are stopping for (its reservation of what they give back is part of the pass)."""
        queued = jobs_table.c.state == "queued"
        groups: dict[int, tuple[int, Unread]] = {}
        if window is None:
            rows = list(conn.execute(select(*_QUEUED_COLUMNS).where(queued)).all())
        else:
            # A job running jobs stop for is read on its own, and not counted in its kind's window.
            firsts = self._first_of_each_kind(conn, window, stopping_for)
            for key, n in (wider or {}).items():
                if key in firsts:
                    firsts[key] = self._first_of_kind(conn, key, n, stopping_for)
            rows = []
            for read, unread in firsts.values():
                rows += read
                if unread is not None:
                    groups.update({r[_SEQ]: (read[0][_SEQ], unread) for r in read})
            read_seqs = {r[_SEQ] for r in rows}
            also: ColumnElement[bool] = jobs_table.c.queue_kind.is_(None)
            if stopping_for:
                also = also | jobs_table.c.id.in_(sorted(stopping_for))
            rows += [
                r for r in conn.execute(select(*_QUEUED_COLUMNS).where(queued, also)).all() if r[_SEQ] not in read_seqs
            ]
        rows.sort(key=lambda r: r[_SEQ])
        sweeps = [r[_SEQ] for r in rows if r[_KIND] == "sweep"]
        sweep_specs: dict[int, str] = {}
        if sweeps:
            sweep_specs = dict(
                conn.execute(select(jobs_table.c.seq, jobs_table.c.spec_json).where(jobs_table.c.seq.in_(sweeps))).all()
            )
        out = []
        for r in rows:
            group, unread = groups.get(r[_SEQ], (None, Unread(0, None, None)))
            out.append(
                # By position (mypy cannot count a Row's columns): _QUEUED_COLUMNS lists them in QueuedRow's order.
                QueuedRow(  # type: ignore[call-arg, misc]
                    *r[:_RESOURCES],
                    resources_of(r[_RESOURCES]),
                    *r[_RESOURCES + 1 :],
                    spec_json=sweep_specs.get(r[_SEQ]),
                    unread_group=group,
                    unread_reasons=(unread.first_reason, unread.last_reason),
                    unread_count=unread.count,
                )
            )
        return tuple(out)

    def _first_of_kind(
        self, conn: Connection, key: tuple, n: int, stopping_for: Sequence[str] = ()
    ) -> tuple[list, Unread | None]:
        """The first ``n`` queued jobs of one kind (owner, priority, queue_kind) and, when it has more, how many and
        the wait reasons of the first and the last of those (as _first_of_each_kind)."""
        owner, priority, queue_kind = key
        of_kind = select(*_QUEUED_COLUMNS).where(
            jobs_table.c.state == "queued",
            jobs_table.c.owner == owner,
            jobs_table.c.priority == priority,
            jobs_table.c.queue_kind == queue_kind,
            jobs_table.c.id.not_in(list(stopping_for)),
        )
        # Ordered as ix_aeforge_jobs_queue_kind is, so that the database reads that index's range for the kind.
        in_index = [jobs_table.c[name] for name in ("state", "owner", "priority", "queue_kind", "seq")]
        rows = list(conn.execute(of_kind.order_by(*in_index).limit(n + 1)).all())
        if len(rows) <= n:
            return rows, None
        last = conn.execute(of_kind.order_by(*(c.desc() for c in in_index)).limit(1)).one()
        count = conn.execute(
            select(func.count()).select_from(of_kind.where(jobs_table.c.seq >= rows[n][_SEQ]).subquery())
        ).scalar_one()
        return rows[:n], Unread(int(count), rows[n][_WAIT], last[_WAIT])

    def _first_of_each_kind(
        self, conn: Connection, window: int, stopping_for: Sequence[str] = ()
    ) -> dict[tuple, tuple[list, Unread | None]]:
        """Per (owner, priority, queue_kind) of the queued jobs: its first ``window`` jobs in submission order (the
        QueuedRow columns) and, when it has more, how many and the wait reasons of the first and the last of those
        (else None).
        On PostgreSQL a skip scan of ix_aeforge_jobs_queue_kind (each kind found by one index probe after the
        previous one, its jobs by three more): the read costs the number of kinds, not of queued jobs. On SQLite
        (in-process, no LATERAL) the queued jobs are numbered per kind by window functions."""
        firsts: dict[tuple, tuple[list, Unread | None]] = {}
        if self.dialect == "postgresql":
            extra: list[ColumnElement[Any]] = [
                column("unread_seq", Integer),
                column("first_unread", Text),
                column("last_unread", Text),
                column("unread_count", Integer),
            ]
            query = text(_FIRST_OF_EACH_KIND_PG).columns(*_QUEUED_COLUMNS, *extra)
            for r in conn.execute(query, {"n": window, "stopping_for": list(stopping_for)}).all():
                key = (r.owner, r.priority, r.queue_kind)
                unread = None if r.unread_seq is None else Unread(r.unread_count, r.first_unread, r.last_unread)
                firsts.setdefault(key, ([], unread))[0].append(r[: len(_QUEUED_COLUMNS)])
        else:
            alike = [jobs_table.c.owner, jobs_table.c.priority, jobs_table.c.queue_kind]
            numbered = (
                select(
                    *_QUEUED_COLUMNS,
                    func.row_number().over(partition_by=alike, order_by=jobs_table.c.seq).label("place"),
                    func.row_number().over(partition_by=alike, order_by=jobs_table.c.seq.desc()).label("from_end"),
                )
                .where(
                    jobs_table.c.state == "queued",
                    jobs_table.c.queue_kind.is_not(None),
                    jobs_table.c.id.not_in(list(stopping_for)),
                )
                .subquery()
            )
            found = conn.execute(
                select(numbered)
                .where((numbered.c.place <= window + 1) | (numbered.c.from_end == 1))
                .order_by(numbered.c.seq)
            ).all()
            peeks: dict[tuple, list] = defaultdict(list)
            for r in found:
                key = (r.owner, r.priority, r.queue_kind)
                if r.place <= window:
                    firsts.setdefault(key, ([], None))[0].append(r[: len(_QUEUED_COLUMNS)])
                else:
                    peeks[key].append(r)  # the first one unread (counting from it to the end), then the last one
            for key, (first, *rest) in peeks.items():
                firsts[key] = (
                    firsts[key][0],
                    Unread(first.from_end, first.wait_reason, (rest or [first])[-1].wait_reason),
                )
        return firsts

    def _note_wait(self, conn: Connection, job: Job, reason: str) -> None:
        """Store why ``job`` waits (no event: it is not a state change), unless it says that already."""
        if job.wait_reason != reason:
            conn.execute(
                update(jobs_table)
                .where(jobs_table.c.seq == job.seq, jobs_table.c.state == "queued")
                .values(wait_reason=reason)
            )

    def _clear_wait_reasons(self, conn: Connection, keep: Sequence[int]) -> None:
        query = update(jobs_table).where(jobs_table.c.state == "queued", jobs_table.c.wait_reason.is_not(None))
        if keep:
            query = query.where(jobs_table.c.seq.not_in(list(keep)))
        conn.execute(query.values(wait_reason=None))

    def queue_place(self, job: Job) -> QueuePlace:
        """How many queued jobs go before ``job`` and, when the dispatcher is waiting on one of them, which (the
        last one ahead that carries a wait reason: the walk stops at the job it waits for)."""
        ahead = (jobs_table.c.state == "queued") & (
            (jobs_table.c.priority > job.priority)
            | ((jobs_table.c.priority == job.priority) & (jobs_table.c.seq < job.seq))
        )
        with self.engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(jobs_table).where(ahead)).scalar_one()
            row = conn.execute(
                select(jobs_table)
                .where(ahead, jobs_table.c.wait_reason.is_not(None))
                .order_by(jobs_table.c.priority, jobs_table.c.seq.desc())
                .limit(1)
            ).first()
        return QueuePlace(jobs_ahead=int(count), blocked_by=None if row is None else Job.from_row(row))

    def _holdings(self, conn: Connection) -> Holdings:
        rows = conn.execute(_per_active_state(select(jobs_table.c.resources))).all()
        held: dict[str, float] = {}
        for (resources,) in rows:
            held = add_resources(held, resources or {})
        return Holdings(resources=held, active_jobs=len(rows))

    def holdings(self) -> Holdings:
        with self.engine.connect() as conn:
            return self._holdings(conn)


# The first window + 1 queued jobs of each kind (owner, priority, queue_kind) and the last one: a recursive CTE walks
# the kinds in the order of ix_aeforge_jobs_queue_kind, one probe from each to the next (a "loose index scan").
_FIRST_OF_EACH_KIND_PG = """
WITH RECURSIVE kinds AS (
    (SELECT owner, priority, queue_kind FROM aeforge_jobs
     WHERE state = 'queued' AND queue_kind IS NOT NULL
     ORDER BY state, owner, priority, queue_kind LIMIT 1)
    UNION ALL
    SELECT next.owner, next.priority, next.queue_kind FROM kinds, LATERAL (
        SELECT owner, priority, queue_kind FROM aeforge_jobs
        WHERE state = 'queued' AND queue_kind IS NOT NULL
          AND (owner, priority, queue_kind) > (kinds.owner, kinds.priority, kinds.queue_kind)
        ORDER BY state, owner, priority, queue_kind LIMIT 1
    ) AS next
), ends AS (
    SELECT kinds.owner, kinds.priority, kinds.queue_kind,
           peek.seq AS unread_seq, peek.wait_reason AS first_unread, last.wait_reason AS last_unread,
           unread.count AS unread_count
    FROM kinds
    LEFT JOIN LATERAL (
        SELECT seq, wait_reason FROM aeforge_jobs
        WHERE state = 'queued' AND owner = kinds.owner AND priority = kinds.priority AND queue_kind = kinds.queue_kind
          AND id <> ALL(:stopping_for)
        ORDER BY state, owner, priority, queue_kind, seq OFFSET :n LIMIT 1
    ) AS peek ON true
    LEFT JOIN LATERAL (
        SELECT wait_reason FROM aeforge_jobs
        WHERE peek.seq IS NOT NULL
          AND state = 'queued' AND owner = kinds.owner AND priority = kinds.priority AND queue_kind = kinds.queue_kind
          AND id <> ALL(:stopping_for)
        ORDER BY state DESC, owner DESC, priority DESC, queue_kind DESC, seq DESC LIMIT 1
    ) AS last ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS count FROM aeforge_jobs
        WHERE peek.seq IS NOT NULL
          AND state = 'queued' AND owner = kinds.owner AND priority = kinds.priority AND queue_kind = kinds.queue_kind
          AND seq >= peek.seq AND id <> ALL(:stopping_for)
    ) AS unread ON true
)
SELECT {job_columns}, ends.unread_seq, ends.first_unread, ends.last_unread, ends.unread_count FROM ends, LATERAL (
    SELECT {columns} FROM aeforge_jobs
    WHERE state = 'queued' AND owner = ends.owner AND priority = ends.priority AND queue_kind = ends.queue_kind
      AND id <> ALL(:stopping_for)
    ORDER BY state, owner, priority, queue_kind, seq LIMIT :n
) AS job
"""


@functools.lru_cache(maxsize=4096)
def _resource_items(stored: str) -> tuple[tuple[str, float], ...]:
    return tuple((str(k), float(v)) for k, v in json.loads(stored).items())


def resources_of(stored: str | None) -> dict[str, float]:
    """A job's resources from their stored JSON text: a pass reads thousands, of a few distinct texts, each parsed
    once (and each job given its own dict)."""
    return dict(_resource_items(stored)) if stored else {}


# What a pass reads of a queued job (QueuedRow, but what the store adds to it), and of an admitted one (ActiveRow):
# the resources as their JSON text (resources_of).
def _pass_columns(names) -> list:
    return [
        cast(jobs_table.c.resources, Text).label("resources") if name == "resources" else jobs_table.c[name]
        for name in names
    ]


_QUEUED_COLUMNS = _pass_columns(
    name
    for name in QueuedRow.__dataclass_fields__
    if name not in ("spec_json", "unread_group", "unread_reasons", "unread_count")
)
_QUEUED_NAMES = [c.name for c in _QUEUED_COLUMNS]
_SEQ, _KIND, _WAIT, _RESOURCES = (_QUEUED_NAMES.index(name) for name in ("seq", "kind", "wait_reason", "resources"))
_ACTIVE_COLUMNS = _pass_columns(ActiveRow.__dataclass_fields__)
_ACTIVE_RESOURCES = list(ActiveRow.__dataclass_fields__).index("resources")
_FIRST_OF_EACH_KIND_PG = _FIRST_OF_EACH_KIND_PG.format(
    columns=", ".join(
        "CAST(resources AS TEXT) AS resources" if c.name == "resources" else c.name for c in _QUEUED_COLUMNS
    ),
    job_columns=", ".join(f"job.{c.name}" for c in _QUEUED_COLUMNS),
)


def _stopping_for(active: Iterable[ActiveRow]) -> list[str]:
    """The queued jobs that running jobs were asked to stop for (preemption)."""
    return sorted({job.preempted_by for job in active if job.preempted_by is not None})


def _per_active_state(query):
    """``query`` restricted to the admitted states, one equality per state: SQLite scans the whole table for
    ``state IN (...)`` but searches the queue index for ``state = ?``, and the queue may hold many thousands."""
    return union_all(*(query.where(jobs_table.c.state == state) for state in ACTIVE_STATES))


# --- engine and schema ---------------------------------------------------------------------------------------


def make_engine(url: str, *, echo: bool = False) -> Engine:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        raise StoreError("AEFORGE_DB_URL: use the psycopg 3 driver, postgresql+psycopg://user@host:port/db")
    if url.startswith("sqlite"):
        if ":memory:" in url or url in ("sqlite://", "sqlite:///"):
            raise StoreError(
                "AEFORGE_DB_URL: an in-memory SQLite database is not shared between the API and the "
                "dispatcher; give a file, sqlite:////path/to/aeforge.db"
            )
        database = url.split("///", 1)[-1].split("?", 1)[0]
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            # pysqlite's own BEGIN handling is off so that _tx can choose BEGIN IMMEDIATE (SQLAlchemy's recipe).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # A 201 promises the job is stored, so every commit is fsynced (FULL), power loss included; WAL keeps
            # that to one append of its log. NORMAL would be faster but may lose the last commits on a power loss;
            # PostgreSQL's group commit is the store for throughput.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True)


@contextmanager
def locked_migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection inside the one transaction a migration runs in: PostgreSQL holds its advisory lock (so two
    services starting at once migrate once, the second finding the work done), SQLite its write lock."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            yield conn


@functools.cache
def _scripts(location: Path):
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(location))


def _alembic_config(location: Path, conn: Connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(location))
    config.attributes["connection"] = conn
    return config


@dataclass(frozen=True)
class Revision:
    id: str
    description: str
    is_head: bool


def migration_history(migrations: Path = MIGRATIONS_DIR) -> list[Revision]:
    """The job store's revisions, oldest first."""
    scripts = _scripts(migrations)
    heads = set(scripts.get_heads())
    return [
        Revision(s.revision, (s.doc or "").strip().splitlines()[0] if s.doc else "", s.revision in heads)
        for s in reversed(list(scripts.walk_revisions()))
    ]


def current_revision(conn: Connection, migrations: Path = MIGRATIONS_DIR) -> str | None:
    """The revision the database is at: Alembic's version table, else (a database made before Alembic) the revision
    its ``aeforge_schema`` version corresponds to, else None (no aeforge tables). A database newer than the code
    (a revision or a version it does not know) is refused with SchemaTooNew."""
    from alembic.runtime.migration import MigrationContext

    head = _scripts(migrations).get_current_head()
    inspector = inspect(conn)
    if inspector.has_table(VERSION_TABLE):
        current = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
        known = {r.id for r in migration_history(migrations)}
        if current is not None and current not in known:
            raise SchemaTooNew(current, head)
        return current
    if not inspector.has_table(schema_table.name):
        return None
    version = conn.execute(select(schema_table.c.version).where(schema_table.c.id == 1)).scalar_one_or_none()
    if version not in LEGACY_REVISIONS:
        raise SchemaTooNew(version, head)
    return LEGACY_REVISIONS[version]


def migrate(engine: Engine, migrations: Path = MIGRATIONS_DIR, target: str = "head") -> str:
    """Bring the database to ``target`` (the newest revision by default) in one transaction under the migration
    lock: an empty database gets every revision, one made before Alembic is stamped at its version first. Returns
    the revision it is at."""
    from alembic import command

    with locked_migration_connection(engine) as conn:
        before = current_revision(conn, migrations)
        config = _alembic_config(migrations, conn)
        if before is not None and not inspect(conn).has_table(VERSION_TABLE):
            command.stamp(config, before)
            log.info("the job store predates Alembic (revision %s); Alembic versions it from now on", before)
        command.upgrade(config, target)
        after = current_revision(conn, migrations)
        if after != before:
            log.info("migrated the job store from revision %s to %s", before or "(empty)", after)
        return after or ""
