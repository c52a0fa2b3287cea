"""Which local paths and S3 URLs a queue job of a user may read: the locations under AEFORGE_ALLOWED_DATA_PREFIXES,
and the pushed datasets the user may read (their own and shared ones).

The service checks a source's text when the job is submitted (services.access) and the real path it resolves to;
the job checks again every time its reader opens a local file (:func:`check_local_read`), because a symlink under
an allowed prefix may point anywhere (another owner's dataset in the storage folder, say) and may change after the
submission. The dispatcher gives every queue job AEFORGE_ALLOWED_DATA_PREFIXES and AEFORGE_JOB_OWNER; a path whose
text is under a prefix must then really be under one, or inside a dataset its owner may read (an admin, who may read
anything, names the real path instead).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:  # the annotation only: the resolver imports this module
    from workers.storage.resolver import Storage

# Set by the dispatcher for every queue job: the prefixes, comma-separated (empty: none).
PREFIXES_VARIABLE = "AEFORGE_ALLOWED_DATA_PREFIXES"


def split_location(location: str) -> tuple[str, str, list[str], bool] | None:
    """(scheme, bucket, path segments, whether it may name a folder) of a local path, a file:// URL or an s3:// URL,
    the path normalised; None for what cannot be compared (a relative path, a path with a '..' part). An S3 key
    names a folder only when it ends with '/': s3://b/public is an object beside the folder s3://b/public/."""
    if location.startswith("s3://"):
        bucket, _, key = location[len("s3://") :].partition("/")
        scheme, path = "s3", key  # keys are taken literally, as the resolver does
    elif location.startswith("file://"):
        scheme, bucket, path = "file", "", unquote(urlparse(location).path)
        if not path.startswith("/"):
            return None
    elif location.startswith("/"):
        scheme, bucket, path = "file", "", location
    else:
        return None
    parts = path.split("/")
    if ".." in parts or "\x00" in path:
        return None
    if scheme == "s3":  # a key is literal: no '.' or empty parts to normalise away (the resolver refuses them too)
        parts, folder = (path.removesuffix("/").split("/") if path else []), path == "" or path.endswith("/")
        return None if not bucket or any(p in ("", ".") for p in parts) else (scheme, bucket, parts, folder)
    return scheme, bucket, [p for p in posixpath.normpath(path).split("/") if p], True


def under_prefixes(location: str, prefixes: Iterable[str], *, real: bool = False) -> bool:
    """Whether ``location`` is one of the folders ``prefixes`` or inside one, segment by segment. ``real``: compare
    real paths (symlinks resolved on both sides) for local ones."""
    target = split_location(location)
    if target is None:
        return False
    scheme, bucket, parts, folder = target
    for prefix in prefixes:
        allowed = split_location(prefix)
        if allowed is None or allowed[:2] != (scheme, bucket):
            continue
        under = allowed[2]  # a prefix is a folder: whole segments, the folder itself or what is in it
        if real and scheme == "file":
            under = [p for p in os.path.realpath("/" + "/".join(under)).split("/") if p]
        if parts[: len(under)] == under and (len(parts) > len(under) or folder):
            return True
    return False


def not_readable_message(source: str, prefixes: Iterable[str]) -> str:
    """The one refusal text for a location a user may not read: it names the source and the rules, and says nothing
    about what is there (the same whether a file exists, is a link, or is someone else's)."""
    prefixes = list(prefixes)
    shown = ", ".join(prefixes) if prefixes else "none are set"
    return (
        f"'{source}' is not under a location you may read: a user reads their own "
        f"pushed datasets, shared ones, and paths or s3:// URLs under the prefixes in "
        f"AEFORGE_ALLOWED_DATA_PREFIXES ({shown})"
    )


def parse_prefixes(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def local_dataset_of(real_path: str, storage_root: Path | None) -> str | None:
    """The name of the pushed dataset whose files hold ``real_path`` when the storage is a local folder, else None."""
    if storage_root is None:
        return None
    datasets = Path(os.path.realpath(storage_root)) / "datasets"
    try:
        rel = Path(real_path).relative_to(datasets)
    except ValueError:
        return None
    return rel.parts[0] if len(rel.parts) >= 2 and rel.parts[1] == "files" else None


def real_path_readable(
    path: str | Path, prefixes: Iterable[str], owner: str | None, storage: Storage | None = None
) -> bool:
    """Whether the real path of local ``path`` is under one of ``prefixes`` (real paths on both sides) or inside a
    pushed dataset that ``owner`` may read (theirs, or shared) in the local ``storage``."""
    real = os.path.realpath(path)
    if under_prefixes(real, prefixes, real=True):
        return True
    name = local_dataset_of(real, getattr(storage, "root", None))
    if name is None or storage is None:
        return False
    from workers.storage.objects import StorageError

    try:
        manifest = storage.manifest(name)
    except StorageError:
        return False
    return manifest.get("owner") == owner or manifest.get("shared") is True


def check_local_read(path: str | Path, source: str | None = None) -> Path:
    """The real path to open for local ``path``, after checking, in a job of a user, that a path whose text is under
    an allowed prefix really is (or is inside a dataset its owner may read). Raises DataError with the service's
    refusal text; outside the queue (``aeforge run``) it only resolves the path."""
    from workers.data.base import DataError  # imported here: workers.data imports torch

    real = Path(os.path.realpath(path))
    text = os.environ.get(PREFIXES_VARIABLE)
    if text is None or os.environ.get("AEFORGE_JOB_ID") is None:
        return real
    prefixes = parse_prefixes(text)
    if not under_prefixes(os.path.abspath(path), prefixes):
        return real  # not reached through a prefix: the service checked the source itself at submission
    storage = None
    from workers.storage.resolver import Storage

    try:
        storage = Storage.from_settings()
    except Exception:  # a storage that cannot be named reads no dataset: the prefixes alone decide
        storage = None
    if real_path_readable(path, prefixes, os.environ.get("AEFORGE_JOB_OWNER"), storage):
        return real
    raise DataError(f"data.source: {not_readable_message(source or str(path), prefixes)}")
