"""`aeforge models ...`: browse the MLflow model registry and draw pictures from registered autoencoders.

A model reference is NAME@ALIAS, NAME/VERSION, NAME (its latest version) or a models:/ URI. Unknown models,
aliases and versions, asking an autoencoder without a prior for samples, and an MLflow that cannot be reached or
refuses, print a plain message and exit 2 (see services.cli_errors).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

if TYPE_CHECKING:
    import torch

from services.cli_errors import ErrorHandlingGroup, fail
from services.cli_output import (
    CliConsole,
    OutputFormat,
    make_console,
    metric_text,
    new_table,
    number_column,
    output_option,
    print_json,
    text_column,
)

models_app = typer.Typer(
    cls=ErrorHandlingGroup,
    no_args_is_help=True,
    help="Registered models: list, show, compare, promote, alias rm, sample, traverse.",
)

T = TypeVar("T")


def description_prose(description: str | None) -> str:
    """A version description's written paragraphs. The metrics table and picture links aeforge appends (for the
    MLflow page) are left out: `show` prints both in its own tables below."""
    kept = [
        paragraph.strip()
        for paragraph in (description or "").split("\n\n")
        if not paragraph.startswith(("| ", "**Pictures**", "!["))
    ]
    return "\n\n".join(p for p in kept if p)


def _console() -> CliConsole:
    # Made per call, so the terminal width (COLUMNS) is read when a command runs, not at import.
    return make_console()


def register(app: typer.Typer) -> None:
    """Mount the `models` commands on the main CLI."""
    app.add_typer(models_app, name="models")


def _registry(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` against the MLflow registry; an MLflow that cannot be reached or refuses is a plain error (an
    unknown model, alias or version is a ModelLookupError, which the CLI prints as one)."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args)
    except (MlflowException, OSError) as exc:
        fail(str(exc))


def _load(ref: str) -> Any:
    from jobs.registry import load_model

    return _registry(load_model, ref)


def _image_from_file(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """A picture file as the model's input: its channels (grey or RGB), resized to its height and width, in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    try:
        with Image.open(path) as opened:
            picture = opened.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(picture, dtype=np.float32) / 255.0
    except FileNotFoundError:
        fail(f"--image {path}: no such file")
    except (UnidentifiedImageError, OSError) as exc:
        fail(f"--image {path}: not a picture this can read (PNG, JPEG, ...): {exc}")
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1)


def _image_from_data(ref: str, index: int, source: str | None) -> torch.Tensor:
    """Example ``index`` of ``source`` (default: the data set the model version records it was trained on)."""
    import torch

    from jobs.registry import resolve
    from workers.config import DataConfig
    from workers.data import DataError, open_dataset
    from workers.storage import resolver_from_settings

    if source is None:
        version = _registry(resolve, ref)
        source = (version.tags or {}).get("dataset")
        if not source:
            fail(f"{ref} does not record the data set it was trained on; give it with --data")
    try:
        dataset = open_dataset(DataConfig(source=source), resolve=resolver_from_settings())
    except DataError as exc:
        fail(f"--data {source}: {exc}")
    if index >= len(dataset):
        fail(f"--index {index}: {source} has {len(dataset)} examples (0 to {len(dataset) - 1})")
    return dataset.images(torch.tensor([index]))[0].float()


def _output_path(path: Path) -> Path:
    if path.suffix.lower() != ".png":
        fail(f"--output {path}: pictures are written as PNG; give a path ending in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@models_app.command("list")
def list_command(output: OutputFormat = output_option()) -> None:
    """Every registered model: versions, aliases and its latest version's variant, beta, latent size and data."""
    console = _console()
    from jobs.registry import list_models
    from workers.settings import mlflow_tracking_uri

    models = _registry(list_models)
    if output is OutputFormat.json:
        # {"tracking_uri", "models": [{"name", "versions", "latest_version", "aliases", "description",
        # "latest_tags", "latest_metrics"}]}: an empty registry is an empty list.
        print_json({"tracking_uri": mlflow_tracking_uri(), "models": models})
        return
    if not models:
        console.print(f"no registered models in {mlflow_tracking_uri()}", highlight=False, soft_wrap=True)
        return
    table = new_table(f"registered models ({mlflow_tracking_uri()})")
    for column in ("name", "versions", "aliases", "latest", "variant", "beta", "latent", "data"):
        (number_column if column in ("versions", "latest", "beta", "latent") else text_column)(table, column)
    for m in models:
        tags = m["latest_tags"]
        aliases = ", ".join(f"@{a}→{v}" for a, v in m["aliases"].items()) or "-"
        table.add_row(
            m["name"],
            str(m["versions"]),
            aliases,
            m["latest_version"] or "-",
            tags.get("variant", "-"),
            tags.get("beta", "-"),
            tags.get("latent_dim", "-"),
            tags.get("dataset", "-"),
        )
    console.print(table)


@models_app.command("show")
def show_command(
    ref: str = typer.Argument(..., metavar="NAME[@ALIAS|/VERSION]"),
    output: OutputFormat = output_option(),
    as_json: bool = typer.Option(False, "--json", hidden=True, help="the same as --output json"),
) -> None:
    """One version: aliases, description, run, tags, metrics and where its run's pictures are."""
    console = _console()
    from jobs.registry import describe

    info = _registry(describe, ref)
    if as_json or output is OutputFormat.json:
        # {"name", "version", "aliases", "description", "status", "created", "run_id", "source", "model_uri",
        # "tags", "metrics", "run_artifact_uri", "pictures"}
        print_json(info)
        return
    aliases = " ".join(f"@{a}" for a in info["aliases"]) or "(no aliases)"
    console.print(f"[bold]{info['name']}[/bold] version {info['version']}  {aliases}", highlight=False)
    prose = description_prose(info["description"])
    if prose:
        console.print(prose, highlight=False, soft_wrap=True)
    console.print(f"model URI: {info['model_uri']}", highlight=False, soft_wrap=True)
    console.print(
        f"run: {info['run_id'] or '-'}   created: {info['created'] or '-'}   status: {info['status']}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"source: {info['source']}", highlight=False, soft_wrap=True)

    tags = new_table("tags")
    text_column(tags, "tag")
    text_column(tags, "value")
    for key in sorted(info["tags"]):
        tags.add_row(key, info["tags"][key])
    console.print(tags)
    if info["metrics"]:
        metrics = new_table("metrics")
        text_column(metrics, "metric")
        number_column(metrics, "value")
        for key in sorted(info["metrics"]):
            metrics.add_row(key, metric_text(info["metrics"][key]))
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
    nrow: int | None = typer.Option(None, "--nrow", min=1, help="images per row (default: a square grid)"),
) -> None:
    """Decode n draws from the prior N(0, I) into a titled grid picture (VAE family only), enlarged to at least
    256 px a side."""
    console = _console()
    import torch

    from workers.plots import describe_model, save_labelled_grid

    output = _output_path(output)
    model = _load(ref)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    images = model.sample(n, generator=generator)  # NoPrior (a plain error) for an autoencoder without a prior
    save_labelled_grid(
        images.float().cpu(),
        output,
        nrow=nrow or math.ceil(math.sqrt(n)),
        title=f"{ref} ({describe_model(model)}): {n} decodings of z ~ N(0, I), seed {seed}",
    )
    console.print(f"wrote {n} samples from {ref} to {output}", highlight=False, soft_wrap=True)


@models_app.command("traverse")
def traverse_command(
    ref: str = typer.Argument(..., metavar="NAME[@ALIAS|/VERSION]"),
    output: Path = typer.Option(Path("traversal.png"), "-o", "--output", help="PNG file to write"),
    dim_limit: float = typer.Option(
        2.0,
        "--dim-limit",
        min=0.0,
        help="how far each latent goes, in standard deviations: -limit..+limit of the prior for the VAE family, "
        "the training codes' mean +- limit sd for autoencoders",
    ),
    steps: int = typer.Option(9, "--steps", min=2, help="images per latent dimension"),
    seed: int = typer.Option(0, "--seed", help="seed of the prior draw the traversal starts from (VAE family)"),
    image_path: Path | None = typer.Option(
        None, "--image", help="start from this picture's code (PNG/JPEG; resized to the model's input)"
    ),
    index: int | None = typer.Option(
        None, "--index", min=0, help="start from the code of this example of the data set (--data)"
    ),
    data_source: str | None = typer.Option(
        None, "--data", help="the data set --index reads (default: the one the model was trained on)"
    ),
) -> None:
    """One row per latent dimension, rows ordered by the KL the training data puts on each (largest first;
    autoencoders: by the spread of their codes); the columns are labelled with their values. With --image or
    --index, every row starts from that real image's code (its posterior mean). Otherwise, VAE family: the
    posterior mean of a decoded prior sample; autoencoders: the mean training code (recorded with the model).
    VAE family: each latent from -limit to +limit; autoencoders: over its training codes' mean +- limit sd."""
    console = _console()
    import torch

    from workers.plots import describe_model, latent_traversal

    output = _output_path(output)
    model = _load(ref)
    device = next(model.parameters()).device
    stats = model.code_statistics()
    ranges = start = image = None
    order_by = None
    if stats is not None:
        order_by = ("KL", stats.kl) if model.stochastic and stats.kl is not None else ("sd", stats.std)
    if image_path is not None and index is not None:
        fail("give --image or --index, not both")
    real, origin = None, ""
    if image_path is not None:
        real, origin = _image_from_file(image_path, model.image_shape), f" from {image_path.name}"
    elif index is not None:
        real, origin = _image_from_data(ref, index, data_source), f" from example {index}"
    with torch.no_grad():
        if model.stochastic:
            image = (
                real
                if real is not None
                else model.sample(1, generator=torch.Generator(device=device).manual_seed(seed))[0]
            )
            sweep = f"from -{dim_limit:g} to +{dim_limit:g} (prior sd)"
        elif stats is not None:
            start = stats.mean
            ranges = torch.stack([stats.mean - dim_limit * stats.std, stats.mean + dim_limit * stats.std], dim=1)
            sweep = f"over its training codes' mean +- {dim_limit:g} sd [range shown]"
        else:
            start = torch.zeros(model.latent_dim)
            sweep = f"from -{dim_limit:g} to +{dim_limit:g} around z = 0"
        if real is not None and not model.stochastic:
            image, start = real, None  # the others at the image's code; each latent over its own range
    if stats is None:
        console.print(
            f"note: {ref} was saved without the statistics of its training codes (trained before aeforge "
            f"recorded them), so the rows are in index order"
            + (
                ""
                if model.stochastic
                else f" and each latent goes {sweep}, which may miss where its codes lie; train it again to record them"
            ),
            highlight=False,
            soft_wrap=True,
        )
    rows = f"; rows by {order_by[0]}, largest first" if order_by else ""
    latent_traversal(
        model,
        image,
        output,
        limit=dim_limit,
        steps=steps,
        ranges=ranges,
        start=start,
        order_by=order_by,
        title=f"latent traversal of {ref} ({describe_model(model)}){origin}: each row varies one latent {sweep}{rows}",
    )
    console.print(
        f"wrote a traversal of {model.latent_dim} latent dimensions of {ref} to {output}",
        highlight=False,
        soft_wrap=True,
    )


@models_app.command("promote")
def promote_command(
    name: str = typer.Argument(..., metavar="NAME"),
    version: str = typer.Argument(..., metavar="VERSION"),
    alias: str = typer.Argument(..., metavar="@ALIAS"),
    force: bool = typer.Option(
        False, "--force", help="move it even when the version is worse than the one the alias points at"
    ),
    output: OutputFormat = output_option(),
) -> None:
    """Point @ALIAS of model NAME at VERSION, as its owner, through the registry's gate: the version must have
    finished, be healthy (not collapsed) and, unless --force, be no worse on its metric than the version the alias
    points at now. A refusal leaves the alias where it is, says why and exits 1; the version's description records
    the decision either way."""
    console = _console()
    from jobs.registry import promote

    if version.startswith("v") and version[1:].isdigit():
        version = version[1:]
    if not version.isdigit():
        fail(f"VERSION: a version number (3 or v3), not '{version}'")
    result = _registry(lambda: promote(name, version, alias, force=force))
    if output is OutputFormat.json:
        # {"name", "version", "alias", "moved", "decision"}
        print_json(result)
    else:
        console.print(f"{name}: {result['decision']}", highlight=False, soft_wrap=True)
    if not result["moved"]:
        raise typer.Exit(1)


alias_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True, help="A registered model's aliases.")
models_app.add_typer(alias_app, name="alias")


@alias_app.command("rm")
def alias_rm_command(
    name: str = typer.Argument(..., metavar="NAME"),
    alias: str = typer.Argument(..., metavar="@ALIAS"),
    output: OutputFormat = output_option(),
) -> None:
    """Remove @ALIAS from model NAME, as its owner (the versions stay; `models:/NAME@ALIAS` stops resolving)."""
    console = _console()
    from jobs.registry import remove_alias

    result = _registry(lambda: remove_alias(name, alias))
    if output is OutputFormat.json:
        print_json(result)  # {"name", "alias", "version"}
        return
    console.print(
        f"{name}: removed @{result['alias']} (it pointed at version {result['version']})",
        highlight=False,
        soft_wrap=True,
    )


def _value(value: float | None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


@models_app.command("compare")
def compare_command(
    name: str = typer.Argument(..., metavar="NAME"),
    first: str = typer.Argument(..., metavar="V1"),
    second: str = typer.Argument(..., metavar="V2"),
    output: OutputFormat = output_option(),
) -> None:
    """Two versions of model NAME side by side: their aliases and health, every metric (and V2 - V1), the tags that
    differ, and links to each version's pictures."""
    console = _console()
    from jobs.registry import compare

    versions = [v[1:] if v.startswith("v") and v[1:].isdigit() else v for v in (first, second)]
    for v in versions:
        if not v.isdigit():
            fail(f"V1 and V2: version numbers (3 or v3), not '{v}'")
    result = _registry(lambda: compare(name, *versions))
    if output is OutputFormat.json:
        # {"name", "versions": [show's object x 2], "metrics": [{"metric", "values", "difference"}],
        # "tags": [{"tag", "values"}], "health": [..., ...]}
        print_json(result)
        return
    left, right = result["versions"]
    labels = [f"v{left['version']}", f"v{right['version']}"]
    for label, info, verdict in zip(labels, result["versions"], result["health"]):
        aliases = " ".join(f"@{a}" for a in info["aliases"]) or "(no aliases)"
        console.print(
            f"[bold]{name}[/bold] {label}  {aliases}  {verdict}  run {info['run_id'] or '-'}  created {info['created'] or '-'}",
            highlight=False,
            soft_wrap=True,
        )
    table = new_table(f"{name}: {labels[0]} against {labels[1]}")
    text_column(table, "metric")
    for label in (*labels, f"{labels[1]} - {labels[0]}"):
        number_column(table, label)
    for row in result["metrics"]:
        table.add_row(row["metric"], *(_value(v) for v in row["values"]), _value(row["difference"]))
    console.print(table)
    if result["tags"]:
        tags = new_table("tags that differ")
        text_column(tags, "tag")
        for label in labels:
            text_column(tags, label)
        for row in result["tags"]:
            tags.add_row(row["tag"], *(v if v is not None else "-" for v in row["values"]))
        console.print(tags)
    for label, info in zip(labels, result["versions"]):
        if info["pictures"]:
            console.print(f"pictures of {label}:", highlight=False)
            for uri in info["pictures"]:
                console.print(f"  {uri}", highlight=False, soft_wrap=True)
        else:
            console.print(f"pictures of {label}: none logged on its run", highlight=False)
