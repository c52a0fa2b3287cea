"""How a job runs. ``python -m jobs.run <job id>`` is the fixed entry point the queue launches on Ray;
``aeforge run SPEC`` calls the same functions in-process.

A job's run folder (AEFORGE_HOME/runs/<job id>/) holds the spec as submitted (spec.yaml), metrics.jsonl (curves),
metrics.json (final numbers), checkpoints/ and pictures/.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from jobs.ray_train import (
    build_trainer,
    check_fits_cluster,
    check_fits_memory,
    cluster_resources,
    connect_ray,
    fit,
    stop_gracefully_on_sigterm,
)
from jobs.spec import JobSpec, check_data, parse_spec_json
from workers import settings
from workers.data import prepare
from workers.errors import AeforgeError
from workers.loop import TrainResult, train
from workers.memory_failures import memory_failure
from workers.outputs import publish_outputs
from workers.protocol import emit, new_job_id, phase_line, result_line  # noqa: F401 (new_job_id: the CLI's)
from workers.timeline import fit_parts, parts_line


def run_dir_for(job_id: str) -> Path:
    return settings.home() / "runs" / job_id


def run_in_process(spec: JobSpec, job_id: str, resolve: Callable[[str], str] | None = None) -> TrainResult:
    """Train a `kind: train` spec in this process, no Ray (debugging, benchmarks, `aeforge run --local`).

    Running the same job id again resumes from the run folder's last checkpoint.
    """
    from workers.loop import RunContext

    check_data(spec, resolve=resolve)
    run_dir = run_dir_for(job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(
        yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
    data = prepare(spec.data, spec.train.seed, resolve=resolve)
    result = train(
        spec.model,
        spec.train,
        spec.eval,
        data.train,
        data.val,
        RunContext(run_dir=run_dir),
        dataset_size=len(data.train),
        full_data=data.ground_truth,
        spec_json=spec.model_dump_json(),
    )
    publish_outputs(run_dir, metrics=result.final_metrics)
    return result


def run_train_on_ray(
    spec: JobSpec, job_id: str, spec_file: str | Path | None = None, *, register: bool = True, force: bool = False
) -> dict[str, Any]:
    """A `train` job end to end: preflight, data check, Ray Train (DDP), MLflow run, registered model.

    ``spec_file``: the file `aeforge run` read the spec from, the MLflow run's source (None: a queue job, whose
    source is "aeforge job ID"). The run's page also gets a description and the data set as an input.

    The preflight (storage reachable and writable, data there and fitting the model) runs before Ray or MLflow is
    touched, so a wrong endpoint, bucket or data set fails in seconds and leaves nothing behind. Running the same
    job id again resumes: the Train run (named after the job id) restarts from its last checkpoint, the MLflow run
    is the same one, and a model already registered from that run is not registered twice.

    ``register`` False (``aeforge run --no-register``) registers nothing. Otherwise the model is registered, and
    the spec's alias moves to it only through the registry's gate (jobs/gate.py); ``force`` moves it even when the
    new version is worse than the one the alias points at. The decision is printed to the run's log and returned
    in ``model["decision"]``.
    """
    from jobs.lineage import experiment_description, experiment_tags, run_description, source_tags, training_dataset
    from jobs.registry import job_owner, log_and_register, registered_version_of_run
    from workers.loop import load_model_from_checkpoint
    from workers.storage import Storage
    from workers.tracking import MlflowRun, ensure_experiment, start_or_resume_run

    storage = Storage.from_settings()
    storage.preflight(wait_s=settings.storage_wait_s())
    emit(phase_line("loading data", detail="checking the data set"))
    data_info = check_data(spec, resolve=storage.resolve)
    dataset = training_dataset(spec, storage, data_info)
    emit(phase_line("starting Ray"))
    connect_ray()
    check_fits_cluster(spec, cluster_resources())  # a job that can never be placed would wait forever
    check_fits_memory(spec)  # nor can one whose worker needs more memory than any node has

    experiment_id = ensure_experiment(spec.name, description=experiment_description(spec), tags=experiment_tags(spec))
    run_id = start_or_resume_run(experiment_id, job_id, run_name=job_id)
    with MlflowRun(run_id, settings.mlflow_tracking_uri()) as tracking:
        # A changed spec under a finished job's id is refused here (params cannot change) and leaves that run as
        # it was; from here on the run is RUNNING, and ends FAILED or KILLED if the job does.
        tracking.log_spec(spec.model_dump(mode="json"))
        tracking.mark_running()
        tracking.set_tags(
            {
                "aeforge.kind": spec.kind,
                "aeforge.variant": spec.model.variant,
                "aeforge.storage": storage.uri(f"ray/{job_id}"),
                **source_tags(job_id, spec_file, job_owner()),
            }
        )
        tracking.describe(run_description(spec, job_id))
        tracking.log_dataset(dataset)
        stop_gracefully_on_sigterm(storage, job_id)  # a preemption or cancel checkpoints at the current step
        started = time.time()
        result = fit(build_trainer(spec, job_id, storage, run_id))
        ended = time.time()
        if result.checkpoint is None:
            raise RuntimeError(f"job {job_id}: training ended without a checkpoint in {storage.uri(f'ray/{job_id}')}")
        summary = result.return_value or {}
        timeline = fit_parts(started, ended, summary.get("timeline"))
        print(f"aeforge: fit {parts_line(timeline)}", flush=True)  # to the run's log: where the time went
        metrics = tracking.final_metrics()
        registered = None
        if spec.registration is not None and register:
            emit(phase_line("registering", detail=spec.registration.model_name))
            registered = registered_version_of_run(spec.registration.model_name, run_id, alias=spec.registration.alias)
            if registered is None:
                with tempfile.TemporaryDirectory(prefix="aeforge-final-") as tmp:
                    result.checkpoint.to_directory(tmp)
                    model = load_model_from_checkpoint(tmp)
                registered = log_and_register(model, spec, job_id, run_id, metrics, force=force)
            print(
                f"aeforge: registered {registered['name']} version {registered['version']}: {registered['decision']}",
                flush=True,
            )
    return {
        "job_id": job_id,
        "mlflow_run_id": run_id,
        "checkpoint": result.checkpoint.path,
        "steps": summary.get("steps"),
        "resumed_from_step": summary.get("resumed_from_step"),
        "fit_seconds": ended - started,
        "timeline": timeline,
        "metrics": metrics,
        "model": registered,
        "pictures": storage.uri(f"runs/{job_id}/pictures"),
    }


def run_job(
    spec: JobSpec, job_id: str, spec_file: str | Path | None = None, *, register: bool = True, force: bool = False
) -> dict[str, Any]:
    """Run a train or sweep job; ``spec_file`` is where `aeforge run` read the spec (None for a queue job);
    ``register`` False registers no model, ``force`` moves the alias past a better version (see the registry's
    gate, jobs/gate.py)."""
    if spec.kind == "sweep":
        from jobs.sweep import run_sweep

        return run_sweep(spec, job_id, spec_file=spec_file, register=register, force=force)
    return run_train_on_ray(spec, job_id, spec_file=spec_file, register=register, force=force)


def read_job_spec() -> str | None:
    """The spec JSON of a queue job: the package AEFORGE_JOB_SPEC_MODULE names (workers.job_specs), else
    AEFORGE_JOB_SPEC."""
    from workers.job_specs import read_spec

    return read_spec() or os.environ.get("AEFORGE_JOB_SPEC") or None


def _refused(job_id: str, exc: AeforgeError) -> int:
    """The spec, its data, a setting or the registry says no: running it again changes nothing. Exit code 2 tells
    the queue not to retry."""
    message = str(exc)
    print(message if message.startswith(f"job {job_id}") else f"job {job_id}: {message}", file=sys.stderr)
    return 2


def _error_text(exc: BaseException) -> str:
    """The exception's text with its causes' (Ray Train and Tune wrap a worker's error), for telling what failed."""
    parts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__module__}.{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.run <job id>`: the queue's fixed entry point. The spec is the JSON the queue stored when the
    job was submitted, read from the package AEFORGE_JOB_SPEC_MODULE names (workers.job_specs), which Ray installs
    with the job; or, run by hand, given in AEFORGE_JOB_SPEC."""
    from workers.storage import StorageUnreachable

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m jobs.run <job id>", file=sys.stderr)
        return 2
    job_id = argv[0]
    try:
        text = read_job_spec()
        if not text:
            print(
                f"job {job_id}: neither AEFORGE_JOB_SPEC_MODULE nor AEFORGE_JOB_SPEC is set; the queue names the "
                f"spec it stored in the job's environment",
                file=sys.stderr,
            )
            return 2
        spec = parse_spec_json(text, f"job {job_id}")
        outcome = run_job(spec, job_id)
    except StorageUnreachable:
        raise  # an outage: exit 1, and the queue tries the job again after a back-off
    except Exception as exc:
        memory = memory_failure(_error_text(exc))
        if memory is None:
            if isinstance(exc, AeforgeError):
                return _refused(job_id, exc)
            raise
        # Out of memory: said as such. From outside the job (the node ran low, a kill) exit 1: the queue retries;
        # the job's own allocation exit 2: it would ask as much again.
        traceback.print_exc()
        print(f"job {job_id}: {memory.sentence()}", file=sys.stderr, flush=True)
        return 1 if memory.outside else 2
    # The queue stores this line as the job's result: `aeforge status` and `submit --follow` show it. A sweep's
    # metrics are its best trial's.
    best = outcome.get("best") or {}
    metrics = outcome.get("metrics") or {k: v for k, v in best.items() if "/" in k and isinstance(v, (int, float))}
    # A train job's steps and the step it last resumed from (0: it never did) say whether a failure was survived.
    progress = {k: outcome[k] for k in ("steps", "resumed_from_step") if outcome.get(k) is not None}
    print(
        result_line(
            {
                "mlflow_run_id": outcome.get("mlflow_run_id"),
                "model": outcome.get("model"),
                "metrics": metrics,
                "pictures": outcome.get("pictures"),
                "best_trial": best.get("run_name"),
                # A sweep with no healthy trial: the one line that says why nothing is @best.
                **({"no_best": outcome["no_best"]} if outcome.get("no_best") else {}),
                **progress,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
