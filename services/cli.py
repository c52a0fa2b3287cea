"""The `aeforge` command line (Typer + rich).

Errors a user can act on (an AeforgeError: a bad spec, data, setting, storage, unknown model or job) print one
plain message and exit with code 2, never a traceback; anything else is a bug in aeforge and prints its traceback
and a line saying so (exit code 1). See services.cli_errors.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from services.cli_errors import ErrorHandlingGroup, fail

app = typer.Typer(cls=ErrorHandlingGroup, add_completion=False, no_args_is_help=True,
                  help="aeforge: train the autoencoder family on Ray, tracked in MLflow.")
console = Console()


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


@app.command()
def validate(spec_path: Path = typer.Argument(..., metavar="SPEC", help="job spec (YAML or JSON)"),
             data: bool = typer.Option(True, "--data/--no-data", help="also open the data source and check the model fits it")) -> None:
    """Check a job spec: prints OK, or every error with its field path (exit code 2)."""
    from jobs.spec import check_data, load_spec

    spec = load_spec(spec_path)
    if data:
        with _spec_named(spec_path):
            info = check_data(spec, resolve=_resolver())
        console.print(f"OK  {spec.name} ({spec.kind}, {spec.model.variant}/{spec.model.architecture}); data: "
                      f"{info['num_examples']} examples of {'x'.join(map(str, info['image_shape']))}", highlight=False)
    else:
        console.print(f"OK  {spec.name} ({spec.kind}, {spec.model.variant}/{spec.model.architecture})", highlight=False)


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
def run(spec_path: Path = typer.Argument(..., metavar="SPEC"),
        job_id: Optional[str] = typer.Option(None, "--job-id", help="resume this job id (default: a new id)"),
        local: bool = typer.Option(False, "--local", help="one process, no Ray, no MLflow (debugging)")) -> None:
    """Run a job here: on a local Ray (or RAY_ADDRESS's cluster), tracked in MLflow; prints where the results are."""
    from jobs.run import new_job_id, run_dir_for, run_in_process, run_job
    from jobs.spec import load_spec

    spec = load_spec(spec_path)
    job_id = job_id or new_job_id(spec.name)
    console.print(f"job [bold]{job_id}[/bold]  ({spec.kind}, {spec.model.variant}/{spec.model.architecture}, latent {spec.model.latent_dim})", highlight=False)
    with _spec_named(spec_path):
        if local:
            if spec.kind != "train":
                fail("--local runs train jobs only; a sweep needs Ray")
            result = run_in_process(spec, job_id, resolve=_resolver())
            _print_metrics(result.final_metrics, f"final metrics ({result.steps} steps, {result.images_per_second:,.0f} images/s)")
            run_dir = run_dir_for(job_id)
            console.print(f"run folder: {run_dir}", highlight=False, soft_wrap=True)
            for name, path in sorted(result.pictures.items()):
                console.print(f"  picture {name}: {path}", highlight=False, soft_wrap=True)
            return
        outcome = run_job(spec, job_id)
    if spec.kind == "sweep":
        _print_sweep_rows(outcome["trials"], spec.sweep.metric.name, spec.sweep.metric.mode)
    else:
        _print_metrics(outcome["metrics"], "final metrics")
    console.print(f"MLflow run: {outcome['mlflow_run_id']}  (tracking URI {_tracking_uri()})", highlight=False, soft_wrap=True)
    model = outcome.get("model")
    if model:
        console.print(f"registered model: [bold]{model['name']}[/bold] version {model['version']} alias @{model['alias']}  ({model['model_uri']})", highlight=False, soft_wrap=True)
    if outcome.get("pictures"):
        console.print(f"pictures: {outcome['pictures']}", highlight=False, soft_wrap=True)


def _tracking_uri() -> str:
    from workers.settings import mlflow_tracking_uri

    return mlflow_tracking_uri()


def _print_metrics(metrics: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        value = metrics[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, (int, float)) else str(value))
    console.print(table)


def _print_sweep_rows(rows: list[dict], metric: str, mode: str = "max", title: str | None = None) -> None:
    """One row per trial, best first by ``metric``: its values, status and the key final metrics."""
    from jobs.sweep import rank_rows

    rows = rank_rows(rows, metric, mode)
    keys = [k for k in ("variant", "beta", "latent_dim", "seed") if any(r.get(k) is not None for r in rows)]
    shown = [metric] + [m for m in ("eval/recon", "eval/elbo", "eval/mig", "eval/tc") if m != metric and any(m in r for r in rows)]
    table = Table(title=title or f"sweep results ({len(rows)} trials, ranked by {metric}, {mode})")
    for k in ["run_name", *keys, "status", *shown]:
        table.add_column(k, justify="right" if k in shown else "left")
    for row in rows:
        cells = [str(row.get("run_name", ""))] + [_cell(row.get(k)) for k in keys] + [str(row.get("status", ""))]
        cells += [f"{row[m]:.4f}" if isinstance(row.get(m), (int, float)) else "" for m in shown]
        table.add_row(*cells)
    console.print(table)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


sweep_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True, help="Sweep results.")
app.add_typer(sweep_app, name="sweep")


@sweep_app.command("results")
def sweep_results_command(ref: str = typer.Argument(..., metavar="JOB_OR_RUN", help="the sweep's job id or parent MLflow run id"),
                          metric: Optional[str] = typer.Option(None, help="metric to rank by (default: the sweep's)"),
                          mode: Optional[str] = typer.Option(None, help="max or min (default: the sweep's mode for its metric, else max)"),
                          csv_path: Optional[Path] = typer.Option(None, "--csv", help="also write the table as CSV")) -> None:
    """The results table of a finished or running sweep, best trial first."""
    from jobs.sweep import load_sweep, write_results_csv

    sweep = load_sweep(ref)
    rows = sweep["rows"]
    if not rows:
        fail(f"sweep {sweep['job_id']} (MLflow run {sweep['mlflow_run_id']}, {sweep['status']}) has no trials yet")
    metric_name = metric or sweep["metric"]
    if mode not in (None, "max", "min"):
        fail(f"--mode must be max or min, not {mode!r}")
    mode = mode or (sweep["mode"] if metric_name == sweep["metric"] else "max")
    title = (f"sweep {sweep['job_id']} ({sweep['status']}): {len(rows)} trials, ranked by {metric_name} ({mode})")
    _print_sweep_rows(rows, metric_name, mode, title=title)
    console.print(f"MLflow run: {sweep['mlflow_run_id']}  (tracking URI {_tracking_uri()})", highlight=False, soft_wrap=True)
    if csv_path is not None:
        write_results_csv(rows, csv_path)
        console.print(f"wrote {csv_path}", highlight=False)


@app.command()
def bench(spec_path: Path = typer.Argument(..., metavar="SPEC"),
          steps: int = typer.Option(200, help="timed steps per loop"),
          warmup: int = typer.Option(20, help="untimed steps first"),
          ray_workers: int = typer.Option(0, "--ray-workers", min=0,
                                          help="also time the loop on Ray Train as DDP over this many workers "
                                               "(local Ray, or RAY_ADDRESS's cluster; resources per worker from the spec)")) -> None:
    """Training throughput (images/s) of aeforge's loop next to a plain PyTorch loop, same model, same device;
    with --ray-workers N, also on Ray Train (N DDP workers), so Ray's overhead per step shows."""
    from benchmarks.bench_train import run_benchmark
    from jobs.spec import load_spec

    spec = load_spec(spec_path)
    if ray_workers:
        from jobs.ray_train import connect_ray

        connect_ray()
    report = run_benchmark(spec, steps=steps, warmup=warmup, resolve=_resolver(), ray_workers=ray_workers)
    table = Table(title=f"throughput on {report['device']} ({spec.model.variant}/{spec.model.architecture}, batch {spec.train.batch_size})")
    table.add_column("loop")
    table.add_column("images/s", justify="right")
    table.add_column("ms/step", justify="right")
    for row in report["rows"]:
        table.add_row(row["loop"], f"{row['images_per_second']:,.0f}", f"{row['ms_per_step']:.2f}")
    console.print(table)
    console.print(f"ratio aeforge / plain: {report['ratio']:.2f}x", highlight=False)
    for row in report["rows"]:
        if "fit_seconds" in row:
            console.print(f"Ray Train fit, worker start-up included: {row['fit_seconds']:.1f} s for {warmup + steps} "
                          f"steps (images/s above: timed steps only)", highlight=False)


def _mount_subcommands() -> None:
    """The data, models, queue and token commands live next to the code they drive."""
    from services import cli_data, cli_jobs, cli_models, cli_tokens

    for module in (cli_data, cli_models, cli_jobs, cli_tokens):
        module.register(app)


_mount_subcommands()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
