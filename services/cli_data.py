"""The `aeforge data` commands: push files as a named dataset to storage, list the datasets, share one, remove one.

``register(app)`` mounts them as the ``data`` sub-command. Storage comes from the settings (AEFORGE_STORAGE,
AEFORGE_S3_ENDPOINT_URL, the AWS keys). A dataset is owned by whoever pushed it: the owner of the API token when the
CLI is set up for a queue service (AEFORGE_API_TOKEN, asked of the service's /whoami; or the local `aeforge serve`
admin token), else this machine's user name. Only its owner or an admin replaces, shares or removes it. A storage
error prints one plain message and exits with code 2 (see services.cli_errors).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from services.cli_errors import ErrorHandlingGroup
from services.cli_output import (
    OutputFormat,
    make_console,
    new_table,
    number_column,
    output_option,
    print_json,
    text_column,
)

console = make_console()


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
        return getpass.getuser(), False  # no token: nobody vouches for this name (see acting_owner)
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
    paths: list[Path] = typer.Argument(
        ..., metavar="FILE...", help="files (e.g. MNIST images + labels), or one folder"
    ),
    name: str = typer.Option(..., "--name", "-n", help="dataset name; a job's data.source names it"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a dataset of the same name"),
    format: str | None = typer.Option(
        None, "--format", help="idx | npz | hdf5 | folder (default: inferred from the first file)"
    ),
) -> None:
    """Check the data with the reader a job will use, then upload it to storage as dataset NAME (the manifest,
    which records what the reader found, is written last). Data the reader refuses is not uploaded."""
    from workers.storage import human_size

    owner, admin = identity()
    storage = _storage()
    storage.preflight()
    with console.status("reading") as status:

        def describe(files: list[Path], data_format: str) -> dict:
            from workers.data.summary import summarize  # imports torch: only when pushing

            status.update(f"reading {files[0]} as {data_format}")
            return summarize(files, data_format).manifest_fields()

        manifest = storage.push(
            paths,
            name,
            overwrite=overwrite,
            format=format,
            owner=owner,
            admin=admin,
            describe=describe,
            progress=lambda relpath: status.update(f"uploading {relpath}"),
        )
    console.print(
        f"pushed [bold]{escape(manifest['name'])}[/bold]: {contents_text(manifest)}; "
        f"{len(manifest['files'])} file(s), {human_size(manifest['size'])}, format {manifest['format']} -> "
        f"{storage.uri('datasets/' + manifest['name'])}",
        highlight=False,
        soft_wrap=True,
    )


# --- what a manifest says the data holds (absent from manifests written before pushes were read: "-") ------------


def examples_text(manifest: dict) -> str:
    return f"{manifest['examples']:,}" if "examples" in manifest else "-"


def image_text(manifest: dict) -> str:
    if "image_shape" not in manifest:
        return "-"
    shape = manifest["image_shape"]
    return "mixed sizes" if shape is None else "x".join(map(str, shape))


def labels_text(manifest: dict) -> str:
    if "classes" not in manifest:
        return "-"
    return "none" if manifest["classes"] is None else f"{manifest['classes']} classes"


def factors_text(manifest: dict) -> str:
    if "factors" not in manifest:
        return "-"
    factors = manifest["factors"]
    return "none" if not factors else ", ".join(f"{f['name']} {f['size']}" for f in factors)


def owner_text(manifest: dict) -> str:
    """Who pushed it ("-" before owners were recorded), and ", shared" when every user's jobs may read it."""
    return str(manifest.get("owner") or "-") + (", shared" if manifest.get("shared") is True else "")


def contents_text(manifest: dict) -> str:
    """One line for `push`: "480,000 examples of 3x64x64, labels none, factors floor_hue 10, ..."."""
    return (
        f"{examples_text(manifest)} examples of {image_text(manifest)}, labels {labels_text(manifest)}, "
        f"factors {factors_text(manifest)}"
    )


def ls(output: OutputFormat = output_option()) -> None:
    """List the datasets in storage: what each holds (examples, image shape CxHxW, labels, factors), its size and
    owner; -o json prints every manifest whole (format, files with their sha256, creation time)."""
    from workers.storage import human_size
    from workers.storage.datasets import CONTENT_FIELDS

    storage = _storage()
    manifests = storage.ls()
    if output is OutputFormat.json:
        # Every manifest whole, with the same keys: one pushed before pushes were read has the content fields
        # null and contents_known false (in the table: "-").
        print_json(
            [
                {**dict.fromkeys(CONTENT_FIELDS), **m, "contents_known": all(k in m for k in CONTENT_FIELDS)}
                for m in manifests
            ]
        )
        return
    if not manifests:
        console.print(f"no datasets in {storage.uri('datasets')}", highlight=False, soft_wrap=True)
        return
    table = new_table(f"datasets in {escape(storage.uri('datasets'))}")
    rows = [
        [
            escape(m["name"]),
            examples_text(m),
            image_text(m),
            labels_text(m),
            escape(factors_text(m)),
            human_size(m["size"]),
            escape(owner_text(m)),
        ]
        for m in manifests
    ]

    def fitted(index: int, header: str) -> int:
        # Short values (numbers, shapes, sizes) keep their width, so a narrow terminal folds the names and the
        # factor lists instead of breaking "737,280" or "1x64x64" in two.
        return max(len(header), *(len(row[index]) for row in rows))

    text_column(table, "name", style="bold")
    number_column(table, "examples", width=fitted(1, "examples"))
    text_column(table, "image", width=fitted(2, "image"))
    text_column(table, "labels")
    text_column(table, "factors")
    number_column(table, "size", width=fitted(5, "size"))
    text_column(table, "owner")
    for row in rows:
        table.add_row(*row)
    console.print(table)


AS_OWNER_HELP = (
    "without an API token: act as the dataset's owner even though it is not this machine's user (your storage "
    "keys allow it; aeforge cannot check who you are)"
)


def has_token() -> bool:
    from services.settings import ServiceSettings

    return bool(ServiceSettings.load().client_token())


def acting_owner(storage, name: str, what: str, as_owner: bool) -> tuple[str, bool]:
    """(owner, is admin) to change dataset ``name`` as. With an API token, its principal. Without one, this machine's
    user, said in the output (nothing authenticates that name: the storage's keys are what allow a change); a dataset
    of another owner is refused unless ``as_owner``, which then acts as its owner."""
    owner, admin = identity()
    if has_token():
        return owner, admin
    console.print(
        f"no API token: acting as {escape(owner)} (this machine's user, $USER); the storage's keys, not aeforge, "
        f"decide what may be changed",
        highlight=False,
        soft_wrap=True,
    )
    from workers.storage import StorageError, StorageUnreachable

    try:
        held = storage.manifest(name).get("owner")
    except StorageUnreachable:
        raise
    except StorageError:  # none, or an incomplete one: the storage's own command says which
        return owner, admin
    if held == owner:
        return owner, admin
    if held is None:
        raise StorageError(
            f"dataset '{name}' was pushed before owners were recorded: only an admin may {what} it (with an admin's "
            f"API token in AEFORGE_API_TOKEN)"
        )
    if not as_owner:
        raise StorageError(
            f"dataset '{name}' belongs to {held or 'no one (pushed before owners were recorded)'}, not {owner}: "
            f"without an API token aeforge cannot tell who you are, so it does not {what} it; set AEFORGE_API_TOKEN, "
            f"or give --as-owner to act as its owner"
        )
    console.print(f"--as-owner: acting as {escape(str(held))}, the owner of {escape(name)}", highlight=False)
    return str(held), False


def share(
    name: str = typer.Argument(..., metavar="NAME"),
    unshare: bool = typer.Option(False, "--unshare", help="make it readable by its owner's jobs only again"),
    as_owner: bool = typer.Option(False, "--as-owner", help=AS_OWNER_HELP),
) -> None:
    """Let every user's jobs read dataset NAME (its owner or an admin); --unshare takes that back."""
    storage = _storage()
    owner, admin = acting_owner(storage, name, "unshare" if unshare else "share", as_owner)
    manifest = storage.share(name, not unshare, owner=owner, admin=admin)
    state = "shared: every user's jobs may read it" if manifest["shared"] else "not shared: only its owner's jobs do"
    console.print(f"{escape(name)} is {state}", highlight=False)


def rm(
    name: str = typer.Argument(..., metavar="NAME"),
    as_owner: bool = typer.Option(False, "--as-owner", help=AS_OWNER_HELP),
) -> None:
    """Delete dataset NAME from storage (its owner or an admin)."""
    storage = _storage()
    owner, admin = acting_owner(storage, name, "remove", as_owner)
    deleted = storage.rm(name, owner=owner, admin=admin)
    console.print(f"removed {name} ({deleted} object(s))", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `data` sub-command (push, ls, share, rm) to the main app."""
    data_app = typer.Typer(
        cls=ErrorHandlingGroup, no_args_is_help=True, help="Datasets in storage: push, ls, share, rm."
    )
    data_app.command("push")(push)
    data_app.command("ls")(ls)
    data_app.command("share")(share)
    data_app.command("rm")(rm)
    app.add_typer(data_app, name="data")
