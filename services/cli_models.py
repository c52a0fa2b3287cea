"""`aeforge models ...`: browse the MLflow model registry and draw pictures from registered autoencoders.

A model reference is NAME@ALIAS, NAME/VERSION, NAME (its latest version) or a models:/ URI. Unknown models,
aliases and versions, asking an autoencoder without a prior for samples, and an MLflow that cannot be reached or
refuses, print a plain message and exit 2 (see services.cli_errors).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from services.cli_errors import ErrorHandlingGroup, fail

models_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True,
                         help="Registered models: list, show, sample, traverse.")


def _console() -> Console:
    # Made per call, so the terminal width (COLUMNS) is read when a command runs, not at import.
    return Console()


def register(app: typer.Typer) -> None:
    """Mount the `models` commands on the main CLI."""
    app.add_typer(models_app, name="models")


def _registry(fn, *args):
    """``fn(*args)`` against the MLflow registry; an MLflow that cannot be reached or refuses is a plain error (an
    unknown model, alias or version is a ModelLookupError, which the CLI prints as one)."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args)
    except (MlflowException, OSError) as exc:
        fail(str(exc))


def _load(ref: str):
    from jobs.registry import load_model

    return _registry(load_model, ref)


def _output_path(path: Path) -> Path:
    if path.suffix.lower() != ".png":
        fail(f"--output {path}: pictures are written as PNG; give a path ending in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@models_app.command("list")
def list_command() -> None:
    """Every registered model: versions, aliases and its latest version's variant, beta, latent size and data."""
    console = _console()
    from jobs.registry import list_models
    from workers.settings import mlflow_tracking_uri

    models = _registry(list_models)
    if not models:
        console.print(f"no registered models in {mlflow_tracking_uri()}", highlight=False, soft_wrap=True)
        return
    table = Table(title=f"registered models ({mlflow_tracking_uri()})")
    for column in ("name", "versions", "aliases", "latest", "variant", "beta", "latent", "data"):
        table.add_column(column, justify="right" if column in ("versions", "latest", "beta", "latent") else "left")
    for m in models:
        tags = m["latest_tags"]
        aliases = ", ".join(f"@{a}→{v}" for a, v in m["aliases"].items()) or "-"
        table.add_row(m["name"], str(m["versions"]), aliases, m["latest_version"] or "-", tags.get("variant", "-"),
                      tags.get("beta", "-"), tags.get("latent_dim", "-"), tags.get("dataset", "-"))
    console.print(table)


@models_app.command("show")
def show_command(
    ref: str = typer.Argument(..., metavar="NAME[@ALIAS|/VERSION]"),
    as_json: bool = typer.Option(False, "--json", help="print the description as JSON"),
) -> None:
    """One version: aliases, description, run, tags, metrics and where its run's pictures are."""
    console = _console()
    from jobs.registry import describe

    info = _registry(describe, ref)
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    aliases = " ".join(f"@{a}" for a in info["aliases"]) or "(no aliases)"
    console.print(f"[bold]{info['name']}[/bold] version {info['version']}  {aliases}", highlight=False)
    if info["description"]:
        console.print(info["description"], highlight=False, soft_wrap=True)
    console.print(f"model URI: {info['model_uri']}", highlight=False, soft_wrap=True)
    console.print(f"run: {info['run_id'] or '-'}   created: {info['created'] or '-'}   status: {info['status']}",
                  highlight=False, soft_wrap=True)
    console.print(f"source: {info['source']}", highlight=False, soft_wrap=True)

    tags = Table(title="tags")
    tags.add_column("tag")
    tags.add_column("value")
    for key in sorted(info["tags"]):
        tags.add_row(key, info["tags"][key])
    console.print(tags)
    if info["metrics"]:
        metrics = Table(title="metrics")
        metrics.add_column("metric")
        metrics.add_column("value", justify="right")
        for key in sorted(info["metrics"]):
            metrics.add_row(key, f"{info['metrics'][key]:.4f}")
        console.print(metrics)
    if info["pictures"]:
        console.print("pictures:", highlight=False)
        for uri in info["pictures"]:
            console.print(f"  {uri}", highlight=False, soft_wrap=True)
    else:
        console.print("pictures: none logged on the run", highlight=False)


@models_app.command("sample")
def sample_command(
    ref: str = typer.Argument(..., metavar="NAME[@ALIAS|/VERSION]"),
    n: int = typer.Option(64, "-n", "--num", min=1, max=4096, help="how many samples"),
    output: Path = typer.Option(Path("samples.png"), "-o", "--output", help="PNG file to write"),
    seed: int = typer.Option(0, "--seed", help="seed of the prior draws"),
    nrow: Optional[int] = typer.Option(None, "--nrow", min=1, help="images per row (default: a square grid)"),
) -> None:
    """Decode n draws from the prior N(0, I) into a grid picture (VAE family only)."""
    console = _console()
    import torch

    from workers.plots import save_grid

    output = _output_path(output)
    model = _load(ref)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    images = model.sample(n, generator=generator)  # NoPrior (a plain error) for an autoencoder without a prior
    save_grid(images, output, nrow=nrow or math.ceil(math.sqrt(n)))
    console.print(f"wrote {n} samples from {ref} to {output}", highlight=False, soft_wrap=True)


@models_app.command("traverse")
def traverse_command(
    ref: str = typer.Argument(..., metavar="NAME[@ALIAS|/VERSION]"),
    output: Path = typer.Option(Path("traversal.png"), "-o", "--output", help="PNG file to write"),
    dim_limit: float = typer.Option(2.0, "--dim-limit", min=0.0, help="each latent goes from -limit to +limit around the start"),
    steps: int = typer.Option(9, "--steps", min=2, help="images per latent dimension"),
    seed: int = typer.Option(0, "--seed", help="seed of the prior draw the traversal starts from"),
) -> None:
    """One row per latent dimension, varied around the posterior mean of a decoded prior sample (around z = 0 for
    autoencoders without a prior)."""
    console = _console()
    import torch

    from workers.plots import latent_traversal

    output = _output_path(output)
    model = _load(ref)
    device = next(model.parameters()).device
    with torch.no_grad():
        if model.stochastic:
            image = model.sample(1, generator=torch.Generator(device=device).manual_seed(seed))[0]
        else:
            image = model.decode(torch.zeros(1, model.latent_dim, device=device))[0]
    latent_traversal(model, image, output, limit=dim_limit, steps=steps)
    console.print(f"wrote a traversal of {model.latent_dim} latent dimensions of {ref} to {output}",
                  highlight=False, soft_wrap=True)
