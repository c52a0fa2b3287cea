"""Out-of-memory failures told apart by where they came from (workers.memory_failures): in the job's entry point
(its exit code) and in the queue (retried only when the memory went from outside the job; the message says which)."""

from __future__ import annotations

import json

import pytest

import jobs.run
from services.dispatcher import Dispatcher
from services.store import Store
from tests.services.fakes import FakeCluster, FakeLauncher
from workers.memory_failures import memory_failure

RAY_MONITOR = (
    "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.\n"
    "Memory on the node (IP: 10.0.0.5) where the task was running was 30.1GB / 31.2GB (0.96)"
)
KERNEL = "Job entrypoint command failed with exit code -9, last available logs: ..."
TORCH_CPU = (
    "RuntimeError: [enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
    "to allocate 256000000000 bytes. Error code 12 (Cannot allocate memory)"
)
TORCH_CUDA = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"


@pytest.mark.parametrize(
    "text,outside",
    [(RAY_MONITOR, True), (KERNEL, True), ("exit code 137", True), (TORCH_CPU, False), (TORCH_CUDA, False)],
)
def test_where_an_out_of_memory_came_from(text, outside):
    failure = memory_failure(text)
    assert failure is not None and failure.outside is outside
    assert memory_failure(failure.sentence()) == failure  # the job's line, read back by the queue


def test_other_failures_are_not_memory_failures():
    assert memory_failure("Job entrypoint command failed with exit code 1: KeyError: 'x'") is None


@pytest.mark.parametrize("error,code", [(RuntimeError(TORCH_CPU), 2), (RuntimeError(RAY_MONITOR), 1)])
def test_the_entry_point_exits_2_for_its_own_allocation_and_1_for_a_kill(monkeypatch, capsys, error, code):
    monkeypatch.setenv("AEFORGE_JOB_SPEC", json.dumps({"name": "oom"}))
    monkeypatch.delenv("AEFORGE_JOB_SPEC_MODULE", raising=False)

    def run_job(spec, job_id):
        try:
            raise error
        except RuntimeError as exc:  # as Ray Train wraps a worker's error
            raise RuntimeError("Training failed due to worker errors") from exc

    monkeypatch.setattr(jobs.run, "run_job", run_job)
    assert jobs.run.main(["oom-1"]) == code
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith("job oom-1: out of memory") and ("retried" in said)


@pytest.mark.parametrize(
    "message,logs,state,words",
    [
        (KERNEL, "", "queued", "from outside the job"),
        ("Job entrypoint command failed with exit code 1", RAY_MONITOR, "queued", "Ray's memory monitor"),
        ("Job entrypoint command failed with exit code 2", TORCH_CUDA, "failed", "inside the job"),
    ],
)
def test_the_queue_retries_an_out_of_memory_only_from_outside(tmp_path, message, logs, state, words):
    store = Store(f"sqlite:///{tmp_path / 'oom.db'}")
    launcher = FakeLauncher()
    dispatcher = Dispatcher(store, FakeCluster({"CPU": 2}), launcher, environ={})
    job, _ = store.submit(
        name="oom", owner="alice", kind="train", spec_text="name: oom\n", spec_json='{"name": "oom"}',
        resources={"CPU": 1.0}, priority=0, max_attempts=3,
    )  # fmt: skip
    dispatcher.tick()
    launcher.set(job.id, "FAILED", message=message, logs=logs)
    dispatcher.follow()
    after = store.get(job.id)
    assert after.state == state and "out of memory" in after.error and words in after.error
    store.close()
