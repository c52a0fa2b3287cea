"""Tune's view of storage: the storage's pyarrow filesystem, except that on S3 it pickles without the keys. Tune pickles
its storage filesystem into the experiment's files (tuner.pkl, experiment and searcher state); unpickled (the sweep's
driver on restore, Tune's trial actors), a :class:`TuneS3FileSystem` takes its keys from the environment or else from
Ray's in-memory key-value store, where the sweep's driver puts them for the run (:func:`share_s3_keys`)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs

from workers import settings
from workers.storage.objects import TIMEOUTS, S3Connection

if TYPE_CHECKING:  # the annotation only
    from workers.storage.resolver import Storage

_KV_NAMESPACE = "aeforge"


def _rebuild_tune_s3(
    options: dict[str, Any], kv_key: str | None, keys: dict[str, str] | None = None
) -> TuneS3FileSystem:
    """A TuneS3FileSystem with these options and keys (unpickled: the keys of the environment or of Ray's store)."""
    if keys is None and not (keys := S3Connection.from_settings().pyarrow_keys()):
        try:
            import ray
            from ray.experimental import internal_kv

            raw = kv_key and ray.is_initialized() and internal_kv._internal_kv_get(kv_key, namespace=_KV_NAMESPACE)
        except Exception:  # no cluster to ask: the default credential chain applies
            raw = None
        keys = json.loads(raw) if raw else {}
    retry = pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=TIMEOUTS[2])
    fs = TuneS3FileSystem(**options, **keys, retry_strategy=retry)
    fs._aeforge_public = (dict(options), kv_key)
    return fs


class TuneS3FileSystem(pyarrow.fs.S3FileSystem):
    """pyarrow's S3FileSystem, pickled as its settings without the keys (see the module's docstring)."""

    def __reduce__(self) -> tuple[Callable[..., TuneS3FileSystem], tuple[Any, ...]]:
        return (_rebuild_tune_s3, self._aeforge_public)


def tune_filesystem(storage: Storage, kv_key: str | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, base path) for Tune: the storage's own, but on S3 a :class:`TuneS3FileSystem`."""
    fs, base = storage.pyarrow_filesystem()
    if not isinstance(fs, pyarrow.fs.S3FileSystem):
        return fs, base
    options = {k: v for k, v in fs.__reduce__()[1][0].items() if k not in ("access_key", "secret_key", "session_token")}
    return _rebuild_tune_s3(options, kv_key, storage.s3.pyarrow_keys()), base


def share_s3_keys(kv_key: str, remove: bool = False) -> None:
    """Share this driver's S3 keys with the trial actors in Ray's key-value store (``remove``: take them out)."""
    from ray.experimental import internal_kv

    if remove:
        internal_kv._internal_kv_del(kv_key, namespace=_KV_NAMESPACE)
    elif (keys := S3Connection.from_settings().pyarrow_keys()) and settings.storage_uri().startswith("s3://"):
        internal_kv._internal_kv_put(kv_key, json.dumps(keys).encode(), overwrite=True, namespace=_KV_NAMESPACE)


# What Ray Tune's actor class cache (ray/tune/execution/class_cache.py) copies from the driver's environment into
# every trial actor's runtime environment, which Ray writes in clear to the head's runtime_env_agent.log.
TUNE_COPIED_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


@contextlib.contextmanager
def keys_out_of_environment() -> Iterator[None]:
    """While Tune runs: no S3 key in this driver's environment. Keys that were there are moved to a private
    credentials file (mode 0600 in a 0700 folder, removed afterwards) named by AEFORGE_S3_CREDENTIALS_FILE, which
    this process reads (S3Connection.from_settings) and Tune does not copy; the trials take the node's own keys
    (the environment their raylet started in, a credentials file, an instance role) or the ones share_s3_keys puts
    in Ray's key-value store. Restored on the way out."""
    saved = {name: os.environ[name] for name in TUNE_COPIED_CREDENTIALS if name in os.environ}
    if not saved:
        yield
        return
    previous_file = os.environ.get("AEFORGE_S3_CREDENTIALS_FILE")
    with tempfile.TemporaryDirectory(prefix="aeforge-keys-") as folder:  # made 0700
        if saved.get("AWS_SECRET_ACCESS_KEY"):
            keys = {
                "aws_access_key_id": saved.get("AWS_ACCESS_KEY_ID", ""),
                "aws_secret_access_key": saved["AWS_SECRET_ACCESS_KEY"],
            }
            token = saved.get("AWS_SESSION_TOKEN") or saved.get("AWS_SECURITY_TOKEN")
            if token:
                keys["aws_session_token"] = token
            path = Path(folder) / "credentials.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(keys, f)
            os.environ["AEFORGE_S3_CREDENTIALS_FILE"] = str(path)
        for name in saved:
            del os.environ[name]
        try:
            yield
        finally:
            os.environ.update(saved)
            if previous_file is None:
                os.environ.pop("AEFORGE_S3_CREDENTIALS_FILE", None)
            else:
                os.environ["AEFORGE_S3_CREDENTIALS_FILE"] = previous_file
