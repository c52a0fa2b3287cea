"""The `aeforge` command line (Typer + rich).

Errors a user can act on (an AeforgeError: a bad spec, data, setting, storage, unknown model or job) print one
plain message and exit with code 2, never a traceback; anything else is a bug in aeforge and prints its traceback
and a line saying so (exit code 1). See services.cli_errors.
"""

from __future__ import annotations

import enum
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import typer

from services.cli_errors import ErrorHandlingGroup, fail
from services.cli_output import (
    OutputFormat,
    make_console,
    metric_text,
    new_table,
    number_column,
    output_option,
    print_json,
    text_column,
)

# MLflow's INFO lines (its table creation on a fresh home, alembic's migrations) are not for the screen of a normal
# command; MLflow reads this when it is first imported, and a user's own MLFLOW_LOGGING_LEVEL wins.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

# Typer's --install-completion / --show-completion: shell completion of commands, options and their choices.
app = typer.Typer(
    cls=ErrorHandlingGroup,
    add_completion=True,
    no_args_is_help=True,
    help="aeforge: train the autoencoder family on Ray, tracked in MLflow.",
)
console = make_console()


def versions() -> dict[str, str]:
    """aeforge's version and those of the packages it runs on, from the installed packages' metadata (nothing is
    imported, so this is quick)."""
    import platform
    from importlib import metadata

    found = {"Python": platform.python_version()}
    for label, package in (("aeforge", "aeforge"), ("torch", "torch"), ("Ray", "ray"), ("MLflow", "mlflow")):
        try:
            found[label] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[label] = "not installed"
    return found


def _print_version(value: bool) -> None:
    if not value:
        return
    found = versions()
    typer.echo(f"aeforge {found.pop('aeforge')} (" + ", ".join(f"{k} {v}" for k, v in found.items()) + ")")
    raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=_print_version,
        help="print aeforge's version (and torch's, Ray's, MLflow's) and exit",
    ),
) -> None:
    pass


@contextmanager
def _spec_named(path: Path) -> Iterator[None]:
    """A SpecError raised past the parsing stage (the data check) names the spec file it is about."""
    from jobs.spec import SpecError

    try:
        yield
    except SpecError as exc:
        if exc.source != "<spec>":
            raise
        raise SpecError(exc.errors, str(path)) from exc


def _settings_option():
    return typer.Option(
        [],
        "--set",
        metavar="PATH=VALUE",
        help="change the spec: a dotted path and a YAML value, e.g. --set train.steps=100 "
        "--set model.latent_dim=8 (repeatable; checked like the file)",
    )


@app.command()
def validate(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="job spec (YAML or JSON)"),
    data: bool = typer.Option(True, "--data/--no-data", help="also open the data source and check the model fits it"),
    settings: list[str] = _settings_option(),
) -> None:
    """Check a job spec: prints OK, or every error with its field path (exit code 2)."""
    from jobs.spec import check_data, load_spec

    spec = load_spec(spec_path, settings)
    if data:
        with _spec_named(spec_path):
            info = check_data(spec, resolve=_resolver())
        console.print(
            f"OK  {spec.name} ({spec.kind}, {spec.model.variant}/{spec.model.architecture}); data: "
            f"{info['num_examples']} examples of {'x'.join(map(str, info['image_shape']))}",
            highlight=False,
        )
    else:
        console.print(f"OK  {spec.name} ({spec.kind}, {spec.model.variant}/{spec.model.architecture})", highlight=False)
    if spec.sweep is not None and spec.sweep.pack != 1:
        # Which trials will train together: fixed by a pack size; with auto, the groups (sized at the start).
        if spec.sweep.pack == "auto":
            groups = spec.packs_line(spec.num_trials()).replace("pack", "group", 1)
            console.print(
                f"    sweep.pack auto: sized when the sweep starts, to keep the trials that run at once "
                f"busy; trials of one variant and latent size go together ({groups})",
                highlight=False,
                soft_wrap=True,
            )
        else:
            console.print(
                f"    sweep.pack {spec.sweep.pack}: {spec.packs_line(int(spec.sweep.pack))}",
                highlight=False,
                soft_wrap=True,
            )
    _warn_without_gpus(spec)


def _warn_without_gpus(spec) -> None:
    """A spec that asks for GPUs where there are none (RAY_ADDRESS's cluster; without it, this machine, where runs
    start their Ray) is valid, but would never start there: say so, as a warning."""
    from services.cli_errors import warn
    from workers.settings import ray_address

    r = spec.resources
    asked = r.workers * r.gpus_per_worker  # one run, or one sweep trial: what must fit before anything starts
    if not asked:
        return
    need = (
        f"the spec asks for {asked:g} GPU{'s' if asked != 1 else ''} (resources: {r.workers} worker"
        f"{'s' if r.workers != 1 else ''} x {r.gpus_per_worker:g} GPU)"
    )
    address = ray_address()
    if address:
        from services.cli_doctor import DEFAULT_TIMEOUT_S, call_with_deadline, describe_error, ray_cluster_resources

        where = f"the Ray cluster at {address} (RAY_ADDRESS)"
        try:
            total, _ = call_with_deadline(lambda: ray_cluster_resources(address, DEFAULT_TIMEOUT_S), DEFAULT_TIMEOUT_S)
        except Exception as exc:  # a cluster that is down makes the spec no less valid: the warning says so
            warn(f"{need}, and {where} could not be asked how many it has: {describe_error(exc)}")
            return
        have = total.get("GPU", 0.0)
    else:
        import torch

        where = "this machine (no RAY_ADDRESS: `aeforge run` starts its Ray here)"
        have = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    if have < asked:
        warn(f"{need}, but {where} has {f'{have:g}' if have else 'none'}: the job could not start there")


@app.command()
def schema() -> None:
    """Print the job spec's JSON Schema (for editor completion)."""
    from jobs.spec import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


def _resolver():
    """The function that turns a data source into a local path (S3 and dataset names need storage)."""
    from workers.storage import resolver_from_settings

    return resolver_from_settings()


@app.command()
def run(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    job_id: str | None = typer.Option(None, "--job-id", help="resume this job id (default: a new id)"),
    local: bool = typer.Option(False, "--local", help="one process, no Ray, no MLflow (debugging)"),
    settings: list[str] = _settings_option(),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="show the run's log (Ray's and MLflow's output) here as it is written, instead of the progress bar",
    ),
    no_register: bool = typer.Option(
        False, "--no-register", help="register no model version (a quick try that leaves the registry as it is)"
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="move the spec's alias to the new version even when it is worse than the version the alias points at "
        "(a collapsed or unfinished model never takes an alias)",
    ),
) -> None:
    """Run a job here: on a local Ray (or RAY_ADDRESS's cluster), tracked in MLflow. Shows its progress (Ray's and
    MLflow's output goes to the run's log file), then the final metrics and where the model and pictures are.

    The model is registered as a new version; the spec's alias moves to it only when it finished, is healthy and
    is not worse than the version the alias points at (the output says why it did or did not)."""
    from jobs.run import new_job_id, run_dir_for, run_in_process, run_job
    from jobs.spec import load_spec
    from services.run_display import LOG_FILE, showing_progress

    spec = load_spec(spec_path, settings)
    if local and spec.kind != "train":
        fail("--local runs train jobs only; a sweep needs Ray")
    if local and force:
        fail("--force moves a registered alias, and --local registers nothing")
    job_id = job_id or new_job_id(spec.name)
    log_path = run_dir_for(job_id) / LOG_FILE
    console.print(
        f"job [bold]{job_id}[/bold]  ({spec.kind}, {spec.model.variant}/{spec.model.architecture}, latent {spec.model.latent_dim})",
        highlight=False,
    )
    console.print(f"log: {log_path}" + ("" if verbose else "  (-v shows it here)"), highlight=False, soft_wrap=True)
    is_sweep = spec.kind == "sweep"
    with (
        _spec_named(spec_path),
        showing_progress(
            log_path,
            verbose=verbose,
            sweep_trials=spec.num_trials() if is_sweep else None,
            metric=spec.sweep.metric.name if spec.sweep is not None else None,
        ),
    ):
        if local:
            result = run_in_process(spec, job_id, resolve=_resolver())
        else:
            outcome = run_job(spec, job_id, spec_file=spec_path, register=not no_register, force=force)
    if local:
        _print_metrics(
            result.final_metrics, f"final metrics ({result.steps} steps, {result.images_per_second:,.0f} images/s)"
        )
        console.print(f"run folder: {run_dir_for(job_id)}", highlight=False, soft_wrap=True)
        for name, path in sorted(result.pictures.items()):
            console.print(f"  picture {name}: {path}", highlight=False, soft_wrap=True)
        return
    if spec.sweep is not None:  # kind sweep (JobSpec's validation ties the two)
        _print_sweep_rows(outcome["trials"], spec.sweep.metric.name, spec.sweep.metric.mode)
    else:
        _print_metrics(outcome["metrics"], "final metrics")
    console.print(
        f"MLflow run: {outcome['mlflow_run_id']}  (tracking URI {_tracking_uri()})", highlight=False, soft_wrap=True
    )
    if outcome.get("no_best"):
        console.print(outcome["no_best"], highlight=False, soft_wrap=True)
    model = outcome.get("model")
    if model:
        console.print(
            f"registered model: [bold]{model['name']}[/bold] version {model['version']}  ({model['model_uri']})",
            highlight=False,
            soft_wrap=True,
        )
        console.print(f"  {model.get('decision', '')}", highlight=False, soft_wrap=True)
    elif no_register and spec.registration is not None:
        console.print("registered no model (--no-register)", highlight=False, soft_wrap=True)
    if outcome.get("pictures"):
        console.print(f"pictures: {outcome['pictures']}", highlight=False, soft_wrap=True)


def _tracking_uri() -> str:
    from workers.settings import mlflow_tracking_uri

    return mlflow_tracking_uri()


def _print_metrics(metrics: dict, title: str) -> None:
    table = new_table(title)
    text_column(table, "metric")
    number_column(table, "value")
    for key in sorted(metrics):
        value = metrics[key]
        table.add_row(key, metric_text(value))
    console.print(table)


def _print_sweep_rows(rows: list[dict], metric: str, mode: str = "max", title: str | None = None) -> None:
    """One row per trial, best first by ``metric``: its values, status and the key final metrics."""
    from jobs.gate import row_health
    from jobs.sweep import rank_rows

    rows = rank_rows(rows, metric, mode)
    keys = [k for k in ("variant", "beta", "latent_dim", "seed") if any(r.get(k) is not None for r in rows)]
    shown = [metric] + [
        m
        for m in ("eval/recon", "eval/elbo", "eval/mig", "eval/tc", "eval/active_units")
        if m != metric and any(m in r for r in rows)
    ]
    table = new_table(title or f"sweep results ({len(rows)} trials, ranked by {metric}, {mode}; healthy first)")
    for k in ["run_name", *keys, "status", "health", *shown]:
        (number_column if k in shown else text_column)(table, k)
    for row in rows:
        cells = [str(row.get("run_name", ""))] + [_cell(row.get(k)) for k in keys] + [str(row.get("status", ""))]
        cells.append(row_health(row, metric).label)
        cells += [_metric_cell(row.get(m)) for m in shown]
        table.add_row(*cells)
    console.print(table)


def _metric_cell(value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    text = f"{value:.4f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


sweep_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True, help="Sweep results.")
app.add_typer(sweep_app, name="sweep")


@sweep_app.command("results")
def sweep_results_command(
    ref: str = typer.Argument(..., metavar="JOB_OR_RUN", help="the sweep's job id or parent MLflow run id"),
    metric: str | None = typer.Option(None, help="metric to rank by (default: the sweep's)"),
    mode: str | None = typer.Option(None, help="max or min (default: the sweep's mode for its metric, else max)"),
    csv_path: Path | None = typer.Option(None, "--csv", help="also write the table as CSV"),
    pictures: Path | None = typer.Option(
        None,
        "--pictures",
        help="also draw the sweep's summary pictures into this folder "
        "(MIG against beta with the spread over seeds, MIG against the ELBO, ...)",
    ),
    output: OutputFormat = output_option(),
) -> None:
    """The results table of a finished or running sweep, best trial first."""
    from jobs.sweep import load_sweep, rank_rows, write_results_csv

    sweep = load_sweep(ref)
    rows = sweep["rows"]
    if not rows:
        fail(f"sweep {sweep['job_id']} (MLflow run {sweep['mlflow_run_id']}, {sweep['status']}) has no trials yet")
    metric_name = metric or sweep["metric"]
    if mode not in (None, "max", "min"):
        fail(f"--mode must be max or min, not {mode!r}")
    mode = mode or (sweep["mode"] if metric_name == sweep["metric"] else "max")
    if csv_path is not None:
        write_results_csv(rows, csv_path)
    drawn = {}
    if pictures is not None:
        from workers.plots.sweep import sweep_summary_pictures

        drawn = sweep_summary_pictures(rows, metric_name, pictures, mode=mode)
    if output is OutputFormat.json:
        # Every trial with all its values and metrics, best first; "rank" is 1 for the best, null for a trial
        # without a value of the metric (listed last).
        # Only healthy trials are ranked (jobs/gate.py); "health" is healthy, collapsed, failed, running, ...
        from jobs.gate import row_health

        ranked = rank_rows(rows, metric_name, mode)
        trials, rank = [], 0
        for row in ranked:
            verdict = row_health(row, metric_name)
            rank += verdict.healthy
            trials.append(
                {
                    **row,
                    "health": verdict.label,
                    "health_reason": verdict.reason,
                    "rank": rank if verdict.healthy else None,
                }
            )
        print_json(
            {
                "job_id": sweep["job_id"],
                "mlflow_run_id": sweep["mlflow_run_id"],
                "status": sweep["status"],
                "tracking_uri": _tracking_uri(),
                "metric": metric_name,
                "mode": mode,
                "trials": trials,
                **({"pictures": {name: str(path) for name, path in drawn.items()}} if pictures is not None else {}),
            }
        )
        return
    title = f"sweep {sweep['job_id']} ({sweep['status']}): {len(rows)} trials, ranked by {metric_name} ({mode})"
    _print_sweep_rows(rows, metric_name, mode, title=title)
    console.print(
        f"MLflow run: {sweep['mlflow_run_id']}  (tracking URI {_tracking_uri()})", highlight=False, soft_wrap=True
    )
    if csv_path is not None:
        console.print(f"wrote {csv_path}", highlight=False, soft_wrap=True)
    for path in drawn.values():
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)


class BenchData(str, enum.Enum):
    spec = "spec"
    npz = "npz"


@app.command()
def bench(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    steps: int = typer.Option(200, min=1, help="timed steps per row"),
    warmup: int = typer.Option(20, min=1, help="untimed steps first (a compiled row compiles in them)"),
    data: BenchData = typer.Option(
        BenchData.spec,
        case_sensitive=False,
        help="what both loops read: the spec's data set (for dSprites, rendered "
        "per batch), or an .npz file the bench writes from it",
    ),
    compiled: bool = typer.Option(
        True,
        "--compiled/--no-compiled",
        help="also the compiled rows (train.compile: true; tens of seconds to "
        "compile on a CPU, before the timed steps)",
    ),
    large_batch: int = typer.Option(
        0, "--large-batch", min=0, help="also every row at this batch size (e.g. 2048); 0: off"
    ),
    large_steps: int = typer.Option(20, "--large-steps", min=1, help="timed steps at the large batch"),
    large_warmup: int = typer.Option(3, "--large-warmup", min=1, help="untimed steps at the large batch"),
    repeats: int = typer.Option(
        1,
        min=1,
        help="measure every row this many times, interleaved, and report the median (steadier on a busy machine)",
    ),
    threads: int | None = typer.Option(
        None, min=1, help="torch CPU threads for every row (default: torch's); 1 is steadier on a shared machine"
    ),
    ray_workers: int = typer.Option(
        0,
        "--ray-workers",
        min=0,
        help="also time the eager loop on Ray Train as DDP over this many workers "
        "(local Ray, or RAY_ADDRESS's cluster; resources per worker from the spec)",
    ),
    output: OutputFormat = output_option(),
) -> None:
    """Training throughput (images/s) of aeforge's loop next to a plain PyTorch loop: same model, same data,
    same device. Rows: eager and compiled, fp32 and bf16 (bf16 on CUDA only), at the spec's batch size and with
    --large-batch at a large one, each with its ratio to the plain loop at the same batch; with --ray-workers N,
    also on Ray Train (N DDP workers), so Ray's overhead per step shows."""
    from benchmarks.bench_train import PRECISIONS, run_benchmark
    from jobs.spec import load_spec

    spec = load_spec(spec_path)
    ray_log = None
    with ExitStack() as stack:
        if ray_workers:
            from jobs.ray_train import connect_ray
            from services.run_display import output_to_log
            from workers import settings

            # Ray's lines and its workers' go to a log; the screen gets the table.
            ray_log = settings.home() / "bench" / f"ray-{time.strftime('%Y%m%d-%H%M%S')}.log"
            stack.enter_context(output_to_log(ray_log))
            connect_ray()
        report = run_benchmark(
            spec,
            steps=steps,
            warmup=warmup,
            resolve=_resolver(),
            ray_workers=ray_workers,
            data=data.value,
            compile_options=(False, True) if compiled else (False,),
            precisions=PRECISIONS,
            large_batch=large_batch,
            large_steps=large_steps,
            large_warmup=large_warmup,
            repeats=repeats,
            threads=threads,
        )
    if ray_log is not None:
        report["ray_log"] = str(ray_log)
    if output is OutputFormat.json:
        print_json(report)
        return
    table = new_table(f"training throughput on {report['device']} ({spec.model.variant}/{spec.model.architecture})")
    text_column(table, "loop")
    number_column(table, "batch")
    number_column(table, "images/s")
    number_column(table, "ms/step")
    number_column(table, "× plain")
    text_column(table, "note")
    # Grouped by batch size (skipped rows next to their batch's), the Ray Train row last.
    in_process = [row for row in report["rows"] if "fit_seconds" not in row] + report["skipped"]
    ordered = sorted(in_process, key=lambda row: row["batch_size"]) + [
        row for row in report["rows"] if "fit_seconds" in row
    ]
    for row in ordered:
        if "reason" in row:
            table.add_row(row["loop"], f"{row['batch_size']:,}", "–", "–", "–", f"skipped: {row['reason']}")
            continue
        note = ""
        if row.get("compile_seconds"):
            note = f"compiled in {row['compile_seconds']:.0f} s (untimed)"
        if "fit_seconds" in row:
            note = f"global batch; fit {row['fit_seconds']:.1f} s with worker start-up"
            if row.get("vs_in_process"):
                note += f"; {row['vs_in_process']:.2f}x one process at this batch"
        if "images_per_second_runs" in row:
            runs = ", ".join(f"{v:,.0f}" for v in row["images_per_second_runs"])
            note = f"median of {runs}" + (f"; {note}" if note else "")
        table.add_row(
            row["loop"],
            f"{row['batch_size']:,}",
            f"{row['images_per_second']:,.0f}",
            f"{row['ms_per_step']:.2f}",
            f"{row['ratio']:.2f}",
            note,
        )
    console.print(table)
    load = report["load"]
    console.print(f"data: {report['data_description']}", highlight=False, soft_wrap=True)
    large = f" (batch {large_batch:,}: {large_steps} after {large_warmup})" if large_batch else ""
    console.print(
        f"{report['steps']} timed steps after {report['warmup']}{large}, {report['repeats']} run(s) per row; "
        f"torch threads {report['torch_threads']}; load average {load['before']:.2f} before, "
        f"{load['after']:.2f} after, on {load['cpus']} CPUs",
        highlight=False,
        soft_wrap=True,
    )
    if report["ratio"] is not None:
        console.print(
            f"ratio aeforge / plain at batch {spec.train.batch_size}: {report['ratio']:.2f}x", highlight=False
        )
    if ray_log is not None:
        console.print(f"Ray's output: {ray_log}", highlight=False, soft_wrap=True)


def _mount_subcommands() -> None:
    """The data, models, queue, token, doctor and admin commands live next to the code they drive."""
    from services import cli_admin, cli_data, cli_doctor, cli_jobs, cli_models, cli_tokens

    for module in (cli_data, cli_models, cli_jobs, cli_tokens, cli_doctor, cli_admin):
        module.register(app)


_mount_subcommands()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
