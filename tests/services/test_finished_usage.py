"""The finished jobs' recent usage a dispatcher keeps from pass to pass (services.dispatcher.FinishedUsage): on random
histories, the sums it keeps equal those recent_usage makes again from every finished job, with late commits, a
plan made twice in one pass, a policy reloaded and the cluster resized; and through the real store and dispatcher."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pytest

from services.dispatcher import HISTORY_HALF_LIVES, Dispatcher, FinishedUsage, recent_usage
from services.policy import PolicySource, parse_policy
from services.store import QueueSnapshot, UsageRow
from tests.services.fakes import FakeCluster, FakeLauncher

POLICY_TEXT = """\
half_life_hours: 2
teams:
  vision: {owners: [alice, bob], weight: 2}
  speech: {owners: [carol]}
classes:
  - {name: normal, value: 0}
"""
T0 = 1_900_000_000.0


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def test_kept_sums_equal_the_sums_made_again_from_every_finished_job():
    rng = random.Random(5)
    policy = parse_policy(POLICY_TEXT, "test-policy")
    total = {"CPU": 16.0, "GPU": 8.0}
    kept = FinishedUsage()
    finished: list[UsageRow] = []
    now, resets, late = T0, 0, 0
    cutoff = None  # the start of the last read of HISTORY_HALF_LIVES (the first pass's, or after a reset)
    for n in range(400):
        now += rng.choice([1.0, 30.0, 600.0, 3600.0])
        latest = max((r.finished_at for r in finished), default=None)
        for _ in range(rng.randint(0, 3)):
            # Some finishes are stamped before the latest one already counted (another process committed late).
            end = now - rng.uniform(0.0, 200.0)
            late += latest is not None and at(end) < latest
            start = end - rng.uniform(60.0, 30_000.0)
            resources = {"CPU": float(rng.choice([1, 4, 8])), "GPU": float(rng.choice([0, 1, 2, 8]))}
            owner = rng.choice(["alice", "bob", "carol", "dan"])
            finished.append(UsageRow(f"job-{n}-{len(finished)}", owner, resources, at(start), at(end)))
        reset = cutoff is None
        if rng.random() < 0.03:  # the policy file read again
            policy, resets, reset = parse_policy(POLICY_TEXT, "test-policy"), resets + 1, True
        if rng.random() < 0.03:  # a node joined
            total, resets, reset = {"CPU": total["CPU"] + 4.0, "GPU": total["GPU"] + 1.0}, resets + 1, True
        since = kept.since(policy, total, now)
        if reset:
            assert since == at(now - HISTORY_HALF_LIVES * policy.half_life_s)
            cutoff = since
        read = [r for r in finished if r.finished_at > since]  # what the store reads from `since`
        got = kept.update(read, policy, total, now)
        if rng.random() < 0.2:  # the pass planned again with more of the queue read: the same rows again
            assert kept.update(read, policy, total, now) == got
        # Made again from every finished job since the last full read (a job finished before it is not counted:
        # it finished over HISTORY_HALF_LIVES before that read).
        history = tuple(r for r in finished if r.finished_at > cutoff)
        want = recent_usage(policy, QueueSnapshot(queued=(), active=(), history=history), total, now)
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (n, key)
    assert resets > 5 and late > 20


@pytest.fixture
def policy_path(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_TEXT)
    return path


def test_a_dispatcher_reads_only_the_jobs_finished_since_its_last_pass(store, policy_path, monkeypatch):
    from services import store as store_module

    clock = [T0]
    monkeypatch.setattr(store_module, "utcnow", lambda: at(clock[0]))  # the store stamps this test's times
    launcher = FakeLauncher()
    dispatcher = Dispatcher(
        store,
        FakeCluster({"CPU": 4.0, "GPU": 0.0}),
        launcher,
        policies=PolicySource(policy_path),
        environ={},
        clock=lambda: clock[0],
    )
    reads: list[int] = []
    schedule = store.schedule

    def counting(plan_for, **kwargs):
        def counted(snapshot):
            reads.append(len(snapshot.history))
            return plan_for(snapshot)

        return schedule(counted, **kwargs)

    store.schedule = counting
    ids = []
    for i in range(6):
        job, _ = store.submit(
            name=f"j{i}",
            owner=["alice", "carol"][i % 2],
            kind="train",
            spec_text="",
            spec_json=json.dumps({"name": f"j{i}"}),
            resources={"CPU": 1.0, "GPU": 0.0},
            priority_class="normal",
        )
        ids.append(job.id)

    def finish(job_ids):
        for job_id in job_ids:
            launcher.set(store.get(job_id).ray_submission_id, "RUNNING")
        clock[0] += 600
        dispatcher.tick()
        for job_id in job_ids:
            launcher.set(store.get(job_id).ray_submission_id, "SUCCEEDED")
        clock[0] += 1200
        dispatcher.tick()

    dispatcher.tick()  # the first four start
    finish(ids[:4])  # ... run, and finish; the other two start
    assert reads[-1] == 4
    clock[0] += 60
    dispatcher.tick()
    assert reads[-1] == 4  # within FinishedUsage.OVERLAP_S of the latest finish: read again, not counted again
    finish(ids[4:])  # read from the latest finish counted before this pass: all six
    assert reads[-1] == 6
    clock[0] += 60
    dispatcher.tick()
    assert reads[-1] == 2  # the first four finished 30 minutes before the latest: not read again
    policy = dispatcher.policies.current()
    total = {"CPU": 4.0, "GPU": 0.0}
    now = clock[0]
    want = recent_usage(policy, store.snapshot(history_since=at(0)), total, now)
    got = recent_usage(policy, store.snapshot(), total, now, dispatcher.finished_usage.update([], policy, total, now))
    assert set(got) == set(want) == {"vision", "speech", "owner:alice", "owner:carol"}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9)
