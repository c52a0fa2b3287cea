"""How a job runs. ``python -m jobs.run <job id>`` is the fixed entry point the queue launches on Ray;
``aeforge run SPEC`` calls the same functions in-process.

A job's run folder (AEFORGE_HOME/runs/<job id>/) holds the spec as submitted (spec.yaml), metrics.jsonl (curves),
metrics.json (final numbers), checkpoints/ and pictures/.
"""

from __future__ import annotations

import json
import os
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
    from workers.ray_worker import TEST_HOOK_WORKER_EXIT

    env = {k: os.environ[k] for k in (*settings.JOB_ENV_VARS, TEST_HOOK_WORKER_EXIT) if os.environ.get(k)}
    env.setdefault("AEFORGE_HOME", str(settings.home()))
    source_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH", "")) if p)
    return env


def connect_ray() -> None:
    """Join RAY_ADDRESS's cluster, or start a local Ray sized to this machine (the embedded default)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # A Ray Job's driver (the queue launched us): the job's runtime env, with these settings, is already in
        # force, and Ray refuses a second one that sets the same variables.
        ray.init(address=settings.ray_address() or "auto", log_to_driver=True)
        return
    # "local": a new Ray on this machine even if another one runs here (ray.init(None) would join the last
    # cluster `ray start` recorded in /tmp/ray, which is not what "no RAY_ADDRESS" means).
    ray.init(address=settings.ray_address() or "local", runtime_env={"env_vars": job_environment()},
             log_to_driver=True)


def worker_config(spec: JobSpec, job_id: str, mlflow_run_id: str | None) -> dict:
    return {
        "model": spec.model.model_dump(mode="json"),
        "data": spec.data.model_dump(mode="json"),
        "train": spec.train.model_dump(mode="json"),
        "eval": spec.eval.model_dump(mode="json"),
        "spec_json": json.dumps(spec.model_dump(mode="json")),
        "job_id": job_id,
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
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(spec, run_name, mlflow_run_id),
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=r.per_worker()),
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


def user_error(exc: BaseException) -> BaseException:
    """The error to show for a failed fit: a worker's own DataError or TrainingDiverged (whose message is the whole
    story) rather than Ray's wrapper around it; anything else as Ray raised it."""
    from ray.train import WorkerGroupError

    from workers.data.base import DataError
    from workers.loop import TrainingDiverged

    if isinstance(exc, WorkerGroupError):
        for _, failure in sorted(exc.worker_failures.items()):
            cause, seen = failure, 0
            while cause is not None and not isinstance(cause, (DataError, TrainingDiverged)) and seen < 10:
                # Ray wraps a worker's exception (UserExceptionWithTraceback._base_exc, RayTaskError.cause).
                cause = getattr(cause, "_base_exc", None) or getattr(cause, "cause", None) or cause.__cause__
                seen += 1
            if isinstance(cause, (DataError, TrainingDiverged)):
                return cause
    return exc


def fit(trainer):
    """``trainer.fit()`` (which raises on a failed run on Ray 2.60), showing a worker's own error (user_error)."""
    try:
        return trainer.fit()
    except Exception as exc:
        shown = user_error(exc)
        if shown is exc:
            raise
        raise shown from exc


def run_train_on_ray(spec: JobSpec, job_id: str) -> dict:
    """A `train` job end to end: preflight, data check, Ray Train (DDP), MLflow run, registered model.

    The preflight (storage reachable and writable, data there and fitting the model) runs before Ray or MLflow is
    touched, so a wrong endpoint, bucket or data set fails in seconds and leaves nothing behind. Running the same
    job id again resumes: the Train run (named after the job id) restarts from its last checkpoint, the MLflow run
    is the same one, and a model already registered from that run is not registered twice.
    """
    from jobs.registry import log_and_register, registered_version_of_run
    from workers.loop import load_model_from_checkpoint
    from workers.storage import Storage
    from workers.tracking import MlflowRun, ensure_experiment, start_or_resume_run

    storage = Storage.from_settings()
    storage.preflight()
    check_data(spec, resolve=storage.resolve)

    experiment_id = ensure_experiment(spec.name)
    run_id = start_or_resume_run(experiment_id, job_id, run_name=job_id)
    tracking = MlflowRun(run_id, settings.mlflow_tracking_uri())
    try:
        # A changed spec under a finished job's id is refused here (params cannot change) and leaves that run as
        # it was; from here on a failure marks the run FAILED.
        tracking.log_spec(spec.model_dump(mode="json"))
    except BaseException:
        if tracking.client.get_run(run_id).info.status == "RUNNING":
            tracking.terminate("FAILED")
        raise
    try:
        tracking.client.update_run(run_id, status="RUNNING")
        tracking.set_tags({"aeforge.kind": spec.kind, "aeforge.variant": spec.model.variant,
                           "aeforge.storage": storage.uri(f"ray/{job_id}")})
        connect_ray()
        started = time.perf_counter()
        result = fit(build_trainer(spec, job_id, storage, run_id))
        fit_seconds = time.perf_counter() - started
        if result.checkpoint is None:
            raise RuntimeError(f"job {job_id}: training ended without a checkpoint in {storage.uri(f'ray/{job_id}')}")
        summary = result.return_value or {}
        metrics = tracking.final_metrics()
        registered = None
        if spec.registration is not None:
            registered = registered_version_of_run(spec.registration.model_name, run_id, alias=spec.registration.alias)
            if registered is None:
                with tempfile.TemporaryDirectory(prefix="aeforge-final-") as tmp:
                    result.checkpoint.to_directory(tmp)
                    model = load_model_from_checkpoint(tmp)
                registered = log_and_register(model, spec, job_id, run_id, metrics)
    except BaseException as exc:
        tracking.terminate("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracking.terminate("FINISHED")
    return {
        "job_id": job_id,
        "mlflow_run_id": run_id,
        "checkpoint": result.checkpoint.path,
        "steps": summary.get("steps"),
        "resumed_from_step": summary.get("resumed_from_step"),
        "fit_seconds": fit_seconds,
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
