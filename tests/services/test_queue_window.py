"""A scheduling pass that reads of each owner's queued jobs alike (priority, class, resources) only the first few
(Store.schedule's window): it decides what the pass over every queued job decides, on random queues (the pure
scheduler, windowed as the store windows it), and through the real store and dispatcher (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import replace

import pytest

from services.dispatcher import Dispatcher
from services.policy import PolicySource, parse_policy
from services.scheduler import QueuedJob, RunningJob, Scheduler
from tests.services.fakes import FakeCluster, FakeLauncher

NOW = 1_000_000.0
POLICY_TEXT = """\
preemption_min_run_minutes: 5
teams:
  vision: {owners: [alice, bob], weight: 2, quota: {gpu: 4, jobs: 6}, borrowing_limit: {gpu: 2}}
  speech: {owners: [carol], quota: {gpu: 3}}
classes:
  - {name: low, value: -10}
  - {name: normal, value: 0}
  - {name: urgent, value: 100, preemptible: false, may_preempt: true}
"""
VALUES = {"low": -10, "normal": 0, "urgent": 100}


def random_case(rng: random.Random) -> tuple[list[QueuedJob], list[RunningJob], dict[str, float]]:
    owners = ["alice", "bob", "carol", "dan"]
    shapes = [(1.0, 0.0), (1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
    queued = []
    for seq in range(rng.randint(5, 40)):
        klass = rng.choice(["low", "normal", "normal", "urgent"])
        cpu, gpu = rng.choice(shapes)
        queued.append(
            QueuedJob(
                f"q-{seq}",
                seq,
                rng.choice(owners),
                VALUES[klass],
                klass,
                {"CPU": cpu, "GPU": gpu},
                max_hours=rng.choice([None, 0.5, 1.0, 3.0, 10.0]),
                # A few jobs back off after a failed attempt.
                not_before=NOW + 60 if rng.random() < 0.1 else 0.0,
                attempts=1 if rng.random() < 0.2 else 0,
            )
        )
    running = []
    for i in range(rng.randint(0, 8)):
        klass = rng.choice(["low", "normal", "urgent"])
        cpu, gpu = rng.choice(shapes)
        running.append(
            RunningJob(
                f"r-{i}",
                rng.choice(owners),
                VALUES[klass],
                klass,
                {"CPU": cpu, "GPU": gpu},
                NOW - rng.choice([60.0, 3600.0, 7200.0]),
                max_hours=rng.choice([None, 2.0, 4.0]),
            )
        )
    total = {"CPU": float(rng.choice([8, 16, 32])), "GPU": float(rng.choice([4, 8, 12]))}
    return queued, running, total


def windowed_plan(scheduler: Scheduler, queued: list[QueuedJob], running: list[RunningJob], window: int):
    """The pass as Store.schedule makes it: the first ``window`` queued jobs of each kind, then more of the kinds the
    plan asks for (sixteen times as many each round, then all of them)."""
    kinds: dict[tuple, list[QueuedJob]] = defaultdict(list)
    for job in queued:
        kinds[(job.owner, job.priority, job.priority_class, tuple(sorted(job.asks.items())))].append(job)
    wider: dict[tuple, int] = {}
    for rounds in range(5):
        seen = []
        for key, jobs in kinds.items():
            n = len(jobs) if rounds == 4 else wider.get(key, window)
            read = jobs[:n]
            group = read[0].seq if len(jobs) > n else None
            seen += [replace(job, unread_group=group, unread_count=len(jobs) - len(read)) for job in read]
        plan = scheduler.plan(sorted(seen, key=lambda j: j.seq), running)
        if not plan.reread:
            return plan, seen
        for key, jobs in kinds.items():
            if jobs[0].seq in plan.reread:
                wider[key] = window * 16 ** (rounds + 1)
    raise AssertionError("the last round reads every job")


@pytest.mark.parametrize("window", [1, 2])
def test_a_windowed_pass_decides_what_the_pass_over_every_job_decides(window):
    policy = parse_policy(POLICY_TEXT, "test-policy")
    rng = random.Random(21)
    read_fewer = 0
    for _ in range(400):
        queued, running, total = random_case(rng)
        scheduler = Scheduler(policy, total, NOW, recent_usage={"vision": 0.1, "owner:carol": 0.05})
        full = scheduler.plan(queued, running)
        plan, seen = windowed_plan(scheduler, queued, running, window)
        assert plan.starts == full.starts
        assert plan.preemptions == full.preemptions
        assert plan.rejects == full.rejects
        assert plan.demand == [job_id for job_id in full.demand if job_id in plan.demand]
        # Each job left unread waits in the full pass too, and its kind has a read job that waits alike.
        seen_ids = {job.id for job in seen}
        unread = [job for job in queued if job.id not in seen_ids]
        assert all(job.id in full.waits for job in unread)
        read_fewer += bool(unread)
    assert read_fewer > 50  # the window did leave jobs unread in many of the cases


def test_capacity_a_victim_gives_back_beyond_its_preemptors_asks_waits_for_it_to_stop():
    policy = parse_policy(POLICY_TEXT, "test-policy")
    victim = RunningJob("r-1", "carol", VALUES["low"], "low", {"CPU": 4.0, "GPU": 4.0}, NOW - 3600)
    urgent = QueuedJob("q-1", 1, "dan", VALUES["urgent"], "urgent", {"CPU": 2.0, "GPU": 2.0})
    small = QueuedJob("q-2", 2, "erin", VALUES["normal"], "normal", {"CPU": 2.0, "GPU": 2.0}, max_hours=1.0)
    plan = Scheduler(policy, {"CPU": 4.0, "GPU": 4.0}, NOW).plan([urgent, small], [victim])
    assert [p.victim_id for p in plan.preemptions] == ["r-1"]
    # The other half of what r-1 holds is free only once it has stopped (the next pass), not in this one: the pass
    # never finds more free than it started with, which lets it leave alike jobs unread.
    assert not plan.starts and "q-2" in plan.waits


POLICY = """\
preemption_min_run_minutes: 0
teams:
  vision: {owners: [alice, bob], quota: {cpu: 2}, borrowing_limit: {cpu: 0}}
classes:
  - {name: normal, value: 0}
"""


@pytest.fixture
def make_dispatcher(store, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)

    def make(cpus: float, **kwargs):
        cluster = FakeCluster({"CPU": cpus, "GPU": 0.0})
        return Dispatcher(store, cluster, FakeLauncher(), policies=PolicySource(path), environ={}, **kwargs)

    return make


def submit(store, name, owner, cpus=1.0):
    job, _ = store.submit(
        name=name,
        owner=owner,
        kind="train",
        spec_text=f"name: {name}\n",
        spec_json=json.dumps({"name": name}),
        resources={"CPU": cpus, "GPU": 0.0},
        priority_class="normal",
    )
    return job


def test_jobs_alike_beyond_the_window_start_when_there_is_room(store, make_dispatcher):
    dispatcher = make_dispatcher(cpus=7, queue_window=2)
    jobs = [submit(store, f"dave-{i}", "dave") for i in range(9)]
    report = dispatcher.tick()
    assert report.started == [job.id for job in jobs[:7]]
    assert store.get(jobs[7].id).wait_reason == "needs CPU 1, GPU 0; free CPU 0, GPU 0"
    assert store.get(jobs[8].id).wait_reason.startswith(f"behind {jobs[7].id}")


def test_a_backlog_over_its_quota_still_lets_the_next_job_that_fits_it_start(store, make_dispatcher):
    dispatcher = make_dispatcher(cpus=8, queue_window=2)
    first = submit(store, "alice-small-0", "alice")
    big = [submit(store, f"alice-big-{i}", "alice", cpus=2.0) for i in range(6)]
    small = submit(store, "alice-small-1", "alice")
    report = dispatcher.tick()
    # The big ones exceed the team's quota (1 + 2 > 2); the small one after them does not (1 + 1).
    assert report.started == [first.id, small.id]
    assert store.get(big[0].id).wait_reason.startswith("team vision holds CPU 1 of its quota 2")
    # Only the first two of the six alike were read; the others wait behind the last one read, and say so.
    for job in big[2:]:
        assert store.get(job.id).wait_reason == (
            f"behind {big[1].id}, which asks for the same (owner, class, resources) and waits"
        )
    # Written once: the next pass, with nothing changed, finds the reasons already there.
    assert not dispatcher.tick().started
    assert store.get(big[5].id).wait_reason.startswith(f"behind {big[1].id}")


def test_a_quota_wait_counts_the_jobs_ahead_that_the_window_left_unread(store, make_dispatcher):
    dispatcher = make_dispatcher(cpus=8, queue_window=1)
    backlog = [submit(store, f"alice-{i}", "alice") for i in range(30)]
    bigger = submit(store, "alice-big", "alice", cpus=2.0)
    report = dispatcher.tick()
    assert report.started == [backlog[0].id, backlog[1].id]  # the team's quota: CPU 2
    # Read: the first 16 of the backlog (a second round, after the first one read started); unread: the other 14.
    # All 30 go before the bigger job in alice's queue, the 2 started in this pass among them.
    assert store.get(backlog[15].id).wait_reason == (
        "team vision holds CPU 2 of its quota 2; this job needs 1; 15 jobs ahead in its queue"
    )
    assert store.get(bigger.id).wait_reason == (
        "team vision holds CPU 2 of its quota 2; this job needs 2; 30 jobs ahead in its queue"
    )
    # The next pass reads one of the backlog (it waits for the quota, as all of them would): 28 still ahead.
    assert not dispatcher.tick().started
    assert store.get(bigger.id).wait_reason == (
        "team vision holds CPU 2 of its quota 2; this job needs 2; 28 jobs ahead in its queue"
    )
    assert store.get(backlog[29].id).wait_reason == (
        f"behind {backlog[2].id}, which asks for the same (owner, class, resources) and waits"
    )


def test_a_job_running_jobs_stop_for_is_read_even_beyond_the_window(store):
    from sqlalchemy import update

    from services.scheduler import Plan
    from services.store import jobs_table

    jobs = [submit(store, f"dave-{i}", "dave") for i in range(5)]
    victim = submit(store, "erin-0", "erin")
    with store.engine.begin() as conn:  # erin's job runs and was asked to stop for dave's last
        conn.execute(
            update(jobs_table)
            .where(jobs_table.c.id == victim.id)
            .values(state="running", attempts=1, preempted_by=jobs[4].id)
        )
    seen = []

    def plan_for(snapshot):
        seen.append(snapshot)
        return Plan()

    store.schedule(plan_for, window=1)
    read = {row.id: row for row in seen[0].queued}
    assert set(read) == {jobs[0].id, jobs[4].id}
    # The first is its kind's only one read, with more behind it; the last is read on its own.
    assert read[jobs[0].id].unread_group == jobs[0].seq and read[jobs[4].id].unread_group is None
    assert read[jobs[0].id].unread_count == 3  # dave-1 to dave-3: the one read on its own is not among them


def test_with_an_autoscaler_every_waiting_job_is_read_and_asked_for(store, tmp_path):
    class Autoscaler:
        def __init__(self):
            self.requests = []

        def request(self, bundles):
            self.requests.append(bundles)

    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    autoscaler = Autoscaler()
    dispatcher = Dispatcher(
        store,
        FakeCluster({"CPU": 1.0, "GPU": 0.0}),
        FakeLauncher(),
        policies=PolicySource(path),
        environ={},
        autoscaler=autoscaler,
        queue_window=1,
    )
    jobs = [submit(store, f"dave-{i}", "dave", cpus=2.0) for i in range(4)]
    assert not dispatcher.tick().started
    # Each job's bundle (one worker each), not only the first's of the four alike.
    assert len(autoscaler.requests[-1]) == len(jobs)
    assert store.get(jobs[3].id).wait_reason.startswith(f"behind {jobs[0].id}, which waits for capacity")
