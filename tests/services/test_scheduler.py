"""The scheduling pass on plain values: fair share between teams and owners, quotas and borrowing with their stored
reasons, EASY backfill with and without max_hours, preemption's choice of victims, autoscaler demand."""

from __future__ import annotations

import pytest

from services.policy import Policy, parse_policy
from services.scheduler import QueuedJob, RunningJob, Scheduler, decayed_usage, dominant_share

NOW = 1_000_000.0
POLICY = parse_policy(
    """\
preemption_min_run_minutes: 5
teams:
  vision: {owners: [alice, bob], weight: 1, quota: {gpu: 4}, borrowing_limit: {gpu: 2}}
  speech: {owners: [carol], weight: 1, quota: {gpu: 4}}
  nlp: {owners: [dan], weight: 3}
classes:
  - {name: low, value: -10}
  - {name: normal, value: 0}
  - {name: urgent, value: 100, preemptible: false, may_preempt: true}
""",
    "test-policy",
)


def queued(job_id, owner="alice", seq=None, cpu=1.0, gpu=0.0, klass="normal", max_hours=None, **kw):
    value = {"low": -10, "normal": 0, "urgent": 100}[klass]
    seq = seq if seq is not None else int(job_id.split("-")[-1]) if job_id.split("-")[-1].isdigit() else 0
    return QueuedJob(job_id, seq, owner, value, klass, {"CPU": cpu, "GPU": gpu}, max_hours, **kw)


def running(job_id, owner="alice", cpu=1.0, gpu=0.0, klass="normal", age_s=3600.0, max_hours=None, **kw):
    value = {"low": -10, "normal": 0, "urgent": 100}[klass]
    return RunningJob(job_id, owner, value, klass, {"CPU": cpu, "GPU": gpu}, NOW - age_s, max_hours, **kw)


def test_a_backlog_of_one_owner_does_not_hold_a_colleague_behind_it():
    # Two owners with their own teams (no policy file); alice queued 6 jobs first, bob 2 after; room for 4.
    jobs = [queued(f"a-{i}", "alice", seq=i) for i in range(6)] + [
        queued(f"b-{i}", "bob", seq=10 + i) for i in range(2)
    ]
    plan = Scheduler(Policy(), {"CPU": 4}, NOW).plan(jobs, [])
    assert sorted(s.job_id for s in plan.starts) == ["a-0", "a-1", "b-0", "b-1"]
    assert plan.order[:4] == ["a-0", "b-0", "a-1", "b-1"]  # alternating: each start raises its team's share


def test_recent_usage_and_weights_decide_between_teams():
    jobs = [queued("a-1", "alice", seq=1), queued("c-2", "carol", seq=2), queued("d-3", "dan", seq=3)]
    # vision used much recently; nlp has weight 3, so the same recent usage counts a third.
    recent = {"vision": 0.6, "speech": 0.3, "nlp": 0.6}
    plan = Scheduler(POLICY, {"CPU": 1}, NOW, recent_usage=recent).plan(jobs, [])
    assert plan.order == ["d-3", "c-2", "a-1"] and [s.job_id for s in plan.starts] == ["d-3"]


def test_a_team_over_its_quota_waits_with_the_reason_and_others_go_on():
    jobs = [queued(f"a-{i}", "alice", seq=i, gpu=2) for i in range(1, 5)] + [queued("c-9", "carol", seq=9, gpu=1)]
    hold = [running("r-1", "bob", gpu=4)]  # vision holds GPU 4 of its quota 4
    plan = Scheduler(POLICY, {"CPU": 64, "GPU": 16}, NOW).plan(jobs, hold)
    started = {s.job_id: s for s in plan.starts}
    assert set(started) == {"a-1", "c-9"}
    assert started["a-1"].borrowed
    assert started["a-1"].reason.startswith("on borrowed capacity: GPU 2 beyond team vision's quota 4; admitted")
    assert plan.waits["a-2"] == (
        "team vision holds GPU 6 of its quota 4 plus borrowing 2; this job needs 2; 1 job ahead in its queue"
    )
    assert "3 jobs ahead in its queue" in plan.waits["a-4"]
    assert not started["c-9"].borrowed


def test_without_a_borrowing_limit_a_team_borrows_any_idle_capacity_and_without_idle_none():
    plan = Scheduler(POLICY, {"CPU": 64, "GPU": 8}, NOW).plan([queued("c-1", "carol", gpu=6)], [])
    assert plan.starts[0].borrowed  # speech: quota 4, no borrowing limit, the cluster idle
    full = [running("r-1", "alice", gpu=4)]
    plan = Scheduler(POLICY, {"CPU": 64, "GPU": 8}, NOW).plan([queued("c-1", "carol", gpu=6)], full)
    assert not plan.starts and plan.waits["c-1"].startswith("needs CPU 1, GPU 6; free CPU 63, GPU 4")


def test_a_job_bigger_than_the_cluster_is_refused_unless_the_cluster_grows():
    big = [queued("a-1", gpu=32)]
    assert "can never run here" in Scheduler(POLICY, {"CPU": 8, "GPU": 8}, NOW).plan(big, []).rejects["a-1"]
    elastic = Scheduler(Policy(), {"CPU": 8, "GPU": 8}, NOW, elastic=True).plan(big, [])
    assert "waiting for the autoscaler to add nodes" in elastic.waits["a-1"]
    assert elastic.demand == ["a-1"]


def test_backfill_only_with_max_hours_that_end_before_the_head_could_start():
    # 8 CPUs: a 6-CPU job runs with 2 h left; the head needs all 8. Behind it: a 2-CPU job of 1 h (ends in time),
    # a 2-CPU job of 3 h (would delay the head), and a 1-CPU job with no max_hours (never overtakes).
    hold = [running("r-0", cpu=6, age_s=3600, max_hours=3)]
    jobs = [
        queued("h-1", "bob", cpu=8),
        queued("long-2", "carol", cpu=2, max_hours=3),
        queued("short-3", "dan", cpu=2, max_hours=1),
        queued("open-4", "eve", cpu=1),
    ]
    plan = Scheduler(Policy(), {"CPU": 8}, NOW).plan(jobs, hold)
    assert [s.job_id for s in plan.starts] == ["short-3"]
    start = plan.starts[0]
    assert start.backfilled_ahead_of == "h-1" and start.reason.startswith("backfilled ahead of h-1")
    assert "expected to start by" in plan.waits["h-1"]
    assert plan.waits["long-2"] == "behind h-1: its train.max_hours = 3 h would end after h-1 could start"
    assert "a job without train.max_hours does not overtake it" in plan.waits["open-4"]


def test_no_backfill_while_the_head_waits_on_a_job_with_no_max_hours():
    hold = [running("r-0", cpu=6)]  # no max_hours: when the head can start is unknown
    jobs = [queued("h-1", "bob", cpu=8), queued("short-2", "dan", cpu=1, max_hours=0.1)]
    plan = Scheduler(Policy(), {"CPU": 8}, NOW).plan(jobs, hold)
    assert not plan.starts and "whose start cannot be known" in plan.waits["short-2"]


def test_a_preempting_class_stops_the_smallest_set_borrowed_first_then_lowest_then_youngest():
    hold = [
        running("vision-own", "alice", gpu=4, age_s=7200),  # within vision's quota
        running("vision-borrowed", "bob", gpu=2, age_s=7000),  # beyond it: borrowed
        running("speech-low", "carol", gpu=2, klass="low", age_s=6000),
        running("speech-young", "carol", gpu=1, age_s=600),
        running("speech-fresh", "carol", gpu=1, age_s=60),  # under the minimum run time
    ]
    urgent = queued("u-1", "dan", gpu=4, klass="urgent")
    plan = Scheduler(POLICY, {"CPU": 64, "GPU": 10}, NOW).plan([urgent, queued("n-2", "dan", gpu=1)], hold)
    assert {p.victim_id for p in plan.preemptions} == {"vision-borrowed", "speech-low"}
    assert all(p.by_job_id == "u-1" for p in plan.preemptions)
    assert "preempting" in plan.waits["u-1"] and not plan.starts
    # The capacity given back is reserved for the preempting job: n-2 does not take it.
    assert "n-2" in plan.waits

    # Next pass: the victims are stopping for u-1; it waits for them and preempts no one else.
    stopping = [h if h.id not in ("vision-borrowed", "speech-low") else _preempted(h, "u-1") for h in hold]
    again = Scheduler(POLICY, {"CPU": 64, "GPU": 10}, NOW).plan([urgent], stopping)
    assert (
        not again.preemptions and "waiting for vision-borrowed, speech-low to checkpoint and stop" in again.waits["u-1"]
    )


def test_nothing_is_preempted_for_a_class_that_may_not_or_of_a_class_that_is_not_preemptible():
    hold = [running("r-1", "carol", gpu=8, klass="urgent")]
    plan = Scheduler(POLICY, {"CPU": 64, "GPU": 8}, NOW).plan([queued("u-1", "dan", gpu=4, klass="urgent")], hold)
    assert not plan.preemptions
    hold = [running("r-1", "carol", gpu=8, klass="low")]
    plan = Scheduler(POLICY, {"CPU": 64, "GPU": 8}, NOW).plan([queued("n-1", "dan", gpu=4)], hold)
    assert not plan.preemptions and plan.waits["n-1"].startswith("needs")


def test_a_job_backing_off_waits_and_blocks_nobody():
    jobs = [queued("a-1", "alice", cpu=4, not_before=NOW + 60), queued("b-2", "bob", cpu=4)]
    plan = Scheduler(Policy(), {"CPU": 4}, NOW).plan(jobs, [])
    assert [s.job_id for s in plan.starts] == ["b-2"] and "back-off after a failed attempt" in plan.waits["a-1"]


def test_the_concurrency_cap_holds_everything():
    plan = Scheduler(Policy(), {"CPU": 8}, NOW, max_concurrent_jobs=1).plan([queued("a-1"), queued("b-2", "bob")], [])
    assert len(plan.starts) == 1 and "the cap is 1" in plan.waits[plan.order[1]]


def test_decayed_usage_halves_per_half_life_and_dominant_share_takes_the_largest():
    hour = 3600.0
    assert decayed_usage([(0, 100 * hour, 0.5)], 100 * hour, hour) == pytest.approx(0.5)
    recent = decayed_usage([(0, 10 * hour, 1.0)], 11 * hour, hour)
    assert recent == pytest.approx(0.5, rel=1e-3)  # ended one half-life ago
    assert dominant_share({"CPU": 8, "GPU": 1}, {"CPU": 64, "GPU": 4}) == 0.25


def _preempted(job: RunningJob, by: str) -> RunningJob:
    from dataclasses import replace

    return replace(job, preempted_by=by)
