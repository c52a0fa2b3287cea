"""The resolver: a data source (a pushed dataset's name, ``s3://bucket/key``, ``s3://bucket/prefix/``, a local path) as
a local file or folder in the node's cache (AEFORGE_HOME/cache): each file is downloaded to a staging name, checked
(size, sha256) and only then renamed into place, under a file lock so that the Ray workers of a node download once."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from workers.storage.datasets import DATASET_NAME, DATASETS, DatasetStore
from workers.storage.objects import (
    NOT_FOUND,
    SHA256_METADATA,
    ObjectStore,
    StorageError,
    clean_relpath,
    client_error_code,
    explain_s3_error,
    s3_errors,
    sha256_file,
    write_file,
)


def _data_error(message: str) -> Exception:
    """A DataError, reported under data.source (imported here: workers.data imports torch; `data ls` needs none)."""
    from workers.data.base import DataError

    return DataError(message)


def _sync(
    dest: Path, record: Path, wanted: dict[str, Any], fetch: Callable[[str, Path], None], prune: bool = False
) -> None:
    """Make ``dest/<rel>`` a copy for every ``rel`` of ``wanted`` (rel -> what names its content), fetching only what
    the record does not show unchanged (that name, size and mtime); ``prune``: delete files no longer wanted."""

    def entry(rel: str) -> list[Any]:
        st = (dest / rel).stat() if (dest / rel).is_file() else None
        return [wanted[rel], st and [st.st_size, st.st_mtime_ns]]

    def recorded() -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            found = json.loads(record.read_text())
            return found if isinstance(found, dict) else {}
        return {}

    if recorded() == {rel: entry(rel) for rel in wanted}:
        return
    lock = record.with_name(f"{record.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as fh:  # one lock holder per open(): between processes and threads on this node
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        checked = recorded()
        for rel in sorted(wanted):
            if checked.get(rel) != entry(rel):
                fetch(rel, dest / rel)
        for path in sorted(dest.rglob("*") if prune else [], reverse=True):
            if path.is_file() and path.relative_to(dest).as_posix() not in wanted:
                path.unlink()  # deleted from the source: a folder reader must not see it
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        write_file(io.BytesIO(json.dumps({rel: entry(rel) for rel in wanted}, indent=2).encode()), record)


class _S3SourceFetcher:
    """Copies of s3://bucket/key objects and s3://bucket/prefix/ folders under cache/s3/<bucket>/<key>, reused while
    their ETag and size are unchanged; records and locks under cache/s3/.state/ (no bucket name starts with '.')."""

    def __init__(self, storage: ObjectStore, bucket: str):
        cache, self.conn, self.client, self.bucket = storage.cache_dir, storage.s3, storage.client, bucket
        self.staging, self.files, self.state = cache / ".partial", cache / "s3" / bucket, cache / "s3/.state" / bucket

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except s3_errors(StorageError) as exc:  # a StorageError: a bad key, or a copy that failed its check
            code, reason = client_error_code(exc), str(exc)
            if code == "PreconditionFailed":
                raise _data_error(f"data source {what} changed while it was being fetched; run again") from None
            if not isinstance(exc, StorageError):
                reason = (
                    f"not found at S3 endpoint {self.conn.endpoint_name}"
                    if code in NOT_FOUND
                    else explain_s3_error(exc, self.conn, self.bucket)
                )
            raise _data_error(f"data source {what}: {reason}") from None

    def _download(self, key: str, etag: str, size: int, target: Path) -> None:
        with self._errors(f"s3://{self.bucket}/{key}"):  # IfMatch: the version whose ETag and size were checked
            response = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=etag)
            with contextlib.closing(response["Body"]) as body:
                write_file(body, target, self.staging, size, response.get("Metadata", {}).get(SHA256_METADATA))

    def fetch(self, source_key: str) -> str:
        """The cached copy of object ``source_key``, or of every object under it if it ends with '/'."""
        what, folder = f"s3://{self.bucket}/{source_key}", source_key.endswith("/")
        with self._errors(what):
            key = clean_relpath(source_key, "S3 key")
            if folder:
                pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{key}/")
                listing = {
                    o["Key"][len(key) + 1 :]: [o["ETag"], int(o["Size"])]
                    for page in pages
                    for o in page.get("Contents", [])
                    if not o["Key"].endswith("/")
                }
            else:
                head = self.client.head_object(Bucket=self.bucket, Key=key)
                listing = {key.rpartition("/")[2]: [head["ETag"], int(head["ContentLength"])]}
            for rel in listing:  # a local file name for each
                clean_relpath(f"{key}/{rel}", "object key")
        if not listing:
            raise _data_error(
                f"data source {what}: no objects under this prefix at S3 endpoint {self.conn.endpoint_name}"
            )
        dest = self.files / key if folder else (self.files / key).parent

        def fetch_one(rel: str, target: Path) -> None:
            etag, size = listing[rel]
            self._download(f"{key}/{rel}" if folder else key, etag, size, target)

        _sync(
            dest,
            self.state / f"{key}.{'prefix' if folder else 'object'}.json",
            listing,
            prune=folder,
            fetch=fetch_one,
        )
        return str(self.files / key)


class Storage(DatasetStore):
    def resolve(self, source: str) -> str:
        """A local path for a data source: a pushed dataset's name (fetched to the node's cache, verified), an object
        or folder on S3 (cached by ETag and size), or a local path (as is; it wins over a dataset). Raises DataError."""
        if source.startswith("builtin:"):
            return source  # the data module's own data sets; nothing to fetch
        if source.startswith("s3://"):
            # Taken literally, as the AWS CLI does: a key may hold '%', '?' or '#'.
            bucket, _, key = source[len("s3://") :].partition("/")
            if not bucket or not key:
                raise _data_error(f"data source '{source}': use s3://bucket/key (an object) or s3://bucket/prefix/")
            return _S3SourceFetcher(self, bucket).fetch(key)
        if source.startswith("file://"):
            return unquote(urlparse(source).path)
        if os.path.exists(os.path.expanduser(source)) or not DATASET_NAME.fullmatch(source):
            return source
        try:
            found = self._read_manifest(source)
        except StorageError as exc:
            raise _data_error(f"data source '{source}': {exc}") from exc
        if found is None:
            raise _data_error(
                f"data source '{source}': no such local file, and no dataset of that name in "
                f"{self.uri(DATASETS)}{self._endpoint_note()} (`aeforge data ls` lists them)"
            )
        manifest, raw = found
        digest, files = hashlib.sha256(raw).hexdigest(), {f["path"]: f for f in manifest["files"]}
        dest = self.cache_dir / DATASETS / source / digest  # a dataset pushed again gets a new folder

        def fetch(rel: str, target: Path) -> None:
            f, relpath = files[rel], f"{self._dataset_prefix(source)}/files/{rel}"
            if target.is_file() and target.stat().st_size == f["size"] and sha256_file(target) == f["sha256"]:
                return  # left by an interrupted fetch, and its content checks out
            try:
                with self._open_read(relpath) as stream:
                    write_file(stream, target, self.cache_dir / ".partial", f["size"], f["sha256"])
            except StorageError as exc:
                raise _data_error(f"dataset '{source}' file {rel} ({self.uri(relpath)}): {exc}") from exc

        _sync(dest, dest.with_name(f"{digest}.complete.json"), {rel: f["sha256"] for rel, f in files.items()}, fetch)
        return str(dest) if manifest["layout"] == "folder" else str(dest / manifest["files"][0]["path"])


def resolver_from_settings() -> Callable[[str], str]:
    """The resolver for ``open_dataset(config, resolve=...)``: the storage of AEFORGE_STORAGE's ``resolve``."""
    resolve: Callable[[str], str] = Storage.from_settings().resolve
    return resolve
