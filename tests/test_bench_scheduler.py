"""benchmarks/bench_scheduler.py at a tiny scale: the simulation runs the real store, policy and dispatcher through
a trace to the end and prints every figure (no assertion on the figures' values: they are the benchmark's)."""

from __future__ import annotations

import re

from benchmarks.bench_scheduler import main, make_trace, policy_yaml
from services.policy import parse_policy


def test_the_trace_and_its_policy_are_what_the_benchmark_says():
    trace = make_trace(jobs=200, teams=4, users=10, hours=5, seed=1)
    assert len(trace.jobs) == 200 and sorted(trace.teams) == ["team0", "team1", "team2", "team3"]
    assert {j.klass for j in trace.jobs} <= {"low", "normal", "high", "urgent"}
    assert all(j.max_hours is None or j.max_hours * 3600 >= j.duration_s for j in trace.jobs)
    policy = parse_policy(policy_yaml(trace, 64), "bench")
    assert policy.team_of("user0").name == "team0" and policy.team_of("user0").quota.gpu == 16
    # --one-class: the same jobs (sizes, durations, arrivals), every one in class normal.
    one = make_trace(jobs=200, teams=4, users=10, hours=5, seed=1, one_class=True)
    assert {j.klass for j in one.jobs} == {"normal"}
    assert [(j.gpus, j.duration_s, j.arrival_s) for j in one.jobs] == [
        (j.gpus, j.duration_s, j.arrival_s) for j in trace.jobs
    ]


def test_a_tiny_simulation_runs_every_job_and_prints_every_figure(capsys):
    args = ["--jobs", "40", "--nodes", "4", "--teams", "2", "--users", "4", "--hours", "2", "--backends", "sqlite"]
    assert main([*args, "--pass-queued", "30", "--pass-running", "4", "--pass-repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "finished jobs: 40 of 40 (0 failed or refused)" in out
    for figure in (
        r"GPU utilisation while a backlog exists: [\d.]+%",
        r"Jain's fairness among teams with work queued, of weighted usage held now: ([\d.]+|nan); of weighted "
        r"usage held now plus recent \(half-life decay, what fair share orders by\): ([\d.]+|nan)",
        r"preemptions: \d+; work lost: 0 GPU-h",
        r"class normal +n= *\d+",
        r"team team0 +n= *\d+",
        r"dispatcher pass over the run: p50 [\d.]+ ms",
        r"dispatcher pass at 30 queued / 4 running: p50 \d+ ms",
    ):
        assert re.search(figure, out), (figure, out)
