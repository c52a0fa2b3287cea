"""The queue's demand reaches Ray's autoscaler, on Ray's own fake multi-node cluster (``RAY_FAKE_CLUSTER=1`` with a
``fake_multinode`` provider, whose nodes are real local raylets the monitor starts): a queued job that fits no node
waits "for the autoscaler", the dispatcher asks for its bundle with ``request_resources``, the autoscaler adds one
node, the job runs on it (its bundle held by an actor there) to the end while its bundle stays asked for (so the node is
not taken away as idle before the job's driver has placed its worker), the request is withdrawn once the queue has
drained and the job ended, and the idle node goes away. A queued job cancelled withdraws its request too.

The provider starts its nodes (in the monitor's process) against ``provider.gcs_address``, and without one against
Ray's default GCS port on the node's address: the head here has a port of its own, so the config names it. (Without
it the node never came up: monitor.err said "Failed to connect to GCS at address 192.0.2.2:6379 within 5 seconds" and
"Failed to get cluster ID from GCS server: TimedOut", and no raylet was started for it.)"""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml

from tests.fixtures.processes import wait_for
from tests.fixtures.ray_head import ray_head_process
from tests.fixtures.s3 import free_ports
from tests.services.fake_job import HOLDS_BUNDLE
from tests.services.test_e2e import RAY_ENV, Service, fake_record, fake_spec, tail

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
    (gcs_port,) = free_ports(1)
    config = tmp_path / "autoscaling.yaml"
    config.write_text(
        yaml.safe_dump(CONFIG | {"provider": CONFIG["provider"] | {"gcs_address": f"127.0.0.1:{gcs_port}"}})
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | RAY_ENV
    env |= {"RAY_FAKE_CLUSTER": "1", HOLDS_BUNDLE: "1"}
    # --num-cpus as the config says the head has. The fake nodes are the monitor's children, in the head's process
    # group, which the head's stop ends.
    with ray_head_process(
        env, num_cpus=1, args=[f"--autoscaling-config={config}"], prefix="aefake-", gcs_port=gcs_port
    ) as head:
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


def node_states(head) -> dict[str, str]:
    """Every node the cluster has had: its id and state (ALIVE, DEAD)."""
    from ray.util.state import list_nodes

    return {n.node_id: n.state for n in list_nodes(address=head.dashboard, timeout=20)}


def test_a_queued_job_that_fits_no_node_gets_one_from_the_autoscaler_which_removes_it_when_idle(tmp_path, fake_cluster):
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    svc = Service(tmp_path / "home", fake_cluster, extra_env={"AEFORGE_AUTOSCALER_ADDRESS": fake_cluster.address})
    svc.start()
    logs = fake_cluster.temp_dir / "session_latest" / "logs"
    monitor = logs / "monitor.log"

    def monitor_says(text: str) -> bool:
        return monitor.exists() and text in monitor.read_text()

    def context() -> str:
        return f"monitor.log:\n{tail(monitor)}\nmonitor.err:\n{tail(logs / 'monitor.err')}\nservice:\n{tail(svc.log_path, 80)}"

    def asked() -> list[str]:
        """What the service asked Ray's autoscaler for, in order."""
        said = "asked Ray's autoscaler for "
        return [line.split(said, 1)[1] for line in svc.log_path.read_text().splitlines() if said in line]

    marks: dict[str, float] = {}
    try:
        wait_for(lambda: live_cpus(fake_cluster) == 1.0, 60, "the head alone (1 CPU)")
        marks["submitted"] = time.monotonic()
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
        # The node comes up: the head's CPU and the worker type's 2.
        wait_for(lambda: live_cpus(fake_cluster) == 3.0, 300, "the autoscaler's node (3 CPUs)", detail=context)
        marks["node up"] = time.monotonic()
        # The job runs on it to the end: its bundle fits no other node.
        svc.wait_state(job_id, "succeeded", timeout=180)
        marks["succeeded"] = time.monotonic()
        record = fake_record(svc.home, job_id)
        assert record is not None and "ended" in record, record
        assert record["node_id"] != FAKE_HEAD_NODE_ID, record
        # One node was launched, and kept while the job held it (its bundle stayed asked for while it ran).
        assert set(node_states(fake_cluster)) == {FAKE_HEAD_NODE_ID, record["node_id"]}, context()
        assert monitor.read_text().count("Launching 1 nodes") == 1, context()
        # The queue has drained and the job ended: the request is withdrawn.
        wait_for(
            lambda: asked()[-2:] == ["1 bundle(s): [{'CPU': 2.0}]", "nothing more"],
            60,
            "the withdrawal",
            detail=context,
        )
        marks["withdrawn"] = time.monotonic()
        # The idle node goes away (idle_timeout_minutes is 0.1).
        terminating = f"Terminating the node with id {record['node_id']}"
        wait_for(lambda: monitor_says(terminating), 180, "the node's removal", detail=context)
        wait_for(lambda: live_cpus(fake_cluster) == 1.0, 120, "the head alone again (1 CPU)", detail=context)
        marks["node gone"] = time.monotonic()
        assert "(idle)" in next(line for line in monitor.read_text().splitlines() if terminating in line)
        # A job bigger than any node type the autoscaler may add is asked for as well; cancelled while queued, it
        # withdraws its request.
        too_big = svc.submit(fake_spec("too-big", steps=5, cpus=8))
        wait_for(lambda: asked()[-1] == "1 bundle(s): [{'CPU': 8.0}]", 60, "the 8-CPU request", detail=context)
        assert svc.job(too_big)["state"] == "queued"
        assert svc.http.post(f"/jobs/{too_big}/cancel").status_code == 200
        wait_for(lambda: asked()[-1] == "nothing more", 60, "the 8-CPU request withdrawn", detail=context)
    finally:
        svc.stop()
        start = marks.get("submitted")
        if start is not None:
            print("autoscaler timings:", json.dumps({k: round(v - start, 1) for k, v in marks.items()}))
