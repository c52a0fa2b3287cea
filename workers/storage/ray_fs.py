"""Tune's view of storage: the storage's pyarrow filesystem, except that on S3 it pickles without the keys. Tune pickles
its storage filesystem into the experiment's files (tuner.pkl, experiment and searcher state); unpickled (the sweep's
driver on restore, Tune's trial actors), a :class:`TuneS3FileSystem` takes its keys from the environment or else from
Ray's in-memory key-value store, where the sweep's driver puts them for the run (:func:`share_s3_keys`)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow.fs

from workers import settings
from workers.storage.objects import TIMEOUTS, S3Connection

_KV_NAMESPACE = "aeforge"


def _rebuild_tune_s3(options: dict[str, Any], kv_key: str | None, keys: dict[str, str] | None = None):
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

    def __reduce__(self):
        return (_rebuild_tune_s3, self._aeforge_public)


def tune_filesystem(storage, kv_key: str | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
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
