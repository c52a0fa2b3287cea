"""The dispatcher: admits queued jobs to the Ray cluster and follows their Ray jobs into the store.

One pass (:meth:`Dispatcher.tick`) first follows every admitted job (Ray status -> job state, cancel requests ->
``stop_job``, a Ray job that is gone -> re-queued or failed), then admits from the head of the queue while the
cluster has room. The order is strict: priority (higher first), then submission order, and a head that does not
fit yet is waited for rather than overtaken, so a large job is not starved by a stream of small ones. A job that
could never fit the cluster is failed with what it asked for and what exists.

The cluster and Ray's Jobs API sit behind two small interfaces (:class:`ClusterView`, :class:`JobLauncher`) so
the policy is tested without Ray; :class:`RayClusterView` and :class:`RayJobLauncher` are the real ones.
Everything the job needs reaches it through its runtime environment's variables; nothing secret is written to
the job table, the events or the logs (texts from Ray are passed through :func:`redact`).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shlex
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from jobs import ray_train
from jobs.ray_train import describe_resources, sweep_concurrency  # noqa: F401 (describe_resources re-exported)
from jobs.spec import parse_spec_json
from services import metrics
from services.job_log import RAY_PREFIX, readable_lines
from services.logs import job_fields, redact, secret_values
from services.policy import Policy, PolicySource
from services.scheduler import (
    QueuedJob,
    ResumePoint,
    RunningJob,
    Scheduler,
    decay_factor,
    decayed_usage,
    dominant_share,
)
from services.store import ActiveRow, Decision, Job, QueuedRow, QueueSnapshot, Store, UsageRow, add_resources
from workers.errors import AeforgeError
from workers.job_specs import write_spec_package
from workers.memory_failures import memory_failure
from workers.protocol import PROGRESS_MARK, RESULT_MARK, parse_progress, parse_result  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_S = 600.0
JOB_STOP_WAIT_S = 30
# How Ray reports an entrypoint that exited with code 2 (python -m jobs.run: a spec or data error).
USER_ERROR_EXIT = re.compile(r"\bexit code 2\b")
# Ray job statuses: PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED.
RAY_TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")
# What Ray's Jobs API answers when no dashboard agent can take a submission ("No available agent to submit job",
# "Timed out waiting for an available job agent"): the cluster's state, not the job's.
NO_JOB_AGENT = re.compile(r"\bavailable (job )?agent\b", re.IGNORECASE)
LOG_TAIL_LINES = 20
# An import error as Python prints it at the end of a traceback, or as Ray wraps a task's:
# "ModuleNotFoundError: No module named 'torch'", "ray.exceptions.RayTaskError(ImportError): ...".
IMPORT_ERROR = re.compile(r"^(?:[\w.]+\()?(?:[\w.]*\.)?((?:ModuleNotFound|Import)Error)\)?: (\S.*)$")


class LauncherUnavailable(RuntimeError):
    """Ray's Jobs API could not be reached; nothing can be concluded about the jobs on it."""


class SpecPackageUnwritable(LauncherUnavailable):
    """This machine could not write the package a submission carries (its temporary folder is full or read-only):
    Ray is not the cause, and the job is not at fault either (it stays `starting`, submitted again on a later pass)."""


class SubmissionExists(RuntimeError):
    """Ray already has a job with this submission id (a dispatcher submitted it before it stopped)."""


@dataclass(frozen=True)
class RayJobInfo:
    status: str
    message: str | None = None


class ClusterView(Protocol):
    def total_resources(self) -> dict[str, float]:
        """Resources of the cluster's live nodes ({"CPU": 8.0, "GPU": 1.0, ...}); empty when it is not up."""


class JobLauncher(Protocol):
    def submit(self, submission_id: str, entrypoint: str, env_vars: dict[str, str], spec_json: str) -> None:
        """Start a Ray job that reads ``spec_json`` by reference (workers.job_specs); raises SubmissionExists if
        Ray has that submission id already."""

    def info(self, submission_id: str) -> RayJobInfo | None:
        """The Ray job's status, or None when Ray has no job with that id."""

    def stop(self, submission_id: str) -> None:
        """Ask Ray to stop the job (idempotent)."""

    def logs(self, submission_id: str) -> str:
        """The job's whole log so far ("" when Ray has no such job)."""

    def tail(self, submission_id: str) -> AsyncIterator[str]:
        """The job's log as it is written, until the job ends."""


# --- log lines the job prints (workers.protocol) -------------------------------------------------------------


def model_version_of(result: dict) -> str | None:
    version = result.get("model_version")
    if version is None and isinstance(result.get("model"), dict):
        version = result["model"].get("version")
    return None if version is None else str(version)


def environment_error(logs: str) -> str | None:
    """The import error that failed a job (``ModuleNotFoundError: No module named 'torch'``), from its driver or,
    as Ray reports a worker's, ``RayTaskError(ModuleNotFoundError): ...``; None when its log has none."""
    for line in reversed(readable_lines(logs)):
        found = IMPORT_ERROR.search(RAY_PREFIX.sub("", line, count=1))
        if found:
            return f"{found.group(1)}: {found.group(2).strip()}"
    return None


# --- what a job gets ------------------------------------------------------------------------------------------


def job_environment(
    job: Job, environ: Mapping[str, str] | None = None, allowed_data_prefixes: tuple[str, ...] = ()
) -> dict[str, str]:
    """The variables a job runs with: the settings every job gets (jobs.ray_train.job_environment), and its id,
    attempt and owner; its spec goes by reference (workers.job_specs). No credential: Ray keeps a submission's
    runtime environment in its job records (`ray job list`, the dashboard, runtime_env_agent.log); the job takes the
    Ray node's own."""
    env = ray_train.job_environment(environ)
    env["AEFORGE_JOB_ID"] = job.id
    env["AEFORGE_ATTEMPT"] = str(job.attempts)
    # Seconds Ray waits after its SIGTERM before SIGKILL when the job is stopped: room for a fit's graceful abort.
    env["RAY_JOB_STOP_WAIT_TIME_S"] = str(JOB_STOP_WAIT_S)
    env["AEFORGE_JOB_OWNER"] = job.owner  # whose name the job registers its model under (jobs.registry)
    # What the job's data readers check every local open against (workers.storage.read_access).
    env["AEFORGE_ALLOWED_DATA_PREFIXES"] = ",".join(allowed_data_prefixes)
    return env


def max_hours_of(job: Job) -> float | None:
    """The job's wall-clock limit in hours (``train.max_hours`` of the spec JSON stored at submission), or None."""
    try:
        value = json.loads(job.spec_json).get("train", {}).get("max_hours")
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def entrypoint_for(job_id: str, module: str = "jobs.run", python: str = "python") -> str:
    """The shell command Ray runs as the job's driver: ``python`` (a path, or a name looked up on the node's PATH)
    running the job module."""
    return f"{shlex.quote(python)} -m {module} {shlex.quote(job_id)}"


def subtract(total: Mapping[str, float], held: Mapping[str, float]) -> dict[str, float]:
    return {k: total.get(k, 0.0) - held.get(k, 0.0) for k in set(total) | set(held)}


# Finished jobs older than this many half-lives add under 0.1 % to recent usage: not read.
HISTORY_HALF_LIVES = 10


def recent_usage(
    policy: Policy,
    snapshot: QueueSnapshot,
    total: dict[str, float],
    now: float,
    finished: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Each team's and owner's (``owner:NAME``) decayed recent usage (services.scheduler.decayed_usage): the finished
    jobs' last attempts and the admitted jobs so far, each as its dominant share of today's cluster. ``finished``:
    the finished jobs' part as a FinishedUsage keeps it (then ``snapshot.history`` is not read here)."""
    intervals: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    rows: list[tuple[str, dict[str, float], datetime, datetime | None]] = []
    if finished is None:
        rows += [(r.owner, r.resources, r.started_at, r.finished_at) for r in snapshot.history]
    rows += [(j.owner, j.resources, j.started_at, None) for j in snapshot.active if j.started_at is not None]
    team_names: dict[str, str] = {}
    for owner, resources, started, ended in rows:
        share = dominant_share(resources or {}, total)
        interval = (started.timestamp(), now if ended is None else ended.timestamp(), share)
        if owner not in team_names:
            team_names[owner] = policy.team_of(owner).name
        intervals[team_names[owner]].append(interval)
        intervals[f"owner:{owner}"].append(interval)
    usage = dict(finished or {})
    for key, spans in intervals.items():
        usage[key] = usage.get(key, 0.0) + decayed_usage(spans, now, policy.half_life_s)
    return usage


class FinishedUsage:
    """The finished jobs' part of recent usage, kept by a dispatcher from pass to pass instead of read and summed
    again by each: a pass reads only the jobs that finished since the latest finish it has counted (less OVERLAP_S),
    decays the sums it keeps, one per team and owner, by one factor, and adds the new ones. The same sums as
    recent_usage over the same finished jobs (services.scheduler.decayed_usage: a sum decays as each of its terms
    does), but that a job counted once stays counted: one finished longer than HISTORY_HALF_LIVES ago (under 0.1 %
    each), or purged, or run again by ``aeforge retry`` (its earlier attempt's usage stays with the new one's). A
    change of the policy (teams, half-life) or of the cluster's size (each job's share) starts the sums again from a
    read of the last HISTORY_HALF_LIVES."""

    # A job whose finish is stamped earlier than one already counted, but commits later (another process's
    # transaction), is still read if it is within this many seconds of the latest finish counted.
    OVERLAP_S = 300.0

    def __init__(self) -> None:
        self._basis: tuple[Policy, dict[str, float]] | None = None
        self._sums: dict[str, float] = {}
        self._at = 0.0
        # The jobs counted that finished within OVERLAP_S of the latest (they are read again), with their finish.
        self._counted: dict[str, datetime] = {}
        self._latest: datetime | None = None

    def _same_basis(self, policy: Policy, total: Mapping[str, float]) -> bool:
        return self._basis is not None and self._basis[0] is policy and self._basis[1] == total

    def since(self, policy: Policy, total: Mapping[str, float], now: float) -> datetime:
        """From when the pass is to read finished jobs."""
        if not self._same_basis(policy, total) or self._latest is None:
            return datetime.fromtimestamp(now - HISTORY_HALF_LIVES * policy.half_life_s, UTC)
        return self._latest - timedelta(seconds=self.OVERLAP_S)

    def update(
        self, history: Iterable[UsageRow], policy: Policy, total: Mapping[str, float], now: float
    ) -> dict[str, float]:
        """The sums at ``now``, with the jobs of ``history`` (read from ``since``) that were not counted yet.
        Called again with the same rows (a pass that reads more of the queue plans again), it adds nothing."""
        # What the read from since() left out; a row before it comes from a read made before the last update (the
        # same pass planning again) and was counted then, though no longer listed in _counted.
        floor = None if self._latest is None else self._latest - timedelta(seconds=self.OVERLAP_S)
        if not self._same_basis(policy, total):
            floor = None
            self._basis = (policy, dict(total))
            self._sums, self._counted, self._latest, self._at = {}, {}, None, now
        elif now != self._at:
            factor = decay_factor(now - self._at, policy.half_life_s)
            self._sums = {key: value * factor for key, value in self._sums.items()}
            self._at = now
        team_names: dict[str, str] = {}
        for row in history:
            if (floor is not None and row.finished_at <= floor) or self._counted.get(row.id) == row.finished_at:
                continue
            self._counted[row.id] = row.finished_at
            if self._latest is None or row.finished_at > self._latest:
                self._latest = row.finished_at
            share = dominant_share(row.resources or {}, total)
            usage = decayed_usage(
                [(row.started_at.timestamp(), row.finished_at.timestamp(), share)], now, policy.half_life_s
            )
            if row.owner not in team_names:
                team_names[row.owner] = policy.team_of(row.owner).name
            for key in (team_names[row.owner], f"owner:{row.owner}"):
                self._sums[key] = self._sums.get(key, 0.0) + usage
        if self._latest is not None:
            oldest = self._latest - timedelta(seconds=self.OVERLAP_S)
            self._counted = {job_id: at for job_id, at in self._counted.items() if at >= oldest}
        return dict(self._sums)


# Of each owner's queued jobs of one priority, class and resources, a pass reads this many (Store.schedule);
# more of a kind where what those read did leaves the others open (Plan.reread). 1: the bench's pass at 10,000
# queued jobs took 56-59 ms with 1, 73-126 ms with 2.
QUEUE_WINDOW = 1

# --- the dispatcher -------------------------------------------------------------------------------------------


@dataclass
class TickReport:
    started: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    waiting: str | None = None
    wait_reason: str | None = None
    preempted: list[str] = field(default_factory=list)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        cluster: ClusterView,
        launcher: JobLauncher,
        *,
        max_concurrent_jobs: int | None = None,
        job_module: str = "jobs.run",
        job_python: str = "python",
        environ: Mapping[str, str] | None = None,
        resubmit_after_s: float = 15.0,
        retry_backoff_s: float = 0.0,
        clock: Callable[[], float] = time.time,
        allowed_data_prefixes: tuple[str, ...] = (),
        policies: PolicySource | None = None,
        autoscaler: AutoscalerDemand | None = None,
        cancel_pending_after_s: float = 10.0,
        queue_window: int | None = QUEUE_WINDOW,
    ):
        self.store = store
        self.cluster = cluster
        self.launcher = launcher
        self.max_concurrent_jobs = max_concurrent_jobs
        self.job_module = job_module
        self.job_python = job_python
        self.environ = environ
        # A job claimed (starting) that Ray does not know yet is submitted again only after this long, so that a
        # dispatcher does not race another one that is between its claim and its submission.
        self.resubmit_after_s = resubmit_after_s
        # A failed attempt is tried again after retry_backoff_s x 2^(attempts - 1), plus up to a quarter of that as
        # jitter, not at once: an outage (storage, MLflow, a restarting Ray) then passes before the retries run out.
        self.retry_backoff_s = retry_backoff_s
        self.clock = clock
        self.allowed_data_prefixes = tuple(allowed_data_prefixes)
        # The queue policy (teams, quotas, classes), read again when its file changes.
        self.policies = policies or PolicySource(None)
        # Where the queue's demand goes (Ray's autoscaler); None on a cluster of fixed size.
        self.autoscaler = autoscaler
        # The bundles of the admitted jobs, by job id (a job's spec does not change): asked for with the queue's.
        self._admitted_bundles: dict[str, list[dict[str, float]]] = {}
        self.last_pass_s = 0.0
        # The finished jobs' recent usage, kept from pass to pass (each reads only the jobs finished since).
        self.finished_usage = FinishedUsage()
        # A pass reads of each owner's queued jobs alike (class, resources) only the first queue_window, and more
        # only where those unread could change it (Store.schedule); None: every queued job, every pass (as with an
        # autoscaler, which is told the demand of every waiting job).
        self.queue_window = queue_window
        # A Ray job still PENDING (its driver not started: a runtime env being set up, or failing to) does not act
        # on a stop, which Ray queues behind the driver's start: a cancel of such a job takes effect after this long.
        self.cancel_pending_after_s = cancel_pending_after_s
        self._unreachable_logged = False
        # Texts from Ray (messages, log tails) may echo what the job was given; they are masked before storing.
        self._secrets = sorted(set(secret_values(environ)) | set(secret_values()), key=len, reverse=True)

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    # --- one pass ---------------------------------------------------------------------------------------------
    def tick(self) -> TickReport:
        report = TickReport()
        with metrics.DISPATCHER_PASS.time():
            self.follow(report)
            self.admit(report)
        return report

    def run(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Tick until ``stop`` is set; a failing pass (database or Ray down) is logged and tried again."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                metrics.DISPATCHER_PASS_FAILURES.inc()
                log.exception("dispatcher pass failed; trying again in %.1f s", interval_s)
            stop.wait(interval_s)

    # --- admission --------------------------------------------------------------------------------------------
    def admit(self, report: TickReport | None = None) -> TickReport:
        """One scheduling pass (services.scheduler) in one store transaction; then the started jobs are submitted
        to Ray, the preempted ones asked to stop, and the autoscaler told what the queue still needs."""
        report = report or TickReport()
        try:
            total = {k: float(v) for k, v in self.cluster.total_resources().items()}
        except LauncherUnavailable as exc:
            self._log_unreachable(exc)
            return self._hold_queue(report, f"Ray is not reachable ({self._redact(str(exc))})")
        if not total:
            # No live node (the cluster is starting or gone): nothing can be judged to fit or not.
            return self._hold_queue(report, "the Ray cluster has no live node yet")
        policy = self.policies.current()
        now = self.clock()
        started_at = time.perf_counter()
        # The autoscaler is asked for every waiting job's bundles, unread ones included: with one, the whole queue.
        window = None if self.autoscaler is not None else self.queue_window

        def plan_for(snapshot: QueueSnapshot):
            finished = self.finished_usage.update(snapshot.history, policy, total, now)
            return self.plan(snapshot, total, policy, finished=finished, now=now)

        scheduled = self.store.schedule(
            plan_for, history_since=self.finished_usage.since(policy, total, now), window=window
        )
        self.last_pass_s = time.perf_counter() - started_at
        plan = scheduled.plan
        report.rejected += [j.id for j in scheduled.rejected]
        for job in scheduled.rejected:
            log.warning("job %s failed: %s", job.id, plan.rejects.get(job.id), extra=job_fields(job))
        waiting = [job_id for job_id in plan.order if job_id in plan.waits]
        report.waiting = waiting[0] if waiting else None
        report.wait_reason = plan.waits.get(report.waiting) if report.waiting else None
        report.preempted += scheduled.preempted
        for victim in scheduled.preempted:
            self._preempt(victim)
        for job in scheduled.started:
            report.started.append(job.id)
            self._submit(job)
        if self.autoscaler is not None:
            self._ask_autoscaler(self.autoscaler, scheduled.active, scheduled.started, plan.demand)
        return report

    def _ask_autoscaler(
        self, autoscaler: AutoscalerDemand, active: Sequence[ActiveRow], started: Sequence[Job], demand: Sequence[str]
    ) -> None:
        """Ask for the admitted jobs' bundles and the waiting ones'. Ray's autoscaler fits a request into its nodes as
        if they were idle (the request is a size for the cluster, not more on top of its use): asked for the queue
        alone, it finds the nodes the running jobs hold big enough and adds none; and a job just submitted holds
        nothing until its driver has placed its workers, so its node would be idle, and removed, meanwhile."""
        known = self._admitted_bundles
        self._admitted_bundles = {
            row.id: known[row.id] if row.id in known else job_bundles(self.store.get(row.id)) for row in active
        }
        self._admitted_bundles |= {job.id: job_bundles(job) for job in started}
        bundles = [bundle for each in self._admitted_bundles.values() for bundle in each]
        queued: list[dict[str, float]] = []
        for job_id in demand:
            queued += job_bundles(self.store.get(job_id))
            if len(queued) >= RayAutoscalerDemand.MAX_BUNDLES:
                break
        try:
            autoscaler.request(bundles + queued[: RayAutoscalerDemand.MAX_BUNDLES])
        except Exception as exc:  # the autoscaler is advice: a failed request is tried again next pass
            log.warning("cannot ask Ray's autoscaler for the queue's demand: %s", exc)

    def plan(
        self,
        snapshot: QueueSnapshot,
        total: dict[str, float],
        policy: Policy,
        *,
        finished: Mapping[str, float] | None = None,
        now: float | None = None,
    ):
        """The scheduling pass over a store snapshot (services.scheduler.Scheduler.plan), with what the store rows
        do not say themselves: a sweep's resources on this cluster, a failed attempt's back-off, recent usage (of the
        finished jobs: ``finished``, as FinishedUsage keeps it, or else those of ``snapshot.history``)."""
        now = self.clock() if now is None else now
        queued, refused = [], {}
        for row in snapshot.queued:
            asks, note = row.resources, None
            if row.kind == "sweep" and row.spec_json:
                # A sweep runs as many trials at once as fit, up to its max_concurrent_trials (as its driver does).
                try:
                    _, asks, note = sweep_concurrency(parse_spec_json(row.spec_json, f"job {row.id}"), total)
                except AeforgeError as exc:
                    refused[row.id] = f"can never run here: {exc}"
                    continue
            queued.append(
                QueuedJob(
                    id=row.id,
                    seq=row.seq,
                    owner=row.owner,
                    priority=row.priority,
                    priority_class=row.priority_class,
                    asks=asks,
                    max_hours=row.max_hours,
                    not_before=self.retry_due(row),
                    attempts=row.attempts,
                    note=note or "",
                    unread_group=row.unread_group,
                    unread_count=row.unread_count,
                    resumes_after_preemption=(
                        None
                        if row.last_preempted_by is None
                        else ResumePoint(row.last_preempted_by, row.last_preempted_step)
                    ),
                )
            )
        running = [
            RunningJob(
                id=job.id,
                owner=job.owner,
                priority=job.priority,
                priority_class=job.priority_class,
                holds=job.resources,
                started_at=(job.started_at or job.updated_at).timestamp(),
                max_hours=job.max_hours,
                preempted_by=job.preempted_by,
            )
            for job in snapshot.active
        ]
        scheduler = Scheduler(
            policy,
            total,
            now,
            recent_usage=recent_usage(policy, snapshot, total, now, finished),
            max_concurrent_jobs=self.max_concurrent_jobs,
            elastic=self.autoscaler is not None,
        )
        plan = scheduler.plan(queued, running)
        plan.rejects.update(refused)
        return plan

    def _hold_queue(self, report: TickReport, why: str) -> TickReport:
        """Nothing can be admitted now: the first queued job waits, and says why (its stored wait reason)."""
        admission = self.store.admit(lambda job, holdings: Decision.wait(why))
        report.waiting = admission.waiting.id if admission.waiting else None
        report.wait_reason = admission.wait_reason
        return report

    def _preempt(self, job_id: str) -> None:
        """Ask a running job's Ray job to stop: Ray sends SIGTERM, and the job checkpoints at its current step before
        it exits (jobs.run); following it then re-queues it without spending an attempt."""
        job = self.store.get(job_id)
        metrics.PREEMPTIONS.labels(job.kind).inc()
        log.info(
            "job %s: preempted by %s; asking Ray to stop %s",
            job.id,
            job.preempted_by,
            job.ray_submission_id,
            extra=job_fields(job),
        )
        if job.ray_submission_id:
            try:
                self.launcher.stop(job.ray_submission_id)
            except LauncherUnavailable as exc:  # asked again on the next pass: following a marked job stops it
                self._log_unreachable(exc)

    def _submit(self, job: Job) -> None:
        assert job.ray_submission_id is not None
        entrypoint = entrypoint_for(job.id, self.job_module, self.job_python)
        env = job_environment(job, self.environ, self.allowed_data_prefixes)
        try:
            self.launcher.submit(job.ray_submission_id, entrypoint, env, job.spec_json)
        except SubmissionExists:
            log.info("job %s: Ray already has %s; following it", job.id, job.ray_submission_id, extra=job_fields(job))
        except LauncherUnavailable as exc:
            # Left in `starting`: following it submits again once Ray answers.
            self._log_unreachable(exc)
        except Exception as exc:  # Ray refused the submission: this attempt failed
            why = self._redact(str(exc))
            log.warning("job %s: Ray refused the submission: %s", job.id, why, extra=job_fields(job))
            self._attempt_failed(job, f"Ray refused the job submission: {why}")
        else:
            log.info(
                "job %s: submitted to Ray as %s (attempt %d)",
                job.id,
                job.ray_submission_id,
                job.attempts,
                extra=job_fields(job),
            )

    # --- following --------------------------------------------------------------------------------------------
    def follow(self, report: TickReport | None = None) -> TickReport:
        report = report or TickReport()
        for job in self.store.active_jobs():
            try:
                if self._follow_one(job):
                    report.changed.append(job.id)
            except LauncherUnavailable as exc:
                self._log_unreachable(exc)
                return report
        self._unreachable_logged = False
        return report

    def _follow_one(self, job: Job) -> bool:
        sid = job.ray_submission_id
        assert sid is not None, f"active job {job.id} has no Ray submission id"
        info = self.launcher.info(sid)
        if info is None:
            if job.state == "starting":
                if job.cancel_requested_by:
                    return self._set(job, "cancelled", f"cancelled by {job.cancel_requested_by} before it reached Ray")
                if self.clock() - job.updated_at.timestamp() >= self.resubmit_after_s:
                    # Claimed, never submitted: the dispatcher that claimed it stopped in between.
                    log.info("job %s: claimed but not on Ray; submitting it", job.id, extra=job_fields(job))
                    self._submit(job)
                return False
            return self._attempt_failed(job, "its Ray job is gone (the Ray cluster restarted or lost it)")
        if (job.cancel_requested_by or job.preempted_by) and info.status not in RAY_TERMINAL:
            self.launcher.stop(sid)
            if (
                info.status == "PENDING"
                and job.state == "starting"
                and self.clock() - job.updated_at.timestamp() >= self.cancel_pending_after_s
            ):
                # Its driver never started, so nothing of it runs; Ray fails the pending job on its own later.
                return self._set(
                    job,
                    "cancelled",
                    f"cancelled by {job.cancel_requested_by} while starting: Ray job {sid} never left PENDING "
                    f"(stop asked; its driver had not started)",
                )
            return False
        if job.preempted_by and not job.cancel_requested_by and info.status in ("STOPPED", "FAILED"):
            return self._preempted(job)
        if info.status == "PENDING":
            return False
        if info.status == "RUNNING":
            if job.state == "starting":
                return self._set(job, "running", f"Ray job {sid} is running")
            max_hours = max_hours_of(job)
            if (
                max_hours is not None
                and job.started_at is not None
                and self.clock() - job.started_at.timestamp() > max_hours * 3600
            ):
                # The spec's wall-clock limit: stopped, and failed for good (another attempt would run as long).
                self.launcher.stop(sid)
                why = f"ran longer than train.max_hours = {max_hours:g} h"
                return self._set(job, "failed", why, error=why)
            return False
        if info.status == "SUCCEEDED":
            return self._succeeded(job, sid)
        if job.cancel_requested_by:
            return self._set(job, "cancelled", f"cancelled by {job.cancel_requested_by}; Ray job {sid} stopped")
        if info.status == "STOPPED":
            return self._set(job, "cancelled", f"Ray job {sid} was stopped outside aeforge")
        message = self._redact(info.message or "no message from Ray")
        logs = self._logs(sid)
        missing = environment_error(logs)
        if missing is not None:
            # The job's Python on the cluster lacks a module: every attempt would fail the same way, at once.
            why = (
                f"environment error on the Ray cluster: {self._redact(missing)} (the Python of the Ray nodes must "
                f"have aeforge and its dependencies; `aeforge doctor` checks every node)"
            )
            return self._set(job, "failed", f"attempt {job.attempts} of {job.max_attempts} failed: {why}", error=why)
        tail = self._log_tail(logs)
        # Exit code 2 is the entry point's "the spec or its data is wrong": running it again changes nothing.
        retry = not USER_ERROR_EXIT.search(message)
        progress = parse_progress(logs)
        memory = memory_failure(f"{message}\n{tail}")
        if memory is not None:  # said as such, and retried only when it came from outside the job
            return self._attempt_failed(
                job,
                f"Ray job {sid} failed: {memory.sentence()} ({message}){tail}",
                retry=memory.outside,
                progress=progress,
            )
        return self._attempt_failed(job, f"Ray job {sid} failed: {message}{tail}", retry=retry, progress=progress)

    def _succeeded(self, job: Job, sid: str) -> bool:
        try:
            logs = self.launcher.logs(sid)
        except LauncherUnavailable:
            raise
        except RuntimeError as exc:
            log.warning("job %s: cannot read its Ray logs for the result: %s", job.id, exc, extra=job_fields(job))
            logs = ""
        result = parse_result(logs)
        fields: dict = {"error": None}
        reason = f"Ray job {job.ray_submission_id} succeeded"
        if result is None:
            reason += " (it printed no AEFORGE_RESULT line)"
        else:
            result = json.loads(self._redact(json.dumps(result)))
            run_id = result.get("mlflow_run_id")
            fields |= {
                "result": result,
                "mlflow_run_id": None if run_id is None else str(run_id),
                "model_version": model_version_of(result),
            }
        if job.cancel_requested_by:
            reason += f"; it finished before the cancel by {job.cancel_requested_by} took effect"
        return self._set(job, "succeeded", reason, **fields)

    def _preempted(self, job: Job) -> bool:
        """A preempted job has stopped: back to the queue, where it resumes from the checkpoint it wrote at its last
        step. The attempt it used is given back (max_attempts + 1): being preempted is not a failure."""
        try:
            progress = parse_progress(self.launcher.logs(job.ray_submission_id or job.id))
        except (LauncherUnavailable, RuntimeError):
            progress = None
        step = progress["step"] if progress else None
        at = "" if step is None else f" at step {step}"
        return self._set(
            job,
            "queued",
            f"preempted by {job.preempted_by}{at}; re-queued to resume from its checkpoint (no attempt spent)",
            max_attempts=job.max_attempts + 1,
            error=None,  # not a failure: no back-off (retry_due) before it starts again
            # What its next start says it resumed after (services.scheduler.QueuedJob.resumes_after_preemption).
            last_preempted_by=job.preempted_by,
            last_preempted_step=step,
        )

    def retry_delay_s(self, job: Job | QueuedRow) -> float:
        """How long after its failed attempt ``job`` waits before the next one: exponential, with a jitter that is
        fixed per job and attempt (so every dispatcher computes the same time)."""
        if self.retry_backoff_s <= 0 or job.attempts < 1:
            return 0.0
        jitter = random.Random(f"{job.id}:{job.attempts}").random()
        return min(self.retry_backoff_s * 2 ** (job.attempts - 1) * (1 + 0.25 * jitter), MAX_RETRY_DELAY_S)

    def retry_due(self, job: Job | QueuedRow) -> float:
        """When a queued job may start again (its re-queue time plus the back-off; 0 for a new job, and for a job
        a person queued again with ``aeforge retry``: the back-off is for outages, not for a decision)."""
        # A re-queue after a failed attempt keeps that attempt's error on the job; a manual retry clears it.
        if job.attempts < 1 or job.error is None:
            return 0.0
        return job.updated_at.timestamp() + self.retry_delay_s(job)

    def _attempt_failed(self, job: Job, why: str, retry: bool = True, progress: dict | None = None) -> bool:
        """``progress``: the failed attempt's last progress line, when its log was read (what the next attempt
        starts from is said only as far as it is known)."""
        if retry and job.attempts < job.max_attempts:
            delay = self.retry_delay_s(job)
            when = f" in {delay:.0f} s" if delay > 0 else ""
            if progress is not None:
                resume = f"it resumes from its last checkpoint (this attempt reached step {progress['step']})"
            elif job.attempts <= 1:
                resume = "it had not started training, so it starts from the beginning"
            else:
                resume = "it resumes from the last checkpoint an earlier attempt wrote, if any"
            return self._set(
                job,
                "queued",
                f"attempt {job.attempts} of {job.max_attempts} failed: {why}; re-queued{when}: {resume}",
                error=why,
            )
        return self._set(job, "failed", f"attempt {job.attempts} of {job.max_attempts} failed: {why}", error=why)

    def _set(self, job: Job, state: str, reason: str, **fields) -> bool:
        # Guarded by state and attempt: another dispatcher that saw the same Ray status changes it once.
        changed = self.store.transition(job.id, state, reason, expect=(job.state,), attempt=job.attempts, **fields)
        if changed is not None:
            log.info("job %s: %s -> %s (%s)", job.id, job.state, state, reason, extra=job_fields(changed))
        return changed is not None

    def _logs(self, sid: str) -> str:
        """The Ray job's log, "" when it cannot be read (the failure is recorded without it)."""
        try:
            return self.launcher.logs(sid)
        except Exception:
            return ""

    def _log_tail(self, logs: str) -> str:
        lines = [line for line in readable_lines(logs) if line.strip()][-LOG_TAIL_LINES:]
        return ("\nlast log lines:\n" + self._redact("\n".join(lines))) if lines else ""

    def _log_unreachable(self, exc: Exception) -> None:
        if not self._unreachable_logged:
            if isinstance(exc, SpecPackageUnwritable):  # the local disk, not Ray: say which, for the on-call
                log.warning("%s; jobs stay starting and are submitted when it can be written", exc)
            else:
                log.warning("Ray is not reachable (%s); jobs keep their states until it is", exc)
            self._unreachable_logged = True


# --- the real cluster -----------------------------------------------------------------------------------------


class RayJobLauncher:
    """Ray's Jobs API (``JobSubmissionClient``) at RAY_ADDRESS: a cluster address (host:6379) or the dashboard's
    http:// address. The client is made on first use and again after a connection failure."""

    def __init__(self, address: str | None):
        self.address = address
        self._client: JobSubmissionClient | None = None
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.address)
                except Exception as exc:  # connecting fails in several ways (refused, no GCS, no dashboard)
                    raise LauncherUnavailable(
                        f"cannot reach Ray's Jobs API at {self.address or 'the local cluster'}: {exc}"
                    ) from None
            return self._client

    def dashboard_url(self) -> str:
        return self.client().get_address()

    def _call(self, operation: str, fn: Callable, *args, **kwargs):
        import requests

        try:
            client = self.client()
        except LauncherUnavailable:
            metrics.RAY_API_ERRORS.labels(operation, "unreachable").inc()
            raise
        try:
            return fn(client, *args, **kwargs)
        except (requests.ConnectionError, requests.Timeout, ConnectionError) as exc:
            metrics.RAY_API_ERRORS.labels(operation, "unreachable").inc()
            with self._lock:
                self._client = None
            raise LauncherUnavailable(f"Ray's Jobs API did not answer: {exc}") from None

    @staticmethod
    def _refused(operation: str) -> None:
        metrics.RAY_API_ERRORS.labels(operation, "refused").inc()

    def submit(self, submission_id: str, entrypoint: str, env_vars: dict[str, str], spec_json: str) -> None:
        # The spec rides as a package Ray uploads to its own store with the submission and installs on the node that
        # runs the job (workers.job_specs): no size limit of an environment, no storage credential in this process.
        try:
            with tempfile.TemporaryDirectory(prefix="aeforge-spec-") as folder:
                package, spec_vars = write_spec_package(Path(folder), spec_json)
                runtime_env = {"env_vars": {**env_vars, **spec_vars}, "py_modules": [str(package)]}
                self._call(
                    "submit",
                    lambda c: c.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env),
                )
        except OSError as exc:  # this machine's temporary folder (full, read-only): tried again on the next pass
            raise SpecPackageUnwritable(f"cannot write the job's spec package for Ray: {exc}") from None
        except RuntimeError as exc:
            if "already exists" in str(exc):
                raise SubmissionExists(submission_id) from None
            if NO_JOB_AGENT.search(str(exc)):
                # A Ray head that has just started answers this for tens of seconds: not a failed attempt (the job
                # never reached Ray; it stays `starting` and is submitted again with the same attempt).
                metrics.RAY_API_ERRORS.labels("submit", "unreachable").inc()
                raise LauncherUnavailable(f"Ray's Jobs API is not ready yet: {exc}") from None
            self._refused("submit")
            raise

    def info(self, submission_id: str) -> RayJobInfo | None:
        try:
            details = self._call("info", lambda c: c.get_job_info(submission_id))
        except RuntimeError as exc:
            if "status code 404" in str(exc):
                return None
            self._refused("info")
            raise
        return RayJobInfo(
            status=str(details.status.value if hasattr(details.status, "value") else details.status),
            message=details.message,
        )

    def stop(self, submission_id: str) -> None:
        try:
            self._call("stop", lambda c: c.stop_job(submission_id))
        except RuntimeError as exc:
            if "status code 404" not in str(exc):
                self._refused("stop")
                raise

    def logs(self, submission_id: str) -> str:
        try:
            return self._call("logs", lambda c: c.get_job_logs(submission_id))
        except RuntimeError as exc:
            if "status code 404" in str(exc):
                return ""
            self._refused("logs")
            raise

    async def tail(self, submission_id: str) -> AsyncIterator[str]:
        import asyncio

        try:
            client = await asyncio.to_thread(self.client)
        except LauncherUnavailable:
            metrics.RAY_API_ERRORS.labels("tail", "unreachable").inc()
            raise
        try:
            async for chunk in client.tail_job_logs(submission_id):
                yield chunk
        except Exception as exc:  # the websocket or the job went away mid-stream
            metrics.RAY_API_ERRORS.labels("tail", "unreachable").inc()
            raise LauncherUnavailable(f"the log stream of Ray job {submission_id} broke off: {exc}") from None


class RayClusterView:
    """Resources of the live nodes, from Ray's state API (through the dashboard; this process joins no cluster)."""

    def __init__(self, launcher: RayJobLauncher):
        self.launcher = launcher
        # The memory (Ray's `memory` resource, bytes) of the largest live node when the nodes were last listed:
        # what one worker of a job can have at most (jobs.limits checks a submission's estimate against it).
        self.largest_node_memory: float | None = None

    def total_resources(self) -> dict[str, float]:
        from ray.util.state import list_nodes

        try:
            address = self.launcher.dashboard_url()
        except LauncherUnavailable:
            metrics.RAY_API_ERRORS.labels("list_nodes", "unreachable").inc()
            raise
        try:
            # raise_on_missing_output=False: once a node has died, Ray 2.60's state API counts it among the nodes the
            # ALIVE filter drops and raises "data truncation" on every call (found by the stack test).
            nodes = list_nodes(
                address=address, filters=[("state", "=", "ALIVE")], timeout=10, raise_on_missing_output=False
            )
        except Exception as exc:  # the state API raises several kinds when the dashboard is down
            metrics.RAY_API_ERRORS.labels("list_nodes", "unreachable").inc()
            raise LauncherUnavailable(f"cannot list Ray's nodes at {address}: {exc}") from None
        total: dict[str, float] = {}
        for node in nodes:
            total = add_resources(total, {k: v for k, v in node.resources_total.items() if not k.startswith("node:")})
        memories = [float(node.resources_total.get("memory", 0.0)) for node in nodes]
        if memories:
            self.largest_node_memory = max(memories) or None
        return total


# --- the autoscaler -------------------------------------------------------------------------------------------


def job_bundles(job: Job) -> list[dict[str, float]]:
    """The resource shapes a job's Ray job asks the cluster for: one bundle per worker (a sweep: per worker of each
    trial it runs at once, and each trial's driver), as the autoscaler packs them onto nodes."""
    try:
        spec = parse_spec_json(job.spec_json, f"job {job.id}")
    except AeforgeError:
        return [dict(job.resources)]
    r = spec.resources
    worker = {"CPU": float(r.cpus_per_worker), **({"GPU": float(r.gpus_per_worker)} if r.gpus_per_worker else {})}
    trials = 1
    if spec.kind == "sweep" and spec.sweep is not None:
        trials = max(1, int(round(job.resources.get("CPU", 0.0) / max(r.workers * r.cpus_per_worker, 1e-9))))
    return [dict(worker) for _ in range(r.workers * trials)]


class AutoscalerDemand(Protocol):
    def request(self, bundles: list[dict[str, float]]) -> None:
        """Ask the cluster's autoscaler to make room for ``bundles`` (replacing the last request; [] withdraws it)."""


class RayAutoscalerDemand:
    """Ray's autoscaler (``ray.autoscaler.sdk.request_resources``, which KubeRay's autoscaler honours as well): the
    request persists until replaced, so it is sent only when the demand changed, and an empty queue with no job
    admitted withdraws it. ``request_resources`` needs a driver connected to the cluster: this process joins it (its
    GCS address) on the first request."""

    # Most bundles asked for the queue at once (beside the admitted jobs'): enough for its next jobs, not the whole
    # backlog at once.
    MAX_BUNDLES = 256

    def __init__(self, address: str):
        self.address = address
        self._last: list[dict[str, float]] | None = None

    def request(self, bundles: list[dict[str, float]]) -> None:
        if bundles == self._last:
            return
        import ray
        from ray.autoscaler.sdk import request_resources

        if not ray.is_initialized():
            ray.init(address=self.address, namespace="aeforge-dispatcher", log_to_driver=False)
        request_resources(bundles=bundles)
        log.info(
            "asked Ray's autoscaler for %s", f"{len(bundles)} bundle(s): {bundles[:4]}" if bundles else "nothing more"
        )
        self._last = bundles
