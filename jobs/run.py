"""How a job runs. ``python -m jobs.run <job id>`` is the fixed entry point the queue launches on Ray;
``aeforge run SPEC`` calls the same functions in-process.

A job's run folder (AEFORGE_HOME/runs/<job id>/) holds the spec as submitted (spec.yaml), metrics.jsonl (curves),
metrics.json (final numbers), checkpoints/ and pictures/.
"""

from __future__ import annotations

import json
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from jobs.spec import JobSpec, check_data
from workers import settings
from workers.data import open_dataset, train_val_split
from workers.data.base import ImageDataset
from workers.loop import RunContext, TrainResult, train


def new_job_id(name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "job"
    return f"{slug}-{stamp}-{secrets.token_hex(2)}"


def run_dir_for(job_id: str) -> Path:
    return settings.home() / "runs" / job_id


@dataclass
class PreparedData:
    full: ImageDataset
    train: ImageDataset
    val: ImageDataset


def prepare_data(spec: JobSpec, resolve: Callable[[str], str] | None = None) -> PreparedData:
    """Open the spec's data and split it (the same split on every worker: it depends on the seed only)."""
    full = open_dataset(spec.data, resolve=resolve)
    train_part, val_part = train_val_split(full, spec.data.val_fraction, spec.train.seed)
    if len(val_part) == 0:  # val_fraction 0: evaluate on the training data
        val_part = train_part
    return PreparedData(full=full, train=train_part, val=val_part)


def write_spec(run_dir: Path, spec: JobSpec) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))


def write_final_metrics(run_dir: Path, metrics: dict) -> None:
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    tmp.replace(run_dir / "metrics.json")


def run_in_process(spec: JobSpec, job_id: str, resolve: Callable[[str], str] | None = None) -> TrainResult:
    """Train a `kind: train` spec in this process, no Ray (debugging, benchmarks, `aeforge run --local`).

    Running the same job id again resumes from the run folder's last checkpoint.
    """
    check_data(spec, resolve=resolve)
    run_dir = run_dir_for(job_id)
    write_spec(run_dir, spec)
    data = prepare_data(spec, resolve=resolve)
    ctx = RunContext(run_dir=run_dir)
    result = train(
        spec.model,
        spec.train,
        spec.eval,
        data.train,
        data.val,
        ctx,
        dataset_size=len(data.train),
        full_data=data.full if data.full.has_factors else None,
        spec_json=json.dumps(spec.model_dump(mode="json")),
    )
    write_final_metrics(run_dir, result.final_metrics)
    return result


# --- on Ray ------------------------------------------------------------------------------------------------


def job_environment() -> dict[str, str]:
    """Settings a job's Ray workers need, from this process's environment (secrets included, never logged), and
    the source tree on PYTHONPATH so workers import the same packages as this driver."""
    import os

    env = {k: os.environ[k] for k in settings.JOB_ENV_VARS if os.environ.get(k)}
    env.setdefault("AEFORGE_HOME", str(settings.home()))
    source_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH", "")) if p)
    return env


def connect_ray() -> None:
    """Join RAY_ADDRESS's cluster, or start a local Ray sized to this machine (the embedded default)."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=settings.ray_address(), runtime_env={"env_vars": job_environment()}, log_to_driver=True)


def worker_config(spec: JobSpec, job_id: str, experiment_path: str, mlflow_run_id: str | None) -> dict:
    return {
        "model": spec.model.model_dump(mode="json"),
        "data": spec.data.model_dump(mode="json"),
        "train": spec.train.model_dump(mode="json"),
        "eval": spec.eval.model_dump(mode="json"),
        "spec_json": json.dumps(spec.model_dump(mode="json")),
        "job_id": job_id,
        "experiment_path": experiment_path,
        "mlflow_run_id": mlflow_run_id,
        "mlflow_tracking_uri": settings.mlflow_tracking_uri(),
    }


def build_trainer(spec: JobSpec, run_name: str, storage, mlflow_run_id: str | None, callbacks=()):
    """One TorchTrainer for a `train` spec (or one sweep trial); the Train run is named after the job/trial id,
    so running the same id again resumes from its last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workers.ray_worker import train_loop_per_worker

    fs, base = storage.pyarrow_filesystem()
    storage_path = f"{base}/ray"
    r = spec.resources
    per_worker = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker:
        per_worker["GPU"] = r.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(spec, run_name, f"{storage_path}/{run_name}", mlflow_run_id),
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.num_to_keep),
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            callbacks=list(callbacks),
            # Settings as this driver sees them now, whenever the cluster was started.
            worker_runtime_env={"env_vars": job_environment()},
        ),
    )


def run_train_on_ray(spec: JobSpec, job_id: str) -> dict:
    """A `train` job end to end: preflight, data check, Ray Train (DDP), MLflow run, registered model."""
    from jobs.registry import log_and_register
    from workers.loop import load_model_from_checkpoint
    from workers.storage import Storage
    from workers.tracking import MlflowRun, ensure_experiment, start_or_resume_run

    storage = Storage.from_settings()
    storage.preflight()
    check_data(spec, resolve=storage.resolve)
    connect_ray()

    experiment_id = ensure_experiment(spec.name)
    run_id = start_or_resume_run(experiment_id, job_id, run_name=job_id)
    tracking = MlflowRun(run_id, settings.mlflow_tracking_uri())
    tracking.log_spec(spec.model_dump(mode="json"))
    tracking.set_tags({"aeforge.kind": spec.kind, "aeforge.variant": spec.model.variant})

    result = build_trainer(spec, job_id, storage, run_id).fit()
    if result.error:
        raise result.error
    with tempfile.TemporaryDirectory(prefix="aeforge-final-") as tmp:
        result.checkpoint.to_directory(tmp)
        model = load_model_from_checkpoint(tmp)
    metrics = tracking.final_metrics()
    registered = None
    if spec.registration is not None:
        registered = log_and_register(model, spec, job_id, run_id, metrics)
    tracking.terminate("FINISHED")
    return {
        "job_id": job_id,
        "mlflow_run_id": run_id,
        "checkpoint": result.checkpoint.path,
        "metrics": metrics,
        "model": registered,
        "pictures": storage.uri(f"runs/{job_id}/pictures"),
    }


def run_job(spec: JobSpec, job_id: str) -> dict:
    if spec.kind == "sweep":
        from jobs.sweep import run_sweep

        return run_sweep(spec, job_id)
    return run_train_on_ray(spec, job_id)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.run <job id>`: the queue's fixed entry point. The spec comes in AEFORGE_JOB_SPEC."""
    import os
    import sys

    from jobs.spec import SpecError, parse_spec

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m jobs.run <job id>", file=sys.stderr)
        return 2
    job_id = argv[0]
    text = os.environ.get("AEFORGE_JOB_SPEC")
    if not text:
        print(f"job {job_id}: AEFORGE_JOB_SPEC is not set; the queue passes the spec in the job's environment", file=sys.stderr)
        return 2
    try:
        spec = parse_spec(text, f"job {job_id}")
        outcome = run_job(spec, job_id)
    except SpecError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    summary = {"mlflow_run_id": outcome.get("mlflow_run_id"), "model": outcome.get("model")}
    print(f"AEFORGE_RESULT {json.dumps(summary, default=str)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
