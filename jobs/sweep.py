"""A sweep: Ray Tune over a function trainable that runs one TorchTrainer per trial (the Train V2 pattern).

- Each trial is a job of its own, ``<job id>-<trial id>`` (its Train run, its folder on storage, its MLflow run's
  aeforge.job_id); a sweep's Tune experiment is named after the job id, so running the same job id again restores
  the experiment: finished trials are kept, unfinished ones continue from their last Train checkpoint.
- A trial's MLflow run is named ``<spec name>-t<index>-<swept values>`` (``faces-t03-beta4-z10``): names that
  differ early in the UI's runs list, unique within the sweep (Tune's trial index) and the same on a resume.
- Trials end by their own step budget. Nothing here stops a trial from Tune: on Ray 2.60 stopping a Train V2 trial
  can leak its placement group and hang the next trial (ray#54305).
- A SIGTERM to the sweep's driver (the queue preempting or cancelling it) writes one stop request named after the
  sweep's job id, which every trial's and pack's Train workers watch (``stop_on``): the driver need not know which
  trials run in Tune's actors, and a trial that starts after it does not train at all. The workers checkpoint at
  their current step and return, their Train run ends as a finished fit would (its placement group freed by Train,
  not by Tune), and the trial then fails with :class:`TrialStopped`, writing no trial.json: Tune records it as
  errored, never as done, and the same job id run again resumes it from that step.
- MLflow: one parent run per sweep (tagged with the job id), one nested run per trial with the trial's values as
  params. At the end the parent run gets the results table (CSV) and the summary pictures, and the best healthy
  trial's model is registered and offered alias ``best`` through the registry's gate (jobs/gate.py); a collapsed
  trial is never ranked, and a sweep with no healthy trial sets no ``best`` and says why in one line.
"""

from __future__ import annotations

import csv
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from jobs.gate import number, row_health
from jobs.ray_train import (
    build_trainer,
    check_fits_memory,
    cluster_resources,
    connect_ray,
    fit,
    job_environment,
    pack_device_free_bytes,
    stop_gracefully_on_sigterm,
    sweep_concurrency,
)
from jobs.spec import TRIAL_DRIVER_CPU, BetaRange, JobSpec, check_data
from workers import settings
from workers.errors import AeforgeError
from workers.outputs import publish_outputs
from workers.protocol import emit, phase_line, trial_line

TRIAL_KEYS = ("variant", "beta", "latent_dim", "seed")
SWEEP_ID_TAG = "aeforge.sweep_id"
TRIAL_ID_TAG = "aeforge.trial_id"
# Written on storage by a trial's driver when its Train run has finished: {"metrics": {...}, "checkpoint_path"}.
TRIAL_RESULT_FILE = "trial.json"


class SweepNotFound(AeforgeError):
    """No sweep with that job id or MLflow run id."""


class SweepFailed(AeforgeError):
    """A sweep that ended with no finished trial: the message gives each trial's error, and how to continue."""


class TrialStopped(AeforgeError):
    """A trial (or pack) that stopped because its sweep was asked to stop: checkpointed at its current step, not
    finished. Raised in its Tune trial so that Tune records it as errored, and a re-run of the sweep resumes it."""


def _sweep_stopping(storage, job_id: str) -> bool:
    """Whether the sweep's driver has asked its trials to stop (a SIGTERM: preemption or cancel)."""
    from workers.ray_worker import stop_request_path

    return storage.exists(stop_request_path(job_id))


def _stopped_at(return_value: dict[str, Any] | None) -> int | None:
    """The step a trial's or pack's Train run checkpointed at and returned, when it was asked to stop."""
    return (return_value or {}).get("stopped_at_step")


# How a swept value is written in a trial's run name: "beta4", "z10", "seed1"; a variant by its name.
TRIAL_NAME_LABELS = {"variant": "", "beta": "beta", "latent_dim": "z", "seed": "seed"}


def trial_job_id(job_id: str, trial_id: str) -> str:
    """A trial's own job id, ``<sweep job id>-<Tune trial id>``: unique across sweeps, it names the trial's Train
    run and folders on storage (ray/<id>, runs/<id>/) and is its MLflow run's aeforge.job_id."""
    return f"{job_id}-{trial_id}"


def member_trial_id(trial_id: str, k: int) -> str:
    """The trial id of a pack's k-th member: the pack's Tune trial id and the member's place in it."""
    return f"{trial_id}-m{k}"


def trial_index(trial_id: str) -> int | None:
    """Tune numbers a sweep's trials from 0 as it creates them, in the trial id ``<5 hex>_<5-digit index>``; a
    restored sweep keeps its trials' ids. None for an id of another form."""
    found = re.fullmatch(r"[0-9a-f]+_(\d+)", trial_id)
    return int(found.group(1)) if found else None


def _name_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_run_name(
    sweep_name: str, trial_id: str, values: dict[str, Any], num_trials: int, index: int | None = None
) -> str:
    """A trial's MLflow run name: ``<sweep name>-t<index>-<swept values>``, e.g. ``faces-t03-beta4-z10``.

    The index (zero-padded to the sweep's size, at least 2 digits) makes it unique within the sweep; the values
    say what the trial tried. Computed from the trial's id and values, both of which a resumed sweep restores,
    so a trial keeps its name. A packed trial's ``index`` is its place in the grid."""
    index = trial_index(trial_id) if index is None else index
    width = max(2, len(str(max(num_trials - 1, 0))))
    parts = [sweep_name, f"t{index:0{width}d}" if index is not None else trial_id]
    for key, label in TRIAL_NAME_LABELS.items():
        if values.get(key) is not None:
            parts.append(f"{label}{_name_value(values[key])}")
    return "-".join(parts)


def trial_result_relpath(trial_job: str) -> str:
    return f"runs/{trial_job}/{TRIAL_RESULT_FILE}"


def _finished_trial(storage, trial_job: str) -> dict[str, Any] | None:
    relpath = trial_result_relpath(trial_job)
    if not storage.exists(relpath):
        return None
    return json.loads(storage.get_bytes(relpath))


def _trial(config: dict[str, Any], sweep: dict[str, Any]) -> dict[str, float]:
    """One trial, inside a Tune trial actor: a nested MLflow run and a TorchTrainer with TuneReportCallback.
    Returns the trial's final metrics.

    A trial whose Train run already finished (its driver wrote trial.json, then the sweep's driver died before
    Tune recorded the trial as done) trains nothing: it reports its stored results again.
    """
    import os

    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from workers.outputs import numeric_metrics
    from workers.storage import Storage
    from workers.tracking import MlflowRun, start_or_resume_run

    # Tune's trial actors live in worker processes started with the cluster, whose environment may predate this
    # sweep's settings (storage, MLflow, keys): take the driver's.
    os.environ.update(sweep["env"])
    tracking_uri = sweep["tracking_uri"]
    base: JobSpec = sweep["spec"]
    values = {k: config[k] for k in TRIAL_KEYS if k in config}
    spec = base.with_trial(values)
    trial_id = tune.get_context().get_trial_id()
    trial_job = trial_job_id(sweep["job_id"], trial_id)
    run_name = _trial_name(config, sweep)
    storage = Storage.from_settings()
    if _sweep_stopping(storage, sweep["job_id"]):  # started after the stop: nothing to train until the re-run
        raise TrialStopped(f"trial {run_name} not started: sweep {sweep['job_id']} was asked to stop")
    run_id = start_or_resume_run(
        sweep["experiment_id"],
        trial_job,
        run_name=run_name,
        parent_run_id=sweep["parent_run_id"],
        tracking_uri=tracking_uri,
    )
    with MlflowRun(run_id, tracking_uri) as tracking:
        done = _finished_trial(storage, trial_job)
        if done is not None:
            tune.report({**done["metrics"], "checkpoint_path": done["checkpoint_path"]})
            return done["metrics"]
        _describe_trial_run(tracking, sweep, spec, values, trial_id)
        trainer = build_trainer(
            spec,
            trial_job,
            storage,
            run_id,
            callbacks=[TuneReportCallback()],
            trial=run_name,
            stop_on=sweep["job_id"],
        )
        result = fit(trainer)
        stopped = _stopped_at(result.return_value)
        if stopped is not None:
            tracking.terminate("KILLED")  # as the sweep's own run ends: stopped, to be resumed
            raise TrialStopped(
                f"trial {run_name} stopped at step {stopped} (checkpointed there): sweep {sweep['job_id']} was asked "
                f"to stop; running the same job id again resumes it from that step"
            )
        metrics = numeric_metrics(result.metrics or {})
        record = {"metrics": metrics, "checkpoint_path": result.checkpoint.path if result.checkpoint else None}
        storage.put_bytes(json.dumps(record, sort_keys=True).encode(), trial_result_relpath(trial_job))
    return metrics


def _describe_trial_run(run, sweep: dict[str, Any], spec: JobSpec, values: dict[str, Any], trial_id: str) -> None:
    """What a trial's MLflow run records, packed or not: its spec, its values as trial.* params, the sweep's tags
    and lineage, and its description."""
    from jobs.lineage import trial_description

    run.log_spec(spec.model_dump(mode="json"))
    run.log_params({f"trial.{k}": v for k, v in values.items()})
    run.set_tags({SWEEP_ID_TAG: sweep["job_id"], TRIAL_ID_TAG: trial_id, **sweep["source_tags"]})
    run.describe(trial_description(spec, sweep["job_id"], values))
    run.log_dataset(sweep["dataset"])


def _pack_members(rows: list[dict[str, Any]], trial_id: str, job_id: str, spec: JobSpec) -> list[dict[str, Any]]:
    """Who is who in a pack (its Tune trial's grid ``rows``): each member's swept values, trial id, own job id and
    run name (numbered by its place in the grid), as its driver and the results table both name it."""
    members = []
    for k, row in enumerate(rows):
        values = {key: row[key] for key in TRIAL_KEYS if key in row}
        member_id = member_trial_id(trial_id, k)
        members.append(
            {
                "values": values,
                "trial_id": member_id,
                "job": trial_job_id(job_id, member_id),
                "name": trial_run_name(spec.name, member_id, values, spec.num_trials(), index=row["index"]),
            }
        )
    return members


def diverged_message(failed: list | tuple) -> str:
    """What a pack member that diverged (train_pack's (step, part)) reports: on its run, its line, its row."""
    return f"diverged at step {failed[0]}: the '{failed[1]}' part of the loss is not finite"


def param_space(spec: JobSpec, packs: list[list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """grid: every combination (tune.grid_search over the grid's rows); random: each key sampled on its own;
    ``packs``: one Tune trial per pack of grid rows."""
    from ray import tune

    assert spec.sweep is not None
    if packs is not None:
        return {"pack": tune.grid_search(packs)}
    if spec.sweep.search == "grid":
        return {"trial": tune.grid_search(spec.trial_configs())}
    space: dict[str, Any] = {}
    for key, values in spec.sweep.space().items():
        if key == "beta" and isinstance(spec.sweep.beta, BetaRange):
            r = spec.sweep.beta
            space[key] = tune.loguniform(r.start, r.stop) if r.spacing == "log" else tune.uniform(r.start, r.stop)
        else:
            space[key] = tune.choice(values)
    return space


def _flatten_trial(config: dict[str, Any]) -> dict[str, Any]:
    """Grid configs nest the trial values under "trial"; random ones are flat. Trainables see one shape."""
    return dict(config["trial"]) if "trial" in config else dict(config)


def _trial_name(values: dict[str, Any], sweep: dict[str, Any]) -> str:
    """The run name of the trial running here (inside its Tune trial actor)."""
    from ray import tune

    base: JobSpec = sweep["spec"]
    return trial_run_name(
        base.name,
        tune.get_context().get_trial_id(),
        {k: values[k] for k in TRIAL_KEYS if k in values},
        base.num_trials(),
    )


def _trial_entry(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """A trial, with its state in the log as it starts and ends (`aeforge run`'s table of trials reads it)."""
    if "pack" in config:
        _pack_trial(config["pack"], sweep)
        return
    values = _flatten_trial(config)
    name = _trial_name(values, sweep)
    emit(trial_line(name, "running", values={k: values[k] for k in TRIAL_KEYS if k in values}))
    try:
        metrics = _trial(values, sweep)
    except Exception as exc:
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        emit(trial_line(name, "error", error=last[:300]))
        raise
    emit(trial_line(name, "finished", metrics=metrics))


def _pack_trial(rows: list[dict[str, Any]], sweep: dict[str, Any]) -> None:
    """A pack of trials (workers/pack.py) inside one Tune trial actor: a nested MLflow run per member, one
    TorchTrainer for the pack, and per member its trial.json on storage (its metrics and its own checkpoint, the
    member folder of the pack's last one). A member that diverged ends FAILED with its step and loss part; the
    others FINISHED. A pack whose members all finished before (the driver died after) trains nothing."""
    import contextlib
    import os

    from ray import tune

    from jobs.ray_train import build_pack_trainer
    from workers.pack import member_folder
    from workers.storage import Storage
    from workers.tracking import MlflowRun, start_or_resume_run

    os.environ.update(sweep["env"])  # as in _trial: the driver's settings, not the trial actor's
    tracking_uri = sweep["tracking_uri"]
    base: JobSpec = sweep["spec"]
    trial_id = tune.get_context().get_trial_id()
    storage = Storage.from_settings()
    members = _pack_members(rows, trial_id, sweep["job_id"], base)
    for m in members:
        m["spec"] = base.with_trial(m["values"])
    if all(_finished_trial(storage, m["job"]) is not None for m in members):
        tune.report({"members": len(members)})
        return
    if _sweep_stopping(storage, sweep["job_id"]):  # started after the stop: nothing to train until the re-run
        raise TrialStopped(f"pack {trial_id} not started: sweep {sweep['job_id']} was asked to stop")
    for m in members:
        emit(trial_line(m["name"], "running", values=m["values"]))
    with contextlib.ExitStack() as stack:
        runs = []
        for m in members:
            run_id = start_or_resume_run(
                sweep["experiment_id"],
                m["job"],
                run_name=m["name"],
                parent_run_id=sweep["parent_run_id"],
                tracking_uri=tracking_uri,
            )
            run = MlflowRun(run_id, tracking_uri)
            run.mark_running()
            _describe_trial_run(run, sweep, m["spec"], m["values"], m["trial_id"])
            m["mlflow_run_id"] = run_id
            runs.append(run)
            # A failing pack ends every member's run FAILED (KILLED when stopped), as a failing trial ends its own.
            stack.push(run.__exit__)
        pack_job = trial_job_id(sweep["job_id"], trial_id)
        worker_members = [{key: m[key] for key in ("spec", "name", "job", "mlflow_run_id")} for m in members]
        try:
            result = fit(build_pack_trainer(base, pack_job, storage, worker_members, stop_on=sweep["job_id"]))
            stopped = _stopped_at(result.return_value)
            if stopped is not None:
                for run in runs:
                    run.terminate("KILLED")  # as the sweep's own run ends: stopped, to be resumed
                raise TrialStopped(
                    f"pack {trial_id} stopped at step {stopped} (checkpointed there): sweep {sweep['job_id']} was "
                    f"asked to stop; running the same job id again resumes it from that step"
                )
        except Exception as exc:
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            for m in members:
                emit(trial_line(m["name"], "error", error=last[:300]))
            raise
        summaries = (result.return_value or {}).get("members") or [{} for _ in members]
        for k, (m, run, summary) in enumerate(zip(members, runs, summaries)):
            metrics = summary.get("final_metrics") or {}
            failed = summary.get("failed")
            record = {
                "metrics": metrics,
                "failed": failed,
                "resumed_from_step": summary.get("resumed_from_step"),
                "steps": summary.get("steps"),
                "checkpoint_path": f"{result.checkpoint.path}/{member_folder(k)}" if result.checkpoint else None,
            }
            storage.put_bytes(json.dumps(record, sort_keys=True).encode(), trial_result_relpath(m["job"]))
            if failed:
                why = diverged_message(failed)
                run.set_tags({"aeforge.failed": why})
                emit(trial_line(m["name"], "error", error=why))
            else:
                emit(trial_line(m["name"], "finished", metrics=metrics))
        # The members' runs end as the pack did, a diverged member's FAILED.
        stack.pop_all()
        for summary, run in zip(summaries, runs):
            run.terminate("FAILED" if summary.get("failed") else "FINISHED")
    tune.report({"members": len(members)})


def run_sweep(
    spec: JobSpec,
    job_id: str,
    spec_file: str | Path | None = None,
    *,
    register: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """A `sweep` job end to end. Running the same job id again restores the Tune experiment: finished trials are
    kept as they are, unfinished and failed ones run again (each resuming its Train run's last checkpoint).
    ``spec_file``: the file `aeforge run` read the spec from, the MLflow runs' source (None: a queue job).
    ``register`` False registers nothing; ``force`` moves @best past a better version (jobs/gate.py)."""
    from jobs.lineage import experiment_description, experiment_tags, run_description, source_tags, training_dataset
    from jobs.registry import job_owner
    from workers.storage import Storage
    from workers.tracking import MlflowRun, ensure_experiment, start_or_resume_run

    assert spec.sweep is not None
    storage = Storage.from_settings()
    storage.preflight(wait_s=settings.storage_wait_s())
    emit(phase_line("loading data", detail="checking the data set"))
    info = check_data(spec, resolve=storage.resolve)
    # What every run of the sweep records about where it came from: its source, user and data set.
    lineage = {
        "source_tags": source_tags(job_id, spec_file, job_owner()),
        "dataset": training_dataset(spec, storage, info),
    }
    emit(phase_line("starting Ray"))
    connect_ray()
    check_fits_memory(spec)
    max_concurrent, _, capped = sweep_concurrency(spec, cluster_resources())
    if capped:
        print(f"aeforge: sweep {job_id}: {capped}", flush=True)

    tracking_uri = settings.mlflow_tracking_uri()
    experiment_id = ensure_experiment(
        spec.name, tracking_uri, description=experiment_description(spec, BEST_ALIAS), tags=experiment_tags(spec)
    )
    parent_id = start_or_resume_run(experiment_id, job_id, run_name=job_id, tracking_uri=tracking_uri)
    parent = MlflowRun(parent_id, tracking_uri)
    parent.mark_running()  # a finished sweep run again runs again
    with parent:
        parent.log_spec(spec.model_dump(mode="json"))
        parent.set_tags({"aeforge.kind": "sweep", SWEEP_ID_TAG: job_id, **lineage["source_tags"]})
        parent.describe(run_description(spec, job_id))
        parent.log_dataset(lineage["dataset"])
        # Before any trial starts (this clears a request left by an earlier attempt): a SIGTERM from here on asks
        # every trial and pack of the sweep to stop at its current step (the module's docstring says how).
        stop_gracefully_on_sigterm(storage, job_id)
        outcome = _tune(
            spec, job_id, storage, parent, experiment_id, max_concurrent, lineage, info, register=register, force=force
        )
    outcome["data"] = info
    return outcome


def _tune(
    spec: JobSpec,
    job_id: str,
    storage,
    parent,
    experiment_id: str,
    max_concurrent: int,
    lineage: dict[str, Any],
    data_info: dict[str, Any] | None = None,
    *,
    register: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Run (or restore) the Tune experiment and summarise it on the parent run; each trial's run records
    ``lineage`` (source tags, data set) as the parent's does. ``data_info`` (check_data's): the image shape and
    size a pack's memory need is counted for (sweep.pack auto)."""
    from ray import tune

    from workers.storage.ray_fs import keys_out_of_environment, share_s3_keys, tune_filesystem
    from workers.tracking import STOP_REQUESTED

    assert spec.sweep is not None, "a sweep job has a sweep section (JobSpec's validation)"
    data_info = data_info or {}
    sweep_ctx = {
        "spec": spec,
        "job_id": job_id,
        "experiment_id": experiment_id,
        "parent_run_id": parent.run_id,
        "tracking_uri": parent.tracking_uri,
        "env": job_environment(),
        **lineage,
    }
    packs = None
    if spec.sweep.pack != 1:
        free = pack_device_free_bytes(spec, max_concurrent) if spec.sweep.pack == "auto" else None
        shape = tuple(data_info["image_shape"]) if data_info.get("image_shape") else None
        size, why = spec.pack_size(max_concurrent, free, shape, int(data_info.get("num_examples") or 1))
        packs = spec.trial_packs(size)
        print(f"aeforge: sweep {job_id}: {why}: {spec.packs_line(size)}", flush=True)
    trainable = tune.with_resources(tune.with_parameters(_trial_entry, sweep=sweep_ctx), {"cpu": TRIAL_DRIVER_CPU})
    kv_key = f"s3-keys/{job_id}"
    fs, base = tune_filesystem(storage, kv_key)
    share_s3_keys(kv_key)
    tune_path = f"{base}/tune"
    experiment_path = f"{tune_path}/{job_id}"
    try:
        # Tune would copy the keys into every trial's runtime env, and Ray log them: none in the environment.
        with keys_out_of_environment():
            if tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
                tuner = tune.Tuner.restore(
                    experiment_path,
                    trainable=trainable,
                    resume_unfinished=True,
                    resume_errored=True,
                    storage_filesystem=fs,
                )
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=param_space(spec, packs),
                    # No metric/mode here: Tune would require it in every report, and a trial reports its ranking
                    # metric (an evaluation result) only at the end. The ranking is done on the final rows.
                    tune_config=tune.TuneConfig(
                        num_samples=1 if packs is not None else spec.sweep.num_samples,  # packs hold the repeats
                        max_concurrent_trials=max_concurrent,
                    ),
                    run_config=tune.RunConfig(name=job_id, storage_path=tune_path, storage_filesystem=fs, verbose=0),
                )
            grid = tuner.fit()
        if STOP_REQUESTED.is_set():
            # Its trials stopped at their steps (errored in Tune, to be resumed): a stopped sweep, not a failed one.
            raise KeyboardInterrupt(f"sweep {job_id} stopped")
        rows = results_rows(grid, job_id, spec, storage)
        if not any(r["status"] == "finished" for r in rows):
            errors = "; ".join(f"{r['run_name']}: {r.get('error')}" for r in rows if r.get("error"))
            raise SweepFailed(
                f"sweep {job_id}: no trial finished ({errors or 'see the trial errors in the Ray logs'}); "
                f"running the same job id again (aeforge run SPEC --job-id {job_id}) continues it"
            )
        return _summarise(spec, job_id, rows, parent, storage, register=register, force=force)
    finally:
        share_s3_keys(kv_key, remove=True)


def _summarise(
    spec: JobSpec,
    job_id: str,
    rows: list[dict[str, Any]],
    parent,
    storage,
    *,
    register: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """The results table and pictures on the parent run (and storage), the best healthy trial, the registered
    model. Only healthy trials are ranked (jobs/gate.py): when none is, nothing is registered as @best and the
    outcome's ``no_best`` says why in one line with the numbers."""
    from workers.plots.sweep import sweep_summary_pictures

    assert spec.sweep is not None, "a sweep job has a sweep section (JobSpec's validation)"
    metric = spec.sweep.metric
    for row in rows:
        row["health"] = row_health(row, metric.name).label
    outcome: dict[str, Any] = {"job_id": job_id, "mlflow_run_id": parent.run_id, "trials": rows}
    with (
        tempfile.TemporaryDirectory(prefix="aeforge-sweep-") as tmp,
        tempfile.TemporaryDirectory(prefix="aeforge-traversals-") as traversals,
    ):
        outputs = Path(tmp)
        write_results_csv(rows, outputs / "results" / RESULTS_CSV)
        sweep_summary_pictures(
            rows,
            metric.name,
            outputs / "pictures",
            traversal_for=lambda row: _fetch_traversal(storage, row, Path(traversals)),
            mode=metric.mode,
        )
        publish_outputs(outputs, storage=storage, run_name=job_id, mlflow_run=parent)
    outcome["pictures"] = storage.uri(f"runs/{job_id}/pictures")

    finished = [r for r in rows if r["status"] == "finished" and isinstance(r.get(metric.name), (int, float))]
    healthy = [r for r in finished if row_health(r, metric.name).healthy]
    if healthy:
        best = rank_rows(healthy, metric.name, metric.mode)[0]
        parent.log_metrics({f"best/{metric.name}": best[metric.name]}, 0)
        parent.set_tags({"aeforge.best_trial": best["run_name"]})
        outcome["best"] = best
    else:
        outcome["no_best"] = no_best_line(job_id, rows, metric.name)
        parent.set_tags({"aeforge.no_best": outcome["no_best"][:5000]})
        print(f"aeforge: {outcome['no_best']}", flush=True)
    if spec.registration is not None and register and finished:
        outcome["model"] = _register_trials(spec, job_id, finished, metric, storage, force=force)
        print(
            f"aeforge: registered {outcome['model']['name']} version {outcome['model']['version']}: "
            f"{outcome['model']['decision']}",
            flush=True,
        )
    return outcome


def _span(values: list[float], digits: int = 2) -> str:
    low, high = min(values), max(values)
    return (
        number(low, digits)
        if number(low, digits) == number(high, digits)
        else f"{number(low, digits)}-{number(high, digits)}"
    )


def no_best_line(job_id: str, rows: list[dict[str, Any]], metric: str) -> str:
    """'sweep J: no healthy trial, so no @best: 4 of 4 trials collapsed (eval/active_units 0, eval/kl 0.1-0.37)'."""
    verdicts = [row_health(r, metric) for r in rows]
    counts: dict[str, int] = {}
    for verdict in verdicts:
        counts[verdict.label] = counts.get(verdict.label, 0) + 1
    what = ", ".join(f"{n} of {len(rows)} trials {label}" for label, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    numbers: list[str] = []
    for key in ("eval/active_units", "eval/kl", metric):
        values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get(key) == r.get(key)]
        if values and f"{key} " not in " ".join(numbers):
            numbers.append(f"{key} {_span(values)}")
    return f"sweep {job_id}: no healthy trial, so no @best: {what}" + (f" ({', '.join(numbers)})" if numbers else "")


def rank_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Healthy rows (jobs/gate.py: finished, not collapsed) with a numeric ``metric``, best first; then the
    unhealthy ones by the same order (NaN last); the others after them, in their order."""

    def key(row):
        value = row.get(metric)
        if not isinstance(value, (int, float)) or value != value:
            return (2, 0.0)
        return (0 if row_health(row, metric).healthy else 1, -value if mode == "max" else value)

    return sorted(rows, key=key)


def results_rows(grid, job_id: str, spec: JobSpec, storage=None) -> list[dict[str, Any]]:
    """One row per trial: its values, run name, own job id, status, and last reported metrics (the final
    evaluation). A pack's trials come from their trial.json on ``storage``."""
    rows = []
    for result in grid:
        if "pack" in (result.config or {}):
            rows += _pack_rows(result, job_id, spec, storage)
            continue
        config = _flatten_trial(result.config or {})
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
        row: dict[str, Any] = {k: config.get(k) for k in TRIAL_KEYS if k in config}
        row["trial_id"] = trial_id
        row["run_name"] = trial_run_name(spec.name, trial_id, config, spec.num_trials())
        row["trial_job_id"] = trial_job_id(job_id, trial_id)
        row["status"] = "error" if result.error else "finished"
        if result.error:
            row["error"] = (
                str(result.error).strip().splitlines()[-1][:300] if str(result.error).strip() else repr(result.error)
            )
        row["checkpoint_path"] = metrics.get("checkpoint_path")
        for key, value in metrics.items():
            if "/" in key and isinstance(value, (int, float)):
                row[key] = value
        row["step"] = metrics.get("step")
        rows.append(row)
    return rows


def _pack_rows(result, job_id: str, spec: JobSpec, storage) -> list[dict[str, Any]]:
    """The rows of a pack's trials: each member's values, names, and its trial.json (finished or failed), or the
    pack's error when it never wrote one."""
    trial_id = (result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path)
    rows = []
    for member in _pack_members(result.config["pack"], trial_id, job_id, spec):
        row: dict[str, Any] = {
            **member["values"],
            "trial_id": member["trial_id"],
            "run_name": member["name"],
            "trial_job_id": member["job"],
        }
        record = _finished_trial(storage, row["trial_job_id"]) if storage is not None else None
        if record is None:
            row["status"] = "error"
            row["error"] = (
                "the pack stopped before this trial finished"
                if result.error is None
                else (str(result.error).strip().splitlines() or ["the pack ended without this trial"])[-1][:300]
            )
        elif record.get("failed"):
            row["status"] = "failed"
            row["error"] = diverged_message(record["failed"])
        else:
            row["status"] = "finished"
            row["checkpoint_path"] = record.get("checkpoint_path")
            row.update({key: v for key, v in record["metrics"].items() if "/" in key and isinstance(v, (int, float))})
            row["step"] = record.get("steps", spec.train.steps)  # the trial's steps (epochs: counted by its worker)
        rows.append(row)
    return rows


RESULTS_CSV = "results.csv"


def _trial_id_from_path(path: str | None) -> str:
    """A trial folder is named <trainable>_<trial id>_<index>_<config>_<date>; a trial id is <5 hex>_<5 digits>."""
    found = re.search(r"(?:^|_)([0-9a-f]{5}_\d{5})(?:_|$)", Path(path).name) if path else None
    return found.group(1) if found else "?"


def write_results_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One row per trial: its values, status and final metrics (columns in first-seen order)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and k not in ("checkpoint_path", "error")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _fetch_traversal(storage, row: dict[str, Any], tmp: Path) -> Path | None:
    target = tmp / "traversals" / f"{row['trial_job_id']}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        storage.get_file(f"runs/{row['trial_job_id']}/pictures/traversal.png", target)
    except Exception:  # a trial without pictures (failed before the end) is left out of the grid
        return None
    return target


def _load_trial_model(storage, checkpoint_path: str):
    import pyarrow.fs

    from workers.loop import load_model_from_checkpoint

    fs, _ = storage.pyarrow_filesystem()
    with tempfile.TemporaryDirectory(prefix="aeforge-trial-") as tmp:
        pyarrow.fs.copy_files(
            checkpoint_path, tmp, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem()
        )
        return load_model_from_checkpoint(tmp)


def _registered_by_sweep(name: str, job_id: str) -> list:
    """Versions of registered model ``name`` that this sweep registered (a finished sweep run again registers
    nothing new)."""
    from workers.tracking import client

    if "'" in job_id or "'" in name:
        return []
    return list(client().search_model_versions(f"name = '{name}' and tags.sweep_id = '{job_id}'"))


def _register_trials(
    spec: JobSpec, job_id: str, finished: list[dict], metric, storage, force: bool = False
) -> dict[str, Any] | None:
    """Register the best healthy trial's model, offered alias ``best`` through the registry's gate (and, with
    register_all, every other finished trial's without an alias), each version tagged with the sweep id, the trial
    id and its rank. With no healthy trial the top-ranked one is registered as the record, without the alias."""
    from jobs.registry import log_and_register, registration_result

    assert spec.sweep is not None and spec.registration is not None, "called for a sweep that registers"
    emit(phase_line("registering", detail=spec.registration.model_name))
    ordered = rank_rows(finished, metric.name, metric.mode)
    healthy = [r for r in ordered if row_health(r, metric.name).healthy]
    earlier = _registered_by_sweep(spec.registration.model_name, job_id)
    if earlier:
        first = [v for v in earlier if (v.tags or {}).get("sweep_rank") == "1"] or earlier
        version = min(first, key=lambda v: int(v.version))
        return _earlier_result(version, registration_result)
    to_register = ordered if spec.sweep.register_all else ordered[:1]
    from workers.tracking import ensure_experiment, start_or_resume_run

    experiment_id = ensure_experiment(spec.name)
    best_version = None
    for rank, row in enumerate(to_register):
        trial_spec = spec.with_trial({k: row[k] for k in TRIAL_KEYS if k in row and row[k] is not None})
        # A trial's spec is a train spec: @best is judged by the sweep's metric (jobs/gate.py), not a train job's.
        registration = spec.registration.model_copy(update={"metric": spec.gate_metric()})
        trial_spec = trial_spec.model_copy(update={"registration": registration})
        model = _load_trial_model(storage, row["checkpoint_path"])
        run_id = start_or_resume_run(experiment_id, row["trial_job_id"], run_name=row["run_name"])
        is_best = bool(healthy) and row is healthy[0]
        verdict = row_health(row, metric.name)
        note = (
            f"Trial {row['run_name']} of sweep {job_id}, rank {rank + 1} of {len(ordered)} by {metric.name} "
            f"({metric.mode})" + ("" if verdict.healthy else f"; not ranked: {verdict.reason}") + "."
        )
        registered = log_and_register(
            model,
            trial_spec,
            row["trial_job_id"],
            run_id,
            {k: v for k, v in row.items() if "/" in k},
            extra_tags={"sweep_id": job_id, "trial_id": row["trial_id"], "sweep_rank": str(rank + 1)},
            alias=BEST_ALIAS if is_best else None,
            force=force,
            note=note,
        )
        if rank == 0:
            best_version = registered
            if not healthy:
                best_version["decision"] = f"not offered @{BEST_ALIAS}: no trial is healthy ({verdict.reason})"
    return best_version


def _earlier_result(version, registration_result) -> dict:
    """What a finished sweep run again reports about the version it registered the first time: whether @best is
    on it, and the decision recorded then."""
    from jobs.gate import AliasDecision
    from jobs.registry import decision_tag
    from workers.tracking import client

    recorded = (version.tags or {}).get(decision_tag(BEST_ALIAS))
    if recorded is None:
        return registration_result(version, None, None)
    aliases = client().get_registered_model(version.name).aliases or {}
    moved = str(aliases.get(BEST_ALIAS)) == str(version.version)
    return registration_result(version, BEST_ALIAS, AliasDecision(BEST_ALIAS, str(version.version), moved, recorded))


BEST_ALIAS = "best"


def _find_sweep_run(mlflow_client, ref: str):
    from mlflow.exceptions import MlflowException

    from workers.tracking import JOB_ID_TAG, all_pages

    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            return mlflow_client.get_run(ref)
        except MlflowException:
            pass
    if "'" in ref:
        return None
    ids = [e.experiment_id for e in all_pages(mlflow_client.search_experiments)]
    for start in range(0, len(ids), 100):
        found = mlflow_client.search_runs(
            ids[start : start + 100],
            filter_string=f"tags.`{JOB_ID_TAG}` = '{ref}'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        if found:
            return found[0]
    return None


def load_sweep(ref: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """A finished or running sweep, from MLflow: ``ref`` is its job id or its parent run id.

    Returns {"job_id", "mlflow_run_id", "status", "metric", "mode", "rows"}: one row per trial (its values,
    status and latest metrics), best first by the sweep's metric.
    """
    from workers.tracking import JOB_ID_TAG, PARENT_RUN_TAG, all_pages, client

    uri = tracking_uri or settings.mlflow_tracking_uri()
    mlflow_client = client(uri)
    parent = _find_sweep_run(mlflow_client, ref)
    if parent is None:
        raise SweepNotFound(f"no sweep with job id or MLflow run id '{ref}' in {uri}")
    params = parent.data.params
    if parent.data.tags.get("aeforge.kind") != "sweep" and params.get("kind") != "sweep":
        raise SweepNotFound(f"'{ref}' is MLflow run {parent.info.run_id}, which is not a sweep")
    children = all_pages(
        mlflow_client.search_runs,
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'",
    )
    rows = []
    for child in children:
        row: dict[str, Any] = {}
        for key, value in sorted(child.data.params.items()):
            if key.startswith("trial."):
                row[key[len("trial.") :]] = _parse_param(value)
        row["trial_id"] = child.data.tags.get(TRIAL_ID_TAG, "")
        row["run_name"] = child.info.run_name
        row["trial_job_id"] = child.data.tags.get(JOB_ID_TAG, "")
        row["status"] = child.info.status.lower()
        row.update(sorted(child.data.metrics.items()))
        rows.append(row)
    metric = params.get("sweep.metric.name", "eval/elbo")
    for row in rows:
        row["health"] = row_health(row, metric).label
    metric = params.get("sweep.metric.name", "eval/elbo")
    mode = params.get("sweep.metric.mode", "max")
    rows = rank_rows(sorted(rows, key=lambda r: r["run_name"]), metric, mode)
    return {
        "job_id": parent.data.tags.get(JOB_ID_TAG, ref),
        "mlflow_run_id": parent.info.run_id,
        "status": parent.info.status.lower(),
        "metric": metric,
        "mode": mode,
        "rows": rows,
    }


def sweep_results(ref: str) -> list[dict[str, Any]]:
    """The results table of a finished or running sweep (see :func:`load_sweep`)."""
    return load_sweep(ref)["rows"]


def _parse_param(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value
