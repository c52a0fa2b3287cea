"""The deployment, built and run as a platform team runs it: `make test-stack` (not part of `make test`).

The README's deploy section is run as written: podman (installed from the distribution when missing) builds the
images (on a base built with debootstrap when no image registry answers, with stand-ins for PostgreSQL and MinIO),
compose brings the stack up and it is waited for until every service is healthy, `aeforge doctor` runs in the
service container and the smoke job runs from a client container. Then, beyond the README:
- a 2-worker job whose Ray Train workers are on the two Ray worker containers; one of those containers is killed
  after the first checkpoint (its restart policy brings it back) and the job resumes from that checkpoint; the
  service container is restarted while the job runs, and the queue re-attaches to it (same attempt, same Ray job);
- the registered model loads in a one-off client container;
- `down` leaves no container and no network; a second `up` after `down -v`, with Docker Compose v2 against podman's
  Docker-compatible API this time, starts as clean as the first (no job, no model, all checks pass).
Each phase's time, the image sizes and the whole run's time are printed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.s3 import free_ports

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "infra" / "stack.sh"
README = REPO / "README.md"
TWO_WORKERS = "tests/stack/two_workers.yaml"
PROJECT = "aeforge"
# Every check passed (their number grows with the service: not pinned here).
DOCTOR_PASSED = re.compile(r"^all \d+ checks passed$", re.M)

pytestmark = pytest.mark.skipif(not os.environ.get("AEFORGE_STACK_TEST"), reason="run by make test-stack")


def readme_block(marker: str) -> list[str]:
    """The command lines of the README's code block that follows ``<!-- stack-test: MARKER -->``."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- stack-test: {marker} -->\s*```(?:sh|bash)\n(.*?)```", text, re.S)
    assert found, f"README.md has no code block after <!-- stack-test: {marker} -->"
    return [
        line.split("  #")[0].strip()
        for line in found.group(1).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


class Stack:
    """Runs commands against the stack, timing each phase."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.timings: list[tuple[str, float]] = []
        self.started = time.monotonic()

    def run(self, command: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        started = time.monotonic()
        proc = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=REPO,
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        took = time.monotonic() - started
        print(  # with the host's load average: on a shared machine a time means little without it
            f"[{time.monotonic() - self.started:6.0f} s] {command}  ({took:.0f} s, exit {proc.returncode}, "
            f"load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        for line in proc.stderr.splitlines():  # infra/stack.sh's own account: what it built, in how long, how big
            if line.startswith("[stack "):
                print(f"          {line}", flush=True)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"`{command}` exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                f"\n--- stderr\n{proc.stderr[-6000:]}"
            )
        return proc

    def phase(self, name: str, started: float) -> None:
        self.timings.append((f"{name} (load {os.getloadavg()[0]:.1f})", time.monotonic() - started))

    def engine(self, *args: str, check: bool = True) -> str:
        return self.run(shlex.join(["podman", *args]), check=check).stdout.strip()

    def containers(self, service: str | None = None) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={PROJECT}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        out = self.engine("ps", "-a", *filters, "--format", "{{.Names}}")
        return sorted(out.split())

    def diagnostics(self) -> str:
        parts = [self.run(f"{STACK} ps", check=False).stdout]
        for name in self.containers():
            parts.append(f"--- {name}\n" + self.run(f"podman logs --tail 40 {name} 2>&1", check=False).stdout)
        return "\n".join(parts)


class Api:
    """The queue's HTTP API on the port compose publishes, with the admin token infra/stack.sh init made."""

    def __init__(self, port: int):
        token = (REPO / "infra" / "secrets" / "admin-token").read_text().strip()
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    def job(self, job_id: str, progress: bool = False) -> dict:
        for attempt in range(30):  # the service may be restarting
            try:
                answer = self.http.get(f"/jobs/{job_id}", params={"progress": progress})
                if answer.status_code < 500:
                    answer.raise_for_status()
                    return answer.json()
            except httpx.TransportError:
                pass
            time.sleep(2)
        raise AssertionError(f"the API did not answer for job {job_id}")

    def wait(self, job_id: str, predicate, timeout: float, what: str, progress: bool = False) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id, progress=progress)
            if predicate(job):
                return job
            assert job["state"] not in ("failed", "cancelled"), f"{job_id} {job['state']}: {job.get('error')}"
            time.sleep(2)
        raise AssertionError(
            f"{job_id}: not {what} after {timeout:.0f} s (last: {job['state']}, {job.get('progress')})"
        )


def submitted_id(output: str) -> str:
    found = re.search(r"\b((?:smoke|stack-ddp)-\d{8}-\d{6}-[0-9a-f]+)\b", output)
    assert found, f"no job id in:\n{output}"
    return found.group(1)


def train_worker_nodes(stack: Stack) -> dict[str, str]:
    """The alive Ray Train workers' node IPs (actor id -> node IP), as Ray's state API on the head sees them."""

    def listed(what: str) -> list[dict]:
        out = stack.run(f"{STACK} exec ray-head ray list {what} --format json").stdout
        return json.loads(out[out.index("[") :])

    actors = listed("actors --detail --limit 1000 --filter class_name=RayTrainWorker --filter state=ALIVE")
    nodes = {n["node_id"]: n["node_ip"] for n in listed("nodes --filter state=ALIVE")}
    return {a["actor_id"]: nodes.get(a["node_id"], "?") for a in actors}


def container_ip(stack: Stack, name: str) -> str:
    return stack.engine("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name)


def test_stack_end_to_end():
    api_port, mlflow_port, dashboard_port = free_ports(3)
    env = dict(
        os.environ,
        AEFORGE_PORT=str(api_port),
        MLFLOW_PORT=str(mlflow_port),
        RAY_DASHBOARD_PORT=str(dashboard_port),
        AEFORGE_WAIT_S="600",
    )
    stack = Stack(env, Path(tempfile.mkdtemp(prefix="aeforge-stack-")))
    up_lines, down_lines = readme_block("up"), readme_block("down")
    assert any(line.endswith("stack.sh up") for line in up_lines) and any(
        line.endswith("down -v") for line in down_lines
    )
    stack.run(f"{STACK} down -v", check=False)  # a stack a failed run left behind
    try:
        # 1. The README's deploy section, as written: install, build, init, up (healthy), doctor, the smoke job.
        for line in up_lines:
            started = time.monotonic()
            out = stack.run(line, timeout=1200)
            stack.phase(line, started)
            if " submit " in line:
                smoke_id = submitted_id(out.stdout + out.stderr)
                assert f"{smoke_id}: succeeded" in out.stdout, out.stdout[-3000:]
            if "doctor" in line:
                assert DOCTOR_PASSED.search(out.stdout), out.stdout
        api = Api(api_port)
        assert api.job(smoke_id)["model_version"], "the smoke job registered no model"

        # 2. A 2-worker job: one Ray Train worker on each Ray worker container.
        started = time.monotonic()
        out = stack.run(f"{STACK} client aeforge submit {TWO_WORKERS}")
        ddp_id = submitted_id(out.stdout + out.stderr)
        api.wait(
            ddp_id,
            lambda j: (j.get("progress") or {}).get("step", 0) >= 130,
            300,
            "past its first checkpoint",
            progress=True,
        )
        placed = train_worker_nodes(stack)
        workers = stack.containers("ray-worker")
        worker_ips = {container_ip(stack, name): name for name in workers}
        assert len(placed) == 2 and set(placed.values()) == set(worker_ips), (placed, worker_ips)
        stack.phase("2-worker job: running on both Ray worker containers", started)

        # 3. Kill one Ray worker container mid-job (SIGKILL to its init, as a crash or an OOM kill would): its restart
        # policy brings it back and Ray Train resumes the job from its last checkpoint.
        started = time.monotonic()
        victim = workers[0]
        restarts = int(stack.engine("inspect", "--format", "{{.RestartCount}}", victim))
        killed_at = api.job(ddp_id, progress=True)["progress"]["step"]
        kill_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        stack.run(f"kill -9 $(podman inspect --format '{{{{.State.Pid}}}}' {victim})")
        api.wait(
            ddp_id,
            lambda j: (j.get("progress") or {}).get("step", 0) >= killed_at + 60,
            400,
            f"training again past step {killed_at + 60} after the kill",
            progress=True,
        )
        assert int(stack.engine("inspect", "--format", "{{.RestartCount}}", victim)) > restarts
        stack.phase("Ray worker container killed; the job resumed", started)

        # 4. Restart the service container while the job runs: the queue re-attaches to the same Ray job.
        started = time.monotonic()
        before = api.job(ddp_id)
        assert before["state"] == "running", before["state"]
        stack.run(f"{STACK} compose restart aeforge")
        stack.run(f"{STACK} wait")
        after = api.wait(ddp_id, lambda j: j["state"] == "succeeded", 600, "succeeded")
        assert after["attempts"] == before["attempts"], (before["attempts"], after["attempts"])
        assert after["ray_submission_id"] == before["ray_submission_id"]
        result = after["result"]
        assert result.get("steps") == 700 and after["model_version"], result
        assert 100 <= result.get("resumed_from_step", 0) <= killed_at, (killed_at, result)  # from a checkpoint
        # The queue kept seeing Ray after the node died (Ray's state API once raised on a dead node, and the queue
        # then took Ray for unreachable).
        service_log = stack.run(f"podman logs --since {kill_time} {stack.containers('aeforge')[0]} 2>&1").stdout
        assert "cannot list Ray's nodes" not in service_log, service_log[-3000:]
        stack.phase("service restarted; the job re-attached and succeeded", started)

        # 5. The registered model loads in a one-off client container.
        started = time.monotonic()
        out = stack.run(
            f"{STACK} client sh -c 'aeforge models sample stack-ddp@candidate -n 4 -o /tmp/grid.png "
            "&& test -s /tmp/grid.png'"
        )
        assert "wrote 4 samples" in out.stdout + out.stderr
        stack.phase("model loaded in a client container", started)

        # 6. The README's teardown: down leaves nothing running and no network; down -v removes the volumes.
        started = time.monotonic()
        for line in down_lines:
            stack.run(line)
            assert stack.containers() == [], stack.containers()
            assert stack.engine("network", "ls", "--format", "{{.Name}}").split().count(f"{PROJECT}_default") == 0
        volumes = stack.engine("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}")
        assert volumes == "", volumes
        stack.phase("down, down -v", started)

        # 7. A second up after down -v is as clean as the first, this time with Docker Compose v2 (docker-compose,
        # against podman's Docker-compatible API): it follows depends_on's conditions and --wait.
        started = time.monotonic()
        docker_compose = "COMPOSE=docker-compose"
        out = stack.run(
            f"{docker_compose} docker-compose -f infra/compose.yaml config --quiet && {docker_compose} {STACK} up"
        )
        stack.phase("second up, docker compose (healthy)", started)
        out = stack.run(f"{STACK} exec aeforge aeforge doctor")
        assert DOCTOR_PASSED.search(out.stdout), out.stdout
        # No job and no model (asked over the published ports: a client container is what the first run checked).
        jobs = api.http.get("/jobs").raise_for_status().json()
        assert jobs["total"] == 0, jobs
        models = httpx.get(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/registered-models/search", timeout=30)
        assert models.raise_for_status().json().get("registered_models", []) == [], models.text
        started = time.monotonic()
        stack.run(f"{docker_compose} {STACK} down -v")
        assert (
            stack.containers() == []
            and f"{PROJECT}_default" not in stack.engine("network", "ls", "--format", "{{.Name}}").split()
        )
        stack.phase("down -v, docker compose", started)
        leftover = stack.run("pgrep -af 'podman system service' || true").stdout
        assert "podman system service" not in leftover or not Path("/run/aeforge-podman-api.pid").exists(), leftover
    except Exception:
        print(stack.diagnostics(), flush=True)
        raise
    finally:
        started = time.monotonic()
        if stack.containers():
            stack.run(f"{STACK} down -v", check=False)
        stack.phase("final cleanup", started)
        sizes = stack.run(f"{STACK} images", check=False).stdout
        print("\nphase times:", flush=True)
        for name, seconds in stack.timings:
            print(f"  {seconds:7.1f} s  {name}", flush=True)
        print(f"  {time.monotonic() - stack.started:7.1f} s  the whole stack test\nimages:\n{sizes}", flush=True)
