"""The `aeforge data` commands: push files as a named dataset to storage, list the datasets, share one, remove one.

``register(app)`` mounts them as the ``data`` sub-command. Storage comes from the settings (AEFORGE_STORAGE,
AEFORGE_S3_ENDPOINT_URL, the AWS keys). A dataset is owned by whoever pushed it: the owner of the API token when the
CLI is set up for a queue service (AEFORGE_API_TOKEN, asked of the service's /whoami; or the local `aeforge serve`
admin token), else this machine's user name. Only its owner or an admin replaces, shares or removes it. A storage
error prints one plain message and exits with code 2 (see services.cli_errors).
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


def identity() -> tuple[str, bool]:
    """(owner, is admin) of whoever runs the command: the API token's principal when there is a token (the local
    service's token file answers for its own tokens; any other is asked of the service), else the local user."""
    import getpass

    from services.client import AeforgeClient
    from services.settings import ServiceSettings

    settings = ServiceSettings.load()
    token = settings.client_token()
    if not token:
        return getpass.getuser(), False
    local = settings.principal_for(token)
    if local is not None:
        return local.owner, local.is_admin
    client = AeforgeClient(settings.api_url, token)
    try:
        who = client.whoami()
    finally:
        client.close()
    return str(who["owner"]), who.get("role") == "admin"


def push(
    paths: list[Path] = typer.Argument(..., metavar="FILE...", help="files (e.g. MNIST images + labels), or one folder"),
    name: str = typer.Option(..., "--name", "-n", help="dataset name; a job's data.source names it"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a dataset of the same name"),
    format: Optional[str] = typer.Option(None, "--format", help="idx | npz | folder (default: inferred from the first file)"),
) -> None:
    """Upload files to storage as dataset NAME (the manifest is written last)."""
    from workers.storage import human_size

    owner, admin = identity()
    storage = _storage()
    storage.preflight()
    with console.status("uploading") as status:
        manifest = storage.push(paths, name, overwrite=overwrite, format=format, owner=owner, admin=admin,
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
    table.add_column("owner")
    table.add_column("shared")
    table.add_column("created (UTC)")
    for m in manifests:
        table.add_row(escape(m["name"]), str(len(m["files"])), human_size(m["size"]), str(m.get("format")),
                      escape(str(m.get("owner") or "-")), "yes" if m.get("shared") is True else "no",
                      str(m.get("created", "")).replace("T", " ")[:19])
    console.print(table)


def share(
    name: str = typer.Argument(..., metavar="NAME"),
    unshare: bool = typer.Option(False, "--unshare", help="make it readable by its owner's jobs only again"),
) -> None:
    """Let every user's jobs read dataset NAME (its owner or an admin); --unshare takes that back."""
    owner, admin = identity()
    manifest = _storage().share(name, not unshare, owner=owner, admin=admin)
    state = "shared: every user's jobs may read it" if manifest["shared"] else "not shared: only its owner's jobs do"
    console.print(f"{escape(name)} is {state}", highlight=False)


def rm(name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Delete dataset NAME from storage (its owner or an admin)."""
    owner, admin = identity()
    deleted = _storage().rm(name, owner=owner, admin=admin)
    console.print(f"removed {name} ({deleted} object(s))", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `data` sub-command (push, ls, share, rm) to the main app."""
    data_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True,
                           help="Datasets in storage: push, ls, share, rm.")
    data_app.command("push")(push)
    data_app.command("ls")(ls)
    data_app.command("share")(share)
    data_app.command("rm")(rm)
    app.add_typer(data_app, name="data")
