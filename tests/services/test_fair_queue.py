"""The fair queue through the real store (SQLite and PostgreSQL) and dispatcher, with Ray's Jobs API faked: fair
order between two owners with a backlog, a quota wait and its stored reason, backfill with and without max_hours,
preemption (stopped, re-queued without spending an attempt, resumed), two dispatchers with preemption in play."""

from __future__ import annotations

import json
import threading

import pytest

from services.dispatcher import Dispatcher
from services.policy import PolicySource
from services.scheduler import _clock
from services.store import Store
from tests.services.fakes import FakeCluster, FakeLauncher

POLICY = """\
preemption_min_run_minutes: 0
teams:
  vision: {owners: [alice, bob], quota: {cpu: 2}, borrowing_limit: {cpu: 0}}
classes:
  - {name: normal, value: 0}
  - {name: urgent, value: 100, preemptible: false, may_preempt: true}
"""
PROGRESS = 'AEFORGE_PROGRESS {"step": 1234, "total": 5000}\n'


@pytest.fixture
def launcher():
    return FakeLauncher()


@pytest.fixture
def policy_path(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def make_dispatcher(store, launcher, policy_path):
    def make(cpus=4.0, clock=None, **kwargs):
        cluster = FakeCluster({"CPU": cpus, "GPU": 0.0})
        if clock is not None:
            kwargs["clock"] = clock
        return Dispatcher(store, cluster, launcher, policies=PolicySource(policy_path), environ={}, **kwargs)

    return make


def submit(store: Store, name, owner="carol", cpus=1.0, klass="normal", max_hours=None, max_attempts=2):
    train = {"steps": 10} | ({"max_hours": max_hours} if max_hours else {})
    job, _ = store.submit(
        name=name,
        owner=owner,
        kind="train",
        spec_text=f"name: {name}\n",
        spec_json=json.dumps({"name": name, "train": train}),
        resources={"CPU": cpus, "GPU": 0.0},
        priority={"normal": 0, "urgent": 100}[klass],
        priority_class=klass,
        max_hours=max_hours,
        max_attempts=max_attempts,
    )
    return job


def running(launcher: FakeLauncher, dispatcher: Dispatcher, store: Store, job_ids) -> None:
    for job_id in job_ids:
        launcher.set(store.get(job_id).ray_submission_id, "RUNNING", logs=PROGRESS)
    dispatcher.tick()


def test_a_colleague_is_not_held_behind_a_backlog(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher(cpus=2)
    backlog = [submit(store, f"dave-{i}", owner="dave") for i in range(5)]
    erin = submit(store, "erin-0", owner="erin")
    report = dispatcher.tick()
    assert report.started == [backlog[0].id, erin.id]  # one each, not dave's first two
    assert store.get(backlog[1].id).wait_reason == "needs CPU 1, GPU 0; free CPU 0, GPU 0"
    assert store.get(backlog[2].id).wait_reason.startswith(f"behind {backlog[1].id}")


def test_a_team_over_its_quota_waits_with_the_reason_stored(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher(cpus=8)
    jobs = [submit(store, f"alice-{i}", owner="alice") for i in range(4)]
    other = submit(store, "carol-0", owner="carol")
    report = dispatcher.tick()
    assert set(report.started) == {jobs[0].id, jobs[1].id, other.id}
    waiting = store.get(jobs[2].id)
    assert waiting.state == "queued"
    assert waiting.wait_reason == (
        "team vision holds CPU 2 of its quota 2; this job needs 1; 2 jobs ahead in its queue"
    )
    assert "3 jobs ahead in its queue" in store.get(jobs[3].id).wait_reason


def test_backfill_with_max_hours_and_never_without(store, launcher, make_dispatcher):
    now = [1_000_000.0]
    dispatcher = make_dispatcher(cpus=4, clock=lambda: now[0])
    long_run = submit(store, "long", owner="dave", cpus=3, max_hours=2)
    dispatcher.tick()
    running(launcher, dispatcher, store, [long_run.id])
    head = submit(store, "head", owner="erin", cpus=4)
    no_limit = submit(store, "no-limit", owner="frank", cpus=1)
    short = submit(store, "short", owner="gina", cpus=1, max_hours=1)
    report = dispatcher.tick()
    assert report.started == [short.id] and report.waiting == head.id
    # The long run's max_hours ends from its start as the store stamped it (the wall clock, not this test's).
    expected = _clock(store.get(long_run.id).started_at.timestamp() + 2 * 3600)
    assert store.events(short.id)[-1].reason == (
        f"backfilled ahead of {head.id} (ends by {_clock(now[0] + 3600)}, its train.max_hours = 1 h, before "
        f"{head.id} could start, expected to start by {expected}); admitted: asks for CPU 1, GPU 0; free CPU 1, GPU 0"
    )
    assert "does not overtake it" in store.get(no_limit.id).wait_reason
    assert store.get(head.id).state == "queued"


def test_a_preempted_job_is_stopped_requeued_without_spending_an_attempt_and_resumes(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher(cpus=2)
    victim = submit(store, "victim", owner="dave", cpus=2, max_attempts=1)
    dispatcher.tick()
    running(launcher, dispatcher, store, [victim.id])
    urgent = submit(store, "urgent", owner="erin", cpus=2, klass="urgent")

    report = dispatcher.tick()
    assert report.preempted == [victim.id] and launcher.stops == [victim.id]
    assert store.get(victim.id).preempted_by == urgent.id
    assert "preempting" in store.get(urgent.id).wait_reason
    dispatcher.tick()  # follows the stopped victim back to the queue, then starts the urgent job in its place
    after = store.get(victim.id)
    assert after.state == "queued" and after.preempted_by is None
    assert after.attempts == 1 and after.max_attempts == 2  # the attempt it used is given back
    assert store.events(victim.id)[-1].reason == (
        f"preempted by {urgent.id} at step 1234; re-queued to resume from its checkpoint (no attempt spent)"
    )
    assert store.get(urgent.id).state == "starting"
    assert "behind" in after.wait_reason or "needs" in after.wait_reason

    launcher.set(urgent.id, "SUCCEEDED")
    report = dispatcher.tick()
    assert report.started == [victim.id]
    resumed = store.get(victim.id)
    assert resumed.attempts == 2 and resumed.ray_submission_id == f"{victim.id}-attempt-2"
    assert store.events(victim.id)[-1].reason == (
        f"resumed from its checkpoint at step 1234 after preemption by {urgent.id} (attempt 2); "
        f"admitted: asks for CPU 2, GPU 0; free CPU 2, GPU 0"
    )


def test_a_job_preempted_before_it_reported_a_step_resumes_from_its_last_checkpoint(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher(cpus=2)
    victim = submit(store, "victim", owner="dave", cpus=2)
    dispatcher.tick()
    launcher.set(store.get(victim.id).ray_submission_id, "RUNNING")  # no progress line yet
    dispatcher.tick()
    urgent = submit(store, "urgent", owner="erin", cpus=2, klass="urgent")
    dispatcher.tick()
    dispatcher.tick()
    assert store.events(victim.id)[-1].reason == (
        f"preempted by {urgent.id}; re-queued to resume from its checkpoint (no attempt spent)"
    )
    launcher.set(urgent.id, "SUCCEEDED")
    assert dispatcher.tick().started == [victim.id]
    assert store.events(victim.id)[-1].reason.startswith(
        f"resumed from its last checkpoint, if it wrote one, after preemption by {urgent.id} (attempt 2); admitted"
    )


def test_a_job_that_failed_once_resumes_without_a_word_of_preemption(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher(cpus=2)
    job = submit(store, "flaky", owner="dave", cpus=1)
    dispatcher.tick()
    launcher.set(store.get(job.id).ray_submission_id, "FAILED", message="node died", logs=PROGRESS)
    assert dispatcher.tick().started == [job.id]  # followed back to the queue, started again (no back-off here)
    assert store.events(job.id)[-2].to_state == "queued"
    assert store.events(job.id)[-1].reason == (
        "resumes from its checkpoint (attempt 2); admitted: asks for CPU 1, GPU 0; free CPU 2, GPU 0"
    )


def test_a_job_on_borrowed_capacity_says_how_much_beyond_its_teams_quota(store, launcher, tmp_path):
    path = tmp_path / "borrowing.yaml"
    path.write_text(
        "teams:\n  vision: {owners: [alice], quota: {cpu: 2, jobs: 2}, borrowing_limit: {cpu: 2, jobs: 2}}\n"
        "classes:\n  - {name: normal, value: 0}\n"
    )
    dispatcher = Dispatcher(
        store, FakeCluster({"CPU": 8.0, "GPU": 0.0}), launcher, policies=PolicySource(path), environ={}
    )
    jobs = [submit(store, f"alice-{i}", owner="alice", cpus=1) for i in range(4)]
    assert dispatcher.tick().started == [j.id for j in jobs]
    reasons = [store.events(j.id)[-1].reason for j in jobs]
    assert reasons[1] == "admitted: asks for CPU 1, GPU 0; free CPU 7, GPU 0"  # within the quota: nothing borrowed
    assert reasons[2] == (
        "on borrowed capacity: CPU 1 beyond team vision's quota 2, 1 job beyond team vision's quota of 2 jobs; "
        "admitted: asks for CPU 1, GPU 0; free CPU 6, GPU 0"
    )
    assert reasons[3].startswith("on borrowed capacity: CPU 2 beyond team vision's quota 2, 2 jobs beyond")


def test_two_dispatchers_run_each_job_once_with_preemption_in_play(store, launcher, make_dispatcher):
    first, second = make_dispatcher(cpus=4), make_dispatcher(cpus=4)
    jobs = [submit(store, f"n-{i}", owner=f"user{i % 3}", cpus=1) for i in range(12)]
    urgent = [submit(store, f"u-{i}", owner="erin", cpus=2, klass="urgent") for i in range(2)]
    finished: set[str] = set()

    def work(dispatcher):
        for _ in range(40):
            dispatcher.tick()
            with launcher.lock:
                for sid, job in launcher.jobs.items():
                    if job["status"] == "PENDING":
                        job["status"], job["logs"] = "RUNNING", PROGRESS
                    elif job["status"] == "RUNNING" and sid.startswith("u-"):
                        job["status"] = "SUCCEEDED"
                    elif job["status"] == "RUNNING" and sid not in finished:
                        finished.add(sid)
                    elif job["status"] == "RUNNING":
                        job["status"] = "SUCCEEDED"

    threads = [threading.Thread(target=work, args=(d,)) for d in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for _ in range(20):
        first.tick()
        with launcher.lock:
            for job in launcher.jobs.values():
                if job["status"] in ("PENDING", "RUNNING"):
                    job["status"] = "SUCCEEDED"
    states = {j.id: j.state for j in (store.get(x.id) for x in (*jobs, *urgent))}
    assert set(states.values()) == {"succeeded"}, states
    # Each attempt submitted once: no submission id twice, and every job's attempts match its submissions.
    submitted = [sid for sid, _, _ in launcher.submissions]
    assert len(submitted) == len(set(submitted))
    for job_id in states:
        job = store.get(job_id)
        assert sum(1 for sid in submitted if sid == job_id or sid.startswith(f"{job_id}-attempt-")) == job.attempts
        assert job.attempts <= job.max_attempts


def test_the_queue_per_team_and_owner_over_http_and_the_cli(store, launcher, make_dispatcher, policy_path, tmp_path):
    import typer
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from services import cli_jobs
    from services.api import create_app
    from services.client import AeforgeClient
    from services.settings import Principal, ServiceSettings

    dispatcher = make_dispatcher(cpus=4)
    alice = [submit(store, f"alice-{i}", owner="alice") for i in range(3)]
    carol = [submit(store, f"carol-{i}", owner="carol", cpus=2) for i in range(2)][1]
    dispatcher.tick()
    settings = ServiceSettings(
        home=tmp_path,
        db_url="unused",
        tokens=(Principal("alice", "user", "alice-token-1"), Principal("root", "admin", "root-token-1")),
        policy_file=policy_path,
    )
    app = create_app(store, settings, launcher=launcher, cluster=dispatcher.cluster)
    with TestClient(app) as http:
        report = http.get("/queue", headers={"Authorization": "Bearer root-token-1"}).json()
        assert report["live"] is True and report["cluster"] == {"CPU": 4.0, "GPU": 0.0}
        vision = next(t for t in report["teams"] if t["team"] == "vision")
        assert vision["running"] == 2 and vision["waiting"] == 1 and vision["holds"]["cpu"] == 2
        assert vision["quota"]["cpu"] == 2 and vision["share"] == 0.5
        waiting = {j["id"]: j for j in report["waiting"]}
        assert set(waiting) == {alice[2].id, carol.id}
        assert waiting[alice[2].id]["reason"].startswith("team vision holds CPU 2 of its quota 2")
        assert waiting[carol.id]["reason"].startswith("needs CPU 2, GPU 0; free CPU 0")
        assert sorted(j["place"] for j in waiting.values()) == [1, 2]

        own = http.get("/queue", headers={"Authorization": "Bearer alice-token-1"}).json()
        assert [j["id"] for j in own["waiting"]] == [alice[2].id] and len(own["teams"]) == 2

        cli = typer.Typer()
        cli_jobs.register(cli)
        client = AeforgeClient("http://testserver", "root-token-1", http=http)
        original = cli_jobs.make_client
        cli_jobs.make_client = lambda: client
        try:
            shown = CliRunner().invoke(cli, ["queue"], env={"COLUMNS": "250"})
            as_json = CliRunner().invoke(cli, ["queue", "-o", "json"])
        finally:
            cli_jobs.make_client = original
    assert shown.exit_code == 0, shown.output
    assert "vision" in shown.output and "team vision holds CPU 2 of its quota 2" in shown.output
    assert json.loads(as_json.output)["teams"][0]["team"] in ("@carol", "vision")
