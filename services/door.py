"""The data check a submission gets at the queue's door: the same check `aeforge validate` makes (jobs.spec.check_data:
the data source opens, the model's architecture fits its images, the global batch fits the training set, the
scored factors exist), run by the service on what it can reach, so that a spec whose data is missing is refused in
a second instead of failing on the cluster a minute later.

What the service can reach: the built-in data sets, and local paths (a ``file://`` URL or a path) that exist on its
machine. A pushed dataset or an ``s3://`` object is checked for existence in the service's storage when the service
has storage settings; its contents are checked by the job when it starts, and the submission's notes say so. What
could not be checked at all (storage down, a check over its time) is a note too, never a refusal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

# A check slower than this (a storage endpoint that does not answer) is left to the job.
DOOR_CHECK_S = 10.0


@dataclass
class DoorCheck:
    """``errors``: field-level problems that refuse the submission (jobs.spec's {"loc", "msg"} entries);
    ``notes``: what was not checked, and why."""

    errors: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_at_door(spec: Any, timeout_s: float | None = None) -> DoorCheck:
    """The data check of a parsed JobSpec, within ``timeout_s`` (default DOOR_CHECK_S; past it, a note)."""
    source = getattr(getattr(spec, "data", None), "source", None)
    if not isinstance(source, str):
        return DoorCheck()  # not a job spec with data (another validator's object)
    timeout_s = DOOR_CHECK_S if timeout_s is None else timeout_s
    try:
        load_checks()  # the deadline is for endpoints that do not answer, not for a slow first import
    except ImportError as exc:  # the service's own Python lacks a reader's library: the job checks the data
        return DoorCheck(notes=[f"data.source '{source}' was not checked: {type(exc).__name__}: {exc}"])
    if source.startswith("builtin:"):
        # Nothing to wait for (no file, no endpoint): checked here, not in a thread of its own, whose start and join
        # cost a submission ten times the check itself (0.22 ms against 0.016).
        return _check(spec)
    outcome: dict[str, DoorCheck] = {}

    def target() -> None:
        outcome["check"] = _check(spec)

    thread = threading.Thread(target=target, name="aeforge-door-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "check" in outcome:
        return outcome["check"]
    return DoorCheck(
        notes=[f"data.source '{source}' was not checked: no answer within {timeout_s:g} s; the job checks it"]
    )


def load_checks() -> None:
    """Import what the check uses (the data readers, the architectures and with them torch: seconds on a busy
    machine). The service calls it in a thread when it starts, so the first submission does not wait for it."""
    import jobs.spec  # noqa: F401
    import workers.data
    import workers.models.architectures  # noqa: F401


def warm_up() -> None:
    """:func:`load_checks` and one memory estimate (jobs.limits.warm_up), in the background at the service's start;
    an import that fails is told per submission."""
    from jobs.limits import warm_up as warm_limits

    with contextlib.suppress(ImportError):
        load_checks()
    try:
        warm_limits()
    except Exception as exc:  # the first submission pays the cost instead; nothing else depends on it
        log.warning("warming up the memory estimate failed (%s: %s)", type(exc).__name__, exc)


def _check(spec: Any) -> DoorCheck:
    from jobs.spec import SpecError, check_data
    from workers.storage import DATASET_NAME

    source: str = spec.data.source
    local = unquote(urlparse(source).path) if source.startswith("file://") else source
    if source.startswith("builtin:") or (not source.startswith("s3://") and os.path.exists(os.path.expanduser(local))):
        try:
            check_data(spec, resolve=lambda s: local if s == source else s)
        except SpecError as exc:
            return DoorCheck(errors=exc.errors)
        except Exception as exc:  # a file the service cannot read as data: the job would fail the same way
            return DoorCheck(errors=[{"loc": "data.source", "msg": f"{type(exc).__name__}: {exc}"}])
        return DoorCheck()
    if not source.startswith("s3://") and not source.startswith("file://") and DATASET_NAME.fullmatch(source):
        return _check_dataset(source)
    if source.startswith("s3://"):
        return _check_object(source)
    return DoorCheck(
        errors=[
            {
                "loc": "data.source",
                "msg": f"no such file or folder: {local!r} (the service looked on its own machine; the job reads "
                f"it on the Ray nodes: push it with `aeforge data push` or put it on s3://)",
            }
        ]
    )


def _check_dataset(name: str) -> DoorCheck:
    from workers.storage import DATASETS, Storage, StorageError

    try:
        storage = Storage.from_settings()
        if storage._read_manifest(name) is None:
            return DoorCheck(
                errors=[
                    {
                        "loc": "data.source",
                        "msg": f"no such local file, and no dataset named '{name}' in {storage.uri(DATASETS)} "
                        f"(`aeforge data ls` lists them)",
                    }
                ]
            )
    except StorageError as exc:
        return DoorCheck(notes=[f"data.source '{name}' was not checked: {exc}; the job checks it"])
    except Exception as exc:
        return DoorCheck(notes=[f"data.source '{name}' was not checked: {exc}; the job checks it"])
    return DoorCheck(notes=[f"data.source '{name}': the dataset exists; its images are checked when the job starts"])


def _check_object(source: str) -> DoorCheck:
    from workers.storage import Storage

    bucket, _, key = source[len("s3://") :].partition("/")
    try:
        client = Storage.from_settings().s3.client()
        if key.endswith("/"):
            found = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount", 0) > 0
        else:
            client.head_object(Bucket=bucket, Key=key)
            found = True
    except Exception as exc:
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            found = False
        else:
            return DoorCheck(
                notes=[f"data.source '{source}' was not checked from the service: {exc}; the job checks it"]
            )
    if not found:
        return DoorCheck(errors=[{"loc": "data.source", "msg": f"no object or prefix {source}"}])
    return DoorCheck(notes=[f"data.source '{source}' exists; its images are checked when the job starts"])
