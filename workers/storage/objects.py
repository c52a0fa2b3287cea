"""Objects under relative paths in one root, a local folder (``file://``) or ``s3://bucket/prefix`` (AWS or compatible),
through a pyarrow ``SubTreeFileSystem``; a local write is staged under a name listings skip, then renamed into place.
boto3 only where S3's own API is the point: the preflight, and S3 writes, whose sha256 user metadata pyarrow drops."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from workers import settings
from workers.errors import AeforgeError

PREFLIGHT_PREFIX, LOCAL_STAGING_MARK = ".aeforge-preflight", ".aeforge-part-"
SHA256_METADATA = "sha256"  # user metadata key (x-amz-meta-sha256) of objects put by aeforge
CHUNK = 1 << 20
# (connect timeout s, read timeout s, attempts): ordinary traffic rides out a flaky endpoint, a preflight is quick
TIMEOUTS, PREFLIGHT_TIMEOUTS = (5, 60, 5), (2, 5, 2)
_ACCESS_DENIED = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "Forbidden",
    "AllAccessDisabled",
    "InvalidClientTokenId",
}
NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_SESSION_LOCK, _session = threading.Lock(), None  # one boto3 session keeps botocore's loaded service models


class StorageError(AeforgeError, ValueError):
    """Storage that cannot be used, or an object or dataset that is not there. The message says which and why."""


class StorageUnreachable(StorageError):
    """The endpoint did not answer (refused, timed out, or a 5xx): an outage that may pass, unlike a wrong bucket."""


class ObjectNotFound(StorageError):
    """No object at that path."""


def clean_relpath(relpath: str, what: str = "path", allow_empty: bool = False) -> str:
    """A '/'-separated relative path with no empty, '.' or '..' segments (so it cannot leave its folder)."""
    cleaned = str(relpath).strip("/")
    if not cleaned and not allow_empty:
        raise StorageError(f"empty {what}")
    if cleaned and (any(p in ("", ".", "..") for p in cleaned.split("/")) or "\\" in cleaned or "\x00" in cleaned):
        raise StorageError(f"invalid {what} {relpath!r}: it must be a relative path without '.', '..' or empty parts")
    return cleaned


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_file(
    stream: IO[bytes], target: Path, staging: Path | None = None, size: int | None = None, sha256: str | None = None
) -> Path:
    """Copy ``stream`` to a file in ``staging`` (default: target's folder) and rename it to ``target``, unless it is
    not ``size`` bytes or its sha256 is not ``sha256`` (StorageError): ``target`` only ever holds a checked file."""
    tmp = (staging or target.parent) / f"{LOCAL_STAGING_MARK}{uuid.uuid4().hex}-{target.name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    digest, written = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                digest.update(chunk)
                written += out.write(chunk)
        if size is not None and written != size:
            raise StorageError(f"downloaded {written} bytes, expected {size}; the copy was discarded")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise StorageError(f"sha256 mismatch (expected {sha256}, got {digest.hexdigest()}); the copy was discarded")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target


CREDENTIAL_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
ENV_KEYS_SOURCE = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"


def read_credentials_file(path: Path) -> dict[str, str]:
    """The S3 keys in ``path`` (AEFORGE_S3_CREDENTIALS_FILE, typically a mounted secret): ``aws_access_key_id``,
    ``aws_secret_access_key`` and optionally ``aws_session_token``, either as a YAML/JSON mapping or in the AWS
    shared-credentials INI format (the ``[default]`` profile, or AWS_PROFILE's). Every error is a StorageError that
    names the file and never quotes its content."""
    what = f"AEFORGE_S3_CREDENTIALS_FILE={str(path)!r}"
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise StorageError(f"{what}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise StorageError(f"{what}: cannot read the file: {reason}") from None
    first = next(
        (line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith(("#", ";"))), ""
    )
    values = _ini_credentials(text, what) if first.startswith("[") else _mapping_credentials(text, what)
    missing = [k for k in CREDENTIAL_KEYS[:2] if not values.get(k)]
    if missing:
        raise StorageError(f"{what}: no {' and no '.join(missing)} in the file")
    return {k: values[k] for k in CREDENTIAL_KEYS if values.get(k)}


def _mapping_credentials(text: str, what: str) -> dict[str, str]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # its message quotes the line: only say where
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise StorageError(f"{what}: not a YAML/JSON mapping nor an AWS credentials file{where}") from None
    if not isinstance(data, dict):
        raise StorageError(
            f"{what}: expected a mapping with {', '.join(CREDENTIAL_KEYS)} (the last is optional), "
            f"or an AWS credentials file with a [default] profile"
        )
    values = {str(k).lower(): v for k, v in data.items()}
    unknown = sorted(set(values) - set(CREDENTIAL_KEYS))
    if unknown:
        raise StorageError(f"{what}: unknown key(s) {', '.join(unknown)}; expected {', '.join(CREDENTIAL_KEYS)}")
    for key, value in values.items():
        if value is not None and not isinstance(value, str):
            raise StorageError(f"{what}: {key} must be a string (quote it)")
    return {k: v.strip() for k, v in values.items() if v}


def _ini_credentials(text: str, what: str) -> dict[str, str]:
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error as exc:  # its message quotes the lines: only say where
        lines = sorted(
            {n for n, _ in getattr(exc, "errors", [])}
            | ({lineno} if (lineno := getattr(exc, "lineno", None)) else set())
        )
        where = f" (line {', '.join(map(str, lines))})" if lines else ""
        raise StorageError(f"{what}: not a valid AWS credentials (INI) file{where}") from None
    profile = os.environ.get("AWS_PROFILE") or "default"
    if not parser.has_section(profile):
        raise StorageError(f"{what}: no [{profile}] profile in the AWS credentials file")
    return {k: parser.get(profile, k).strip() for k in CREDENTIAL_KEYS if parser.has_option(profile, k)}


@dataclass(frozen=True)
class S3Connection:
    """Where S3 is and how to sign for it. Secrets are kept out of repr and out of every message.

    No keys (both None): boto3's and pyarrow's default credential chains apply (an instance profile, IRSA, the AWS
    shared credentials file)."""

    endpoint_url: str | None
    region: str
    access_key_id: str | None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    keys_source: str = field(default=ENV_KEYS_SOURCE, compare=False)  # where the keys came from, for messages

    @classmethod
    def from_settings(cls) -> S3Connection:
        """Keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN); when the secret key is not
        set, from AEFORGE_S3_CREDENTIALS_FILE (read each time: a rotated secret is picked up); else none."""
        env = os.environ.get
        endpoint, region = settings.s3_endpoint_url(), env("AWS_DEFAULT_REGION") or env("AWS_REGION") or "us-east-1"
        path = settings.s3_credentials_file()
        if not env("AWS_SECRET_ACCESS_KEY") and path is not None:
            keys = read_credentials_file(path)
            return cls(
                endpoint,
                region,
                keys["aws_access_key_id"],
                keys["aws_secret_access_key"],
                keys.get("aws_session_token"),
                keys_source=f"the keys in {path}",
            )
        return cls(
            endpoint,
            region,
            env("AWS_ACCESS_KEY_ID") or None,
            env("AWS_SECRET_ACCESS_KEY") or None,
            env("AWS_SESSION_TOKEN") or None,
        )

    @property
    def endpoint_name(self) -> str:
        return self.endpoint_url or "AWS S3 (default endpoint)"

    def redact(self, text: str) -> str:  # whatever library wrote the text
        for secret in (self.secret_access_key, self.session_token):
            text = text.replace(secret, "***") if secret else text
        return text

    def client(self, *, preflight: bool = False):
        import boto3
        from botocore.config import Config

        connect, read, attempts = PREFLIGHT_TIMEOUTS if preflight else TIMEOUTS
        options: dict[str, Any] = {
            "connect_timeout": connect,
            "read_timeout": read,
            "retries": {"mode": "standard", "total_max_attempts": attempts},
        }
        if self.endpoint_url:  # S3-compatible: path-style buckets, no CRC checksums by default (old MinIO, Ceph)
            options.update(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
        global _session
        with _SESSION_LOCK:  # making clients from a session is not thread-safe; using them is
            _session = _session or boto3.session.Session()
            return _session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=self.access_key_id,
                aws_secret_access_key=self.secret_access_key,
                aws_session_token=self.session_token,
                config=Config(**options),
            )

    def pyarrow_filesystem(self) -> pafs.S3FileSystem:
        retry = pafs.AwsStandardS3RetryStrategy(max_attempts=TIMEOUTS[2])
        options: dict[str, Any] = {
            "region": self.region,
            "connect_timeout": TIMEOUTS[0],
            "request_timeout": TIMEOUTS[1],
            "retry_strategy": retry,
        }
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise StorageError(f"AEFORGE_S3_ENDPOINT_URL={self.endpoint_url!r} is not an http(s)://host[:port] URL")
            options.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme)
        return pafs.S3FileSystem(**options, **self.pyarrow_keys())

    def pyarrow_keys(self) -> dict[str, str]:
        keys = {
            "access_key": self.access_key_id,
            "secret_key": self.secret_access_key,
            "session_token": self.session_token,
        }
        return {k: v for k, v in keys.items() if v} if self.access_key_id and self.secret_access_key else {}


def client_error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(response.get("Error", {}).get("Code", "") or status or "")


def s3_errors(*also: type[Exception]) -> tuple[type[Exception], ...]:
    """boto3's errors (imported when an except clause needs them) and ``also``, for one except clause."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (*also, ClientError, BotoCoreError, Boto3Error)  # Boto3Error: a failed upload


def is_outage(exc: Exception) -> bool:
    """An endpoint that did not answer, or answered that it cannot now (5xx, SlowDown): worth asking again."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import ReadTimeoutError

    code = client_error_code(exc)
    return (
        isinstance(exc, (BotoConnectionError, ReadTimeoutError))
        or code.startswith("5")
        or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout")
    )


def explain_s3_error(exc: Exception, conn: S3Connection, bucket: str) -> str:
    """One sentence on what went wrong talking to S3, naming the endpoint and bucket; never the secret key."""
    from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError

    where, code = f"S3 endpoint {conn.endpoint_name}, bucket '{bucket}'", client_error_code(exc)
    detail = (getattr(exc, "response", None) or {}).get("Error", {}).get("Message") or code
    text = f"{where}: {code}: {detail}" if isinstance(exc, ClientError) else f"{where}: {type(exc).__name__}: {exc}"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        text = f"cannot connect to {where}: is the endpoint URL (AEFORGE_S3_ENDPOINT_URL) right and the server up?"
    elif isinstance(exc, NoCredentialsError):
        text = (
            f"{where}: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
            f"AEFORGE_S3_CREDENTIALS_FILE where this runs (on a Ray cluster: in the nodes' environment), "
            f"or give the machine an instance role"
        )
    elif isinstance(exc, ClientError) and code in _ACCESS_DENIED:
        text = (
            f"access denied at {where} for access key id '{conn.access_key_id}' ({code}: {detail}): check "
            f"{conn.keys_source} and the bucket's policy"
        )
    elif code == "NoSuchBucket":
        text = f"bucket '{bucket}' does not exist at S3 endpoint {conn.endpoint_name}"
    return conn.redact(text)


class ObjectStore:
    """Objects under relative paths in a local folder ``root`` or under ``prefix`` in an S3 ``bucket``."""

    def __init__(
        self,
        *,
        cache_dir: Path,
        s3: S3Connection,
        root: Path | None = None,
        bucket: str | None = None,
        prefix: str = "",
    ):
        self.cache_dir, self.s3, self.root, self.bucket, self.prefix = Path(cache_dir), s3, root, bucket, prefix
        self.base_path = str(root) if bucket is None else "/".join(p for p in (bucket, prefix) if p)

    @classmethod
    def from_settings(cls):
        """The storage named by AEFORGE_STORAGE (default: AEFORGE_HOME/storage), caching under AEFORGE_HOME/cache."""
        return cls.from_uri(settings.storage_uri(), cache_dir=settings.home() / "cache")

    @classmethod
    def from_uri(cls, uri: str, *, cache_dir: Path, s3: S3Connection | None = None):
        s3, parsed = s3 or S3Connection.from_settings(), urlparse(uri)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise StorageError(f"AEFORGE_STORAGE={uri!r}: no bucket; use s3://bucket/prefix")
            prefix = clean_relpath(parsed.path, "prefix of AEFORGE_STORAGE", allow_empty=True)
            return cls(cache_dir=cache_dir, s3=s3, bucket=parsed.netloc, prefix=prefix)
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StorageError(f"AEFORGE_STORAGE={uri!r}: a file URI needs an absolute path, as in file:///data/x")
        root = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)
        if parsed.scheme not in ("file", "") or not root.is_absolute():
            raise StorageError(f"AEFORGE_STORAGE={uri!r}: use file:///path or s3://bucket/prefix")
        return cls(cache_dir=cache_dir, s3=s3, root=root)

    @functools.cached_property
    def fs(self) -> pafs.SubTreeFileSystem:
        """The storage root as a pyarrow filesystem whose paths are the objects' relative paths."""
        base = pafs.LocalFileSystem() if self.bucket is None else self.s3.pyarrow_filesystem()
        return pafs.SubTreeFileSystem(self.base_path, base)

    def pyarrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """(filesystem, base path) for Ray: RunConfig(storage_path=base + "/ray", storage_filesystem=fs)."""
        return self.fs.base_fs, self.base_path

    @functools.cached_property
    def client(self):
        return self.s3.client()  # S3 writes, and s3:// data sources on any storage

    def uri(self, relpath: str = "") -> str:
        cleaned = clean_relpath(relpath, allow_empty=True)
        if self.bucket is None:
            return self._local_path(cleaned).as_uri()
        return f"s3://{self.bucket}/{self._key(cleaned)}".rstrip("/")

    def _local_path(self, relpath: str) -> Path:
        assert self.root is not None, "storage without a bucket is a local folder, its root"
        return self.root / relpath

    def _key(self, relpath: str) -> str:
        return "/".join(p for p in (self.prefix, relpath) if p)

    def _endpoint_note(self) -> str:
        return "" if self.bucket is None else f" at S3 endpoint {self.s3.endpoint_name}"

    @contextlib.contextmanager
    def _errors(self, what: str, missing: str | None = None) -> Iterator[None]:
        """pyarrow's and boto3's errors as one StorageError sentence; ObjectNotFound if ``missing`` is not there."""
        try:
            yield
        except s3_errors(OSError) as exc:
            if missing is not None and (isinstance(exc, FileNotFoundError) or client_error_code(exc) in NOT_FOUND):
                raise ObjectNotFound(f"no object {self.uri(missing)}{self._endpoint_note()}") from None
            if not isinstance(exc, OSError):
                raise StorageError(f"{what}: {explain_s3_error(exc, self.s3, self.bucket or '')}") from None
            raise StorageError(f"{what}{self._endpoint_note()}: {self.s3.redact(exc.strerror or str(exc))}") from None

    def put_file(self, local_path: Path | str, relpath: str) -> None:
        """Upload a local file to relpath (all or nothing: a reader never sees part of it)."""
        if not Path(local_path).is_file():
            raise StorageError(f"no such file: {local_path}")
        with open(local_path, "rb") as fh:
            self._put(fh, relpath, sha256_file(Path(local_path)))

    def put_bytes(self, data: bytes, relpath: str) -> None:
        self._put(io.BytesIO(data), relpath, hashlib.sha256(data).hexdigest())

    def _put(self, stream: IO[bytes], relpath: str, sha256: str) -> None:
        path = clean_relpath(relpath)
        with self._errors(f"write of {self.uri(path)}"):
            if self.bucket is not None:
                return self.client.upload_fileobj(
                    stream, self.bucket, self._key(path), ExtraArgs={"Metadata": {SHA256_METADATA: sha256}}
                )
            write_file(stream, self._local_path(path))

    @contextlib.contextmanager
    def _open_read(self, relpath: str) -> Iterator[IO[bytes]]:
        path = clean_relpath(relpath)
        with self._errors(f"read of {self.uri(path)}", missing=path):
            stream = self.fs.open_input_stream(path)
        with stream, self._errors(f"read of {self.uri(path)}"):
            yield stream

    def get_bytes(self, relpath: str) -> bytes:
        with self._open_read(relpath) as stream:
            return stream.read()

    def get_file(self, relpath: str, target: Path | str) -> Path:
        with self._open_read(relpath) as stream:
            return write_file(stream, Path(target))

    def _infos(self, prefix: str, recursive: bool = True) -> list[pafs.FileInfo]:
        with self._errors(f"listing of {self.uri(prefix)}"):
            return self.fs.get_file_info(pafs.FileSelector(prefix, recursive=recursive, allow_not_found=True))

    def list_prefix(self, prefix: str = "") -> list[str]:
        """Relative paths of all objects under a folder-like prefix, sorted ('runs/x' lists 'runs/x/...')."""
        return sorted(
            i.path
            for i in self._infos(clean_relpath(prefix, "prefix", allow_empty=True))
            if i.type == pafs.FileType.File and not i.base_name.startswith(LOCAL_STAGING_MARK)
        )

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under a folder-like prefix; returns how many. The storage root cannot be deleted."""
        prefix = clean_relpath(prefix, "prefix")
        count = len(self.list_prefix(prefix))
        if count:
            with self._errors(f"delete under {self.uri(prefix)}"):
                self.fs.delete_dir(prefix)
        return count

    def delete(self, relpath: str) -> None:
        path = clean_relpath(relpath)
        with self._errors(f"delete of {self.uri(path)}", missing=path):
            self.fs.delete_file(path)

    def exists(self, relpath: str) -> bool:
        path = clean_relpath(relpath)
        with self._errors(f"look-up of {self.uri(path)}"):
            return self.fs.get_file_info(path).type == pafs.FileType.File

    def preflight(self, wait_s: float = 0.0, sleep=time.sleep) -> None:
        """Check that this storage can be reached and written; StorageError saying what is wrong if not. An
        endpoint that does not answer is asked again for up to ``wait_s`` seconds (with back-off) first."""
        deadline, delay = time.monotonic() + wait_s, 1.0
        while True:
            try:
                return self._preflight_once()
            except StorageUnreachable as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    if wait_s > 0:
                        raise StorageUnreachable(
                            f"{exc} (still unreachable after {wait_s:g} s of retries; "
                            f"AEFORGE_STORAGE_WAIT_S sets how long)"
                        ) from None
                    raise
                delay = min(delay * 2, 30.0, left)
                print(f"aeforge: {exc}; trying again in {delay:.0f} s ({left:.0f} s left)", flush=True)
                sleep(delay)

    def _preflight_once(self) -> None:
        probe = f"{PREFLIGHT_PREFIX}/{uuid.uuid4().hex}"
        if self.bucket is None:
            try:
                self.put_bytes(b"aeforge preflight", probe)
                return self.delete(probe)
            except StorageError as exc:
                raise StorageError(f"AEFORGE_STORAGE={self.uri()}: cannot create or write the folder: {exc}") from None
        client = self.s3.client(preflight=True)
        what = f"storage preflight (AEFORGE_STORAGE={self.uri()} at endpoint {self.s3.endpoint_name})"
        try:  # listing (not HeadBucket, whose 403 has no body) says which of key id, signature or policy is wrong
            client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), MaxKeys=1)
            what += f": bucket '{self.bucket}' is not writable under '{self.prefix or '/'}'"
            client.put_object(Bucket=self.bucket, Key=self._key(probe), Body=b"aeforge preflight")
            client.delete_object(Bucket=self.bucket, Key=self._key(probe))
        except s3_errors() as exc:
            kind = StorageUnreachable if is_outage(exc) else StorageError
            raise kind(f"{what}: {explain_s3_error(exc, self.s3, self.bucket)}") from None
