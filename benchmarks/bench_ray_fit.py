"""Benchmark (not a test): the fixed cost of one Ray Train fit, and where it goes.

    python -m benchmarks.bench_ray_fit [--workers 2] [--steps 10] [--repeats 3] [--output table|json]

Two fits, each ``--repeats`` times, interleaved, on a local Ray this process starts (its start-up is timed apart):

- **Ray's floor**: a TorchTrainer whose train function returns at once. Its time is Ray Train's own: the controller
  actor, the placement group, the worker actors (each a new process that imports torch and ray.train), the process
  group, and the controller noticing that the workers finished.
- **aeforge**: a whole `train` job through the same path as `aeforge run` (storage preflight, MLflow run, Ray Train,
  final checkpoint, registration skipped) of a tiny spec: ``--steps`` steps, the smallest evaluation, no pictures.
  Its worker reports a timeline (workers/timeline.py), so the fit splits into: Ray start-up until our train function
  runs, our set-up (MLflow, data, model), the steps, the end (evaluation, code statistics, final checkpoint), and
  the tail until ``fit()`` returns.

The fixed cost is the fit's time less its training steps. Figures are medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from services.run_display import output_to_log

TINY_SPEC = """\
name: bench-ray-fit
kind: train
model: {{variant: beta_tcvae, architecture: conv64, latent_dim: 6, beta: 6.0}}
data: {{source: 'builtin:dsprites', val_fraction: 0.01}}
train: {{steps: {steps}, batch_size: 64, checkpoint_every: {steps}, log_every: {steps}, seed: 0}}
eval: {{iwae_samples: 1, max_examples: 10, disentanglement: false, probe: false, pictures: false}}
resources: {{workers: {workers}, cpus_per_worker: 1}}
"""


def _floor_fn(config: dict[str, Any]) -> float | None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        return time.time()
    return None


def ray_floor_fit(workers: int, storage: str) -> dict[str, float]:
    """One TorchTrainer fit of a train function that returns at once."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Train V2 keeps what the loop returns (Result.return_value); ray.train picks V2 at import, mypy reads V1.
    trainer = TorchTrainer(
        _floor_fn,  # type: ignore[arg-type]
        scaling_config=ScalingConfig(num_workers=workers),
        run_config=RunConfig(name=f"floor-{time.time_ns()}", storage_path=storage),
    )
    started = time.time()
    result = trainer.fit()
    ended = time.time()
    entered = result.return_value  # type: ignore[attr-defined]
    return {"fit": ended - started, "ray start-up": entered - started, "tail": ended - entered}


def aeforge_fit(workers: int, steps: int) -> dict[str, float]:
    """One tiny `train` job through run_train_on_ray; its parts from the chief's timeline."""
    from jobs.run import run_train_on_ray
    from jobs.spec import parse_spec
    from workers.protocol import new_job_id

    spec = parse_spec(TINY_SPEC.format(steps=steps, workers=workers), "bench spec")
    outcome = run_train_on_ray(spec, new_job_id("bench"))
    row = {"fit": outcome["fit_seconds"]}
    row.update(outcome.get("timeline") or {})
    return row


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    return {k: statistics.median(r[k] for r in rows) for k in keys}


def use_fresh_home(prefix: str) -> Path:
    """Point this process at a new temporary AEFORGE_HOME with the embedded defaults (local storage, SQLite MLflow,
    a local Ray started here), whatever the environment named: a benchmark measures the same setup everywhere."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["AEFORGE_HOME"] = str(home)
    for name in ("AEFORGE_STORAGE", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        os.environ.pop(name, None)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return home


def run(workers: int, steps: int, repeats: int) -> dict[str, Any]:
    home = use_fresh_home("aeforge-bench-fit-")
    import ray

    from jobs.ray_train import connect_ray

    started = time.time()
    connect_ray()
    ray_init = time.time() - started
    floors, ours = [], []
    try:
        for _ in range(repeats):
            floors.append(ray_floor_fit(workers, str(home / "floor")))
            ours.append(aeforge_fit(workers, steps))
    finally:
        ray.shutdown()
    floor, aeforge = _median(floors), _median(ours)
    if "steps" in aeforge:
        aeforge["fixed cost"] = aeforge["fit"] - aeforge["steps"]
    return {
        "workers": workers,
        "steps": steps,
        "repeats": repeats,
        "ray_init_seconds": ray_init,
        "ray_floor": floor,
        "aeforge": aeforge,
        "runs": {"ray_floor": floors, "aeforge": ours},
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"Ray Train fit, {report['workers']} workers, median of {report['repeats']} "
        f"(ray.init took {report['ray_init_seconds']:.1f} s, not counted; Ray's output in {report['log']})",
        "",
        "| fit | part | seconds |",
        "|---|---|---|",
    ]
    for name, label in (
        ("ray_floor", "Ray's floor (train function returns at once)"),
        ("aeforge", f"aeforge tiny job ({report['steps']} steps)"),
    ):
        for part, seconds in report[name].items():
            lines.append(f"| {label} | {part} | {seconds:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    log = Path(tempfile.gettempdir()) / f"aeforge-bench-ray-fit-{os.getpid()}.log"
    with output_to_log(log) as (screen, _):  # Ray's and the workers' lines go to the log, the report to the screen
        report = run(args.workers, args.steps, args.repeats)
    report["log"] = str(log)
    print(json.dumps(report, indent=2) if args.output == "json" else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
