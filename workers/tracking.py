"""MLflow tracking for a job: one MLflow run per job id, written through ``mlflow.MlflowClient``.

Used on the chief Ray Train worker (per-step metrics, pictures) and in the driver (spec, tags, final status).
Everything goes through a client bound to an explicit tracking URI, so no process-wide MLflow state is needed;
:func:`use_tracking_uri` is for the few MLflow calls that only read the global URI (model logging and loading).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from workers import settings
from workers.errors import AeforgeError


class TrackingError(AeforgeError, ValueError):
    """What MLflow holds refuses the job: a deleted experiment of the job's name, a changed spec under a job id
    whose run already has other params, a param that looks like a secret."""


# Set by a job's entry point when Ray asks the job to stop (SIGTERM: a cancel, `ray job stop`): whatever exception
# the stop surfaces as inside Ray's calls, the job's MLflow runs then end KILLED.
STOP_REQUESTED = threading.Event()

JOB_ID_TAG = "aeforge.job_id"
PARENT_RUN_TAG = "mlflow.parentRunId"
# MLflow's own tags: the description an experiment's or a run's page shows, and where a run came from (the run page's
# "Source" and "User").
NOTE_TAG = "mlflow.note.content"
SOURCE_NAME_TAG = "mlflow.source.name"
SOURCE_TYPE_TAG = "mlflow.source.type"
USER_TAG = "mlflow.user"
# What kind of work an experiment holds: where MLflow's UI has no GenAI / Model training selector switched on, it
# opens a model-training experiment on its training runs rather than on the GenAI overview of traces.
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# The context a dataset input is logged with (the run page lists it beside the dataset's name).
DATASET_CONTEXT_TAG = "mlflow.data.context"
# Experiment tags whose value lists every value the experiment's jobs had ("ae, beta_vae"), not only the last one.
LISTED_SEPARATOR = ", "
# Parameter names that look like credentials: refused outright, so a secret can never be stored as a param.
SECRET_WORDS = ("secret", "password", "token", "access_key")
# Tracking URI schemes that talk to a server, which chooses where artifacts go.
SERVER_SCHEMES = ("http", "https", "databricks")

try:  # MLflow's own limits, so they follow the installed version
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
except ImportError:  # pragma: no cover - older layouts
    MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH = 1000, 500, 100
try:
    from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH
except ImportError:  # pragma: no cover - older layouts
    MAX_EXPERIMENT_TAG_VAL_LENGTH = 5000


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings to one level: {"model": {"beta": 4}} -> {"model.beta": 4}. Lists stay values."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


def param_value(value: Any) -> str:
    """How a value is written as an MLflow param: strings as they are, everything else as JSON (6.0, true,
    null, [512, 256]), so a reader can json.loads it back."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, sort_keys=True)
        except TypeError:
            text = str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    return text


def looks_secret(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in SECRET_WORDS)


def is_server_uri(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in SERVER_SCHEMES


@contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``uri`` for the block, then restore it and MLFLOW_TRACKING_URI.

    mlflow.set_tracking_uri also rewrites (or unsets) the MLFLOW_TRACKING_URI variable; this puts the
    variable back as it was, since it is one of aeforge's settings.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous_global = tracking_utils._tracking_uri
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        # None (no URI set before) puts MLflow back on its default; its annotation leaves None out.
        mlflow.set_tracking_uri(previous_global)  # type: ignore[arg-type]
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def client(tracking_uri: str | None = None):
    import mlflow

    return mlflow.MlflowClient(tracking_uri or settings.mlflow_tracking_uri())


def _artifact_folder_name(experiment_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", experiment_name).strip("_") or "experiment"


def listed_value(existing: str | None, value: str) -> str:
    """An experiment tag that lists every value its jobs had: the values listed in ``value`` added to the listed
    ``existing`` ones, sorted and without repeats ("ae" + "beta_vae, vae" -> "ae, beta_vae, vae")."""
    values = {v for text in (existing or "", value) for v in text.split(LISTED_SEPARATOR) if v}
    text = LISTED_SEPARATOR.join(sorted(values))
    if len(text) > MAX_EXPERIMENT_TAG_VAL_LENGTH:
        text = text[: MAX_EXPERIMENT_TAG_VAL_LENGTH - 3] + "..."
    return text


def ensure_experiment(
    name: str, tracking_uri: str | None = None, *, description: str | None = None, tags: Mapping[str, str] | None = None
) -> str:
    """The id of the MLflow experiment called ``name``, created if missing.

    A local store (sqlite, a database, a folder) keeps its artifacts under AEFORGE_HOME/mlartifacts/<name>;
    a tracking server chooses the artifact location itself (e.g. its S3 destination).

    ``description`` becomes the experiment's description (the page's "Description", MLflow's mlflow.note.content
    tag) when it has none: one written by hand in the UI is kept. Each of ``tags`` lists every value the
    experiment's jobs had (a second job of another variant makes ``aeforge.variant`` read "ae, beta_vae"). The
    experiment is marked as model training (mlflow.experimentKind) unless it says otherwise.
    """
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or settings.mlflow_tracking_uri()
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        location = None if is_server_uri(uri) else f"{settings.mlflow_artifact_root()}/{_artifact_folder_name(name)}"
        first_tags = {key: listed_value(None, value) for key, value in (tags or {}).items()}
        first_tags[EXPERIMENT_KIND_TAG] = MODEL_TRAINING_KIND
        if description:
            first_tags[NOTE_TAG] = description
        try:
            return mlflow_client.create_experiment(name, artifact_location=location, tags=first_tags)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = mlflow_client.get_experiment_by_name(name)  # created by a concurrent caller
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment '{name}' (id {experiment.experiment_id}) is deleted in {uri}; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or remove it for good "
            f"(mlflow gc) before running a job named '{name}'"
        )
    existing = dict(experiment.tags or {})
    if not existing.get(EXPERIMENT_KIND_TAG):
        mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    if description and not existing.get(NOTE_TAG):
        mlflow_client.set_experiment_tag(experiment.experiment_id, NOTE_TAG, description)
    for key, value in (tags or {}).items():
        listed = listed_value(existing.get(key), value)
        if listed != existing.get(key):
            mlflow_client.set_experiment_tag(experiment.experiment_id, key, listed)
    return experiment.experiment_id


def find_run(experiment_id: str, job_id: str, tracking_uri: str | None = None) -> str | None:
    """The id of the run tagged aeforge.job_id = ``job_id`` in the experiment, or None."""
    if "'" in job_id:
        raise TrackingError(f"job id {job_id!r} contains a quote; job ids are letters, digits, '.', '_' and '-'")
    runs = client(tracking_uri).search_runs(
        [experiment_id],
        filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return runs[0].info.run_id if runs else None


def start_or_resume_run(
    experiment_id: str,
    job_id: str,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """The MLflow run of ``job_id``: the existing one (running the same job id again continues it), else a new
    one tagged with the job id (and nested under ``parent_run_id``, if given).

    A resumed run that had failed or been killed is marked RUNNING again; a finished one keeps its status
    (callers also use this to look a finished run up). The caller ends a run with :meth:`MlflowRun.terminate`.
    """
    mlflow_client = client(tracking_uri)
    run_id = find_run(experiment_id, job_id, tracking_uri)
    if run_id is not None:
        if mlflow_client.get_run(run_id).info.status in ("FAILED", "KILLED"):
            mlflow_client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {JOB_ID_TAG: job_id}
    if parent_run_id is not None:
        tags[PARENT_RUN_TAG] = parent_run_id
    run = mlflow_client.create_run(experiment_id, tags=tags, run_name=run_name or job_id)
    return run.info.run_id


class MlflowRun:
    """One MLflow run, written through a client bound to ``tracking_uri`` (default: the settings' URI)."""

    def __init__(self, run_id: str, tracking_uri: str | None = None):
        self.run_id = run_id
        self.tracking_uri = tracking_uri or settings.mlflow_tracking_uri()
        self.client = client(self.tracking_uri)

    def __repr__(self) -> str:
        return f"MlflowRun({self.run_id!r}, {self.tracking_uri!r})"

    # --- metrics -------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step`` in one request (names kept as given: "train/loss", "eval/mig")."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric '{key}' must be a number, not {value!r}") from None
            entries.append(Metric(key=key, value=number, timestamp=timestamp, step=int(step)))
        for start in range(0, len(entries), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[start : start + MAX_METRICS_PER_BATCH])

    def final_metrics(self) -> dict[str, float]:
        """Each metric's latest value on the run (what the last evaluation reported)."""
        return dict(self.client.get_run(self.run_id).data.metrics)

    # --- params and the spec -------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a flat dict of params (100 per request). Params cannot change in MLflow: a key already on the
        run with the same value is skipped, with a different value it is an error naming the key."""
        from mlflow.entities import Param

        secret = sorted(k for k in params if looks_secret(k))
        if secret:
            raise TrackingError(f"refusing to log params that look like secrets: {', '.join(secret)}")
        existing = self.client.get_run(self.run_id).data.params
        new: list[Param] = []
        for key, value in params.items():
            text = param_value(value)
            if key in existing:
                if existing[key] != text:
                    raise TrackingError(
                        f"param '{key}' is already {existing[key]!r} on MLflow run {self.run_id} and cannot change "
                        f"to {text!r}; run the changed spec under a new job id"
                    )
                continue
            new.append(Param(key, text))
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_spec(self, spec: Mapping[str, Any]) -> None:
        """The job spec as flattened params (model.beta, train.optimizer.lr, ...) and as spec.yaml."""
        self.log_params(flatten(spec))
        self.client.log_text(self.run_id, yaml.safe_dump(dict(spec), sort_keys=False), "spec.yaml")

    # --- tags, artifacts, status ---------------------------------------------------------------------------
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(k, v if isinstance(v, str) else json.dumps(v)) for k, v in tags.items()]
        for start in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=entries[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def describe(self, text: str) -> None:
        """The run page's description (MLflow's mlflow.note.content tag)."""
        self.set_tags({NOTE_TAG: text})

    def log_dataset(self, dataset, context: str = "train") -> None:
        """Record ``dataset`` (an ``mlflow.entities.Dataset``: name, digest, source, schema, profile) as an input of
        the run, used as ``context``: the run page's "Datasets". Logging the same dataset again (a resumed job) adds
        nothing: MLflow keeps one input per dataset name and digest."""
        from mlflow.entities import DatasetInput, InputTag

        self.client.log_inputs(
            self.run_id, datasets=[DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, context)])]
        )

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Upload a folder's files under ``artifact_path`` of the run (e.g. "pictures")."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise ValueError(f"cannot log artifacts from {local_dir}: not a folder")
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def terminate(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)

    def mark_running(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    # --- the run's end, as a context --------------------------------------------------------------------------
    def __enter__(self) -> MlflowRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """End the run as the block ended: FINISHED; KILLED on KeyboardInterrupt (Ctrl-C, or a cancelled queue job,
        whose entry point turns Ray's SIGTERM into KeyboardInterrupt); FAILED on any other exception. A run that
        is not RUNNING when the block fails (a finished job's run, refusing a changed spec) is left as it was."""
        if exc_type is None:
            self.terminate("FINISHED")
            return
        try:
            if self.client.get_run(self.run_id).info.status == "RUNNING":
                stopped = issubclass(exc_type, KeyboardInterrupt) or STOP_REQUESTED.is_set()
                self.terminate("KILLED" if stopped else "FAILED")
        except Exception as end_error:  # the block's own error is the one to show
            print(f"aeforge: could not end MLflow run {self.run_id}: {end_error}", flush=True)


def all_pages(search: Callable[..., Any], *args: Any, **kwargs: Any) -> list:
    """Every result of an MLflow search that pages (search_runs, search_experiments, search_model_versions,
    search_registered_models), following its page tokens."""
    items: list = []
    token = None
    while True:
        page = search(*args, max_results=1000, page_token=token, **kwargs)
        items += list(page)
        token = page.token
        if not token:
            return items
