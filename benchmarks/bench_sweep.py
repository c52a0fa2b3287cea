"""Benchmark (not a test): one grid sweep of short trials, unpacked and packed (issue 12's goal: packed in at most
half the unpacked wall time for an 8-model grid).

    python -m benchmarks.bench_sweep [--betas 1,2,4,8] [--seeds 0,1] [--steps 30] [--pack auto] [--output table|json]

Both sweeps run through ``jobs.sweep.run_sweep`` (Ray Tune, Ray Train, MLflow, storage) on a local Ray this process
starts, in a temporary AEFORGE_HOME (local storage, SQLite MLflow): the same grid (beta x seed, one latent size, a
beta-VAE on procedural dSprites), the same trials, the same evaluation; only ``sweep.pack`` differs. Ray's and the
workers' output goes to a log whose path is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bench_ray_fit import use_fresh_home
from services.run_display import output_to_log


def sweep_spec(name: str, betas: list[float], seeds: list[int], steps: int, pack: int | str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "sweep",
        "model": {"variant": "beta_vae", "architecture": "conv64", "latent_dim": 6},
        "data": {"source": "builtin:dsprites", "val_fraction": 0.01},
        "train": {"steps": steps, "batch_size": 64, "log_every": steps, "checkpoint_every": steps},
        "eval": {"iwae_samples": 1, "max_examples": 64, "disentanglement": False, "probe": False, "pictures": False},
        # 0.95 CPU a worker: with its driver's 0.01, two trials (or two packs) run at once on 2 CPUs.
        "resources": {"workers": 1, "cpus_per_worker": 0.95},
        "sweep": {"beta": betas, "seed": seeds, "metric": {"name": "eval/elbo", "mode": "max"}, "pack": pack},
    }


def run(betas: list[float], seeds: list[int], steps: int, pack: int | str) -> dict[str, Any]:
    use_fresh_home("aeforge-bench-sweep-")
    import ray

    from jobs.ray_train import connect_ray
    from jobs.spec import parse_spec
    from jobs.sweep import run_sweep

    connect_ray()
    rows: list[dict[str, Any]] = []
    try:
        for label, packing in (("unpacked", 1), ("packed", pack)):
            spec = parse_spec(yaml.safe_dump(sweep_spec(f"bench-{label}", betas, seeds, steps, packing)))
            started = time.perf_counter()
            outcome = run_sweep(spec, f"bench-{label}-{time.strftime('%H%M%S')}")
            seconds = time.perf_counter() - started
            finished = sum(1 for row in outcome["trials"] if row["status"] == "finished")
            rows.append(
                {
                    "sweep": label,
                    "pack": packing,
                    "trials": len(outcome["trials"]),
                    "finished": finished,
                    "seconds": seconds,
                }
            )
    finally:
        ray.shutdown()
    rows[1]["x_unpacked_time"] = rows[1]["seconds"] / rows[0]["seconds"]
    return {"betas": betas, "seeds": seeds, "steps": steps, "cpus": os.cpu_count(), "rows": rows}


def table(report: dict[str, Any]) -> str:
    lines = [
        f"beta-VAE/conv64 on dSprites, {len(report['betas'])} beta x {len(report['seeds'])} seeds, "
        f"{report['steps']} steps a trial, on {report['cpus']} CPUs",
        "",
        "| sweep | sweep.pack | trials finished | wall time (s) | × unpacked |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ratio = f"{row['x_unpacked_time']:.2f}" if "x_unpacked_time" in row else "1.00"
        lines.append(
            f"| {row['sweep']} | {row['pack']} | {row['finished']}/{row['trials']} | {row['seconds']:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--betas", default="1,2,4,8")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pack", default="auto", help="the packed sweep's sweep.pack: a size or auto")
    parser.add_argument("--output", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    pack: int | str = args.pack if args.pack == "auto" else int(args.pack)
    log = Path(tempfile.gettempdir()) / f"aeforge-bench-sweep-{os.getpid()}.log"
    with output_to_log(log):
        report = run(
            [float(b) for b in args.betas.split(",")], [int(s) for s in args.seeds.split(",")], args.steps, pack
        )
    report["log"] = str(log)
    print(json.dumps(report, indent=2) if args.output == "json" else table(report) + f"\n\nRay's output: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
