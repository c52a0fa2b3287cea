"""One scheduling pass over the queue, as Kueue's scheduler makes one: pure, on plain values, so that the store runs
it inside its admission transaction and the benchmark runs it at a scale this machine cannot hold.

The pass (:meth:`Scheduler.plan`) takes the queued and the admitted jobs, the cluster's resources, the policy and
each team's recent usage, and returns a :class:`Plan`: the jobs to start (and which of them backfill or borrow),
the jobs to refuse, the running jobs to preempt, why every other queued job waits, and what the autoscaler should
be asked for. The order it considers jobs in:

1. priority, higher first (a class's value; an admin's raw priority);
2. among equal priority, fair share: the team, then the owner, whose weighted usage is lowest goes next, where usage
   is the dominant resource share held now (Ghodsi et al.'s DRF: the largest fraction of any one resource) plus the
   recent usage decayed with the policy's half-life (Slurm's fair-share factor), over the team's weight; a job the
   pass starts counts at once, so a backlog is shared out job by job;
3. then submission order.

Then each job passes the admission checks in turn: back-off after a failed attempt (waits, blocks nobody); the
cluster (a job bigger than the whole cluster is refused, unless the cluster is elastic: then it is demanded); the
team's quota plus borrowing limit (waits with the reason, blocks nobody: its team is the bound); the service's cap
on concurrent jobs; free capacity. The first job that passes every check but finds too little free capacity is the
head: it reserves the time at which the running jobs' ``train.max_hours`` free enough for it (EASY backfill), and a
job behind it starts only if it fits now and its own ``max_hours`` ends by then, or it fits in what the head leaves
over at that time. A job without ``max_hours`` never overtakes a waiting head. A job of a class that may preempt
stops the smallest set of running jobs of preemptible, lower classes (borrowed capacity first, then the lowest class,
then the youngest) that have run at least the policy's minimum, instead of waiting.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from jobs.ray_train import describe_resources
from services.policy import QUOTA_RESOURCES, Policy, PriorityClass, TeamView

EPS = 1e-9


@dataclass(frozen=True)
class ResumePoint:
    """The preemption that re-queued a job: the job it was stopped for, and the step of the checkpoint it wrote then
    (None when its log said no step)."""

    by: str
    step: int | None


@dataclass(frozen=True)
class QueuedJob:
    id: str
    seq: int
    owner: str
    priority: int
    priority_class: str | None
    asks: Mapping[str, float]
    max_hours: float | None = None
    # A failed attempt backs off until then (epoch seconds); 0: may start now.
    not_before: float = 0.0
    attempts: int = 0
    # Said after its reasons: how the dispatcher sized it (a sweep's trials at once, when fewer than asked fit).
    note: str = ""
    # Set when the store read only the first jobs of this job's kind (same owner, priority, class and resources) and
    # more of them queue behind: the kind's id (its first job's seq). Plan.reread says whether those unread could
    # have changed the pass.
    unread_group: int | None = None
    # With unread_group: how many of the kind the store left unread. They queue behind the last one read, and count
    # among the jobs ahead in its team's queue of any job of the team the pass considers after that one.
    unread_count: int = 0
    # Set when a preemption re-queued it: its start says it resumed after that preemption.
    resumes_after_preemption: ResumePoint | None = None


@dataclass(frozen=True)
class RunningJob:
    id: str
    owner: str
    priority: int
    priority_class: str | None
    holds: Mapping[str, float]
    started_at: float | None
    max_hours: float | None = None
    # The queued job this one was asked to stop for (it is checkpointing and stopping), None when it was not.
    preempted_by: str | None = None


@dataclass(frozen=True)
class Start:
    job_id: str
    reason: str
    backfilled_ahead_of: str | None = None
    borrowed: bool = False


@dataclass(frozen=True)
class Preemption:
    victim_id: str
    by_job_id: str
    reason: str


@dataclass
class Plan:
    starts: list[Start] = field(default_factory=list)
    rejects: dict[str, str] = field(default_factory=dict)
    waits: dict[str, str] = field(default_factory=dict)
    preemptions: list[Preemption] = field(default_factory=list)
    # The waiting jobs that pass every check but capacity, in queue order: what the autoscaler should find room for.
    demand: list[str] = field(default_factory=list)
    # Every queued job the pass read, in the order it considered them (its place in the queue; Store.schedule may
    # leave later jobs alike unread).
    order: list[str] = field(default_factory=list)
    # Waiting jobs whose wait says the same of any later job of the same owner, priority, class and resources in this
    # pass, whatever its max_hours: a quota, the cap, capacity it does not fit (Scheduler._reread).
    alike_waits: set[str] = field(default_factory=set)
    # The kinds of queued jobs (QueuedJob.unread_group) the store read only in part where those unread could have
    # changed the plan: the pass is to be made again with more of them read.
    reread: set[int] = field(default_factory=set)
    # Why the unread jobs of each kind (QueuedJob.unread_group) wait: behind the last one read, which waits alike.
    unread_waits: dict[int, str] = field(default_factory=dict)


def dominant_share(resources: Mapping[str, float], total: Mapping[str, float]) -> float:
    """The largest fraction of any one of the cluster's resources that ``resources`` take (DRF)."""
    share = 0.0
    for key in ("CPU", "GPU"):  # a loop, not a list: a pass computes thousands
        capacity = total.get(key, 0.0)
        if capacity > 0:
            share = max(share, resources.get(key, 0.0) / capacity)
    return share


def decay_factor(elapsed_s: float, half_life_s: float) -> float:
    return 0.5 ** (max(elapsed_s, 0.0) / half_life_s)


def decayed_usage(intervals: Iterable[tuple[float, float, float]], now: float, half_life_s: float) -> float:
    """Recent usage from ``(start, end, share)`` intervals: the integral of the share over time, each moment weighted
    by ``0.5 ** (age / half_life)`` and normalised so that holding a share s for ever gives s (then "now" and
    "recently" are on one scale)."""
    rate = math.log(2) / half_life_s
    total = 0.0
    for start, end, share in intervals:
        end = min(end, now)
        if end <= start:
            continue
        # rate * integral_start^end exp(-rate (now - t)) dt
        total += share * (math.exp(-rate * (now - end)) - math.exp(-rate * (now - start)))
    return total


def add(total: Mapping[str, float], more: Mapping[str, float], sign: float = 1.0) -> dict[str, float]:
    out = dict(total)
    for key, value in more.items():
        out[key] = out.get(key, 0.0) + sign * float(value)
    return out


def fits(asks: Mapping[str, float], available: Mapping[str, float]) -> bool:
    return all(v <= available.get(k, 0.0) + EPS for k, v in asks.items() if v > 0)


def describe(resources: Mapping[str, float], also: Iterable[str] = ()) -> str:
    """ "CPU 4, GPU 1", as every other admission message says it (jobs.ray_train.describe_resources)."""
    return describe_resources(resources, also=also)


@dataclass
class _Holder:
    """What a team or an owner holds during the pass."""

    resources: dict[str, float] = field(default_factory=dict)
    jobs: int = 0

    def take(self, resources: Mapping[str, float]) -> None:
        for key, value in resources.items():  # in place: a pass takes for every running job
            self.resources[key] = self.resources.get(key, 0.0) + float(value)
        self.jobs += 1


class Scheduler:
    def __init__(
        self,
        policy: Policy,
        total: Mapping[str, float],
        now: float,
        *,
        recent_usage: Mapping[str, float] | None = None,
        max_concurrent_jobs: int | None = None,
        elastic: bool = False,
    ):
        self.policy = policy
        self.total = {k: float(v) for k, v in total.items()}
        self.now = now
        # Decayed recent usage per team name and per owner ("owner:NAME"), as decayed_usage gives it.
        self.recent = dict(recent_usage or {})
        self.max_concurrent_jobs = max_concurrent_jobs
        # An autoscaling cluster: a job bigger than today's nodes waits for (and asks for) more, and is not refused.
        self.elastic = elastic
        self._preemptible_cache: tuple[Sequence[RunningJob], list[RunningJob]] | None = None

    # --- the pass -----------------------------------------------------------------------------------------------
    def plan(self, queued: Sequence[QueuedJob], running: Sequence[RunningJob]) -> Plan:
        plan = Plan()
        teams: dict[str, TeamView] = {}
        team_of: dict[str, str] = {}
        everyone: list[QueuedJob | RunningJob] = [*queued, *running]
        for job in everyone:
            if job.owner not in team_of:
                team = self.policy.team_of(job.owner)
                teams[team.name] = team
                team_of[job.owner] = team.name
        team_held: dict[str, _Holder] = defaultdict(_Holder)
        owner_held: dict[str, _Holder] = defaultdict(_Holder)
        held: dict[str, float] = {}
        for job in running:
            team_held[team_of[job.owner]].take(job.holds)
            owner_held[job.owner].take(job.holds)
            for key, value in job.holds.items():
                held[key] = held.get(key, 0.0) + float(value)
        free = {k: v - held.get(k, 0.0) for k, v in self.total.items()}
        active = len(running)
        borrowed: list[set[str]] = []  # the running jobs on borrowed capacity, found when first needed

        def borrowed_running() -> set[str]:
            if not borrowed:
                borrowed.append(self._borrowed(running, teams, team_of))
            return borrowed[0]

        # Capacity that running jobs asked to stop for a queued job will give back: reserved for that job.
        stopping_for: dict[str, list[RunningJob]] = defaultdict(list)
        for job in running:
            if job.preempted_by is not None:
                stopping_for[job.preempted_by].append(job)
        victims_taken = {j.id for j in running if j.preempted_by is not None}
        started_now: list[RunningJob] = []

        head: QueuedJob | None = None
        shadow: float | None = None  # when the head can start, by the running jobs' max_hours
        spare: dict[str, float] = {}  # what the head leaves over at that time
        # How many of each team's queued jobs go before the one considered: those considered before it, and the
        # unread jobs of a kind once the last one read of that kind was (they queue behind it).
        ahead_in_team: dict[str, int] = defaultdict(int)
        last_read_of_kind: dict[int, str] = {}
        for job in sorted(queued, key=lambda j: j.seq):
            if job.unread_group is not None:
                last_read_of_kind[job.unread_group] = job.id

        for job in self._order(queued, teams, team_of, team_held, owner_held):
            plan.order.append(job.id)
            team = teams[team_of[job.owner]]
            klass = self._class_of(job)
            place = ahead_in_team[team.name]
            ahead_in_team[team.name] += 1
            if job.unread_group is not None and last_read_of_kind[job.unread_group] == job.id:
                ahead_in_team[team.name] += job.unread_count
            asks = {k: float(v) for k, v in job.asks.items()}
            note = f" ({job.note})" if job.note else ""

            if job.not_before > self.now:
                # A time, not a countdown: the reason is stored, and a fixed text is written once.
                plan.waits[job.id] = (
                    f"attempt {job.attempts + 1} waits until {_clock(job.not_before, '%H:%M:%S UTC')} "
                    f"(back-off after a failed attempt)"
                )
                continue
            if not self.elastic and not fits(asks, self.total):
                plan.rejects[job.id] = (
                    f"can never run here: it asks for {describe(asks)} but the whole Ray cluster has "
                    f"{describe(self.total, also=asks)}"
                )
                continue
            quota_wait, borrowing = self._quota(job, asks, team, team_held[team.name], place)
            if quota_wait is not None:
                plan.waits[job.id] = quota_wait
                plan.alike_waits.add(job.id)
                continue
            if self.max_concurrent_jobs is not None and active >= self.max_concurrent_jobs:
                plan.waits[job.id] = (
                    f"{active} jobs running, the cap is {self.max_concurrent_jobs} (AEFORGE_MAX_CONCURRENT_JOBS)"
                )
                plan.alike_waits.add(job.id)
                continue

            pending = stopping_for.get(job.id, [])
            if pending:
                # It preempted before: the capacity its victims give back is its own; it waits for them to stop.
                free = _reserve(free, asks, pending)
                names = ", ".join(v.id for v in pending)
                plan.waits[job.id] = f"waiting for {names} to checkpoint and stop (preempted for it)"
                continue

            if fits(asks, free) and (head is None or self._may_backfill(job, asks, shadow, spare)):
                reason, behind = self._start_reason(job, asks, free, head, shadow, borrowing)
                reason += note
                if head is not None and not self._ends_before(job, shadow):
                    spare = add(spare, asks, -1)  # a backfill past the head's start takes from what it leaves over
                free = add(free, asks, -1)
                team_held[team.name].take(asks)
                owner_held[job.owner].take(asks)
                active += 1
                plan.starts.append(Start(job.id, reason, backfilled_ahead_of=behind, borrowed=bool(borrowing)))
                started_now.append(
                    RunningJob(job.id, job.owner, job.priority, job.priority_class, asks, self.now, job.max_hours)
                )
                continue

            if klass.may_preempt:
                victims = self._victims(job, asks, free, running, victims_taken, borrowed_running)
                if victims:
                    for victim in victims:
                        victims_taken.add(victim.id)
                        plan.preemptions.append(
                            Preemption(victim.id, job.id, f"preempted by {job.id} (class {klass.name})")
                        )
                    free = _reserve(free, asks, victims)
                    names = ", ".join(v.id for v in victims)
                    plan.waits[job.id] = f"preempting {names}: waiting for them to checkpoint and stop"
                    continue

            plan.demand.append(job.id)
            if head is None or not fits(asks, free) or (shadow is None and not fits(asks, spare)):
                # The head, or a job that fits neither now nor in what the head leaves over: a later job asking the
                # same can neither start nor backfill in this pass (free capacity only shrinks: _reserve), nor preempt
                # (this one's class found no victims for as much).
                plan.alike_waits.add(job.id)
            if head is None:
                head = job
                shadow, spare = self._reservation(asks, free, [*running, *started_now])
                when = "" if shadow is None else f"; expected to start by {_clock(shadow)} (running jobs' max_hours)"
                short = "" if fits(asks, self.total) else " (waiting for the autoscaler to add nodes)"
                plan.waits[job.id] = f"needs {describe(asks)}; free {describe(free, also=asks)}{note}{short}{when}"
            elif job.max_hours is None:
                plan.waits[job.id] = (
                    f"behind {head.id}, which waits for capacity; a job without train.max_hours does not overtake it"
                )
            elif not fits(asks, free):
                plan.waits[job.id] = f"behind {head.id}; needs {describe(asks)}, free {describe(free, also=asks)}"
            elif shadow is None:
                plan.waits[job.id] = (
                    f"behind {head.id}, whose start cannot be known (it waits on running jobs without "
                    f"train.max_hours), so nothing overtakes it"
                )
            else:
                plan.waits[job.id] = (
                    f"behind {head.id}: its train.max_hours = {job.max_hours:g} h would end after {head.id} could start"
                )
        self._reread(plan, queued)
        return plan

    def _reread(self, plan: Plan, queued: Sequence[QueuedJob]) -> None:
        """Whether the jobs the store left unread could have changed this plan (Plan.reread), and why those that
        could not wait (Plan.unread_waits).

        The store reads, of each owner's queued jobs of one priority, class and resources (a kind), only the first
        few in submission order (and every sweep). A job left unread, B, would have been judged after those read of
        its kind, with no less held by its team and owner, no more capacity free (_reserve), no fewer running
        jobs taken as victims; so if one of those read waited for a reason that then holds for B too
        (``alike_waits``: a quota, the cap, capacity it fits neither now nor in what the head leaves over), B would
        have waited as well, and leaving it unread changed nothing: not the starts, not the fair-share order (a job
        that waits moves nobody's usage, and each owner's jobs keep their order). Where none of them did (they
        started, preempted, or waited for what B's own max_hours might not: to backfill), more of the kind is read."""
        partial = sorted((job for job in queued if job.unread_group is not None), key=lambda j: j.seq)
        for job in partial:  # the last one read of each kind that waits alike stays
            if job.id in plan.alike_waits and job.unread_group is not None:
                plan.unread_waits[job.unread_group] = (
                    f"behind {job.id}, which asks for the same (owner, class, resources) and waits"
                )
        plan.reread = {
            job.unread_group
            for job in partial
            if job.unread_group is not None and job.unread_group not in plan.unread_waits
        }

    # --- ordering -----------------------------------------------------------------------------------------------
    def _order(self, queued, teams, team_of, team_held, owner_held):
        """Queued jobs by priority, then fair share between teams and between a team's owners, then submission;
        lazily, so that a job started by the pass counts in its team's share before the next job is chosen. Heaps
        of teams and of each team's owners, keyed by usage when pushed: an entry whose usage grew since (a job of
        it started) is pushed again with its new usage rather than taken."""
        by_priority: dict[int, dict[str, dict[str, list[QueuedJob]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list))
        )
        for job in sorted(queued, key=lambda j: j.seq):
            by_priority[job.priority][team_of[job.owner]][job.owner].append(job)
        for priority in sorted(by_priority, reverse=True):
            per_team = by_priority[priority]
            cursors = {o: 0 for owners in per_team.values() for o in owners}
            owner_heaps = {
                t: [(self._owner_usage(o, owner_held[o]), jobs[0].seq, o) for o, jobs in owners.items()]
                for t, owners in per_team.items()
            }
            for owner_heap in owner_heaps.values():
                heapq.heapify(owner_heap)
            heap = [(self._team_usage(teams[t], team_held[t]), t) for t in per_team]
            heapq.heapify(heap)
            while heap:
                usage, name = heapq.heappop(heap)
                current = self._team_usage(teams[name], team_held[name])
                if current > usage + EPS:  # its share grew since it was pushed (a job of it started): re-place it
                    heapq.heappush(heap, (current, name))
                    continue
                owner_heap = owner_heaps[name]
                while True:
                    owner_usage, _, owner = heapq.heappop(owner_heap)
                    now_usage = self._owner_usage(owner, owner_held[owner])
                    if now_usage <= owner_usage + EPS:
                        break
                    heapq.heappush(owner_heap, (now_usage, per_team[name][owner][cursors[owner]].seq, owner))
                jobs = per_team[name][owner]
                job = jobs[cursors[owner]]
                cursors[owner] += 1
                yield job
                if cursors[owner] < len(jobs):
                    heapq.heappush(
                        owner_heap, (self._owner_usage(owner, owner_held[owner]), jobs[cursors[owner]].seq, owner)
                    )
                if owner_heap:
                    heapq.heappush(heap, (self._team_usage(teams[name], team_held[name]), name))

    def _team_usage(self, team: TeamView, holder: _Holder) -> float:
        return (dominant_share(holder.resources, self.total) + self.recent.get(team.name, 0.0)) / team.weight

    def _owner_usage(self, owner: str, holder: _Holder) -> float:
        return dominant_share(holder.resources, self.total) + self.recent.get(f"owner:{owner}", 0.0)

    def team_usage(self, team: TeamView, holds: Mapping[str, float]) -> float:
        """A team's weighted usage: dominant share now plus decayed recent usage, over its weight."""
        return self._team_usage(team, _Holder(dict(holds)))

    def _class_of(self, job) -> PriorityClass:
        return self.policy.priority_class(job.priority_class) or self.policy.default_class

    # --- checks -------------------------------------------------------------------------------------------------
    def _quota(self, job, asks, team: TeamView, holder: _Holder, place: int) -> tuple[str | None, list[str]]:
        """(why the job waits for its team's quota, or None; what its team would hold beyond its quota with it, as
        "GPU 2 beyond team vision's quota 8", one per resource, and the jobs)."""
        borrowing: list[str] = []
        ahead = f"; {place} job{'s' if place != 1 else ''} ahead in its queue" if place else ""
        for ray_name in QUOTA_RESOURCES.values():
            quota = team.quota.resource(ray_name)
            if quota is None:
                continue
            after = holder.resources.get(ray_name, 0.0) + asks.get(ray_name, 0.0)
            if after <= quota + EPS or asks.get(ray_name, 0.0) <= 0:
                continue
            ceiling = team.ceiling(ray_name)
            if ceiling is not None and after > ceiling + EPS:
                extra = f" plus borrowing {ceiling - quota:g}" if ceiling > quota else ""
                return (
                    f"team {team.name} holds {ray_name} {holder.resources.get(ray_name, 0.0):g} of its quota "
                    f"{quota:g}{extra}; this job needs {asks.get(ray_name, 0.0):g}{ahead}"
                ), []
            borrowing.append(f"{ray_name} {after - quota:g} beyond team {team.name}'s quota {quota:g}")
        if team.quota.jobs is not None and holder.jobs + 1 > team.quota.jobs:
            ceiling = team.jobs_ceiling()
            if ceiling is not None and holder.jobs + 1 > ceiling:
                return f"team {team.name} runs {holder.jobs} jobs of its quota {team.quota.jobs}{ahead}", []
            beyond = holder.jobs + 1 - team.quota.jobs
            borrowing.append(
                f"{beyond} job{'s' if beyond != 1 else ''} beyond team {team.name}'s quota of {team.quota.jobs} jobs"
            )
        return None, borrowing

    def _may_backfill(self, job: QueuedJob, asks, shadow: float | None, spare: Mapping[str, float]) -> bool:
        if job.max_hours is None:
            return False  # its end is unknown: it could hold the head's capacity for ever
        return self._ends_before(job, shadow) or fits(asks, spare)

    def _ends_before(self, job: QueuedJob, shadow: float | None) -> bool:
        return job.max_hours is not None and shadow is not None and self.now + job.max_hours * 3600 <= shadow + EPS

    def _start_reason(self, job, asks, free, head, shadow, borrowing) -> tuple[str, str | None]:
        """The reason of a start, as its event says it: first how it starts when that is not plainly (resumed after
        a preemption, backfilled ahead of a waiting head, on borrowed capacity), then what it asks for and finds free;
        and the head it backfills ahead of, if any."""
        said = []
        resumed = job.resumes_after_preemption
        if resumed is not None:
            at = (
                "its last checkpoint, if it wrote one,"
                if resumed.step is None
                else f"its checkpoint at step {resumed.step}"
            )
            said.append(f"resumed from {at} after preemption by {resumed.by} (attempt {job.attempts + 1})")
        elif job.attempts > 0:  # after a failed attempt, or queued again by a person
            said.append(f"resumes from its checkpoint (attempt {job.attempts + 1})")
        if head is not None:
            expected = "" if shadow is None else f", expected to start by {_clock(shadow)}"
            if self._ends_before(job, shadow):
                said.append(
                    f"backfilled ahead of {head.id} (ends by {_clock(self.now + job.max_hours * 3600)}, its "
                    f"train.max_hours = {job.max_hours:g} h, before {head.id} could start{expected})"
                )
            else:
                said.append(f"backfilled ahead of {head.id} (it fits in what {head.id} leaves over{expected})")
        if borrowing:
            said.append(f"on borrowed capacity: {', '.join(borrowing)}")
        said.append(f"admitted: asks for {describe(asks)}; free {describe(free, also=asks)}")
        return "; ".join(said), None if head is None else head.id

    def _reservation(self, asks, free, running: Sequence[RunningJob]) -> tuple[float | None, dict[str, float]]:
        """When the head could start (the running jobs ending at their max_hours, earliest first) and what it leaves
        over then; (None, {}) when it needs capacity held by a job with no max_hours (its start is unknown)."""
        ends = []
        for job in running:
            if job.preempted_by is not None:
                continue  # already counted as given back to its preemptor
            if job.max_hours is None or job.started_at is None:
                ends.append((math.inf, job))
            else:
                ends.append((max(job.started_at + job.max_hours * 3600, self.now), job))
        ends.sort(key=lambda e: e[0])
        available = dict(free)
        for end, job in ends:
            if math.isinf(end):
                break
            available = add(available, job.holds)
            if fits(asks, available):
                return end, add(available, asks, -1)
        return None, {}

    def _borrowed(self, running, teams, team_of) -> set[str]:
        """Running jobs that hold capacity beyond their team's quota: the youngest of a team's jobs, beyond it."""
        borrowed: set[str] = set()
        per_team: dict[str, list[RunningJob]] = defaultdict(list)
        for job in running:
            per_team[team_of[job.owner]].append(job)
        for name, jobs in per_team.items():
            team = teams[name]
            if not team.quota.bounded:
                continue
            holder = _Holder()
            for job in sorted(jobs, key=lambda j: j.started_at or 0.0):
                holder.take(job.holds)
                over = any(
                    (q := team.quota.resource(r)) is not None and holder.resources.get(r, 0.0) > q + EPS
                    for r in QUOTA_RESOURCES.values()
                ) or (team.quota.jobs is not None and holder.jobs > team.quota.jobs)
                if over:
                    borrowed.add(job.id)
        return borrowed

    def _preemptible(self, running) -> list[RunningJob]:
        """The running jobs of preemptible classes that have run the policy's minimum (once per pass)."""
        if self._preemptible_cache is None or self._preemptible_cache[0] is not running:
            eligible = [
                r
                for r in running
                if self._class_of(r).preemptible
                and r.started_at is not None
                and self.now - r.started_at >= self.policy.min_run_s
            ]
            self._preemptible_cache = (running, eligible)
        return self._preemptible_cache[1]

    def _victims(self, job, asks, free, running, taken, borrowed_running) -> list[RunningJob]:
        """The smallest set of running jobs whose stopping makes room for ``job``: preemptible, of a lower priority,
        run for at least the policy's minimum; borrowed capacity first, then the lowest class, then the youngest.
        Empty when even all of them would not make room. ``borrowed_running()``: the running jobs on borrowed
        capacity (found only when there are candidates)."""
        candidates = [r for r in self._preemptible(running) if r.id not in taken and r.priority < job.priority]
        if not candidates:
            return []
        borrowed = borrowed_running()
        candidates.sort(key=lambda r: (r.id not in borrowed, r.priority, -(r.started_at or 0.0)))
        chosen: list[RunningJob] = []
        available = dict(free)
        for victim in candidates:
            if fits(asks, available):
                break
            chosen.append(victim)
            available = add(available, victim.holds)
        if not fits(asks, available):
            return []
        # Smallest: drop any chosen job the others make room without (the latest chosen first).
        for victim in reversed(list(chosen)):
            if fits(asks, add(available, victim.holds, -1)):
                chosen.remove(victim)
                available = add(available, victim.holds, -1)
        return chosen


def _reserve(free: Mapping[str, float], asks: Mapping[str, float], victims: Iterable[RunningJob]) -> dict[str, float]:
    """What stays free once a preempting job has the capacity its victims give back, and what of its asks free must
    cover beyond that. The victims' capacity beyond its asks is not offered to later jobs of the pass: the victims
    still run until they checkpoint (the next pass sees it free). So free never grows during a pass, which is what
    lets a pass leave jobs unread (Scheduler._reread)."""
    after = add(free, asks, -1)
    for victim in victims:
        after = add(after, victim.holds)
    return {k: min(v, after.get(k, v)) for k, v in free.items()} | {k: v for k, v in after.items() if k not in free}


def _clock(epoch_s: float, form: str = "%Y-%m-%d %H:%M:%S UTC") -> str:
    import time

    return time.strftime(form, time.gmtime(epoch_s))
