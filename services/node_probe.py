"""What `aeforge doctor` runs on the Ray cluster: a Ray job (``python -c`` with this file's text, the same ``python``
the queue's jobs start with) whose driver runs a small task on every alive node, pinned there
(NodeAffinitySchedulingStrategy, hard), that imports aeforge's job entry point (and with it torch, Ray Train and the
training loop) and reports the versions it finds, and CUDA where the node has GPUs. The driver checks itself too:
it is where ``python -m jobs.run`` runs. It prints one ``AEFORGE_NODE_CHECK {...}`` line, which the doctor reads
from the job's log.

It imports nothing of aeforge at its top, so that a node without aeforge is reported, not a crash.
"""

import json
import logging
import sys
from typing import Any

MARK = "AEFORGE_NODE_CHECK "
# A node's task may wait for a worker process to start and for torch to import on a busy machine.
TASK_TIMEOUT_S = 90.0


def probe() -> dict[str, Any]:
    """This process's Python and what it can import: aeforge (its job entry point), torch, CUDA."""
    import platform
    import socket
    from importlib import metadata

    found: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "host": socket.gethostname(),
    }
    try:
        found["aeforge"] = metadata.version("aeforge")
        import torch

        import jobs.run  # noqa: F401  (the queue's entry point: torch, Ray Train, the training loop)

        found["torch"] = torch.__version__
        found["cuda"] = torch.version.cuda
        found["cuda_gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # an ImportError above all: this Python lacks aeforge or one of its dependencies
        found["error"] = f"{type(exc).__name__}: {exc}"
    return found


def main() -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address="auto", log_to_driver=False, logging_level=logging.ERROR)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    remote_probe = ray.remote(probe)
    pending = {
        node["NodeID"]: remote_probe.options(
            num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote()
        for node in nodes
    }
    report = []
    for node in nodes:
        entry = {
            "node_id": node["NodeID"],
            "address": node.get("NodeManagerAddress"),
            "head": "node:__internal_head__" in node.get("Resources", {}),
            "gpus": node.get("Resources", {}).get("GPU", 0),
        }
        try:
            found: dict[str, Any] = ray.get(pending[node["NodeID"]], timeout=TASK_TIMEOUT_S)
            entry |= found
        except Exception as exc:  # the task could not run there: its worker process failed to start or died
            entry["error"] = f"the check task did not run there: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        report.append(entry)
    print(MARK + json.dumps({"driver": probe(), "nodes": report}), flush=True)


if __name__ == "__main__":
    main()
