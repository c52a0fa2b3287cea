"""The dispatcher's policy and its following of Ray jobs, on SQLite and PostgreSQL, with a fake cluster and a fake
launcher that records submissions (the real Ray path is in test_e2e.py)."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from services.dispatcher import (
    Dispatcher,
    describe_resources,
    entrypoint_for,
    parse_progress,
    parse_result,
    redact,
)
from services.store import Store
from tests.services.fakes import FakeCluster, FakeLauncher
from workers.errors import AeforgeError

SECRET = "very-secret-aws-key-0123"
ENVIRON = {
    "AEFORGE_HOME": "/srv/aeforge",
    "AEFORGE_STORAGE": "s3://bucket/prefix",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    "UNRELATED": "not passed",
}


def submit(store, name="job", cpus=1.0, gpus=0.0, priority=0, max_attempts=2):
    job, _ = store.submit(
        name=name,
        owner="alice",
        kind="train",
        spec_text=f"name: {name}\n",
        spec_json=json.dumps({"name": name}),
        resources={"CPU": cpus, "GPU": gpus},
        priority=priority,
        max_attempts=max_attempts,
    )
    return job


@pytest.fixture
def launcher():
    return FakeLauncher()


@pytest.fixture
def make_dispatcher(store, launcher):
    def make(cpus=2.0, gpus=0.0, **kwargs):
        kwargs.setdefault("environ", ENVIRON)
        cluster = FakeCluster({"CPU": cpus, "GPU": gpus, "memory": 1e9, "node:10.0.0.1": 1.0})
        return Dispatcher(store, cluster, launcher, **kwargs)

    return make


def test_jobs_that_each_take_the_cluster_run_one_after_another_by_priority(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher(cpus=2)
    low = submit(store, "low", cpus=2, priority=0)
    high = submit(store, "high", cpus=2, priority=5)
    high_later = submit(store, "high-later", cpus=2, priority=5)
    order = []
    for _ in range(8):
        report = dispatcher.tick()
        order += report.started
        for sid, status in [(s, j["status"]) for s, j in launcher.jobs.items()]:
            if status == "PENDING":
                launcher.set(sid, "RUNNING")
            elif status == "RUNNING":
                launcher.set(sid, "SUCCEEDED", logs="AEFORGE_RESULT {}\n")
    assert order == [high.id, high_later.id, low.id]
    assert launcher.max_running == 1
    assert all(store.get(j.id).state == "succeeded" for j in (low, high, high_later))


def test_the_job_gets_a_fixed_entrypoint_and_its_settings_but_the_table_no_secret(store, launcher, make_dispatcher):
    job = submit(store, "envjob")
    make_dispatcher().tick()
    [(sid, entrypoint, env)] = launcher.submissions
    assert sid == job.id and entrypoint == f"python -m jobs.run {job.id}"
    assert env["AEFORGE_JOB_ID"] == job.id and env["AEFORGE_ATTEMPT"] == "1"
    # The spec by reference: never in the environment (E2BIG at 128 KiB; Ray's job records)
    assert "AEFORGE_JOB_SPEC" not in env and json.loads(launcher.specs[job.id]) == {"name": "envjob"}
    # Where storage is, but no credential: Ray shows a submission's env in `ray job list`, its dashboard and logs;
    # the job takes the Ray node's own keys.
    assert env["AEFORGE_STORAGE"] == "s3://bucket/prefix" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env and SECRET not in json.dumps(env)
    # Locations, not the service's AEFORGE_HOME: the job's processes run on nodes with homes of their own.
    assert "AEFORGE_HOME" not in env and "UNRELATED" not in env
    assert "PYTHONPATH" in env
    launcher.set(sid, "FAILED", message=f"crashed with key {SECRET}", logs=f"Traceback\nKeyError: {SECRET}\n")
    make_dispatcher().tick()
    stored = store.get(job.id)
    everything = json.dumps(stored.to_dict(include_spec=True)) + json.dumps([e.to_dict() for e in store.events(job.id)])
    assert SECRET not in everything and "***" in stored.error


def test_a_head_that_does_not_fit_yet_is_waited_for_not_overtaken(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher(cpus=2)
    first = submit(store, "first", cpus=1, priority=9)
    big = submit(store, "big", cpus=2, priority=5)
    small = submit(store, "small", cpus=1, priority=0)
    report = dispatcher.tick()
    assert report.started == [first.id] and report.waiting == big.id
    assert report.wait_reason == "needs CPU 2, GPU 0; free CPU 1, GPU 0"
    assert store.get(small.id).state == "queued"  # 1 CPU is free, but the big job is ahead of it
    # The reason is stored on each waiting job (the API and `aeforge status` show it); the job behind it waits for
    # the one ahead, and (without train.max_hours) may not overtake it.
    assert store.get(big.id).wait_reason == report.wait_reason
    assert store.get(small.id).wait_reason == (
        f"behind {big.id}, which waits for capacity; a job without train.max_hours does not overtake it"
    )
    place = store.queue_place(store.get(small.id))
    assert place.jobs_ahead == 1 and place.blocked_by.id == big.id
    launcher.set(first.id, "SUCCEEDED")
    assert dispatcher.tick().started == [big.id]
    assert store.get(big.id).wait_reason is None  # started: the reason is gone with the state change


def test_the_autoscaler_is_asked_for_the_admitted_jobs_bundles_as_well_as_the_queues(store, launcher, make_dispatcher):
    # Ray's autoscaler fits a request into its nodes as if they were idle: asked for the queued job alone, it would
    # find the node the running job holds big enough and add none. A job just submitted holds its node only once its
    # driver has placed its workers: until it ends, its bundle stays asked for, or its node could be removed as idle.
    class Autoscaler:
        def __init__(self):
            self.requests: list[list[dict[str, float]]] = []

        def request(self, bundles):
            self.requests.append(bundles)

    def submit_two_cpu_worker(name, priority):
        spec = {"name": name, "resources": {"workers": 1, "cpus_per_worker": 2}}
        job, _ = store.submit(
            name=name,
            owner="alice",
            kind="train",
            spec_text=f"name: {name}\n",
            spec_json=json.dumps(spec),
            resources={"CPU": 2.0, "GPU": 0.0},
            priority=priority,
        )
        return job

    autoscaler = Autoscaler()
    dispatcher = make_dispatcher(cpus=2, autoscaler=autoscaler)
    first = submit_two_cpu_worker("first", priority=5)
    second = submit_two_cpu_worker("second", priority=0)
    two = {"CPU": 2.0}  # one worker's bundle
    assert dispatcher.tick().started == [first.id]
    assert autoscaler.requests[-1] == [two, two]  # the started job's and the waiting one's
    launcher.set(first.id, "RUNNING")
    dispatcher.tick()
    assert store.get(first.id).state == "running" and autoscaler.requests[-1] == [two, two]
    launcher.set(first.id, "SUCCEEDED")
    assert dispatcher.tick().started == [second.id]
    assert autoscaler.requests[-1] == [two]
    launcher.set(second.id, "SUCCEEDED")
    dispatcher.tick()
    assert store.get(second.id).state == "succeeded" and autoscaler.requests[-1] == []  # withdrawn


def test_a_job_that_can_never_fit_fails_with_what_it_asked_and_what_exists(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher(cpus=2, gpus=0)
    too_many_cpus = submit(store, "cpus", cpus=8, priority=3)
    needs_gpu = submit(store, "gpu", cpus=1, gpus=1, priority=2)
    ok = submit(store, "ok", cpus=1)
    report = dispatcher.tick()
    assert report.rejected == [too_many_cpus.id, needs_gpu.id] and report.started == [ok.id]
    cpu_error = store.get(too_many_cpus.id).error
    assert "CPU 8" in cpu_error and "has CPU 2" in cpu_error
    gpu_error = store.get(needs_gpu.id).error
    assert "GPU 1" in gpu_error and "GPU 0" in gpu_error
    assert store.get(needs_gpu.id).state == "failed"


def test_the_concurrency_cap_holds_even_with_room(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher(cpus=16, max_concurrent_jobs=2)
    jobs = [submit(store, f"j{i}") for i in range(4)]
    report = dispatcher.tick()
    assert report.started == [jobs[0].id, jobs[1].id] and "cap is 2" in report.wait_reason
    launcher.set(jobs[0].id, "SUCCEEDED")
    assert dispatcher.tick().started == [jobs[2].id]


def test_ray_status_is_followed_into_the_store_with_results(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher()
    job = submit(store, "follow")
    dispatcher.tick()
    dispatcher.tick()
    assert store.get(job.id).state == "starting"  # Ray says PENDING
    launcher.set(job.id, "RUNNING", logs='AEFORGE_PROGRESS {"step": 5, "total": 10}\n')
    dispatcher.tick()
    assert store.get(job.id).state == "running"
    launcher.set(
        job.id,
        "SUCCEEDED",
        logs='AEFORGE_PROGRESS {"step": 10, "total": 10}\n'
        'AEFORGE_RESULT {"mlflow_run_id": "run123", "model": {"name": "m", "version": 4}}\n',
    )
    dispatcher.tick()
    done = store.get(job.id)
    assert done.state == "succeeded" and done.mlflow_run_id == "run123" and done.model_version == "4"
    assert done.result["model"]["name"] == "m"
    assert [e.to_state for e in store.events(job.id)] == ["queued", "starting", "running", "succeeded"]


def test_a_failed_attempt_is_requeued_then_the_last_one_fails(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher()
    job = submit(store, "flaky", max_attempts=2)
    dispatcher.tick()
    launcher.set(job.id, "FAILED", message="exit code 1", logs="line\nRuntimeError: worker died\n")
    dispatcher.tick()  # attempt 1 fails -> queued, then admitted again in the same pass
    second = f"{job.id}-attempt-2"
    assert [s[0] for s in launcher.submissions] == [job.id, second]
    assert launcher.submissions[1][2]["AEFORGE_ATTEMPT"] == "2"
    requeue = [e for e in store.events(job.id) if e.to_state == "queued"][-1]
    # Its log shows no step: nothing was trained, and the reason says so instead of promising a checkpoint.
    assert "attempt 1 of 2 failed" in requeue.reason and "had not started training" in requeue.reason
    assert "checkpoint" not in requeue.reason
    assert "worker died" in requeue.reason
    launcher.set(second, "FAILED", message="exit code 1")
    dispatcher.tick()
    failed = store.get(job.id)
    assert failed.state == "failed" and failed.attempts == 2 and "exit code 1" in failed.error
    assert len(launcher.submissions) == 2


def test_a_restarted_dispatcher_reattaches_and_requeues_what_ray_lost(store, launcher, make_dispatcher):
    first = make_dispatcher(cpus=4)
    still_running = submit(store, "alive")
    lost = submit(store, "lost", max_attempts=2)
    lost_last = submit(store, "lost-last", max_attempts=1)
    first.tick()
    for sid in (still_running.id, lost.id, lost_last.id):
        launcher.set(sid, "RUNNING")
    first.tick()
    del first  # the service dies; Ray restarts and forgets two of the jobs
    launcher.forget(lost.id)
    launcher.forget(lost_last.id)
    restarted = make_dispatcher(cpus=4)
    restarted.follow()
    assert store.get(still_running.id).state == "running"
    requeued = store.get(lost.id)
    assert requeued.state == "queued" and "gone" in requeued.error
    assert store.get(lost_last.id).state == "failed"
    assert [s[0] for s in launcher.submissions] == [still_running.id, lost.id, lost_last.id]  # nothing resubmitted yet
    restarted.admit()
    assert launcher.submissions[-1][0] == f"{lost.id}-attempt-2"
    launcher.set(still_running.id, "SUCCEEDED")
    restarted.tick()
    assert store.get(still_running.id).state == "succeeded"
    assert [s[0] for s in launcher.submissions].count(still_running.id) == 1


def test_a_claim_that_never_reached_ray_is_submitted_once(store, launcher, make_dispatcher):
    job = submit(store, "orphan")
    from services.store import Decision

    store.admit(lambda j, h: Decision.start("claimed by a dispatcher that then died"))
    patient = make_dispatcher(resubmit_after_s=3600)
    patient.follow()
    assert launcher.submissions == []  # maybe another dispatcher is about to submit it
    eager = make_dispatcher(resubmit_after_s=0)
    eager.follow()
    assert [s[0] for s in launcher.submissions] == [job.id]
    launcher.set(job.id, "RUNNING")
    eager._submit(store.get(job.id))  # a second submission of the same attempt is refused by Ray and attaches
    eager.follow()
    assert [s[0] for s in launcher.submissions] == [job.id] and store.get(job.id).state == "running"


def test_cancel_stops_the_ray_job_then_marks_it_cancelled(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher(cpus=4)
    running = submit(store, "running")
    pending = submit(store, "pending")
    dispatcher.tick()
    launcher.set(running.id, "RUNNING")
    dispatcher.tick()
    store.request_cancel(running.id, by="bob")
    store.request_cancel(pending.id, by="alice")
    assert store.get(running.id).state == "running"
    dispatcher.follow()  # stop asked of Ray
    assert set(launcher.stops) == {running.id, pending.id}
    dispatcher.follow()  # Ray says STOPPED
    for job, who in ((running, "bob"), (pending, "alice")):
        cancelled = store.get(job.id)
        assert cancelled.state == "cancelled"
        assert who in store.events(job.id)[-1].reason


def test_cancel_of_a_claim_not_yet_on_ray_needs_no_ray_job(store, launcher, make_dispatcher):
    from services.store import Decision

    job = submit(store, "claimed")
    store.admit(lambda j, h: Decision.start("claimed"))
    store.request_cancel(job.id, by="alice")
    make_dispatcher(resubmit_after_s=0).follow()
    assert store.get(job.id).state == "cancelled" and launcher.submissions == []


def test_a_job_stopped_outside_aeforge_is_cancelled_and_a_succeeding_one_stays_succeeded(
    store, launcher, make_dispatcher
):
    dispatcher = make_dispatcher(cpus=4)
    outside = submit(store, "outside")
    raced = submit(store, "raced")
    dispatcher.tick()
    launcher.set(outside.id, "STOPPED")
    store.request_cancel(raced.id, by="alice")
    launcher.set(raced.id, "SUCCEEDED", logs='AEFORGE_RESULT {"mlflow_run_id": "r"}\n')
    dispatcher.follow()
    assert store.get(outside.id).state == "cancelled"
    assert "outside aeforge" in store.events(outside.id)[-1].reason
    assert store.get(raced.id).state == "succeeded"
    assert "before the cancel" in store.events(raced.id)[-1].reason


def test_ray_unreachable_changes_nothing(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher()
    running = submit(store, "r")
    dispatcher.tick()
    launcher.set(running.id, "RUNNING")
    dispatcher.tick()
    waiting = submit(store, "w")
    launcher.down = True
    dispatcher.cluster.down = True
    report = dispatcher.tick()
    assert report.started == [] and report.changed == [] and report.rejected == []
    assert store.get(running.id).state == "running" and store.get(waiting.id).state == "queued"
    launcher.down = dispatcher.cluster.down = False
    dispatcher.cluster.resources = {}  # up, but no live node yet: nothing is judged
    assert dispatcher.tick().rejected == [] and store.get(waiting.id).state == "queued"


def test_ray_refusing_a_submission_is_a_failed_attempt(store, launcher, make_dispatcher):
    class Refusing(FakeLauncher):
        def submit(self, submission_id, entrypoint, env_vars, spec_json):
            raise RuntimeError(f"Request failed with status code 400: bad runtime_env {SECRET}")

    refusing = Refusing()
    dispatcher = Dispatcher(store, FakeCluster({"CPU": 2}), refusing, environ=ENVIRON)
    job = submit(store, "refused", max_attempts=1)
    dispatcher.admit()
    failed = store.get(job.id)
    assert failed.state == "failed" and "refused the job submission" in failed.error
    assert SECRET not in failed.error


@pytest.mark.timeout(120)
def test_two_dispatchers_racing_start_every_job_once_within_the_cluster(store_url, launcher):
    setup = Store(store_url)
    ids = [submit(setup, f"r{i}", cpus=1).id for i in range(16)]
    dispatchers = [Dispatcher(Store(store_url), FakeCluster({"CPU": 3}), launcher, environ=ENVIRON) for _ in range(2)]
    for _ in range(40):
        barrier = threading.Barrier(2)
        errors = []

        def run(d):
            barrier.wait()
            try:
                d.tick()
            except Exception as exc:  # surfaced below; a thread's exception would otherwise vanish
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(d,)) for d in dispatchers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for sid, job in list(launcher.jobs.items()):
            if job["status"] == "PENDING":
                launcher.set(sid, "RUNNING")
            elif job["status"] == "RUNNING":
                launcher.set(sid, "SUCCEEDED")
        if all(setup.get(i).state == "succeeded" for i in ids):
            break
    submitted = [s[0] for s in launcher.submissions]
    assert sorted(submitted) == sorted(ids)  # each job once, none twice
    assert launcher.max_running <= 3
    for job_id in ids:
        assert [e.to_state for e in setup.events(job_id)] == ["queued", "starting", "running", "succeeded"]
    for d in dispatchers:
        d.store.close()
    setup.close()


def test_log_line_parsing_and_redaction():
    logs = (
        'noise\nAEFORGE_PROGRESS {"step": 3, "total": 9}\n(pid=1) AEFORGE_PROGRESS {"step": 4, "total": 9}\n'
        'AEFORGE_RESULT not json\nAEFORGE_RESULT {"mlflow_run_id": "a", "model_version": 2}\n'
    )
    assert parse_progress(logs) == {"step": 4, "total": 9}
    assert parse_result(logs) == {"mlflow_run_id": "a", "model_version": 2}
    assert parse_result("nothing here") is None and parse_progress("") is None
    assert redact("key=abcdef and abcdef", ["abcdef"]) == "key=*** and ***"
    assert describe_resources({"CPU": 4.0, "memory": 1e9, "node:x": 1.0}, also={"GPU": 1}) == "CPU 4, GPU 0"
    assert entrypoint_for("a-b", "jobs.run") == "python -m jobs.run a-b"


# --- retries that know what failed ----------------------------------------------------------------------------------


def test_a_spec_or_data_error_fails_once_and_is_not_retried(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher()
    job = submit(store, "bad-data", max_attempts=3)
    dispatcher.tick()
    launcher.set(
        job.id,
        "FAILED",
        message="Job entrypoint command failed with exit code 2, last available logs: "
        "job bad-data: 1 error\n  data.source: no such file: /x.npz",
    )
    dispatcher.tick()
    failed = store.get(job.id)
    assert failed.state == "failed" and failed.attempts == 1
    assert "data.source: no such file" in failed.error
    assert len(launcher.submissions) == 1


def test_a_failed_attempt_backs_off_exponentially_and_others_go_first(store, launcher, make_dispatcher):
    now = [1_000_000_000.0]
    dispatcher = make_dispatcher(cpus=2, retry_backoff_s=30.0, clock=lambda: now[0])
    flaky = submit(store, "flaky", priority=5, max_attempts=3)
    dispatcher.tick()
    failed_at = store.get(flaky.id).updated_at.timestamp()
    now[0] = failed_at
    launcher.set(flaky.id, "FAILED", message="Job entrypoint command failed with exit code 1")
    dispatcher.tick()
    requeued = store.get(flaky.id)
    assert requeued.state == "queued" and requeued.attempts == 1
    events = store.events(flaky.id)
    assert "re-queued in " in events[-1].reason and "starts from the beginning" in events[-1].reason
    first_delay = dispatcher.retry_delay_s(requeued)
    assert 30.0 <= first_delay <= 37.5

    other = submit(store, "other", priority=0)
    now[0] = requeued.updated_at.timestamp() + first_delay - 1
    report = dispatcher.tick()
    assert report.started == [other.id]  # the backing-off head does not hold the queue up
    assert store.get(flaky.id).state == "queued"
    # Why it waits is stored with the time it may start (a fixed text: the next pass writes nothing new).
    due = time.strftime("%H:%M:%S UTC", time.gmtime(requeued.updated_at.timestamp() + first_delay))
    assert store.get(flaky.id).wait_reason == f"attempt 2 waits until {due} (back-off after a failed attempt)"

    now[0] = requeued.updated_at.timestamp() + first_delay + 0.1
    assert dispatcher.tick().started == [flaky.id]
    second = store.get(flaky.id)
    launcher.set(second.ray_submission_id, "FAILED", message="Job entrypoint command failed with exit code 1")
    now[0] = second.updated_at.timestamp() + 1
    dispatcher.tick()
    again = store.get(flaky.id)
    assert again.state == "queued" and again.attempts == 2
    assert 60.0 <= dispatcher.retry_delay_s(again) <= 75.0  # twice the first


def test_a_ray_head_that_is_not_ready_yet_is_not_a_failed_attempt(store, make_dispatcher):
    from services.dispatcher import LauncherUnavailable, RayJobLauncher

    class NotReady(RayJobLauncher):
        def _call(self, fn, *args, **kwargs):
            raise RuntimeError(
                "Request failed with status code 500: No available agent to submit job, please try again later."
            )

    launcher = NotReady("http://127.0.0.1:1")
    with pytest.raises(LauncherUnavailable, match="not ready yet"):
        launcher.submit("sid", "python -m jobs.run x", {}, "{}")


def test_a_job_running_longer_than_its_max_hours_is_stopped_and_failed_not_retried(store, launcher, make_dispatcher):
    import time

    now = [time.time()]
    dispatcher = make_dispatcher(cpus=4, clock=lambda: now[0])
    spec = {"name": "slow", "train": {"steps": 10, "max_hours": 0.5}}
    limited, _ = store.submit(
        name="slow",
        owner="alice",
        kind="train",
        spec_text="name: slow\n",
        spec_json=json.dumps(spec),
        resources={"CPU": 1.0, "GPU": 0.0},
        max_attempts=3,
    )
    unlimited = submit(store, "free")
    dispatcher.tick()
    for job in (limited, unlimited):
        launcher.set(job.id, "RUNNING")
    dispatcher.tick()
    assert store.get(limited.id).state == "running" and store.get(unlimited.id).state == "running"

    now[0] += 0.49 * 3600  # within the limit: nothing happens
    dispatcher.tick()
    assert store.get(limited.id).state == "running" and launcher.stops == []

    now[0] += 0.02 * 3600  # past it
    dispatcher.tick()
    failed = store.get(limited.id)
    assert failed.state == "failed" and failed.attempts == 1 < failed.max_attempts
    assert failed.error == "ran longer than train.max_hours = 0.5 h"
    assert store.events(limited.id)[-1].reason == "ran longer than train.max_hours = 0.5 h"
    assert launcher.stops == [limited.id] and launcher.jobs[limited.id]["status"] == "STOPPED"

    now[0] += 1000 * 3600  # not retried; the job without a limit runs on
    dispatcher.tick()
    dispatcher.tick()
    assert store.get(limited.id).state == "failed" and [s[0] for s in launcher.submissions].count(limited.id) == 1
    assert store.get(unlimited.id).state == "running" and launcher.stops == [limited.id]


def test_a_sweep_asking_more_trials_at_once_than_fit_is_capped_not_refused(store, launcher, make_dispatcher):
    """max_concurrent_trials 4 of 1-CPU trials on a 2-CPU cluster: admitted with as many trials as fit (each trial's
    driver takes 0.01 CPU too, so one), and the admission says so with the numbers."""
    from jobs.spec import parse_spec

    spec = parse_spec(
        "name: wide\nkind: sweep\nmodel: {variant: beta_vae, architecture: mlp}\n"
        "sweep: {beta: [1, 2, 4, 8], max_concurrent_trials: 4}\nresources: {workers: 1, cpus_per_worker: 1}\n"
    )
    job, _ = store.submit(
        name="wide",
        owner="alice",
        kind="sweep",
        spec_text="",
        resources=spec.resource_request(),
        spec_json=json.dumps(spec.model_dump(mode="json")),
        priority=0,
        max_attempts=1,
    )
    assert job.resources["CPU"] == 4.0
    report = make_dispatcher(cpus=2).tick()
    assert report.started == [job.id] and report.rejected == []
    reason = store.events(job.id)[-1].reason
    assert "4 trials at once asked, 1 at a time run: each trial needs 1.01 CPU, the cluster has CPU 2" in reason


def test_with_ray_down_or_no_live_node_the_head_of_the_queue_says_so(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher(cpus=2)
    head, behind = submit(store, "head"), submit(store, "behind")
    dispatcher.cluster.down = True
    report = dispatcher.tick()
    assert report.started == [] and report.waiting == head.id
    assert store.get(head.id).wait_reason == "Ray is not reachable (cluster down)"
    assert store.get(behind.id).wait_reason is None and store.queue_place(store.get(behind.id)).blocked_by.id == head.id
    dispatcher.cluster.down = False
    dispatcher.cluster.resources = {}
    dispatcher.tick()
    assert store.get(head.id).wait_reason == "the Ray cluster has no live node yet"
    dispatcher.cluster.resources = {"CPU": 2.0, "GPU": 0.0}
    assert dispatcher.tick().started == [head.id, behind.id]
    assert store.get(head.id).wait_reason is None and store.get(behind.id).wait_reason is None


# --- issue 19: the spec by reference, and a cancel of a job that never leaves PENDING ------------------------------


def test_a_200_kb_spec_goes_by_reference_and_reads_back_in_the_job(tmp_path, monkeypatch):
    """A spec far past the 128 KiB one environment string can hold (E2BIG): the job's environment names a package
    (the one Ray installs with the job, here put on the path by hand) and its digest; the entry point reads the very
    JSON the queue stored, and refuses one that was swapped."""
    from jobs.run import read_job_spec
    from workers.job_specs import write_spec_package

    spec_json = json.dumps({"name": "big", "eval": {"factors": [f"factor-{i:06d}" for i in range(13_000)]}})
    assert len(spec_json) > 200_000
    package, env = write_spec_package(tmp_path, spec_json)
    assert max(len(k) + len(v) for k, v in env.items()) < 200 and package.parent == tmp_path
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AEFORGE_JOB_SPEC", raising=False)
    assert read_job_spec() == spec_json
    (package / "spec.json").write_text('{"name": "swapped"}')
    with pytest.raises(AeforgeError, match="SHA-256 differs"):
        read_job_spec()
    monkeypatch.setenv("AEFORGE_JOB_SPEC_MODULE", "aeforge_spec_" + "0" * 32)
    with pytest.raises(AeforgeError, match="not on this Python's path"):
        read_job_spec()


def test_a_spec_package_that_cannot_be_written_leaves_the_job_starting_until_it_can(store, monkeypatch, caplog):
    """The real launcher writes the package in this machine's temporary folder: a full disk is not the job's fault;
    the job stays `starting` and is submitted on a later pass."""
    import tempfile

    from services.dispatcher import RayJobLauncher

    calls = []

    class Client:  # Ray's JobSubmissionClient, as far as submitting goes
        def submit_job(self, **kwargs):
            calls.append(kwargs)

        def get_job_info(self, submission_id):
            raise RuntimeError("Request failed with status code 404")

    launcher = RayJobLauncher("127.0.0.1:1")
    launcher._client = Client()
    now = [time.time()]
    dispatcher = Dispatcher(store, FakeCluster({"CPU": 2}), launcher, environ=ENVIRON, clock=lambda: now[0])
    job = submit(store)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "TemporaryDirectory", full)
        with caplog.at_level(logging.WARNING, logger="services.dispatcher"):
            dispatcher.tick()
    assert store.get(job.id).state == "starting" and not calls
    # The log names the cause (this machine's disk), not Ray.
    [line] = [r.getMessage() for r in caplog.records if "spec package" in r.getMessage()]
    assert "No space left on device" in line and "Ray is not reachable" not in line
    now[0] += 60
    dispatcher.tick()
    [call] = calls
    assert call["submission_id"] == job.id and len(call["runtime_env"]["py_modules"]) == 1
    assert call["runtime_env"]["env_vars"]["AEFORGE_JOB_SPEC_MODULE"].startswith("aeforge_spec_")


def test_cancel_of_a_job_whose_ray_job_never_leaves_pending(store, make_dispatcher):
    """Ray queues a stop behind the driver's start: a job stuck PENDING (a runtime env that cannot start) is marked
    cancelled once the stop had its chance, instead of staying `starting` with its resources held."""

    class StuckLauncher(FakeLauncher):
        def stop(self, submission_id):
            self.stops.append(submission_id)  # accepted, and nothing happens

    launcher, now = StuckLauncher(), [time.time()]
    dispatcher = Dispatcher(store, FakeCluster({"CPU": 2}), launcher, environ=ENVIRON, clock=lambda: now[0])
    job = submit(store)
    dispatcher.tick()
    assert store.request_cancel(job.id, "alice").state == "starting"
    dispatcher.tick()
    assert store.get(job.id).state == "starting" and launcher.stops == [job.id]  # asked first
    now[0] += 11
    dispatcher.tick()
    cancelled = store.get(job.id)
    assert cancelled.state == "cancelled" and "never left PENDING" in store.events(job.id)[-1].reason
    submit(store, "next")
    assert dispatcher.tick().started  # its resources are free again


def test_an_import_error_is_an_environment_error_that_fails_at_once(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher()
    job = submit(store, "no-torch", max_attempts=3)
    dispatcher.tick()
    log = (
        "Traceback (most recent call last):\n"
        '  File "<frozen runpy>", line 198, in _run_module_as_main\n'
        '  File "/srv/aeforge/jobs/run.py", line 18, in <module>\n'
        "    import torch\n"
        "ModuleNotFoundError: No module named 'torch'\n"
    )
    launcher.set(job.id, "FAILED", message="Job entrypoint command failed with exit code 1", logs=log)
    dispatcher.tick()
    failed = store.get(job.id)
    assert failed.state == "failed" and failed.attempts == 1 and len(launcher.submissions) == 1
    assert failed.error.splitlines() == [failed.error]  # one line, not the traceback
    assert "environment error" in failed.error and "ModuleNotFoundError: No module named 'torch'" in failed.error
    assert "aeforge doctor" in failed.error
    assert not any("checkpoint" in e.reason for e in store.events(job.id))


def test_a_worker_import_error_as_ray_reports_it_is_an_environment_error(store, launcher, make_dispatcher):
    dispatcher = make_dispatcher()
    job = submit(store, "worker-no-torch", max_attempts=3)
    dispatcher.tick()
    log = (
        "\x1b[36m(TrainController pid=77)\x1b[0m ray.exceptions.RayTaskError(ModuleNotFoundError): "
        "ray::RayTrainWorker.__init__() (pid=78, ip=10.0.0.2)\n"
        "\x1b[36m(TrainController pid=77)\x1b[0m ModuleNotFoundError: No module named 'workers'\n"
        "RuntimeError: training failed\n"
    )
    launcher.set(job.id, "FAILED", message="exit code 1", logs=log)
    dispatcher.tick()
    failed = store.get(job.id)
    assert failed.state == "failed" and "No module named 'workers'" in failed.error


def test_a_requeue_after_steps_says_where_it_resumes(store, launcher, make_dispatcher):
    from workers.protocol import progress_line

    dispatcher = make_dispatcher()
    job = submit(store, "trained-some", max_attempts=2)
    dispatcher.tick()
    launcher.set(job.id, "FAILED", message="exit code 1", logs=progress_line(40, 100) + "\nRuntimeError: node died\n")
    dispatcher.tick()
    requeue = [e for e in store.events(job.id) if e.to_state == "queued"][-1]
    assert "resumes from its last checkpoint (this attempt reached step 40)" in requeue.reason


def test_a_manual_retry_starts_without_the_back_off(store, launcher, make_dispatcher):
    now = [1_000_000_000.0]
    dispatcher = make_dispatcher(retry_backoff_s=600.0, clock=lambda: now[0])
    job = submit(store, "retried", max_attempts=1)
    dispatcher.tick()
    now[0] = store.get(job.id).updated_at.timestamp()
    launcher.set(job.id, "FAILED", message="exit code 1")
    dispatcher.tick()
    assert store.get(job.id).state == "failed"
    store.retry(job.id, "alice")
    now[0] += 1  # well inside the 600 s an automatic re-queue would wait
    assert dispatcher.tick().started == [job.id]
    assert store.get(job.id).attempts == 2
