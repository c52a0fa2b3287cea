"""A queued job's spec, passed by reference: the dispatcher writes the JSON it stored at submission to the storage
(``specs/<job id>.json``) and gives the job the object's path and its SHA-256; the job reads it back and checks the
digest. Not in the job's environment: an environment string of 128 KiB or more fails ``exec`` with E2BIG (the job
would never start), and a runtime environment is copied into Ray's job records and logs."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping

from workers.storage.objects import StorageError

SPEC_PATH_VARIABLE = "AEFORGE_JOB_SPEC_PATH"
SPEC_SHA256_VARIABLE = "AEFORGE_JOB_SPEC_SHA256"
SPEC_FOLDER = "specs"
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def spec_relpath(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise StorageError(f"job id {job_id!r} cannot name a stored spec")
    return f"{SPEC_FOLDER}/{job_id}.json"


def publish_spec(storage, job_id: str, spec_json: str) -> dict[str, str]:
    """Write ``spec_json`` for ``job_id`` (the same bytes again for a later attempt) and return the variables that
    name it for the job."""
    data = spec_json.encode("utf-8")
    relpath = spec_relpath(job_id)
    storage.put_bytes(data, relpath)
    return {SPEC_PATH_VARIABLE: relpath, SPEC_SHA256_VARIABLE: hashlib.sha256(data).hexdigest()}


def read_spec(storage, environ: Mapping[str, str] | None = None) -> str | None:
    """The spec JSON the variables in ``environ`` (default: this process's) name, checked against its digest; None
    when they name none. StorageError when it cannot be read or is not what the queue wrote."""
    env = os.environ if environ is None else environ
    relpath = env.get(SPEC_PATH_VARIABLE)
    if not relpath:
        return None
    data = storage.get_bytes(relpath)
    expected = env.get(SPEC_SHA256_VARIABLE)
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise StorageError(
            f"the spec at {storage.uri(relpath)} is not the one the queue wrote (its SHA-256 differs); "
            f"the job's spec was replaced or damaged in storage"
        )
    return data.decode("utf-8")
