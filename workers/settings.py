"""Settings that come from the environment (or a settings file), never from a job spec.

Every layer reads them here so that one variable means one thing everywhere. Secrets (AWS keys, API tokens)
are read where they are used and never copied into logs, MLflow params or the job table.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """AEFORGE_HOME: the state folder (runs, local storage, sqlite stores). Default ./.aeforge."""
    return Path(os.environ.get("AEFORGE_HOME", ".aeforge")).expanduser().resolve()


def storage_uri() -> str:
    """AEFORGE_STORAGE: file:///path (default: AEFORGE_HOME/storage) or s3://bucket/prefix."""
    uri = os.environ.get("AEFORGE_STORAGE")
    if uri:
        return uri.rstrip("/")
    return (home() / "storage").as_uri()


def s3_endpoint_url() -> str | None:
    """AEFORGE_S3_ENDPOINT_URL: a MinIO / Ceph / other S3-compatible endpoint; None means AWS."""
    return os.environ.get("AEFORGE_S3_ENDPOINT_URL") or None


def mlflow_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI; default: a sqlite store under AEFORGE_HOME."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{home() / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    """Where the embedded MLflow store keeps artifacts (only used when aeforge creates the experiment):
    AEFORGE_MLFLOW_ARTIFACT_ROOT (set for a job by whoever started it), else AEFORGE_HOME/mlartifacts."""
    return os.environ.get("AEFORGE_MLFLOW_ARTIFACT_ROOT") or (home() / "mlartifacts").as_uri()


def ray_address() -> str | None:
    return os.environ.get("RAY_ADDRESS") or None


def s3_credentials_file() -> Path | None:
    """AEFORGE_S3_CREDENTIALS_FILE: a file holding the S3 keys (a mounted secret), read when AWS_SECRET_ACCESS_KEY
    is not set; see workers.storage.objects.read_credentials_file for its format."""
    path = os.environ.get("AEFORGE_S3_CREDENTIALS_FILE")
    return Path(path).expanduser() if path else None


# Where data, runs and MLflow are: set for the service and its jobs alike, and passed to each job (the queue puts
# them in the Ray job's runtime environment). Locations only, never a credential.
STORAGE_ENV_VARS = (
    "AEFORGE_STORAGE",
    "AEFORGE_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "AWS_DEFAULT_REGION",
)
# Credentials: read from the environment of the process that uses them, and never passed on to a job. A Ray job
# takes the credentials of the node it runs on: the variables set where `ray start` ran, a mounted secret file
# (AEFORGE_S3_CREDENTIALS_FILE, itself node configuration) or an instance profile / IRSA role (the default credential
# chains of boto3 and pyarrow). Values in a job submission's runtime environment would be in clear in `ray job list`,
# the dashboard's job API and Ray's runtime_env_agent.log. The key id and user name travel with their secrets: a
# service's key id over a node's own secret key would be a mismatched pair.
CREDENTIAL_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AEFORGE_S3_CREDENTIALS_FILE",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# Variables a job needs wherever it runs (the queue passes them in the Ray job's runtime environment). Not
# AEFORGE_HOME: each node keeps its own (jobs.ray_train.job_environment names the embedded locations instead).
JOB_ENV_VARS = ("AEFORGE_STORAGE_WAIT_S", "AEFORGE_MLFLOW_ARTIFACT_ROOT", *STORAGE_ENV_VARS)
# Values masked in whatever the service stores or shows (job errors, logs).
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


DEFAULT_STORAGE_WAIT_S = 300.0


def storage_wait_s() -> float:
    """AEFORGE_STORAGE_WAIT_S: how long a job starting while its storage endpoint does not answer keeps trying
    before it fails (default 300 s; 0: fail at once)."""
    return _seconds("AEFORGE_STORAGE_WAIT_S", DEFAULT_STORAGE_WAIT_S, zero_allowed=True)


def _seconds(name: str, default: float, *, zero_allowed: bool) -> float:
    """The finite number of seconds variable ``name`` holds (``default`` when unset or empty); AeforgeError naming
    the variable otherwise."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not ((value >= 0 if zero_allowed else value > 0) and value < float("inf")):
        from workers.errors import AeforgeError

        bound = ">= 0" if zero_allowed else "> 0"
        raise AeforgeError(f"{name} must be a number of seconds {bound}, got {raw!r}")
    return value


DEFAULT_STOP_POLL_S = 2.0


def stop_poll_s() -> float:
    """AEFORGE_STOP_POLL_S: how often a run's workers look for a stop request (a preemption or a cancel) on
    storage (default 2 s: one small read per worker each time; the stop waits this long at most before the current
    log window's end). Read on the node, from the environment its Ray workers were started with."""
    return _seconds("AEFORGE_STOP_POLL_S", DEFAULT_STOP_POLL_S, zero_allowed=False)
