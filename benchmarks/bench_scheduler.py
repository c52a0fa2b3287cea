"""A scheduler simulation (a benchmark, not a test): the real store, queue policy and dispatcher, driven through a
synthetic trace with a simulated clock and a fake launcher, at a scale this machine cannot hold.

    python -m benchmarks.bench_scheduler [--jobs 20000] [--nodes 64] [--gpus-per-node 8] [--teams 8] [--users 50]
                                         [--backends sqlite,postgresql] [--compare-backfill] [--one-class] [--one-gpu]
                                         [--pass-queued 10000]

The trace: jobs arrive over ``--hours`` (Poisson), each from a user of a team, with heavy-tailed sizes (1 to 32
GPUs, most of them 1) and durations (log-normal, median 1 h, capped at 48 h), a priority mix (low 20 %, normal
65 %, high 10 %, urgent 5 %: urgent may preempt the preemptible low and normal), and ``train.max_hours`` on 60 % of
them (1.5 x their duration). The dispatcher ticks every ``--tick-minutes`` of simulated time; a started job runs
after a minute of start-up, and a preempted one stops at once with a checkpoint at its current step (the launcher
keeps the work it had done), so it loses nothing; the work a scheduler that resumes from the last periodic
checkpoint (every ``--checkpoint-minutes``) would have lost is reported beside it.

It prints: GPU utilisation while a backlog exists; p50/p95/p99 wait (submission to first start) per class and per
team; Jain's fairness index of weighted usage (GPU share / weight) among the teams with work queued, averaged over
the ticks; preemptions and work lost; the dispatcher pass time over the run, and at ``--pass-queued`` queued and
``--pass-running`` running jobs (a store filled to that size, a few passes timed). ``--compare-backfill`` runs the
trace a second time with every ``max_hours`` removed (no backfill) and prints the utilisation gained by backfill.

The store's clock is the simulation's (services.store.utcnow is replaced for the run), so that the times it stores
(start, update) are the simulated ones the dispatcher's policy reads. For PostgreSQL a temporary database is made
at --pg-admin-url and dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import services.store as store_module
from benchmarks.bench_queue import postgres_database
from services.dispatcher import HISTORY_HALF_LIVES, Dispatcher, RayJobInfo, recent_usage
from services.policy import PolicySource
from services.scheduler import dominant_share
from services.store import Store

CLASSES = (("low", -10, 0.20), ("normal", 0, 0.65), ("high", 50, 0.10), ("urgent", 100, 0.05))
GPU_SIZES = ((1, 0.50), (2, 0.20), (4, 0.15), (8, 0.10), (16, 0.04), (32, 0.01))
STARTUP_S = 60.0


@dataclass
class TraceJob:
    name: str
    owner: str
    team: str
    klass: str
    gpus: int
    duration_s: float
    max_hours: float | None
    arrival_s: float


@dataclass
class Trace:
    teams: dict[str, list[str]]
    weights: dict[str, float]
    jobs: list[TraceJob]


def make_trace(
    jobs: int, teams: int, users: int, hours: float, seed: int, *, one_class: bool = False, one_gpu: bool = False
) -> Trace:
    """``one_class``: the same trace with every job in class normal (fair share alone orders it); ``one_gpu``: with
    every job asking for one GPU (no lumpy 16- and 32-GPU jobs)."""
    rng = random.Random(seed)
    team_names = [f"team{i}" for i in range(teams)]
    members: dict[str, list[str]] = {t: [] for t in team_names}
    for u in range(users):
        members[team_names[u % teams]].append(f"user{u}")
    weights = {t: (2.0 if i % 4 == 0 else 1.0) for i, t in enumerate(team_names)}
    out = []
    t = 0.0
    rate = jobs / (hours * 3600)
    # Some users are heavy submitters (a morning's sweep of hundreds of jobs): Zipf-like popularity.
    all_users = [(u, t_name) for t_name, us in members.items() for u in us]
    popularity = [1.0 / (i + 1) ** 0.8 for i in range(len(all_users))]
    for i in range(jobs):
        t += rng.expovariate(rate)
        user, team = rng.choices(all_users, popularity)[0]
        klass = rng.choices([c[0] for c in CLASSES], [c[2] for c in CLASSES])[0]
        klass = "normal" if one_class else klass
        gpus = rng.choices([g for g, _ in GPU_SIZES], [p for _, p in GPU_SIZES])[0]
        gpus = 1 if one_gpu else gpus
        duration = min(3600 * math.exp(rng.gauss(0.0, 1.0)), 48 * 3600.0)
        max_hours = math.ceil(duration * 1.5 / 1800) / 2 if rng.random() < 0.6 else None
        out.append(TraceJob(f"j{i}", user, team, klass, gpus, duration, max_hours, t))
    return Trace(members, weights, out)


def policy_yaml(trace: Trace, total_gpus: int) -> str:
    quota = total_gpus // len(trace.teams)
    lines = ["half_life_hours: 24", "preemption_min_run_minutes: 10", "default_class: normal", "teams:"]
    for team, users in trace.teams.items():
        lines.append(
            f"  {team}: {{owners: [{', '.join(users)}], weight: {trace.weights[team]:g}, "
            f"quota: {{gpu: {quota}}}, borrowing_limit: {{gpu: {total_gpus - quota}}}}}"
        )
    lines.append("classes:")
    for name, value, _ in CLASSES:
        extra = ", preemptible: false, may_preempt: true" if name == "urgent" else ""
        extra = ", preemptible: false" if name == "high" else extra
        lines.append(f"  - {{name: {name}, value: {value}{extra}}}")
    return "\n".join(lines) + "\n"


class SimClock:
    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def utc(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


@dataclass
class SimJob:
    duration_s: float
    done_s: float = 0.0  # work kept by checkpoints at the current step (preemption)
    run_started: float | None = None
    status: str = "PENDING"


class SimLauncher:
    """Ray's Jobs API in simulated time: a job runs after STARTUP_S, succeeds when its work is done, and stops at
    once when asked (the checkpoint at its current step keeps its work)."""

    def __init__(self, clock: SimClock, durations: dict[str, float], checkpoint_s: float):
        self.clock = clock
        self.durations = durations
        self.checkpoint_s = checkpoint_s
        self.jobs: dict[str, tuple[str, SimJob]] = {}
        self.work: dict[str, float] = defaultdict(float)
        self.lost_without_step_checkpoint_s = 0.0
        self.gpus: dict[str, float] = {}

    @staticmethod
    def _job_id(submission_id: str) -> str:
        return submission_id.split("-attempt-")[0]

    def submit(self, submission_id, entrypoint, env_vars, spec_json):
        job_id = self._job_id(submission_id)
        self.jobs[submission_id] = (job_id, SimJob(self.durations[job_id]))
        self.jobs[submission_id][1].run_started = self.clock.now + STARTUP_S

    def _advance(self, sid: str) -> SimJob:
        job_id, job = self.jobs[sid]
        if job.status in ("PENDING", "RUNNING") and job.run_started is not None and self.clock.now >= job.run_started:
            job.status = "RUNNING"
            if self.work[job_id] + (self.clock.now - job.run_started) >= job.duration_s:
                job.status = "SUCCEEDED"
                self.work[job_id] = job.duration_s
        return job

    def info(self, submission_id):
        if submission_id not in self.jobs:
            return None
        job = self._advance(submission_id)
        return RayJobInfo(job.status, None)

    def stop(self, submission_id):
        job_id, job = self.jobs[submission_id]
        job = self._advance(submission_id)
        if job.status in ("PENDING", "RUNNING"):
            ran = max(0.0, self.clock.now - (job.run_started or self.clock.now))
            self.work[job_id] += ran
            # What resuming from the last periodic checkpoint would have re-trained.
            self.lost_without_step_checkpoint_s += (self.work[job_id] % self.checkpoint_s) * self.gpus.get(job_id, 1)
            job.status = "STOPPED"

    def logs(self, submission_id):
        job_id, _ = self.jobs.get(submission_id, ("", None))
        return f'AEFORGE_PROGRESS {{"step": {int(self.work.get(job_id, 0))}, "total": 0}}\n'

    async def tail(self, submission_id):  # not used by the dispatcher
        yield ""


class SimCluster:
    def __init__(self, total):
        self.total = total

    def total_resources(self):
        return dict(self.total)


@contextmanager
def store_for(backend: str, pg_admin_url: str, clock: SimClock):
    original = store_module.utcnow
    store_module.utcnow = clock.utc  # the store stamps simulated times
    try:
        if backend == "sqlite":
            with tempfile.TemporaryDirectory(prefix="aeforge-bench-sched-") as tmp:
                store = Store(f"sqlite:///{Path(tmp) / 'sched.db'}")
                try:
                    yield store
                finally:
                    store.close()
        else:
            with postgres_database(pg_admin_url) as url:
                store = Store(url)
                try:
                    yield store
                finally:
                    store.close()
    finally:
        store_module.utcnow = original


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Result:
    utilisation: float
    waits: dict[str, list[float]] = field(default_factory=dict)
    fairness: float = float("nan")
    fairness_recent: float = float("nan")
    preemptions: int = 0
    lost_gpu_h: float = 0.0
    lost_without_step_checkpoint_gpu_h: float = 0.0
    pass_ms: list[float] = field(default_factory=list)
    finished: int = 0
    refused: int = 0
    sim_hours: float = 0.0


def simulate(backend: str, trace: Trace, args, *, backfill: bool = True) -> Result:
    total_gpus = args.nodes * args.gpus_per_node
    total = {"CPU": float(args.nodes * args.cpus_per_node), "GPU": float(total_gpus)}
    start = 1_900_000_000.0
    clock = SimClock(start)
    with tempfile.TemporaryDirectory(prefix="aeforge-bench-policy-") as tmp:
        policy_path = Path(tmp) / "policy.yaml"
        policy_path.write_text(policy_yaml(trace, total_gpus))
        with store_for(backend, args.pg_admin_url, clock) as store:
            durations: dict[str, float] = {}
            launcher = SimLauncher(clock, durations, args.checkpoint_minutes * 60)
            dispatcher = Dispatcher(
                store,
                SimCluster(total),
                launcher,
                clock=clock,
                environ={},
                policies=PolicySource(policy_path),
            )
            tick_s = args.tick_minutes * 60
            arrivals = sorted(trace.jobs, key=lambda j: j.arrival_s)
            meta: dict[str, TraceJob] = {}
            first_start: dict[str, float] = {}
            submitted_at: dict[str, float] = {}
            next_arrival = 0
            busy_ticks, util_sum = 0, 0.0
            fairness: list[float] = []
            fairness_recent: list[float] = []
            team_of = {owner: team for team, owners in trace.teams.items() for owner in owners}
            policy = dispatcher.policies.current()
            result = Result(utilisation=0.0)
            while True:
                while next_arrival < len(arrivals) and arrivals[next_arrival].arrival_s + start <= clock.now:
                    tj = arrivals[next_arrival]
                    next_arrival += 1
                    job, _ = store.submit(
                        name=tj.name,
                        owner=tj.owner,
                        kind="train",
                        spec_text=f"name: {tj.name}\n",
                        spec_json=json.dumps({"name": tj.name}),
                        resources={"CPU": float(tj.gpus), "GPU": float(tj.gpus)},
                        priority={c[0]: c[1] for c in CLASSES}[tj.klass],
                        priority_class=tj.klass,
                        max_hours=tj.max_hours if backfill else None,
                        max_attempts=3,
                    )
                    durations[job.id] = tj.duration_s
                    launcher.gpus[job.id] = tj.gpus
                    meta[job.id] = tj
                    submitted_at[job.id] = clock.now
                report = dispatcher.tick()
                result.pass_ms.append(dispatcher.last_pass_s * 1000)
                result.preemptions += len(report.preempted)
                for job_id in report.started:
                    first_start.setdefault(job_id, clock.now)
                active = store.active_jobs()
                held = sum(j.resources.get("GPU", 0.0) for j in active)
                queued = store.list_jobs(states=["queued"], limit=1)[1]
                if queued:
                    busy_ticks += 1
                    util_sum += held / total_gpus
                    # Every team with a job queued (not only those among the first queued jobs listed).
                    waiting_teams = {team_of[owner] for state, owner, *_ in store.active_counts() if state == "queued"}
                    if len(waiting_teams) >= 2:
                        per_team: dict[str, float] = defaultdict(float)
                        for j in active:
                            per_team[meta[j.id].team] += dominant_share(j.resources, total)
                        # Held now, over the weight (the first figure); held now plus recent usage decayed with the
                        # policy's half-life, over the weight: the weighted usage fair share orders by (issue 21).
                        now_only = [per_team[t] / trace.weights[t] for t in waiting_teams]
                        since = datetime.fromtimestamp(clock.now - HISTORY_HALF_LIVES * policy.half_life_s, UTC)
                        recent = recent_usage(policy, store.snapshot(history_since=since), total, clock.now)
                        with_recent = [(per_team[t] + recent.get(t, 0.0)) / trace.weights[t] for t in waiting_teams]
                        for xs, series in ((now_only, fairness), (with_recent, fairness_recent)):
                            if sum(x * x for x in xs) > 0:
                                series.append(sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)))
                if next_arrival >= len(arrivals) and not queued and not active:
                    break
                clock.now += tick_s
            for job_id, started in first_start.items():
                tj = meta[job_id]
                wait = (started - submitted_at[job_id]) / 60
                result.waits.setdefault(f"class {tj.klass}", []).append(wait)
                result.waits.setdefault(f"team {tj.team}", []).append(wait)
            result.utilisation = util_sum / busy_ticks if busy_ticks else float("nan")
            result.fairness = statistics.fmean(fairness) if fairness else float("nan")
            result.fairness_recent = statistics.fmean(fairness_recent) if fairness_recent else float("nan")
            result.lost_without_step_checkpoint_gpu_h = launcher.lost_without_step_checkpoint_s / 3600
            result.finished = store.list_jobs(states=["succeeded"], limit=1)[1]
            result.refused = store.list_jobs(states=["failed"], limit=1)[1]
            result.sim_hours = (clock.now - start) / 3600
    return result


def pass_time_at_scale(backend: str, args) -> tuple[float, list[float]]:
    """Dispatcher pass time with ``--pass-queued`` queued and ``--pass-running`` running jobs in the store: the first
    pass's, and those of the ``--pass-repeats`` passes after it."""
    from sqlalchemy import insert, text

    from services.store import jobs_table, new_job_id, queue_kind_of

    clock = SimClock(1_900_000_000.0)
    trace = make_trace(args.pass_queued + args.pass_running, args.teams, args.users, 1.0, args.seed + 1)
    total = {"CPU": 1e9, "GPU": float(args.pass_running + 4)}  # the running jobs fit (1 GPU each); no queued one
    with tempfile.TemporaryDirectory(prefix="aeforge-bench-policy-") as tmp:
        policy_path = Path(tmp) / "policy.yaml"
        policy_path.write_text(policy_yaml(trace, int(total["GPU"])))
        with store_for(backend, args.pg_admin_url, clock) as store:
            now = clock.utc()
            rows = []
            for i, tj in enumerate(trace.jobs):
                running = i < args.pass_running
                gpus = 1 if running else max(tj.gpus, 8)
                resources = {"CPU": float(gpus), "GPU": float(gpus)}
                klass = "normal" if running else tj.klass
                job_id = new_job_id(tj.name)
                rows.append(
                    {
                        "id": job_id,
                        "name": tj.name,
                        "owner": tj.owner,
                        "kind": "train",
                        "spec_text": "",
                        "spec_json": "{}",
                        "priority": {c[0]: c[1] for c in CLASSES}[tj.klass] if not running else 0,
                        "priority_class": klass,
                        "max_hours": tj.max_hours,
                        "resources": resources,
                        "queue_kind": queue_kind_of(job_id, "train", klass, resources),
                        "state": "running" if running else "queued",
                        "attempts": 1 if running else 0,
                        "max_attempts": 3,
                        "ray_submission_id": tj.name if running else None,
                        "created_at": now,
                        "updated_at": now,
                        "started_at": now if running else None,
                    }
                )
            with store.engine.begin() as conn:
                for chunk in range(0, len(rows), 1000):
                    conn.execute(insert(jobs_table), rows[chunk : chunk + 1000])
            if backend == "postgresql":
                # The statistics autovacuum would gather within a minute of such a burst (the planner picks the
                # queue-kind index by them); without them the first passes use another index, and are slower.
                with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(text("ANALYZE aeforge_jobs"))

            class Running:
                """Every job runs for ever: the passes see the same queue and running set."""

                def info(self, sid):
                    return RayJobInfo("RUNNING")

                def submit(self, sid, entrypoint, env_vars, spec_json):
                    pass

                def stop(self, sid):
                    pass

                def logs(self, sid):
                    return ""

                async def tail(self, sid):
                    yield ""

            dispatcher = Dispatcher(
                store,
                SimCluster(total),
                Running(),
                clock=clock,
                environ={},
                policies=PolicySource(policy_path),
            )
            # The first pass writes the wait reason of every job inserted at once above: a one-off of this fill (a
            # queue fills job by job), reported apart from the passes timed after it.
            dispatcher.admit()
            first = dispatcher.last_pass_s * 1000
            times = []
            for _ in range(args.pass_repeats):
                clock.now += 60
                dispatcher.admit()
                times.append(dispatcher.last_pass_s * 1000)
            return first, times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpus-per-node", type=int, default=64)
    parser.add_argument("--teams", type=int, default=8)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--hours", type=float, default=200.0, help="the arrivals' span, simulated")
    parser.add_argument("--tick-minutes", type=float, default=5.0)
    parser.add_argument("--checkpoint-minutes", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-backfill", action="store_true")
    parser.add_argument(
        "--one-class", action="store_true", help="every job in class normal: fair share alone orders the queue"
    )
    parser.add_argument("--one-gpu", action="store_true", help="every job asks for one GPU (no heavy-tailed sizes)")
    parser.add_argument("--pass-queued", type=int, default=10_000)
    parser.add_argument("--pass-running", type=int, default=1_000)
    parser.add_argument("--pass-repeats", type=int, default=20)
    parser.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)

    trace = make_trace(
        args.jobs, args.teams, args.users, args.hours, args.seed, one_class=args.one_class, one_gpu=args.one_gpu
    )
    gpu_hours = sum(j.gpus * j.duration_s for j in trace.jobs) / 3600
    print(
        f"trace: {len(trace.jobs)} jobs, {args.teams} teams, {args.users} users, "
        f"{args.nodes * args.gpus_per_node} GPUs in {args.nodes} nodes; {gpu_hours:,.0f} GPU-h of work arriving "
        f"over {args.hours:g} h ({gpu_hours / (args.nodes * args.gpus_per_node * args.hours):.0%} of capacity)",
        flush=True,
    )
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        started = time.perf_counter()
        result = simulate(backend, trace, args)
        print(f"\n== {backend} ({time.perf_counter() - started:.0f} s wall, {result.sim_hours:.0f} h simulated)")
        print(f"finished jobs: {result.finished} of {len(trace.jobs)} ({result.refused} failed or refused)")
        print(f"GPU utilisation while a backlog exists: {result.utilisation:.1%}")
        print(
            f"Jain's fairness among teams with work queued, of weighted usage held now: {result.fairness:.3f}; "
            f"of weighted usage held now plus recent (half-life decay, what fair share orders by): "
            f"{result.fairness_recent:.3f}"
        )
        print(
            f"preemptions: {result.preemptions}; work lost: 0 GPU-h (checkpoint at the current step); "
            f"resuming from the last {args.checkpoint_minutes:g}-minute checkpoint would have lost "
            f"{result.lost_without_step_checkpoint_gpu_h:.1f} GPU-h"
        )
        print("wait, minutes (p50 / p95 / p99):")
        for key in sorted(result.waits):
            values = result.waits[key]
            print(
                f"  {key:14s} n={len(values):6d}  {percentile(values, 0.5):8.1f} {percentile(values, 0.95):8.1f} "
                f"{percentile(values, 0.99):8.1f}"
            )
        passes = result.pass_ms
        print(
            f"dispatcher pass over the run: p50 {percentile(passes, 0.5):.1f} ms, p99 {percentile(passes, 0.99):.1f} "
            f"ms, max {max(passes):.1f} ms"
        )
        if args.compare_backfill:
            plain = simulate(backend, trace, args, backfill=False)
            print(
                f"backfill: utilisation {result.utilisation:.1%} with, {plain.utilisation:.1%} without "
                f"(gain {result.utilisation - plain.utilisation:+.1%})"
            )
        if args.pass_queued:
            first, times = pass_time_at_scale(backend, args)
            print(
                f"dispatcher pass at {args.pass_queued} queued / {args.pass_running} running: "
                f"p50 {percentile(times, 0.5):.0f} ms, p95 {percentile(times, 0.95):.0f} ms, "
                f"p99 {percentile(times, 0.99):.0f} ms over {len(times)} passes, one a minute (the running jobs become "
                f"preemptible after 10 minutes: urgent jobs then preempt them); the first pass, writing the wait "
                f"reasons of the {args.pass_queued} jobs inserted at once: {first:.0f} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
