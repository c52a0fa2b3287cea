"""The service's Prometheus metrics (``GET /metrics``, prometheus_client's text format).

Three kinds, all named ``aeforge_*``:

- What the job table holds, read from the database at each scrape (:class:`StoreCollector`): jobs per state, owner,
  team, kind and priority class for the states that change (queued, starting, running); the store's connection
  pool. Every service process reads the same table, so these agree across processes: aggregate them with ``max``,
  not ``sum``.
- What happened, counted by this process as it happens (the counters and histograms below): submissions,
  admissions, rejections, retries, preemptions, finished jobs; the dispatcher's pass time, admission latency, time
  from submit to start and from start to end; Ray Jobs API errors; HTTP requests per route. A state change is
  counted by the process that made it, once: add these up over processes (``sum``).
- The process itself (prometheus_client's process collector): RSS, open files, CPU.

A replica is one process (``aeforge serve``: uvicorn with the dispatcher in a thread) or, with
AEFORGE_API_WORKERS > 1, several processes on one port (services.api.ServiceWorkers): then every process writes its
counters and histograms to prometheus_client's multiprocess directory (PROMETHEUS_MULTIPROC_DIR, set by the
supervisor before they start), and whichever process answers ``/metrics`` adds up all of them: the replica is still
one scrape target. Its process collector is left out there (it would describe whichever worker answered).

Labels are bounded: states and kinds are fixed sets, routes are the API's path templates, and owners are capped
(:data:`MAX_OWNER_LABELS`, AEFORGE_METRICS_MAX_OWNERS) with the rest counted as ``other``. A team is the queue
policy's team of the owner (services.policy): a team the policy file names (the admins' few), or ``@owner`` for an
owner no team names (each is a team of their own; without a policy file, every owner), ``other`` for an owner past
the cap. No job id is a label.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from services.policy import Policy, PolicySource

ACTIVE_STATES = ("queued", "starting", "running")
# prometheus_client's multiprocess mode: where each process writes its values (read when prometheus_client is
# imported, so set before a worker process starts).
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"
MAX_OWNER_LABELS = int(os.environ.get("AEFORGE_METRICS_MAX_OWNERS", "100"))

# Seconds: a pass or a database round trip (ms) up to a long queue wait (hours) and a long training run (days).
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200)


class BoundedLabel:
    """The first ``limit`` distinct values keep their name; later ones are ``other`` (bounded series)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


owner_label = BoundedLabel(MAX_OWNER_LABELS)


def team_label(policy: Policy, owner: str) -> str:
    """The owner's team as a label: a team the policy names (bounded by the policy file), else the owner's own team
    ``@owner`` while the owner has a label of their own, ``other`` past the owner cap."""
    team = policy.team_of(owner).name
    if not team.startswith("@"):  # a named team (the policy refuses team names that start with @)
        return team
    return team if owner_label(owner) != OTHER else OTHER


# registry=None: created once per process, registered into each app's registry (make_registry).
# Counted by the API's submit (it knows the owner's team), once the new job is committed.
SUBMISSIONS = Counter(
    "aeforge_job_submissions", "Jobs submitted (queued for the first time)", ["owner", "team", "kind"], registry=None
)
ADMISSIONS = Counter(
    "aeforge_job_admissions", "Attempts admitted to the cluster (queued -> starting)", ["kind"], registry=None
)
REJECTIONS = Counter(
    "aeforge_job_rejections",
    "Submissions refused by the API (stage=submit: invalid spec, forbidden data, bad request) and queued jobs failed "
    "by admission because they can never fit the cluster (stage=admission)",
    ["stage", "reason"],
    registry=None,
)
RETRIES = Counter(
    "aeforge_job_retries",
    "Jobs re-queued for another attempt: cause=failed_attempt (automatic) or user (aeforge retry)",
    ["cause", "kind"],
    registry=None,
)
PREEMPTIONS = Counter(
    "aeforge_job_preemptions",
    "Running jobs stopped to make room for a job of a preempting class (re-queued to resume from a checkpoint)",
    ["kind"],
    registry=None,
)
PURGED = Counter(
    "aeforge_jobs_purged",
    "Finished jobs deleted by retention (AEFORGE_RETENTION_DAYS), with their events",
    registry=None,
)
FINISHED = Counter("aeforge_jobs_finished", "Jobs that reached a final state", ["state", "kind"], registry=None)
DISPATCHER_PASS = Histogram(
    "aeforge_dispatcher_pass_seconds",
    "One dispatcher pass: follow admitted jobs, then admit",
    buckets=FAST_BUCKETS,
    registry=None,
)
DISPATCHER_PASS_FAILURES = Counter(
    "aeforge_dispatcher_pass_failures", "Dispatcher passes that raised (database or Ray down)", registry=None
)
ADMISSION_LATENCY = Histogram(
    "aeforge_admission_latency_seconds",
    "Time an attempt waited in the queue: from (re-)queueing to admission",
    ["kind"],
    buckets=WAIT_BUCKETS,
    registry=None,
)
SUBMIT_TO_START = Histogram(
    "aeforge_job_submit_to_start_seconds",
    "Time from submission to the job's first attempt running on Ray",
    ["kind"],
    buckets=WAIT_BUCKETS,
    registry=None,
)
START_TO_END = Histogram(
    "aeforge_job_start_to_end_seconds",
    "Time from the job running on Ray to its final state",
    ["kind", "state"],
    buckets=WAIT_BUCKETS,
    registry=None,
)
RAY_API_ERRORS = Counter(
    "aeforge_ray_jobs_api_errors",
    "Calls to Ray's Jobs and state APIs that failed: error=unreachable (no answer) or refused (an error answer)",
    ["operation", "error"],
    registry=None,
)
HTTP_REQUESTS = Counter("aeforge_http_requests", "API requests answered", ["method", "route", "status"], registry=None)
HTTP_LATENCY = Histogram(
    "aeforge_http_request_seconds",
    "Time to answer an API request (to the start of the response; a followed log stream is not timed)",
    ["method", "route"],
    buckets=FAST_BUCKETS,
    registry=None,
)

PROCESS_METRICS = (
    SUBMISSIONS,
    ADMISSIONS,
    REJECTIONS,
    RETRIES,
    PREEMPTIONS,
    FINISHED,
    PURGED,
    DISPATCHER_PASS,
    DISPATCHER_PASS_FAILURES,
    ADMISSION_LATENCY,
    SUBMIT_TO_START,
    START_TO_END,
    RAY_API_ERRORS,
    HTTP_REQUESTS,
    HTTP_LATENCY,
)


def record_transition(
    *,
    from_state: str | None,
    to_state: str,
    kind: str,
    owner: str,
    at: datetime,
    created_at: datetime | None,
    queued_since: datetime | None,
    started_at: datetime | None,
    attempt: int,
) -> None:
    """Count one committed state change (services.store calls this after its transaction commits). A submission
    (``from_state`` None) is counted by the API instead (:func:`record_submission`): the store knows no teams."""
    if from_state is None:
        return
    if to_state == "starting" and from_state == "queued":
        ADMISSIONS.labels(kind).inc()
        if queued_since is not None:
            ADMISSION_LATENCY.labels(kind).observe(max(0.0, (at - queued_since).total_seconds()))
    elif to_state == "running" and attempt <= 1 and created_at is not None:
        SUBMIT_TO_START.labels(kind).observe(max(0.0, (at - created_at).total_seconds()))
    elif to_state == "queued":
        cause = "user" if from_state in ("failed", "cancelled") else "failed_attempt"
        RETRIES.labels(cause, kind).inc()
    if to_state in ("succeeded", "failed", "cancelled"):
        FINISHED.labels(to_state, kind).inc()
        if from_state == "queued" and to_state == "failed":
            REJECTIONS.labels("admission", "never_fits").inc()
        if started_at is not None and from_state in ("starting", "running"):
            START_TO_END.labels(kind, to_state).observe(max(0.0, (at - started_at).total_seconds()))


def record_submission(policy: Policy, owner: str, kind: str) -> None:
    """Count one new job, committed, under its owner and the owner's team in ``policy``."""
    SUBMISSIONS.labels(owner_label(owner), team_label(policy, owner), kind).inc()


class StoreCollector:
    """Jobs per state, owner, team, kind and class for the states that change, and the store's connection pool, read
    at each scrape (a grouped count over the queue index: cheap however many finished jobs the table holds). The
    team is the owner's in the policy in force at the scrape: a policy change regroups the jobs at once."""

    def __init__(self, store, policies: PolicySource | None = None):
        self.store = store
        self.policies = policies

    def collect(self) -> Iterable:
        jobs = GaugeMetricFamily(
            "aeforge_jobs",
            "Jobs in each changing state (queued, starting, running), per owner, the owner's team, kind and priority "
            "class",
            labels=["state", "owner", "team", "kind", "class"],
        )
        counts: dict[tuple[str, str, str, str, str], int] = {
            (s, OTHER, OTHER, k, ""): 0 for s in ACTIVE_STATES for k in ("train", "sweep")
        }
        try:
            rows = self.store.active_counts()
        except Exception:  # the database is down: /healthz says so; the gauges are left out, not wrong
            rows = None
        up = GaugeMetricFamily("aeforge_store_up", "1 when the job database answered this scrape")
        up.add_metric([], 0 if rows is None else 1)
        yield up
        if rows is not None:
            policy = self._policy()
            for state, owner, kind, priority_class, count in rows:
                # Classes are the policy's few names (services.policy); none (a raw priority) is "".
                key = (state, owner_label(owner), team_label(policy, owner), kind, priority_class or "")
                counts[key] = counts.get(key, 0) + count
            for labels, count in sorted(counts.items()):
                jobs.add_metric(list(labels), count)
            yield jobs
        yield from self._pool()

    def _policy(self) -> Policy:
        return Policy() if self.policies is None else self.policies.current()

    def _pool(self) -> Iterable:
        pool = self.store.engine.pool
        for name, help_text, getter in (
            ("aeforge_db_pool_size", "Connections the store's pool keeps", "size"),
            ("aeforge_db_pool_checked_out", "Pool connections in use now", "checkedout"),
            ("aeforge_db_pool_overflow", "Connections open beyond the pool's size (negative: room left)", "overflow"),
        ):
            fn = getattr(pool, getter, None)
            if fn is None:
                continue
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], float(fn()))
            yield family


def make_registry(store, policies: PolicySource | None = None) -> CollectorRegistry:
    """A registry for one app: this process's counters and histograms, the store's gauges (teams from ``policies``;
    None: the default policy, every owner a team of their own), the process's own."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROCESS_DIR):  # one of several worker processes: every worker's, added up
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry)
    else:
        for metric in PROCESS_METRICS:
            registry.register(metric)
        registry.register(ProcessCollector(registry=None))
    registry.register(StoreCollector(store, policies))
    return registry
