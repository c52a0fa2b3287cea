"""End to end with real processes: `ray start --head --num-cpus=2`, the service in a subprocess (python -m
services.api), jobs submitted over HTTP.

The queue tests run a stand-in job module (tests/services/fake_job.py, through AEFORGE_JOB_MODULE) so they test the
queue's Ray path without paying a TorchTrainer start per job; the last tests run the real `python -m jobs.run`.

Credentials are the Ray node's: the head is started with the S3 keys in its own environment (as `ray start` is on a
cluster's machines), and the service forwards none to the jobs it submits.
"""

from __future__ import annotations

import getpass
import importlib.util
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.processes import wait_for
from tests.fixtures.ray_head import ray_head_process
from tests.fixtures.s3 import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
TOKEN = "e2e-admin-token"
SECRET = "e2e-secret-key-never-stored-4242"
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# The Ray node's own credentials (moto's plain server accepts any key), set where `ray start` runs.
NODE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "e2e-access-key", "AWS_SECRET_ACCESS_KEY": SECRET}
# The machine's own AWS settings reach neither the head nor the service.
MACHINE_AWS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AEFORGE_S3_CREDENTIALS_FILE",
)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@contextmanager
def started_ray_head(extra_env: dict[str, str] | None = None):
    """A Ray head with 2 CPUs and its dashboard, in a process of its own (tests.fixtures.ray_head); the S3 keys are
    in its environment (NODE_CREDENTIALS), where the jobs it runs find them, with ``extra_env`` added (what that
    node's Python sees). The modules of tests/services share one (the ``ray_head`` fixture of their conftest)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in MACHINE_AWS} | RAY_ENV
    env |= NODE_CREDENTIALS | {"AWS_DEFAULT_REGION": "us-east-1"}
    env |= extra_env or {}
    with ray_head_process(env, num_cpus=2) as head:
        os.environ.update(RAY_ENV)

        def alive():
            if head.proc.poll() is not None:
                raise AssertionError(f"ray start exited with {head.proc.returncode}:\n{tail(head.log_path)}")
            try:
                from ray.util.state import list_nodes

                return list_nodes(address=head.dashboard, filters=[("state", "=", "ALIVE")], timeout=5)
            except Exception:
                return None

        wait_for(alive, 300, "the Ray head to have a live node", interval=0.5)
        yield head


class Service:
    """`python -m services.api` in a subprocess over one AEFORGE_HOME; start it again after a kill. It has no AWS
    keys of its own unless ``extra_env`` gives it some: the jobs get theirs from the Ray node."""

    def __init__(
        self,
        home: Path,
        ray_head,
        job_module: str | None = "tests.services.fake_job",
        extra_env: dict[str, str] | None = None,
        tokens: str | None = f"{TOKEN}:tester:admin",
        workers: int = 1,
    ):
        self.home = home
        self.workers = workers
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_path = home / "aeforge.db"
        self.log_path = home / "service.log"
        self.env = (
            {k: v for k, v in ray_head.env.items() if not k.startswith("AEFORGE_") and k not in MACHINE_AWS}
            | {
                "AEFORGE_HOME": str(home),
                "AEFORGE_DB_URL": f"sqlite:///{self.db_path}",
                "AEFORGE_DISPATCH_INTERVAL": "0.3",
                "RAY_ADDRESS": ray_head.address,
                "PYTHONPATH": str(REPO),
            }
            | (extra_env or {})
        )
        if tokens:
            self.env["AEFORGE_TOKENS"] = tokens
        if job_module:
            self.env["AEFORGE_JOB_MODULE"] = job_module
        self.proc: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    def start(self) -> Service:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.api", "--port", str(self.port), "--workers", str(self.workers)],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"the service exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            try:
                return self.http.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 60, "the service to answer /healthz")
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.http.close()

    def submit(self, spec: str, priority: int = 0) -> str:
        response = self.http.post("/jobs", json={"spec": spec, "priority": priority})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        response = self.http.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_state(self, job_id: str, state: str, timeout: float = 120) -> dict:
        def reached():
            job = self.job(job_id)
            if job["state"] != state and job["state"] in ("succeeded", "failed", "cancelled"):
                raise AssertionError(
                    f"job {job_id} ended {job['state']}, not {state}: {job['error']}\n"
                    f"service log:\n{tail(self.log_path)}"
                )
            return job if job["state"] == state else None

        return wait_for(reached, timeout, f"job {job_id} to be {state}")


@pytest.fixture
def service(tmp_path, ray_head):
    made: list[Service] = []

    def make(**kwargs) -> Service:
        s = Service(tmp_path / "home", ray_head, **kwargs)
        made.append(s)
        return s.start()

    yield make
    for s in made:
        s.stop()


@pytest.fixture(scope="module")
def real_job_service(tmp_path_factory, ray_head):
    """One service running the real `python -m jobs.run`, shared by the real-job tests that need nothing else of a
    service: they tell their jobs, MLflow runs and models apart by id and name, and the embedded MLflow store is
    made once (by the first job), not once per test. It runs two API processes (`--workers 2`), so these real jobs
    also cross processes: a submission or cancel taken by one worker, dispatched by the other."""
    svc = Service(tmp_path_factory.mktemp("real-jobs") / "home", ray_head, job_module=None, workers=2).start()
    try:
        yield svc
    finally:
        svc.stop()


def fake_spec(name: str, steps: int, cpus: float) -> str:
    return (
        f"name: {name}\nmodel: {{variant: ae, architecture: mlp, latent_dim: 2}}\n"
        f"train: {{steps: {steps}, batch_size: 4}}\nresources: {{workers: 1, cpus_per_worker: {cpus}}}\n"
    )


def fake_record(home: Path, job_id: str, attempt: int = 1) -> dict | None:
    path = home / "fake-jobs" / f"{job_id}.attempt-{attempt}.json"
    return json.loads(path.read_text()) if path.exists() else None


def ray_client(ray_head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_head.dashboard)


def test_jobs_that_take_the_whole_cluster_run_one_after_another_in_priority_order(service, ray_head):
    svc = service(extra_env={"AEFORGE_LOG_FORMAT": "json"})
    blocker = svc.submit(fake_spec("blocker", steps=20, cpus=2))
    svc.wait_state(blocker, "running")
    low = svc.submit(fake_spec("low", steps=3, cpus=2), priority=0)
    high = svc.submit(fake_spec("high", steps=3, cpus=2), priority=5)
    for job_id in (blocker, high, low):
        svc.wait_state(job_id, "succeeded")
    runs = {job_id: fake_record(svc.home, job_id) for job_id in (blocker, high, low)}
    assert runs[blocker]["ended"] <= runs[high]["started"]
    assert runs[high]["ended"] <= runs[low]["started"]

    job = svc.job(high)
    assert [e["to_state"] for e in job["events"]] == ["queued", "starting", "running", "succeeded"]
    assert job["mlflow_run_id"] == f"run-{high}" and job["model_version"] == "1"
    info = ray_client(ray_head).get_job_info(high)
    assert info.status == "SUCCEEDED" and info.entrypoint == f"python -m tests.services.fake_job {high}"

    logs = svc.http.get(f"/jobs/{high}/logs", params={"full": "true"}).text
    assert "credentials: present" in logs and "AEFORGE_RESULT" in logs
    followed = svc.http.get(f"/jobs/{high}/logs", params={"follow": "true", "full": "true"}).text
    assert "AEFORGE_RESULT" in followed
    readable = svc.http.get(f"/jobs/{high}/logs").text
    assert "step 3/3" in readable and "AEFORGE_" not in readable
    # The node's credential reached the job (the service had none to forward), and nothing aeforge wrote.
    assert "AWS_SECRET_ACCESS_KEY" not in svc.env
    for path in svc.home.glob("aeforge.db*"):
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in svc.log_path.read_text() and SECRET not in logs

    # The service's log is JSON lines; a job's lines carry its id, owner, attempt and Ray submission id.
    lines = [json.loads(line) for line in svc.log_path.read_text().splitlines() if line.startswith("{")]
    submitted = [line for line in lines if line.get("job_id") == high and "submitted to Ray" in line["message"]]
    assert submitted and submitted[0]["owner"] == "tester" and submitted[0]["ray_submission_id"] == high
    assert submitted[0]["attempt"] == 1
    # /metrics after three real Ray jobs: each counted once, none left in the queue.
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(svc.http.get("/metrics").text)
        for s in family.samples
    }
    train = frozenset({("kind", "train")})
    # No policy file: every owner is a team of its own, labelled "@owner".
    assert samples[("aeforge_job_submissions_total", train | {("owner", "tester"), ("team", "@tester")})] == 3
    assert samples[("aeforge_job_admissions_total", train)] == 3
    assert samples[("aeforge_jobs_finished_total", train | {("state", "succeeded")})] == 3
    assert samples[("aeforge_job_submit_to_start_seconds_count", train)] == 3
    assert samples[("aeforge_job_start_to_end_seconds_count", train | {("state", "succeeded")})] == 3
    assert samples[("aeforge_dispatcher_pass_seconds_count", frozenset())] > 3
    assert not any(v for (name, labels), v in samples.items() if name == "aeforge_jobs" and v)


def test_logs_follow_shows_the_step_lines_of_a_running_job(service, ray_head):
    from typer.testing import CliRunner

    from services import cli

    svc = service()
    job_id = svc.submit(fake_spec("followed", steps=40, cpus=1))
    svc.wait_state(job_id, "running")
    env = {"AEFORGE_API_URL": svc.url, "AEFORGE_API_TOKEN": TOKEN, "AEFORGE_HOME": str(svc.home), "COLUMNS": None}
    result = CliRunner().invoke(cli.app, ["logs", job_id, "-f"], env=env)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line for line in lines if line.startswith("step ")] == [f"step {n}/40" for n in range(1, 41)]
    assert "credentials: present" in lines and not any("AEFORGE_" in line for line in lines)
    assert svc.job(job_id)["state"] == "succeeded"


def test_a_first_start_without_tokens_stores_a_hash_and_the_local_cli_submits_without_a_token_set(service, ray_head):
    """`aeforge serve`'s first start (here `python -m services.api`, the same run_service) with no tokens: the token
    file holds a hash, and `aeforge submit` on this machine, with nothing exported but the URL, finds the token."""
    svc = service(tokens=None)
    token_file, client_file = svc.home / "tokens.yaml", svc.home / "client-token"
    token = client_file.read_text().strip()
    assert len(token) >= 40 and client_file.stat().st_mode & 0o777 == 0o600
    assert token not in token_file.read_text() and "token_hash: sha256:" in token_file.read_text()
    spec = svc.home / "spec.yaml"
    spec.write_text(fake_spec("local-cli", steps=2, cpus=1))
    cli_env = {k: v for k, v in svc.env.items() if not k.startswith("AEFORGE_")} | {
        "AEFORGE_HOME": str(svc.home),
        "AEFORGE_API_URL": svc.url,
    }
    submitted = subprocess.run(
        [str(Path(sys.executable).parent / "aeforge"), "submit", str(spec)],
        env=cli_env,
        cwd=svc.home,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    svc.http.headers["Authorization"] = f"Bearer {token}"
    job = svc.wait_state(submitted.stdout.strip(), "succeeded")
    assert job["owner"] == getpass.getuser()
    assert svc.http.get("/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401


def test_a_200_kb_spec_starts_on_ray(service, ray_head):
    """A spec whose JSON is past the 128 KiB an environment string can hold (a sweep over 10,000 beta values): it goes
    to the job by reference, so its Ray job starts (in an environment it would fail exec with E2BIG) and finishes."""
    betas = ", ".join(repr(1 / (i + 3)) for i in range(10_000))
    spec = (
        "name: big-spec\nkind: sweep\nmodel: {variant: beta_vae, architecture: mlp, latent_dim: 2}\n"
        "train: {steps: 2, batch_size: 4}\nresources: {workers: 1, cpus_per_worker: 1}\n"
        f"sweep: {{beta: [{betas}], max_concurrent_trials: 1}}\n"
    )
    assert len(spec) > 200_000
    svc = service()
    job_id = svc.submit(spec)
    svc.wait_state(job_id, "succeeded", timeout=240)
    assert fake_record(svc.home, job_id) is not None  # the job read its spec (fake_job reads train.steps from it)


def test_cancelling_a_running_job_stops_its_ray_job(service, ray_head):
    svc = service()
    job_id = svc.submit(fake_spec("long", steps=900, cpus=1))
    svc.wait_state(job_id, "running")
    wait_for(lambda: fake_record(svc.home, job_id), 60, "the job's process to start")
    response = svc.http.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    job = svc.wait_state(job_id, "cancelled", timeout=90)
    assert "cancelled by tester" in job["events"][-1]["reason"]
    assert ray_client(ray_head).get_job_status(job_id) == "STOPPED"
    assert "ended" not in fake_record(svc.home, job_id)  # stopped, not finished


def test_a_killed_service_comes_back_reattaches_and_the_job_succeeds_once(service, ray_head):
    svc = service()
    job_id = svc.submit(fake_spec("survivor", steps=40, cpus=1))
    svc.wait_state(job_id, "running")
    wait_for(lambda: fake_record(svc.home, job_id), 60, "the job's process to start")
    svc.kill()
    svc.start()
    job = svc.wait_state(job_id, "succeeded", timeout=120)
    events = job["events"]
    assert [e["to_state"] for e in events] == ["queued", "starting", "running", "succeeded"]
    assert [e["from_state"] for e in events] == [None, "queued", "starting", "running"]
    assert job["attempts"] == 1 and job["mlflow_run_id"] == f"run-{job_id}"
    ray_jobs = [j for j in ray_client(ray_head).list_jobs() if (j.submission_id or "").startswith(job_id)]
    assert [j.submission_id for j in ray_jobs] == [job_id]
    assert fake_record(svc.home, job_id, attempt=2) is None


REAL_JOB_MODULES = ("jobs.run", "jobs.registry", "workers.storage", "workers.tracking", "workers.ray_worker")


def real_spec(name: str, steps: int, **extra: str) -> str:
    lines = [
        f"name: {name}",
        "model: {variant: vae, architecture: conv64, latent_dim: 2}",
        "data: {source: 'builtin:dsprites', limit: 256, val_fraction: 0.25}",
        f"train: {{steps: {steps}, batch_size: 16, checkpoint_every: 2, log_every: 1}}",
        "eval: {iwae_samples: 2, max_examples: 16, disentanglement: false, pictures: false}",
        "resources: {workers: 1, cpus_per_worker: 1}",
    ]
    return "\n".join(lines + [f"{k}: {v}" for k, v in extra.items()]) + "\n"


def mlflow_of(svc: Service):
    from workers.tracking import client

    return client(f"sqlite:///{svc.home / 'mlflow.db'}")


def run_of_job(svc: Service, job_id: str):
    """The MLflow run tagged with the job id, in the service's embedded MLflow store, or None."""
    mlflow_client = mlflow_of(svc)
    experiments = mlflow_client.search_experiments()
    runs = (
        mlflow_client.search_runs(
            [e.experiment_id for e in experiments], filter_string=f"tags.`aeforge.job_id` = '{job_id}'"
        )
        if experiments
        else []
    )
    return runs[0] if runs else None


def places_holding(
    secret: str, svc: Service, ray_head, job_id: str, bucket_client, bucket: str
) -> dict[str, list[str]]:
    """Every place a secret given to the service could end up, and where in each it was found (empty: nowhere)."""
    needle = secret.encode()
    hits: dict[str, list[str]] = {}
    # Ray's job records: the `ray` CLI, the dashboard's job API, and every file of the head's session folder (its
    # logs, runtime_env_agent.log included).
    listing = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "list", "--address", ray_head.dashboard],
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0 and job_id in listing.stdout, listing.stdout + listing.stderr
    hits["ray job list"] = ["stdout"] if secret in listing.stdout + listing.stderr else []
    api_jobs = httpx.get(f"{ray_head.dashboard}/api/jobs/", timeout=30)
    assert api_jobs.status_code == 200 and job_id in api_jobs.text
    hits["dashboard /api/jobs/"] = ["body"] if secret in api_jobs.text else []
    session_files = [Path(root) / name for root, _, names in os.walk(ray_head.temp_dir) for name in names]
    hits["Ray session folder"] = [
        str(f.relative_to(ray_head.temp_dir))
        for f in session_files
        if f.is_file() and not f.is_symlink() and needle in f.read_bytes()
    ]
    # What aeforge writes: the job table, its log, the job's log as the API serves it, MLflow, the bucket.
    hits["job table"] = [p.name for p in svc.home.glob("aeforge.db*") if needle in p.read_bytes()]
    hits["service log"] = ["service.log"] if needle in svc.log_path.read_bytes() else []
    hits["job log (API)"] = ["logs"] if secret in svc.http.get(f"/jobs/{job_id}/logs").text else []
    run = run_of_job(svc, job_id)
    hits["MLflow params/tags"] = [
        f"{kind} {k}"
        for kind, values in (("param", run.data.params), ("tag", run.data.tags))
        for k, v in values.items()
        if secret in f"{k}={v}"
    ]
    hits["MLflow params/tags"] += [p.name for p in svc.home.glob("mlflow.db*") if needle in p.read_bytes()]
    keys = [
        o["Key"]
        for page in bucket_client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    ]
    assert keys, "the job wrote nothing to the bucket"
    hits["bucket objects"] = []
    for key in keys:
        obj = bucket_client.get_object(Bucket=bucket, Key=key)
        if needle in obj["Body"].read() or secret in json.dumps(obj.get("Metadata", {})):
            hits["bucket objects"].append(key)
    return hits


# 2 beta x 2 seeds in packs of 2 (issue 12): the packed sweep the queue runs, and the sweep the secret scan reads.
PACKED_SWEEP_SPEC = (
    "name: e2e-packed\nkind: sweep\nmodel: {variant: beta_vae, architecture: conv64, latent_dim: 2}\n"
    "data: {source: 'builtin:dsprites', limit: 256, val_fraction: 0.25}\n"
    "train: {steps: 4, batch_size: 16, checkpoint_every: 2, log_every: 2}\n"
    # 4 steps leave every trial collapsed (no active unit at Burda et al.'s 0.01), and a sweep gives no collapsed
    # trial @best (issue 20): this test is about the queue and packs, so it lowers the health bar to "any unit
    # moves at all"; tests/jobs/test_registry_gate.py tests the bar itself.
    "eval: {iwae_samples: 2, max_examples: 16, disentanglement: false, pictures: true,"
    " active_unit_variance: 1.0e-9, collapse_kl_per_latent: 0}\n"
    "resources: {workers: 1, cpus_per_worker: 0.9}\n"  # beside the train job on the 2 CPUs
    "sweep: {beta: [1, 4], seed: [0, 1], pack: 2, metric: {name: eval/elbo, mode: max}}\n"
    "register: {model_name: e2e-packed}\n"
)


@pytest.fixture(scope="module")
def s3_real_jobs(tmp_path_factory, ray_head, s3_server):
    """A real train job and a real packed sweep through the queue, on S3 (a bucket of their own on the session's
    moto), run once for the module and read by two tests: the secret scan, and the packed sweep's results. The keys
    are in the Ray node's environment; the service has them too (its operator's shell), and forwards none.
    (the service, the bucket, the train job's id, the sweep's id, the sweep's job record)"""
    from tests.fixtures.s3 import s3_client

    bucket = f"aeforge-test-{os.urandom(6).hex()}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    svc = Service(
        tmp_path_factory.mktemp("s3-real-jobs") / "home",
        ray_head,
        job_module=None,
        extra_env={
            "AEFORGE_STORAGE": f"s3://{bucket}/aeforge",
            "AEFORGE_S3_ENDPOINT_URL": s3_server,
            "AEFORGE_LOG_FORMAT": "json",  # the scan covers the JSON log lines too
            **NODE_CREDENTIALS,
        },
    ).start()
    try:
        job_id = svc.submit(real_spec("e2e-s3", 2))
        # A sweep too: Ray Tune copies AWS_* from its driver's environment into every trial actor's runtime env, which
        # Ray writes to the head's runtime_env_agent.log (issue 19); the driver holds none while Tune runs.
        sweep_id = svc.submit(PACKED_SWEEP_SPEC)
        job = svc.wait_state(job_id, "succeeded", timeout=240)
        assert job["mlflow_run_id"]
        sweep = svc.wait_state(sweep_id, "succeeded", timeout=400)
        assert sweep["mlflow_run_id"]
        yield svc, bucket, job_id, sweep_id, sweep
    finally:
        svc.stop()


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in REAL_JOB_MODULES), reason="no real job path")
@pytest.mark.timeout(900)  # a train job and a sweep
def test_s3_credentials_reach_jobs_from_the_node_never_through_ray_job_records(s3_real_jobs, ray_head, s3_server):
    """A real train job and a real sweep on S3 through the queue: the keys are in the Ray node's environment; the
    service has them too (its operator's shell), and forwards none: the secret is in none of Ray's job records (its
    session folder included) nor anything aeforge wrote."""
    from tests.fixtures.s3 import s3_client

    svc, bucket, job_id, sweep_id, _ = s3_real_jobs
    for checked in (job_id, sweep_id):
        hits = places_holding(SECRET, svc, ray_head, checked, s3_client(s3_server), bucket)
        print(f"{checked}: places checked for the secret: {len(hits)}; with it: {sum(bool(h) for h in hits.values())}")
        assert len(hits) == 8 and not any(hits.values()), {place: found for place, found in hits.items() if found}


UNICODE_DESCRIPTION = "🚀 VAE auf dSprites — 形状の分離 ✓"
UNICODE_MODEL_DESCRIPTION = "模型说明 🧪 (registered through the queue)"


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in REAL_JOB_MODULES), reason="no real job path")
def test_a_spec_with_emoji_and_cjk_text_trains_through_the_queue(real_job_service, ray_head):
    """A real training job (`python -m jobs.run`) through the queue, registered; the spec's free text crosses the
    API, the job table, the Ray job's environment and the entry point intact (it once failed every attempt: JSON's
    escaped surrogate pairs read back as YAML). The queue's plain real-job test was folded in here: one Ray Train fit
    fewer."""
    svc = real_job_service
    spec = real_spec(
        "e2e-unicode",
        2,
        description=json.dumps(UNICODE_DESCRIPTION, ensure_ascii=False),
        register=f"{{model_name: e2e-unicode, description: {json.dumps(UNICODE_MODEL_DESCRIPTION, ensure_ascii=False)}}}",
    )
    job_id = svc.submit(spec)
    job = svc.wait_state(job_id, "succeeded", timeout=280)
    assert job["attempts"] == 1 and job["mlflow_run_id"] and job["model_version"]
    assert [e["to_state"] for e in job["events"]] == ["queued", "starting", "running", "succeeded"]
    run = run_of_job(svc, job_id)
    assert run.info.run_id == job["mlflow_run_id"]
    assert run.data.params["description"] == UNICODE_DESCRIPTION
    version = mlflow_of(svc).get_model_version("e2e-unicode", job["model_version"])
    assert version.description.startswith(UNICODE_MODEL_DESCRIPTION + "\n\n")  # then the metrics, pictures


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in REAL_JOB_MODULES), reason="no real job path")
@pytest.mark.timeout(900)  # the module's S3 jobs, when this test is the first to ask for them
def test_a_packed_sweep_runs_through_the_queue(s3_real_jobs, ray_head):
    """2 beta x 2 seeds in packs of 2 (issue 12), submitted to the queue: four nested runs with their metrics, the
    results table and summary pictures on the sweep's run, and the best trial's model, which loads. (The sweep the
    secret scan above reads: submitted beside a train job, on S3.)"""
    import mlflow.pytorch
    import torch

    svc, _, _, job_id, job = s3_real_jobs
    mlflow_client = mlflow_of(svc)
    parent = run_of_job(svc, job_id)
    children = mlflow_client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert {(c.data.params["trial.beta"], c.data.params["trial.seed"]) for c in children} == {
        ("1.0", "0"),
        ("1.0", "1"),
        ("4.0", "0"),
        ("4.0", "1"),
    }
    assert all("eval/elbo" in c.data.metrics for c in children)
    assert {f.path for f in mlflow_client.list_artifacts(parent.info.run_id, "results")} == {"results/results.csv"}
    assert "pictures/traversals.png" in {f.path for f in mlflow_client.list_artifacts(parent.info.run_id, "pictures")}
    version = mlflow_client.get_model_version_by_alias("e2e-packed", "best")
    assert str(job["model_version"]) == str(version.version)
    mlflow.set_tracking_uri(f"sqlite:///{svc.home / 'mlflow.db'}")
    try:
        model = mlflow.pytorch.load_model("models:/e2e-packed@best", map_location="cpu")
    finally:
        mlflow.set_tracking_uri(None)
    assert tuple(model(torch.rand(1, 1, 64, 64)).shape) == (1, 1, 64, 64)


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in REAL_JOB_MODULES), reason="no real job path")
def test_cancelling_a_real_job_ends_its_mlflow_run_killed(real_job_service, ray_head):
    svc = real_job_service
    job_id = svc.submit(real_spec("e2e-cancel", 100_000))
    svc.wait_state(job_id, "running", timeout=120)
    # The job's progress lines first, then MLflow: reading the embedded store while the job creates it would race
    # the job's own schema migration.
    wait_for(
        lambda: (
            (svc.http.get(f"/jobs/{job_id}", params={"progress": "true"}).json().get("progress") or {}).get("step", 0)
            >= 2
        ),
        180,
        "the job to train",
    )
    wait_for(
        lambda: (r := run_of_job(svc, job_id)) and "train/loss" in r.data.metrics, 60, "the first losses in MLflow"
    )
    assert svc.http.post(f"/jobs/{job_id}/cancel").status_code == 202
    svc.wait_state(job_id, "cancelled", timeout=90)
    run = wait_for(
        lambda: (r := run_of_job(svc, job_id)) and r.info.status != "RUNNING" and r, 30, "the MLflow run to end"
    )
    assert run.info.status == "KILLED"
    # Nothing of the job stays on Ray: its controller, workers and Ray Train's detached PlacementGroupCleaner end.
    wait_for(lambda: not job_actors_alive(ray_head), 60, "the job's Ray actors to end")


def job_actors_alive(ray_head) -> list[str]:
    from ray.util.state import list_actors

    alive = list_actors(address=ray_head.dashboard, filters=[("state", "=", "ALIVE")], timeout=10)
    return [
        a.class_name for a in alive if a.class_name in ("TrainController", "RayTrainWorker", "PlacementGroupCleaner")
    ]
