"""Preemption through the queue on real Ray (CPU, a tiny model): a job of a preempting class stops a running job,
which checkpoints at its current step, goes back to the queue without spending an attempt, resumes from that step
and ends with the same weights as its twin that ran uninterrupted beside it; its MLflow run is one run."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from tests.fixtures.processes import wait_for
from tests.services.test_e2e import (
    REAL_JOB_MODULES,
    Service,
    mlflow_of,
    real_spec,
    run_of_job,
    tail,
)
from workers.loop import CHECKPOINT_FILE

# Four fits on 2 CPUs (victim twice, its twin, the urgent job).
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]

POLICY = """\
preemption_min_run_minutes: 0
classes:
  - {name: normal, value: 0}
  - {name: pinned, value: 0, preemptible: false}
  - {name: urgent, value: 100, preemptible: false, may_preempt: true}
"""


def spec(name: str, steps: int) -> str:
    # Periodic checkpoints far apart: the step the job is preempted at is checkpointed only by the preemption.
    return real_spec(name, steps).replace("checkpoint_every: 2, log_every: 1", "checkpoint_every: 100000, log_every: 5")


def submit(svc: Service, text: str, klass: str) -> str:
    response = svc.http.post("/jobs", json={"spec": text, "priority_class": klass})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def final_weights(home: Path, job_id: str) -> torch.Tensor:
    files = sorted((home / "storage" / "ray" / job_id).rglob(CHECKPOINT_FILE))
    assert files, f"no checkpoint of {job_id} under {home / 'storage' / 'ray' / job_id}"
    state = torch.load(files[-1], map_location="cpu", weights_only=False)
    return torch.cat([v.flatten().float() for v in state["model"].values()])


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in REAL_JOB_MODULES), reason="no real job path")
def test_a_preempted_job_resumes_from_its_current_step_and_ends_as_an_uninterrupted_twin(tmp_path, ray_head):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    svc = Service(tmp_path / "home", ray_head, job_module=None, extra_env={"AEFORGE_POLICY_FILE": str(policy)})
    svc.start()
    try:
        # Enough steps that an idle machine cannot finish the victim between its first log window and the stop
        # request's landing (the urgent job's submission, a dispatcher pass, Ray's stop, the workers' poll of the
        # request: seconds; 60 steps did not last that long). The twin starts beside the victim, so the victim need not
        # also outlast the twin's start (600 steps did, when the twin was submitted after the victim's first window).
        steps = 300

        def trained_a_window(job_id):
            progress = svc.http.get(f"/jobs/{job_id}", params={"progress": "true"}).json().get("progress") or {}
            return progress.get("step", 0) >= 5

        # The embedded MLflow store made before the jobs: two first jobs at once race to create it.
        mlflow_of(svc).search_experiments()
        victim = submit(svc, spec("e2e-victim", steps), "normal")
        svc.wait_state(victim, "running", timeout=400)
        # The twin once the victim's Ray job runs (its driver only starting): a little behind the victim, so it is
        # still training, and holding its CPU, when the urgent job comes.
        twin = submit(svc, spec("e2e-twin", steps), "pinned")  # not preemptible: it runs straight through
        svc.wait_state(twin, "running", timeout=400)
        wait_for(lambda: trained_a_window(victim), 600, "the victim to train a log window")
        urgent = submit(svc, spec("e2e-urgent", 5), "urgent")

        def requeue_event():
            events = svc.job(victim)["events"]
            return next((e for e in events if e["to_state"] == "queued" and "preempted by" in e["reason"]), None)

        def what_happened() -> str:
            jobs = {name: svc.job(job_id) for name, job_id in (("victim", victim), ("twin", twin), ("urgent", urgent))}
            lines = [f"{name}: {j['state']} {[e['reason'][:3000] for e in j['events']]}" for name, j in jobs.items()]
            return "\n".join(lines) + f"\nservice log:\n{tail(svc.log_path, 60)}"

        event = wait_for(requeue_event, 240, "the victim to be preempted and re-queued", detail=what_happened)
        found = re.search(rf"preempted by {urgent} at step (\d+)", event["reason"])
        assert found, what_happened()
        stopped_at = int(found.group(1))
        assert 5 <= stopped_at < steps and stopped_at % 5 == 0  # at a log window's end, before the last step
        # The attempt it used is given back: still 3 left of the service's default 3 (AEFORGE_MAX_ATTEMPTS).
        assert svc.job(victim)["max_attempts"] - event["attempt"] == 3

        assert (
            wait_for(lambda: svc.job(urgent)["state"] in ("succeeded", "failed"), 300, "urgent")
            and svc.job(urgent)["state"] == "succeeded"
        ), what_happened()
        done = svc.wait_state(victim, "succeeded", timeout=600)
        svc.wait_state(twin, "succeeded", timeout=600)
        assert done["attempts"] == 2 and done["result"]["resumed_from_step"] == stopped_at
        assert any(
            e["reason"].startswith(f"resumed from its checkpoint at step {stopped_at} after preemption by {urgent}")
            for e in done["events"]
        )
        home = tmp_path / "home"
        assert torch.equal(final_weights(home, victim), final_weights(home, twin))
        run = run_of_job(svc, victim)
        assert run is not None and run.info.status == "FINISHED"
    finally:
        svc.stop()
