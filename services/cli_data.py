"""The `aeforge data` commands: push files as a named dataset to storage, list the datasets, remove one.

``register(app)`` mounts them as the ``data`` sub-command. Storage comes from the settings (AEFORGE_STORAGE,
AEFORGE_S3_ENDPOINT_URL, the AWS keys). A storage error prints one plain message and exits with code 2 (see
services.cli_errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.cli_errors import ErrorHandlingGroup

console = Console()


def _storage():
    from workers.storage import Storage

    return Storage.from_settings()


def push(
    paths: list[Path] = typer.Argument(..., metavar="FILE...", help="files (e.g. MNIST images + labels), or one folder"),
    name: str = typer.Option(..., "--name", "-n", help="dataset name; a job's data.source names it"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a dataset of the same name"),
    format: Optional[str] = typer.Option(None, "--format", help="idx | npz | folder (default: inferred from the first file)"),
) -> None:
    """Upload files to storage as dataset NAME (the manifest is written last)."""
    from workers.storage import human_size

    storage = _storage()
    storage.preflight()
    with console.status("uploading") as status:
        manifest = storage.push(paths, name, overwrite=overwrite, format=format,
                                progress=lambda relpath: status.update(f"uploading {relpath}"))
    console.print(f"pushed [bold]{escape(manifest['name'])}[/bold]: {len(manifest['files'])} file(s), "
                  f"{human_size(manifest['size'])}, format {manifest['format']} -> "
                  f"{storage.uri('datasets/' + manifest['name'])}", highlight=False, soft_wrap=True)


def ls() -> None:
    """List the datasets in storage."""
    from workers.storage import human_size

    storage = _storage()
    manifests = storage.ls()
    if not manifests:
        console.print(f"no datasets in {storage.uri('datasets')}", highlight=False, soft_wrap=True)
        return
    table = Table(title=f"datasets in {storage.uri('datasets')}")
    table.add_column("name", style="bold")
    table.add_column("files", justify="right")
    table.add_column("size", justify="right")
    table.add_column("format")
    table.add_column("created (UTC)")
    for m in manifests:
        table.add_row(m["name"], str(len(m["files"])), human_size(m["size"]), str(m.get("format")),
                      str(m.get("created", "")).replace("T", " ")[:19])
    console.print(table)


def rm(name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Delete dataset NAME from storage."""
    deleted = _storage().rm(name)
    console.print(f"removed {name} ({deleted} object(s))", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `data` sub-command (push, ls, rm) to the main app."""
    data_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True, help="Datasets in storage: push, ls, rm.")
    data_app.command("push")(push)
    data_app.command("ls")(ls)
    data_app.command("rm")(rm)
    app.add_typer(data_app, name="data")
