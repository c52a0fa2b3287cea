"""Storage on a local folder (``file://``) or an S3-compatible endpoint (``s3://bucket/prefix``).

One interface for both: objects under relative paths (``put_file``, ``get_file``, ``list_prefix``, ...), the
pyarrow filesystem Ray Train writes checkpoints through, a preflight that fails fast with a message naming the
endpoint and bucket, datasets pushed under ``datasets/<name>/`` with a manifest written last, and the resolver
that turns a data source (a dataset name, ``s3://bucket/key``, a local path) into a verified local file.

Layout of a dataset: ``datasets/<name>/files/<relative path>`` and ``datasets/<name>/manifest.json``. A dataset
without a manifest is incomplete: it is never listed or resolved, and the next push of that name clears it.

Resolved copies live in a per-node cache under AEFORGE_HOME/cache; every file is downloaded to a staging name,
checked (size, sha256) and only then renamed into place, under a file lock so that several Ray workers on one
node download once.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterator, get_args
from urllib.parse import unquote, urlparse

from workers import settings

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DATASETS = "datasets"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PREFLIGHT_PREFIX = ".aeforge-preflight"
# Staging files of the local backend; listings skip them so a reader never sees a half-written object.
LOCAL_STAGING_MARK = ".aeforge-part-"
SHA256_METADATA = "sha256"  # user metadata key (x-amz-meta-sha256) of objects put by aeforge

CHUNK = 1 << 20

# Timeouts: ordinary traffic rides out a slow or briefly failing endpoint; the preflight answers in seconds.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 5
PREFLIGHT_CONNECT_TIMEOUT_S = 2
PREFLIGHT_READ_TIMEOUT_S = 5
PREFLIGHT_MAX_ATTEMPTS = 2

_ACCESS_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                  "ExpiredToken", "TokenRefreshRequired", "Forbidden", "AllAccessDisabled", "InvalidClientTokenId"}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


class StorageError(ValueError):
    """Storage that cannot be used, or an object or dataset that is not there. The message says which and why."""


class ObjectNotFound(StorageError):
    """No object at that path."""


def _data_error(message: str) -> ValueError:
    """A DataError: what the resolver raises, so the data module and the spec check report it under data.source.
    Imported here, not at module level: workers.data imports torch, which `aeforge data ls` does not need."""
    from workers.data.base import DataError

    return DataError(message)


def validate_dataset_name(name: str) -> str:
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
        raise StorageError(
            f"invalid dataset name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _clean_relpath(relpath: str, what: str = "path", allow_empty: bool = False) -> str:
    """A '/'-separated relative path with no empty, '.' or '..' segments (so it cannot leave its folder)."""
    cleaned = str(relpath).strip("/")
    if not cleaned:
        if allow_empty:
            return ""
        raise StorageError(f"empty {what}")
    parts = cleaned.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in cleaned or "\x00" in cleaned:
        raise StorageError(f"invalid {what} {relpath!r}: it must be a relative path without '.', '..' or empty parts")
    return cleaned


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def human_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (and threads: each open() is its own lock holder) on one node."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stat_key(path: Path) -> list[int] | None:
    """(size, mtime_ns) of a cached file: what a later resolve compares to see that nobody touched it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _download_verified(stream: IO[bytes], target: Path, staging_dir: Path, *, size: int, sha256: str | None,
                       what: str) -> str:
    """Copy ``stream`` to a staging file, check size and sha256, then rename it to ``target``. Returns the sha256.

    A copy that fails a check is deleted, never renamed: ``target`` only ever holds a verified file.
    """
    staging_dir.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir / f"{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    written = 0
    try:
        with open(tmp, "wb") as out:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
                written += len(chunk)
        if written != size:
            raise _data_error(f"{what}: downloaded {written} bytes, expected {size}; the copy was discarded")
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            raise _data_error(f"{what}: sha256 mismatch (expected {sha256}, got {actual}); the copy was discarded")
        os.replace(tmp, target)
        return actual
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


_BOTO3_SESSION_LOCK = threading.Lock()
_boto3_session = None


# --------------------------------------------------------------------------------------------------------------
# S3 connection (endpoint, region, keys) shared by the S3 backend and by s3:// data sources
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class S3Connection:
    """Where S3 is and how to sign for it. Secrets are kept out of repr and out of every message."""

    endpoint_url: str | None
    region: str
    access_key_id: str | None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls) -> "S3Connection":
        return cls(
            endpoint_url=settings.s3_endpoint_url(),
            region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
            access_key_id=os.environ.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        )

    @property
    def endpoint_name(self) -> str:
        return self.endpoint_url or "AWS S3 (default endpoint)"

    def redact(self, text: str) -> str:
        """The text with the secret key and session token replaced, whatever library wrote it."""
        for secret in (self.secret_access_key, self.session_token):
            if secret:
                text = text.replace(secret, "***")
        return text

    def client(self, *, preflight: bool = False):
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = {
            "connect_timeout": PREFLIGHT_CONNECT_TIMEOUT_S if preflight else CONNECT_TIMEOUT_S,
            "read_timeout": PREFLIGHT_READ_TIMEOUT_S if preflight else READ_TIMEOUT_S,
            "retries": {"mode": "standard", "total_max_attempts": PREFLIGHT_MAX_ATTEMPTS if preflight else MAX_ATTEMPTS},
        }
        if self.endpoint_url:
            # S3-compatible servers: path-style buckets, and no default CRC checksums (boto3 >= 1.36 sends and
            # expects them; older MinIO and Ceph reject or lack them).
            options.update(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
        global _boto3_session
        # One session keeps botocore's loaded service models (half the cost of a client); creating clients from
        # it is not thread-safe, using them is.
        with _BOTO3_SESSION_LOCK:
            if _boto3_session is None:
                _boto3_session = boto3.session.Session()
            return _boto3_session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=self.access_key_id,
                aws_secret_access_key=self.secret_access_key,
                aws_session_token=self.session_token,
                config=Config(**options),
            )

    def pyarrow_filesystem(self):
        from pyarrow import fs

        options: dict[str, Any] = {
            "region": self.region,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "request_timeout": READ_TIMEOUT_S,
            "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        }
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise StorageError(f"AEFORGE_S3_ENDPOINT_URL={self.endpoint_url!r} is not an http(s)://host[:port] URL")
            options["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
            options["scheme"] = parsed.scheme
        if self.access_key_id and self.secret_access_key:
            options.update(access_key=self.access_key_id, secret_key=self.secret_access_key)
            if self.session_token:
                options["session_token"] = self.session_token
        return fs.S3FileSystem(**options)


def _client_error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    if not code:
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(status) if status else ""
    return code


def _is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and _client_error_code(exc) in _NOT_FOUND


def _explain_s3_error(exc: Exception, conn: S3Connection, bucket: str) -> str:
    """One sentence on what went wrong talking to S3, naming the endpoint and bucket; never the secret key."""
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError,
                                     ReadTimeoutError)

    where = f"S3 endpoint {conn.endpoint_name}, bucket '{bucket}'"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        text = f"cannot connect to {where}: is the endpoint URL (AEFORGE_S3_ENDPOINT_URL) right and the server up?"
    elif isinstance(exc, ReadTimeoutError):
        text = f"{where}: no answer in time ({exc})"
    elif isinstance(exc, NoCredentialsError):
        text = f"{where}: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    elif isinstance(exc, ClientError):
        code = _client_error_code(exc)
        detail = exc.response.get("Error", {}).get("Message") or code
        if code in _ACCESS_DENIED:
            text = (f"access denied at {where} for access key id '{conn.access_key_id}' ({code}: {detail}): check "
                    f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy")
        elif code == "NoSuchBucket" or (code == "404" and exc.operation_name == "HeadBucket"):
            text = f"bucket '{bucket}' does not exist at S3 endpoint {conn.endpoint_name}"
        else:
            text = f"{where}: {code}: {detail}"
    else:
        text = f"{where}: {type(exc).__name__}: {exc}"
    return conn.redact(text)


# --------------------------------------------------------------------------------------------------------------
# Storage: the interface, with datasets and the resolver built on five primitives each backend provides
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectInfo:
    relpath: str
    size: int


class Storage(abc.ABC):
    """Objects under relative paths in one storage root. Use :meth:`from_settings`."""

    def __init__(self, cache_dir: Path, s3: S3Connection):
        self.cache_dir = Path(cache_dir)
        self.s3 = s3  # for s3:// data sources, whatever the backend
        self._source_client = None

    def _s3_source_client(self):
        """The boto3 client s3:// data sources are fetched with (made on first use)."""
        if self._source_client is None:
            self._source_client = self.s3.client()
        return self._source_client

    # --- construction --------------------------------------------------------------------------------------
    @staticmethod
    def from_settings() -> "Storage":
        """The storage named by AEFORGE_STORAGE (default: AEFORGE_HOME/storage), caching under AEFORGE_HOME/cache."""
        return Storage.from_uri(settings.storage_uri(), cache_dir=settings.home() / "cache",
                                s3=S3Connection.from_settings())

    @staticmethod
    def from_uri(uri: str, *, cache_dir: Path, s3: S3Connection | None = None) -> "Storage":
        s3 = s3 or S3Connection.from_settings()
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise StorageError(f"AEFORGE_STORAGE={uri!r}: a file URI needs an absolute path, as in file:///data/aeforge")
            return LocalStorage(Path(unquote(parsed.path)), cache_dir=cache_dir, s3=s3)
        if parsed.scheme == "" and uri.startswith("/"):
            return LocalStorage(Path(uri), cache_dir=cache_dir, s3=s3)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise StorageError(f"AEFORGE_STORAGE={uri!r}: no bucket; use s3://bucket/prefix")
            prefix = _clean_relpath(parsed.path, "prefix of AEFORGE_STORAGE", allow_empty=True)
            return S3Storage(parsed.netloc, prefix, cache_dir=cache_dir, s3=s3)
        raise StorageError(f"AEFORGE_STORAGE={uri!r}: use file:///path or s3://bucket/prefix")

    # --- what each backend provides ------------------------------------------------------------------------
    @abc.abstractmethod
    def uri(self, relpath: str = "") -> str:
        """The URI of a path in this storage (s3://bucket/prefix/relpath or file:///root/relpath)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where this storage is, for messages (the endpoint too, for S3)."""

    @abc.abstractmethod
    def put_file(self, local_path: Path | str, relpath: str) -> None:
        """Upload a local file to relpath (all or nothing: a reader never sees part of it)."""

    @abc.abstractmethod
    def put_bytes(self, data: bytes, relpath: str) -> None:
        """Write bytes to relpath (all or nothing)."""

    @abc.abstractmethod
    def _open_read(self, relpath: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A readable binary stream of the object; StorageError naming it if it is not there."""

    @abc.abstractmethod
    def _list(self, prefix: str) -> list[ObjectInfo]:
        """Objects under a folder-like prefix ('' for all), recursively, with their sizes."""

    @abc.abstractmethod
    def _children(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders of a prefix."""

    @abc.abstractmethod
    def _delete(self, relpaths: list[str]) -> None:
        """Delete these objects."""

    @abc.abstractmethod
    def exists(self, relpath: str) -> bool:
        """Whether an object is stored at relpath."""

    @abc.abstractmethod
    def pyarrow_filesystem(self):
        """(pyarrow.fs.FileSystem, base path) for Ray: RunConfig(storage_path=base + "/ray", storage_filesystem=fs)."""

    @abc.abstractmethod
    def preflight(self) -> None:
        """Check that this storage can be reached and written; StorageError saying what is wrong if not."""

    def _endpoint_note(self) -> str:
        """" at S3 endpoint URL" for messages about S3 storage; empty for a local folder."""
        return ""

    # --- objects -------------------------------------------------------------------------------------------
    def get_bytes(self, relpath: str) -> bytes:
        with self._open_read(relpath) as stream:
            return stream.read()

    def get_file(self, relpath: str, target: Path | str) -> Path:
        """Copy an object to a local file (written under a staging name, renamed when complete)."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            with self._open_read(relpath) as stream, open(tmp, "wb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return target

    def list_prefix(self, prefix: str = "") -> list[str]:
        """Relative paths of all objects under a folder-like prefix, sorted ('runs/x' lists 'runs/x/...')."""
        return sorted(o.relpath for o in self._list(_clean_relpath(prefix, "prefix", allow_empty=True)))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under a folder-like prefix; returns how many. The storage root cannot be deleted."""
        prefix = _clean_relpath(prefix, "prefix")
        relpaths = [o.relpath for o in self._list(prefix)]
        self._delete(relpaths)
        return len(relpaths)

    def delete(self, relpath: str) -> None:
        self._delete([_clean_relpath(relpath)])

    # --- datasets ------------------------------------------------------------------------------------------
    def _dataset_prefix(self, name: str) -> str:
        return f"{DATASETS}/{validate_dataset_name(name)}"

    def _read_manifest(self, name: str) -> tuple[dict[str, Any], bytes] | None:
        """(manifest, its bytes) of a complete dataset, or None if there is no manifest."""
        relpath = f"{self._dataset_prefix(name)}/{MANIFEST}"
        try:
            raw = self.get_bytes(relpath)
        except ObjectNotFound:
            return None
        return _parse_manifest(raw, name, self.uri(relpath)), raw

    def manifest(self, name: str) -> dict[str, Any]:
        """The manifest of a pushed dataset; StorageError if there is none."""
        found = self._read_manifest(name)
        if found is None:
            raise StorageError(f"no dataset named '{name}' in {self.uri(DATASETS)} (`aeforge data ls` lists them)")
        return found[0]

    def push(self, paths: list[Path | str], name: str, *, overwrite: bool = False, format: str | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Upload files (or one folder's files, keeping their relative paths) as dataset ``name``; returns the
        manifest. The manifest is written last, so an interrupted push leaves an incomplete dataset that is never
        used. ``format``: idx | npz | folder; inferred from the first file (or the folder) if left out."""
        validate_dataset_name(name)
        entries, layout = _collect_files([Path(p) for p in paths])
        if format is None:
            format = _infer_format(Path(paths[0]))
        elif format not in data_formats():
            raise StorageError(f"unknown format {format!r}: use one of {', '.join(data_formats())}")
        prefix = self._dataset_prefix(name)
        existing = self._read_manifest(name)
        if existing is not None and not overwrite:
            raise StorageError(f"dataset '{name}' already exists (pushed {existing[0].get('created', '?')}); "
                               f"use --overwrite to replace it")
        # The old manifest goes first: from here on the name reads as incomplete until the new manifest lands.
        with contextlib.suppress(ObjectNotFound):
            self.delete(f"{prefix}/{MANIFEST}")
        self.delete_prefix(prefix)

        files = []
        for local, relpath in entries:
            if progress is not None:
                progress(relpath)
            size = local.stat().st_size
            sha256 = _sha256_file(local)
            self.put_file(local, f"{prefix}/files/{relpath}")
            files.append({"path": relpath, "size": size, "sha256": sha256})
        manifest = {
            "aeforge_manifest": MANIFEST_VERSION,
            "name": name,
            "layout": layout,
            "format": format,
            "files": files,
            "size": sum(f["size"] for f in files),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.put_bytes(json.dumps(manifest, indent=2).encode(), f"{prefix}/{MANIFEST}")
        return manifest

    def ls(self) -> list[dict[str, Any]]:
        """Manifests of the complete datasets, by name."""
        manifests = []
        for name in sorted(self._children(DATASETS)):
            if not DATASET_NAME.fullmatch(name):
                continue
            found = self._read_manifest(name)
            if found is not None:
                manifests.append(found[0])
        return manifests

    def rm(self, name: str) -> int:
        """Delete a dataset (manifest first, so a half-deleted dataset is never used); returns the files deleted.
        An incomplete dataset (no manifest) is cleared too."""
        prefix = self._dataset_prefix(name)
        present = self._list(prefix)
        if not present:
            raise StorageError(f"no dataset named '{name}' in {self.uri(DATASETS)} (`aeforge data ls` lists them)")
        with contextlib.suppress(ObjectNotFound):
            self.delete(f"{prefix}/{MANIFEST}")
        self.delete_prefix(prefix)
        return len(present)

    # --- the resolver --------------------------------------------------------------------------------------
    def resolve(self, source: str) -> str:
        """A local path for a data source: a pushed dataset name (fetched to the node's cache and verified), an
        ``s3://bucket/key`` object or ``s3://bucket/prefix/`` folder (cached by ETag and size), or a local path
        (returned as is). An existing local file wins over a dataset of the same name. Raises DataError."""
        if source.startswith("builtin:"):
            return source  # the data module's own data sets; nothing to fetch
        if source.startswith("s3://"):
            return self._resolve_s3(source)
        if source.startswith("file://"):
            return unquote(urlparse(source).path)
        if os.path.exists(os.path.expanduser(source)) or not DATASET_NAME.fullmatch(source):
            return source
        try:
            found = self._read_manifest(source)
        except StorageError as exc:
            raise _data_error(f"data source '{source}': {exc}") from exc
        if found is None:
            raise _data_error(f"data source '{source}': no such local file, and no dataset of that name in "
                              f"{self.uri(DATASETS)}{self._endpoint_note()} (`aeforge data ls` lists them)")
        return self._fetch_dataset(source, *found)

    def _fetch_dataset(self, name: str, manifest: dict[str, Any], raw: bytes) -> str:
        # Keyed by the manifest's hash: a dataset pushed again under the same name gets a fresh folder.
        digest = hashlib.sha256(raw).hexdigest()
        base = self.cache_dir / DATASETS / name
        dest = base / digest
        record_path = base / f"{digest}.complete.json"
        entry = str(dest) if manifest["layout"] == "folder" else str(dest / manifest["files"][0]["path"])
        if _record_matches(record_path, dest, manifest["files"]):
            return entry
        with _file_lock(base / f"{digest}.lock"):
            if _record_matches(record_path, dest, manifest["files"]):
                return entry
            staging = base / f"{digest}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            record = {}
            prefix = self._dataset_prefix(name)
            for f in manifest["files"]:
                target = dest / f["path"]
                # A file already there is kept only if its content checks out (an earlier, interrupted fetch).
                if not (target.is_file() and target.stat().st_size == f["size"] and _sha256_file(target) == f["sha256"]):
                    what = f"dataset '{name}' file {f['path']} ({self.uri(prefix + '/files/' + f['path'])})"
                    try:
                        with self._open_read(f"{prefix}/files/{f['path']}") as stream:
                            _download_verified(stream, target, staging, size=f["size"], sha256=f["sha256"], what=what)
                    except StorageError as exc:
                        raise _data_error(f"{what}: {exc}") from exc
                record[f["path"]] = _stat_key(target)
            shutil.rmtree(staging, ignore_errors=True)
            _write_json_atomic(record_path, record)
        return entry

    def _resolve_s3(self, source: str) -> str:
        # Taken literally, as the AWS CLI does: a key may hold '%', '?' or '#'.
        bucket, _, key = source[len("s3://"):].partition("/")
        if not bucket or not key:
            raise _data_error(f"data source '{source}': use s3://bucket/key for an object or s3://bucket/prefix/ for a folder")
        try:
            clean = _clean_relpath(key, f"S3 key in data source '{source}'")
        except StorageError as exc:
            raise _data_error(str(exc)) from None
        fetcher = _S3SourceFetcher(self.s3, self._s3_source_client(), self.cache_dir / "s3", bucket)
        if key.endswith("/"):
            return fetcher.fetch_prefix(clean)
        return fetcher.fetch_object(clean)


def _parse_manifest(raw: bytes, name: str, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        if not isinstance(files, list) or not files:
            raise ValueError("no files")
        for f in files:
            f["path"] = _clean_relpath(f["path"], "file path")
            if not isinstance(f["size"], int) or f["size"] < 0:
                raise ValueError(f"bad size for {f['path']}")
            if not re.fullmatch(r"[0-9a-f]{64}", str(f["sha256"])):
                raise ValueError(f"bad sha256 for {f['path']}")
        if manifest.get("layout") not in ("files", "folder"):
            raise ValueError(f"unknown layout {manifest.get('layout')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"the manifest of dataset '{name}' ({where}) is invalid: {exc}") from None
    return manifest


def _record_matches(record_path: Path, dest: Path, files: list[dict[str, Any]]) -> bool:
    """True if every file of the manifest is in the cache exactly as it was when it was checked."""
    record = _read_json(record_path)
    if not isinstance(record, dict):
        return False
    return all(record.get(f["path"]) is not None and record[f["path"]] == _stat_key(dest / f["path"]) for f in files)


def _collect_files(paths: list[Path]) -> tuple[list[tuple[Path, str]], str]:
    """(local file, relative path) pairs and the layout ('files' or 'folder') of what `push` was given."""
    if not paths:
        raise StorageError("no files to push")
    for p in paths:
        if not p.exists():
            raise StorageError(f"no such file or folder: {p}")
    if any(p.is_dir() for p in paths):
        if len(paths) != 1:
            raise StorageError("push either one folder or one or more files, not a mix: "
                               + ", ".join(str(p) for p in paths))
        folder = paths[0]
        entries = [(f, f.relative_to(folder).as_posix()) for f in sorted(folder.rglob("*")) if f.is_file()]
        if not entries:
            raise StorageError(f"folder {folder} has no files")
        return entries, "folder"
    entries, seen = [], set()
    for p in paths:
        if not p.is_file():
            raise StorageError(f"not a regular file: {p}")
        if p.name in seen:
            raise StorageError(f"two files named '{p.name}': a dataset keeps files by name")
        seen.add(p.name)
        entries.append((p, p.name))
    return entries, "files"


def data_formats() -> tuple[str, ...]:
    """The values of DataConfig.format (idx, npz, folder)."""
    from workers.config import DataConfig

    annotation = DataConfig.model_fields["format"].annotation
    return tuple(value for arg in get_args(annotation) for value in get_args(arg))


def _infer_format(path: Path) -> str:
    from workers.data import infer_format
    from workers.data.base import DataError

    try:
        return str(infer_format(path))
    except DataError as exc:
        raise StorageError(f"cannot tell the format of {path} ({exc}); give it with --format") from None


# --------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------
class LocalStorage(Storage):
    """Storage in a local (or shared, mounted) folder."""

    def __init__(self, root: Path, *, cache_dir: Path, s3: S3Connection):
        super().__init__(cache_dir, s3)
        if not root.is_absolute():
            raise StorageError(f"local storage root {root} must be an absolute path")
        self.root = root

    def _path(self, relpath: str, allow_empty: bool = False) -> Path:
        cleaned = _clean_relpath(relpath, allow_empty=allow_empty)
        return self.root / cleaned if cleaned else self.root

    def uri(self, relpath: str = "") -> str:
        return self._path(relpath, allow_empty=True).as_uri()

    def describe(self) -> str:
        return f"local storage {self.root}"

    def _write_atomic(self, relpath: str, write: Callable[[Path], None]) -> None:
        target = self._path(relpath)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{LOCAL_STAGING_MARK}{uuid.uuid4().hex}-{target.name}")
            try:
                write(tmp)
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        except OSError as exc:
            raise StorageError(f"cannot write {target} in {self.describe()}: {exc.strerror or exc}") from None

    def put_file(self, local_path: Path | str, relpath: str) -> None:
        local_path = Path(local_path)
        if not local_path.is_file():
            raise StorageError(f"no such file: {local_path}")
        self._write_atomic(relpath, lambda tmp: shutil.copyfile(local_path, tmp))

    def put_bytes(self, data: bytes, relpath: str) -> None:
        self._write_atomic(relpath, lambda tmp: tmp.write_bytes(data))

    @contextlib.contextmanager
    def _open_read(self, relpath: str) -> Iterator[IO[bytes]]:
        path = self._path(relpath)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {self.uri(relpath)}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
        with fh:
            yield fh

    def _list(self, prefix: str) -> list[ObjectInfo]:
        folder = self._path(prefix, allow_empty=True)
        if not folder.is_dir():
            return []
        out = []
        for dirpath, _, filenames in os.walk(folder):
            for filename in filenames:
                if filename.startswith(LOCAL_STAGING_MARK):
                    continue
                path = Path(dirpath) / filename
                with contextlib.suppress(FileNotFoundError):
                    out.append(ObjectInfo(path.relative_to(self.root).as_posix(), path.stat().st_size))
        return out

    def _children(self, prefix: str) -> list[str]:
        folder = self._path(prefix, allow_empty=True)
        if not folder.is_dir():
            return []
        return [p.name for p in folder.iterdir() if p.is_dir()]

    def _delete(self, relpaths: list[str]) -> None:
        touched = set()
        for relpath in relpaths:
            path = self._path(relpath)
            try:
                path.unlink()
            except FileNotFoundError:
                raise ObjectNotFound(f"no object {self.uri(relpath)}") from None
            except OSError as exc:
                raise StorageError(f"cannot delete {path}: {exc.strerror or exc}") from None
            touched.add(path.parent)
        # Folders left empty go too, so a deleted dataset leaves no trace in listings.
        for folder in sorted(touched, key=lambda p: len(p.parts), reverse=True):
            while folder != self.root and folder.is_relative_to(self.root):
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent

    def exists(self, relpath: str) -> bool:
        return self._path(relpath).is_file()

    def pyarrow_filesystem(self):
        from pyarrow import fs

        return fs.LocalFileSystem(), str(self.root)

    def preflight(self) -> None:
        probe = self.root / PREFLIGHT_PREFIX / uuid.uuid4().hex
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"aeforge preflight")
            probe.unlink()
            with contextlib.suppress(OSError):
                probe.parent.rmdir()
        except OSError as exc:
            raise StorageError(f"{self.describe()} (AEFORGE_STORAGE={self.uri()}): cannot create or write the folder: "
                               f"{exc.strerror or exc}") from None


class S3Storage(Storage):
    """Storage under s3://bucket/prefix on AWS or an S3-compatible endpoint (MinIO, Ceph, moto)."""

    def __init__(self, bucket: str, prefix: str, *, cache_dir: Path, s3: S3Connection):
        super().__init__(cache_dir, s3)
        self.bucket = bucket
        self.prefix = prefix
        self._client = None
        self._pyarrow_fs = None

    @property
    def client(self):
        if self._client is None:
            self._client = self.s3.client()
        return self._client

    def _s3_source_client(self):
        return self.client

    def _key(self, relpath: str, allow_empty: bool = False) -> str:
        cleaned = _clean_relpath(relpath, allow_empty=allow_empty)
        return "/".join(p for p in (self.prefix, cleaned) if p)

    def _relpath(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def uri(self, relpath: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(relpath, allow_empty=True)}".rstrip("/")

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at endpoint {self.s3.endpoint_name}"

    def _endpoint_note(self) -> str:
        return f" at S3 endpoint {self.s3.endpoint_name}"

    @contextlib.contextmanager
    def _s3_errors(self, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"{what}: {_explain_s3_error(exc, self.s3, self.bucket)}") from None

    def put_file(self, local_path: Path | str, relpath: str) -> None:
        local_path = Path(local_path)
        if not local_path.is_file():
            raise StorageError(f"no such file: {local_path}")
        key = self._key(relpath)
        extra = {"Metadata": {SHA256_METADATA: _sha256_file(local_path)}}
        with self._s3_errors(f"upload of {local_path} to {self.uri(relpath)}"):
            self.client.upload_file(str(local_path), self.bucket, key, ExtraArgs=extra)

    def put_bytes(self, data: bytes, relpath: str) -> None:
        with self._s3_errors(f"write of {self.uri(relpath)}"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(relpath), Body=data,
                                   Metadata={SHA256_METADATA: hashlib.sha256(data).hexdigest()})

    @contextlib.contextmanager
    def _open_read(self, relpath: str) -> Iterator[IO[bytes]]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(relpath))
        except (ClientError, BotoCoreError) as exc:
            if _is_not_found(exc):
                raise ObjectNotFound(f"no object {self.uri(relpath)} (S3 endpoint {self.s3.endpoint_name})") from None
            raise StorageError(f"read of {self.uri(relpath)}: {_explain_s3_error(exc, self.s3, self.bucket)}") from None
        body = response["Body"]
        try:
            with self._s3_errors(f"read of {self.uri(relpath)}"):
                yield body
        finally:
            body.close()

    def _paginate(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        key_prefix = self._key(prefix, allow_empty=True)
        key_prefix = f"{key_prefix}/" if key_prefix else ""
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key_prefix}
        if delimiter:
            params["Delimiter"] = delimiter
        with self._s3_errors(f"listing of {self.uri(prefix)}"):
            yield from self.client.get_paginator("list_objects_v2").paginate(**params)

    def _list(self, prefix: str) -> list[ObjectInfo]:
        return [ObjectInfo(self._relpath(o["Key"]), int(o["Size"]))
                for page in self._paginate(prefix) for o in page.get("Contents", [])
                if not o["Key"].endswith("/")]

    def _children(self, prefix: str) -> list[str]:
        names = []
        for page in self._paginate(prefix, delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                names.append(common["Prefix"].rstrip("/").rsplit("/", 1)[-1])
        return names

    def _delete(self, relpaths: list[str]) -> None:
        from botocore.exceptions import ClientError

        keys = [self._key(r) for r in relpaths]
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            with self._s3_errors(f"delete under {self.uri()}"):
                try:
                    response = self.client.delete_objects(Bucket=self.bucket,
                                                           Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
                except ClientError as exc:
                    # Some S3-compatible servers want Content-MD5 on DeleteObjects, which boto3 >= 1.36 no longer
                    # sends; one DeleteObject per key works everywhere.
                    if _client_error_code(exc) in _ACCESS_DENIED:
                        raise
                    for key in batch:
                        self.client.delete_object(Bucket=self.bucket, Key=key)
                    continue
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(f"delete under {self.uri()} failed for {len(errors)} object(s), e.g. "
                                   f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}")

    def exists(self, relpath: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(relpath))
        except (ClientError, BotoCoreError) as exc:
            if _is_not_found(exc):
                return False
            raise StorageError(f"look-up of {self.uri(relpath)}: {_explain_s3_error(exc, self.s3, self.bucket)}") from None
        return True

    def pyarrow_filesystem(self):
        if self._pyarrow_fs is None:
            self._pyarrow_fs = self.s3.pyarrow_filesystem()
        # Paths on a pyarrow S3 filesystem are bucket/key, without the s3:// scheme.
        return self._pyarrow_fs, "/".join(p for p in (self.bucket, self.prefix) if p)

    def preflight(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.s3.client(preflight=True)
        where = f"AEFORGE_STORAGE={self.uri()} at endpoint {self.s3.endpoint_name}"
        try:
            # Listing (not HeadBucket, whose 403 has no body) says which of key id, signature or policy is wrong.
            client.list_objects_v2(Bucket=self.bucket, Prefix=self._key("", allow_empty=True), MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"storage preflight ({where}): {_explain_s3_error(exc, self.s3, self.bucket)}") from None
        probe = self._key(f"{PREFLIGHT_PREFIX}/{uuid.uuid4().hex}")
        try:
            client.put_object(Bucket=self.bucket, Key=probe, Body=b"aeforge preflight")
            client.delete_object(Bucket=self.bucket, Key=probe)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"storage preflight ({where}): bucket '{self.bucket}' is not writable under "
                               f"'{self.prefix or '/'}': {_explain_s3_error(exc, self.s3, self.bucket)}") from None


# --------------------------------------------------------------------------------------------------------------
# s3:// data sources
# --------------------------------------------------------------------------------------------------------------
class _S3SourceFetcher:
    """Copies of s3://bucket/key objects (and prefixes) under cache/s3/<bucket>/<key>, reused while their ETag
    and size are unchanged. Records and locks live apart, under cache/s3/.state/ (no bucket name starts with
    '.'), so a cached folder holds only the objects."""

    def __init__(self, conn: S3Connection, client, cache_root: Path, bucket: str):
        self.conn = conn
        self.client = client
        self.bucket = bucket
        self.files = cache_root / bucket
        self.state = cache_root / ".state" / bucket

    def _fail(self, what: str, exc: Exception) -> ValueError:
        if _is_not_found(exc):
            return _data_error(f"data source {what}: not found at S3 endpoint {self.conn.endpoint_name}")
        return _data_error(f"data source {what}: {_explain_s3_error(exc, self.conn, self.bucket)}")

    def _download(self, key: str, etag: str, size: int, target: Path) -> list[int]:
        from botocore.exceptions import BotoCoreError, ClientError

        what = f"s3://{self.bucket}/{key}"
        try:
            # IfMatch: the bytes are those of the version whose ETag and size were checked.
            response = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=etag)
            sha256 = (response.get("Metadata") or {}).get(SHA256_METADATA)
            with contextlib.closing(response["Body"]) as body:
                _download_verified(body, target, self.state / ".partial", size=size, sha256=sha256, what=what)
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, ClientError) and _client_error_code(exc) == "PreconditionFailed":
                raise _data_error(f"data source {what} changed while it was being fetched; run again") from None
            raise self._fail(what, exc) from None
        return _stat_key(target)  # type: ignore[return-value]

    def fetch_object(self, key: str) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        what = f"s3://{self.bucket}/{key}"
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(what, exc) from None
        etag, size = head["ETag"], int(head["ContentLength"])
        target = self.files / key
        record_path = self.state / f"{key}.object.json"

        def cached() -> bool:
            record = _read_json(record_path)
            return (isinstance(record, dict) and record.get("etag") == etag and record.get("size") == size
                    and record.get("stat") == _stat_key(target))

        if not cached():
            with _file_lock(self.state / f"{key}.object.lock"):
                if not cached():
                    stat = self._download(key, etag, size, target)
                    _write_json_atomic(record_path, {"etag": etag, "size": size, "stat": stat})
        return str(target)

    def fetch_prefix(self, prefix: str) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        what = f"s3://{self.bucket}/{prefix}/"
        try:
            listing = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix + "/"):
                for o in page.get("Contents", []):
                    if not o["Key"].endswith("/"):
                        listing[o["Key"][len(prefix) + 1:]] = (o["ETag"], int(o["Size"]))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(what, exc) from None
        if not listing:
            raise _data_error(f"data source {what}: no objects under this prefix at S3 endpoint {self.conn.endpoint_name}")
        for rel in listing:
            try:
                _clean_relpath(rel, "key")
            except StorageError:
                raise _data_error(f"data source {what}: object key {prefix}/{rel} cannot be a local file name") from None
        folder = self.files / prefix
        record_path = self.state / f"{prefix}.prefix.json"

        def up_to_date(record: Any, rel: str) -> bool:
            etag, size = listing[rel]
            entry = record.get(rel) if isinstance(record, dict) else None
            return entry == {"etag": etag, "size": size, "stat": _stat_key(folder / rel)}

        def cached() -> bool:
            record = _read_json(record_path)
            return isinstance(record, dict) and set(record) == set(listing) and all(up_to_date(record, r) for r in listing)

        if not cached():
            with _file_lock(self.state / f"{prefix}.prefix.lock"):
                record = _read_json(record_path)
                record = record if isinstance(record, dict) else {}
                fresh = {}
                for rel, (etag, size) in sorted(listing.items()):
                    if not up_to_date(record, rel):
                        self._download(f"{prefix}/{rel}", etag, size, folder / rel)
                    fresh[rel] = {"etag": etag, "size": size, "stat": _stat_key(folder / rel)}
                # Objects deleted from the prefix leave the cached folder too, or a folder reader would see them.
                for path in sorted(folder.rglob("*"), reverse=True):
                    rel = path.relative_to(folder).as_posix()
                    if path.is_file() and rel not in listing:
                        path.unlink()
                    elif path.is_dir() and not any(path.iterdir()):
                        path.rmdir()
                _write_json_atomic(record_path, fresh)
        return str(folder)


def resolver_from_settings() -> Callable[[str], str]:
    """The resolver for ``open_dataset(config, resolve=...)``: the storage of AEFORGE_STORAGE's ``resolve``."""
    return Storage.from_settings().resolve
