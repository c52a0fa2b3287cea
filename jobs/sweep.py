"""A sweep: Ray Tune over a function trainable that runs one TorchTrainer per trial (the Train V2 pattern).

- Each trial's Train run is named ``<job id>-<trial id>``; a sweep's Tune experiment is named after the job id, so
  running the same job id again restores the experiment: finished trials are kept, unfinished ones continue from
  their last Train checkpoint.
- Trials end by their own step budget. Nothing here stops a trial from Tune: on Ray 2.60 stopping a Train V2 trial
  can leak its placement group and hang the next trial (ray#54305).
- MLflow: one parent run per sweep (tagged with the job id), one nested run per trial with the trial's values as
  params. At the end the parent run gets the results table (CSV) and the summary pictures, and the best trial's
  model is registered with alias ``best``.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from jobs.spec import BetaRange, JobSpec, check_data, trials_that_fit
from workers import settings

TRIAL_KEYS = ("variant", "beta", "latent_dim", "seed")


def trial_run_name(job_id: str, trial_id: str) -> str:
    return f"{job_id}-{trial_id}"


def _trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One trial, inside a Tune trial actor: a nested MLflow run and a TorchTrainer with TuneReportCallback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.run import build_trainer
    from workers.storage import Storage
    from workers.tracking import MlflowRun, start_or_resume_run

    base = JobSpec.model_validate(sweep["spec"])
    values = {k: config[k] for k in TRIAL_KEYS if k in config}
    spec = base.with_trial(values)
    run_name = trial_run_name(sweep["job_id"], tune.get_context().get_trial_id())
    run_id = start_or_resume_run(sweep["experiment_id"], run_name, run_name=run_name, parent_run_id=sweep["parent_run_id"])
    tracking = MlflowRun(run_id, settings.mlflow_tracking_uri())
    tracking.log_spec(spec.model_dump(mode="json"))
    tracking.log_params({f"trial.{k}": v for k, v in values.items()})
    tracking.set_tags({"aeforge.sweep_id": sweep["job_id"]})
    result = build_trainer(spec, run_name, Storage.from_settings(), run_id, callbacks=[TuneReportCallback()]).fit()
    if result.error:
        tracking.terminate("FAILED")
        raise result.error
    tracking.terminate("FINISHED")


def param_space(spec: JobSpec) -> dict[str, Any]:
    """grid: every combination (tune.grid_search over the grid's rows); random: each key sampled on its own."""
    from ray import tune

    assert spec.sweep is not None
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


def _trial_entry(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    _trial(_flatten_trial(config), sweep)


def cluster_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


def run_sweep(spec: JobSpec, job_id: str) -> dict[str, Any]:
    from ray import tune

    from jobs.run import connect_ray
    from workers.storage import Storage
    from workers.tracking import MlflowRun, ensure_experiment, start_or_resume_run

    assert spec.sweep is not None
    storage = Storage.from_settings()
    storage.preflight()
    info = check_data(spec, resolve=storage.resolve)
    connect_ray()
    cluster = cluster_resources()
    if trials_that_fit(spec.resources, cluster) < 1:
        r = spec.resources
        raise ValueError(
            f"resources: a trial asks for {r.workers} workers x {r.cpus_per_worker} CPUs and {r.gpus_per_worker} GPUs; "
            f"the cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs, so no trial can ever start"
        )

    experiment_id = ensure_experiment(spec.name)
    parent_id = start_or_resume_run(experiment_id, job_id, run_name=job_id)
    parent = MlflowRun(parent_id, settings.mlflow_tracking_uri())
    parent.log_spec(spec.model_dump(mode="json"))
    parent.set_tags({"aeforge.kind": "sweep", "aeforge.sweep_id": job_id})

    sweep_ctx = {"spec": spec.model_dump(mode="json"), "job_id": job_id, "experiment_id": experiment_id, "parent_run_id": parent_id}
    # The trial's driver only waits on its TorchTrainer: a sliver of a CPU, so two nested trials cannot deadlock a
    # small cluster by holding whole CPUs their workers need.
    trainable = tune.with_resources(tune.with_parameters(_trial_entry, sweep=sweep_ctx), {"cpu": 0.01})
    fs, base = storage.pyarrow_filesystem()
    tune_path = f"{base}/tune"
    experiment_path = f"{tune_path}/{job_id}"
    metric = spec.sweep.metric
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                metric=metric.name,
                mode=metric.mode,
                num_samples=spec.sweep.num_samples,
                max_concurrent_trials=spec.max_concurrent_trials(cluster),
            ),
            run_config=tune.RunConfig(name=job_id, storage_path=tune_path, storage_filesystem=fs, verbose=0),
        )
    grid = tuner.fit()

    rows = results_rows(grid, job_id)
    if not rows:
        raise RuntimeError(f"sweep {job_id}: no trial finished; see the trial errors in the Ray logs")
    outcome: dict[str, Any] = {"job_id": job_id, "mlflow_run_id": parent_id, "trials": rows}
    with tempfile.TemporaryDirectory(prefix="aeforge-sweep-") as tmp:
        tmp_path = Path(tmp)
        write_results_csv(rows, tmp_path / "results.csv")
        storage.put_file(tmp_path / "results.csv", f"runs/{job_id}/results.csv")
        parent.log_artifacts(tmp_path, "results")
        pictures = tmp_path / "pictures"
        from workers.sweep_plots import sweep_summary_pictures

        sweep_summary_pictures(rows, metric.name, pictures, traversal_for=lambda row: _fetch_traversal(storage, row, tmp_path))
        parent.log_artifacts(pictures, "pictures")
        for p in pictures.iterdir():
            storage.put_file(p, f"runs/{job_id}/pictures/{p.name}")

    finished = [r for r in rows if r["status"] == "finished" and isinstance(r.get(metric.name), (int, float))]
    if spec.registration is not None and finished:
        outcome["model"] = _register_trials(spec, job_id, finished, metric, storage)
    if finished:
        best = max(finished, key=lambda r: r[metric.name] if metric.mode == "max" else -r[metric.name])
        parent.log_metrics({f"best/{metric.name}": best[metric.name]}, 0)
        parent.set_tags({"aeforge.best_trial": best["run_name"]})
        outcome["best"] = best
    parent.terminate("FINISHED")
    outcome["data"] = info
    return outcome


def results_rows(grid, job_id: str) -> list[dict[str, Any]]:
    """One row per trial: its values, status, and last reported metrics (the final evaluation)."""
    rows = []
    for result in grid:
        config = _flatten_trial(result.config or {})
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or (Path(result.path).name.split("_")[1] if result.path else "?")
        row: dict[str, Any] = {k: config.get(k) for k in TRIAL_KEYS if k in config}
        row["trial_id"] = trial_id
        row["run_name"] = trial_run_name(job_id, trial_id)
        row["status"] = "error" if result.error else "finished"
        row["checkpoint_path"] = metrics.get("checkpoint_path")
        for key, value in metrics.items():
            if "/" in key and isinstance(value, (int, float)):
                row[key] = value
        row["step"] = metrics.get("step")
        rows.append(row)
    return rows


def write_results_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and k != "checkpoint_path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _fetch_traversal(storage, row: dict[str, Any], tmp: Path) -> Path | None:
    target = tmp / "traversals" / f"{row['run_name']}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        storage.get_file(f"runs/{row['run_name']}/pictures/traversal.png", target)
    except Exception:  # a trial without pictures (failed before the end) is left out of the grid
        return None
    return target


def _load_trial_model(storage, checkpoint_path: str):
    import pyarrow.fs

    from workers.loop import load_model_from_checkpoint

    fs, _ = storage.pyarrow_filesystem()
    with tempfile.TemporaryDirectory(prefix="aeforge-trial-") as tmp:
        pyarrow.fs.copy_files(checkpoint_path, tmp, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
        return load_model_from_checkpoint(tmp)


def _register_trials(spec: JobSpec, job_id: str, finished: list[dict], metric, storage) -> dict:
    from jobs.registry import log_and_register
    from workers.tracking import ensure_experiment, start_or_resume_run

    ordered = sorted(finished, key=lambda r: r[metric.name], reverse=metric.mode == "max")
    to_register = ordered if spec.sweep.register_all else ordered[:1]
    experiment_id = ensure_experiment(spec.name)
    best_version = None
    for rank, row in enumerate(to_register):
        trial_spec = spec.with_trial({k: row[k] for k in TRIAL_KEYS if k in row and row[k] is not None})
        model = _load_trial_model(storage, row["checkpoint_path"])
        run_id = start_or_resume_run(experiment_id, row["run_name"], run_name=row["run_name"])
        registered = log_and_register(
            model, trial_spec, row["run_name"], run_id, {k: v for k, v in row.items() if "/" in k},
            extra_tags={"sweep_id": job_id, "trial_id": row["trial_id"], "sweep_rank": str(rank + 1)},
            alias="best" if rank == 0 else None,
        )
        if rank == 0:
            best_version = registered
    return best_version


def sweep_results(ref: str) -> list[dict[str, Any]]:
    """The results table of a finished or running sweep, from MLflow: ``ref`` is the job id or the parent run id."""
    import mlflow

    client = mlflow.MlflowClient(settings.mlflow_tracking_uri())
    parent = None
    try:
        parent = client.get_run(ref)
    except Exception:
        found = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`aeforge.job_id` = '{ref}'",
                                   output_format="list")
        parent = found[0] if found else None
    if parent is None:
        raise LookupError(f"no sweep with job id or run id '{ref}' in {settings.mlflow_tracking_uri()}")
    children = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        output_format="list",
    )
    rows = []
    for child in children:
        row: dict[str, Any] = {"run_name": child.info.run_name, "status": child.info.status.lower()}
        for key, value in child.data.params.items():
            if key.startswith("trial."):
                row[key[len("trial."):]] = _parse_param(value)
        row.update(child.data.metrics)
        rows.append(row)
    return sorted(rows, key=lambda r: r["run_name"])


def _parse_param(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value
