"""A stand-in for ``python -m jobs.run <job id>`` in the queue's end-to-end tests (AEFORGE_JOB_MODULE points here).

It reads what the dispatcher passes (AEFORGE_JOB_ID, the spec by AEFORGE_JOB_SPEC_MODULE, AEFORGE_ATTEMPT), "trains" for
``train.steps`` steps of ``0.1 s`` printing AEFORGE_PROGRESS lines, records when it started and ended under
the service's AEFORGE_HOME/fake-jobs/, and prints an AEFORGE_RESULT line like the real entry point.

Where the Ray node sets AEFORGE_FAKE_JOB_HOLDS_BUNDLE=1, the job holds its worker's bundle (``cpus_per_worker`` CPUs,
as jobs.run's Ray Train worker does) in a Ray actor while it "trains", and records the node that actor ran on: on a
cluster where no node has room for the bundle, the job runs only on a node the autoscaler added.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

STEP_SECONDS = 0.1
HOLDS_BUNDLE = "AEFORGE_FAKE_JOB_HOLDS_BUNDLE"


def hold_bundle(cpus: float) -> tuple[object, str]:
    """An actor that holds ``cpus`` CPUs until this driver exits, and the id of the node it was placed on."""
    import ray

    ray.init(log_to_driver=False)  # the Ray job's own cluster

    @ray.remote(num_cpus=cpus)
    class Worker:
        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

    worker = Worker.remote()
    return worker, ray.get(worker.node_id.remote())


def main(argv: list[str]) -> int:
    job_id = argv[0]
    if os.environ.get("AEFORGE_JOB_ID") != job_id:
        print(f"AEFORGE_JOB_ID is {os.environ.get('AEFORGE_JOB_ID')!r}, not {job_id!r}", file=sys.stderr)
        return 2
    from workers.job_specs import read_spec

    spec = json.loads(read_spec())  # by reference (the package Ray installed with the job), as jobs.run reads it
    attempt = int(os.environ["AEFORGE_ATTEMPT"])
    # The queue names locations, not its AEFORGE_HOME: the service's embedded storage is <its home>/storage.
    record = (
        Path(urlparse(os.environ["AEFORGE_STORAGE"]).path).parent / "fake-jobs" / f"{job_id}.attempt-{attempt}.json"
    )
    record.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    record.write_text(json.dumps({"started": started}))
    # Says whether credentials arrived, never what they are.
    print(f"credentials: {'present' if os.environ.get('AWS_SECRET_ACCESS_KEY') else 'absent'}", flush=True)
    holder = hold_bundle(float(spec["resources"]["cpus_per_worker"])) if os.environ.get(HOLDS_BUNDLE) == "1" else None
    node = {"node_id": holder[1]} if holder else {}
    total = int(spec["train"]["steps"])
    for step in range(1, total + 1):
        time.sleep(STEP_SECONDS)
        print(f"AEFORGE_PROGRESS {json.dumps({'step': step, 'total': total})}", flush=True)
    record.write_text(json.dumps({"started": started, "ended": time.time(), **node}))
    print(f"AEFORGE_RESULT {json.dumps({'mlflow_run_id': f'run-{job_id}', 'model_version': str(attempt)})}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
