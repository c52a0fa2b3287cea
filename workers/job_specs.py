"""A queued job's spec, passed by reference: the dispatcher writes the JSON it stored at submission into a one-file
Python package (``aeforge_spec_<digest>/spec.json``) that Ray's Jobs API uploads with the submission (its runtime
env's ``py_modules``) and puts on the path of the job's driver on whatever node runs it; the job's environment names
the package and the JSON's SHA-256, and the job reads it back and checks the digest.

Not in the job's environment: an environment string of 128 KiB or more fails ``exec`` with E2BIG (the job would
never start), and a runtime environment is copied into Ray's job records and logs. Not in the job storage either:
the queue service holds no storage credentials (the Ray nodes do), so it could not write there on an S3 deployment.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

from workers.errors import AeforgeError

SPEC_MODULE_VARIABLE = "AEFORGE_JOB_SPEC_MODULE"
SPEC_SHA256_VARIABLE = "AEFORGE_JOB_SPEC_SHA256"
SPEC_FILE = "spec.json"
MODULE_PREFIX = "aeforge_spec_"


class JobSpecError(AeforgeError):
    """The job's spec package is missing or is not what the queue wrote."""


def write_spec_package(parent: Path, spec_json: str) -> tuple[Path, dict[str, str]]:
    """Write ``spec_json`` as a package under ``parent``; its folder (for ``py_modules``) and the variables that
    name it for the job. The package's name comes from the digest, so the same spec makes the same package (Ray
    uploads it once) and two specs never share a name."""
    data = spec_json.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    package = parent / f"{MODULE_PREFIX}{digest[:32]}"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""A queued job\'s spec (aeforge: workers.job_specs)."""\n')
    (package / SPEC_FILE).write_bytes(data)
    return package, {SPEC_MODULE_VARIABLE: package.name, SPEC_SHA256_VARIABLE: digest}


def read_spec(environ: Mapping[str, str] | None = None) -> str | None:
    """The spec JSON the variables in ``environ`` (default: this process's) name, checked against its digest; None
    when they name none. JobSpecError when it cannot be found or is not what the queue wrote."""
    env = os.environ if environ is None else environ
    name = env.get(SPEC_MODULE_VARIABLE)
    if not name:
        return None
    if not name.startswith(MODULE_PREFIX) or not name.isidentifier():
        raise JobSpecError(f"{SPEC_MODULE_VARIABLE}={name!r} does not name a spec package")
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise JobSpecError(
            f"the job's spec package {name} is not on this Python's path: the queue hands it to Ray with the "
            f"submission (runtime env py_modules), and Ray did not install it here"
        )
    path = Path(next(iter(found.submodule_search_locations))) / SPEC_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise JobSpecError(f"cannot read the job's spec at {path}: {exc.strerror or exc}") from None
    expected = env.get(SPEC_SHA256_VARIABLE)
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise JobSpecError(
            f"the spec at {path} is not the one the queue wrote (its SHA-256 differs); it was replaced or damaged"
        )
    return data.decode("utf-8")
