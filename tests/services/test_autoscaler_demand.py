"""The queue's demand reaches Ray's autoscaler, on Ray's own fake multi-node cluster (``RAY_FAKE_CLUSTER=1`` with a
``fake_multinode`` provider): a queued job that fits no node waits "for the autoscaler", the dispatcher asks for its
bundle with ``request_resources``, the autoscaler's monitor sees the request and plans a node for it, and once the
queue drains the dispatcher withdraws the request. (Not asserted yet: on this machine the fake node the autoscaler
launched did not come up within minutes, and the monitor's status after the withdrawal was not seen to change.)"""

from __future__ import annotations

import os

import pytest
import yaml

from tests.fixtures.processes import wait_for
from tests.fixtures.ray_head import ray_head_process
from tests.services.test_e2e import RAY_ENV, Service, fake_spec, tail

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = {
    "cluster_name": "aeforge-fake",
    "max_workers": 1,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "available_node_types": {
        # The head offers 1 CPU to jobs: a job asking for 2 fits no node until the autoscaler adds the worker.
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "ray.worker.big": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1},
    },
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


@pytest.fixture
def fake_cluster(tmp_path):
    config = tmp_path / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | RAY_ENV | {"RAY_FAKE_CLUSTER": "1"}
    # --num-cpus as the config says the head has; `ray start --block` stops the fake nodes it started with itself.
    with ray_head_process(env, num_cpus=1, args=[f"--autoscaling-config={config}"], prefix="aefake-") as head:
        os.environ.update(RAY_ENV)
        wait_for(lambda: live_cpus(head, head.proc, head.log_path) is not None, 300, "the fake cluster's head to be up")
        yield head


def live_cpus(head, proc=None, log_path=None) -> float | None:
    if proc is not None and proc.poll() is not None:
        raise AssertionError(f"ray start exited with {proc.returncode}:\n{tail(log_path)}")
    try:
        from ray.util.state import list_nodes

        nodes = list_nodes(
            address=head.dashboard, filters=[("state", "=", "ALIVE")], timeout=20, raise_on_missing_output=False
        )
    except Exception:
        return None
    return sum(float(n.resources_total.get("CPU", 0.0)) for n in nodes) if nodes else None


def test_a_queued_job_that_fits_no_node_is_asked_of_the_autoscaler_and_the_request_withdrawn(tmp_path, fake_cluster):
    svc = Service(tmp_path / "home", fake_cluster, extra_env={"AEFORGE_AUTOSCALER_ADDRESS": fake_cluster.address})
    svc.start()
    monitor = fake_cluster.temp_dir / "session_latest" / "logs" / "monitor.log"

    def monitor_says(text: str) -> bool:
        return monitor.exists() and text in monitor.read_text()

    try:
        wait_for(lambda: live_cpus(fake_cluster) == 1.0, 60, "the head alone (1 CPU)")
        job_id = svc.submit(fake_spec("needs-a-node", steps=5, cpus=2))
        waiting = wait_for(
            lambda: (j := svc.job(job_id))["state"] == "queued" and j.get("queue", {}).get("reason") and j,
            60,
            "a reason",
        )
        assert "waiting for the autoscaler to add nodes" in waiting["queue"]["reason"]
        # Ray's autoscaler sees the request and plans a node for it.
        wait_for(lambda: monitor_says("{'CPU': 2.0}: 1 from request_resources()"), 120, "the autoscaler to see it")
        wait_for(lambda: monitor_says("Queue 1 new nodes for launch"), 60, "the autoscaler to plan a node")
        # The queue drains (the job is cancelled): the request is withdrawn.
        assert svc.http.post(f"/jobs/{job_id}/cancel").status_code == 200
        wait_for(
            lambda: "asked Ray's autoscaler for nothing more" in svc.log_path.read_text(), 60, "the request withdrawn"
        )
    finally:
        svc.stop()
