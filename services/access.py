"""What a user may ask a job to read and register, checked when the job is submitted (``check_submission``).

A job reads ``data.source`` with the workers' own storage keys and file system, and registers its model in the
service's MLflow, so the queue decides for the user:

- ``builtin:`` data is everyone's. A pushed dataset (a source that is a dataset name) is readable by its owner and,
  once it is shared (``aeforge data share``), by everyone; the owner is in the dataset's manifest. Local paths and
  ``s3://`` URLs are readable only under the prefixes an admin lists in AEFORGE_ALLOWED_DATA_PREFIXES, compared
  segment by segment after normalising (a path with a ``..`` part is refused outright, so none escapes); relative
  paths never are. A local path's real path (symlinks resolved) must be under a prefix too, or inside a dataset the
  user may read, and the job's readers check again at every open (workers.storage.read_access). A refusal says
  nothing about the files: its text is the same whether a file, link, object or dataset is there or not. Admins
  read anything.
- A registered model belongs to the owner who created it (its ``aeforge.owner`` tag): another owner's job may not
  add versions to it or move its aliases, admins included. The name is looked up in MLflow here, and a new one is
  reserved (created, tagged, with no versions yet) so that two owners racing for it cannot both train; when MLflow
  cannot be reached, the job goes through and its registration checks again (jobs.registry).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pydantic import BaseModel

from services.policy import Policy, never_fits_team
from services.settings import Principal, Role, ServiceSettings
from workers import settings as worker_settings
from workers.storage.read_access import not_readable_message, real_path_readable, under_prefixes

log = logging.getLogger(__name__)

# The tag jobs.registry writes on a registered model it creates (jobs.registry.OWNER_TAG; a test keeps them equal).
OWNER_TAG = "aeforge.owner"
MLFLOW_TIMEOUT_S = 5.0


class Identity(BaseModel):
    """``GET /whoami``: who a token belongs to."""

    owner: str
    role: Role


@dataclass
class Refusal:
    """An answer instead of a job: the HTTP status, its detail, and the field errors ({loc, msg})."""

    status: int
    detail: str
    errors: list[dict[str, str]] = field(default_factory=list)


def check_submission(spec: Any, who: Principal, settings: ServiceSettings) -> Refusal | None:
    """None when ``who`` may run ``spec`` (a parsed JobSpec) as far as its data and model name go, else why not."""
    data = getattr(spec, "data", None)
    source = getattr(data, "source", None)
    if isinstance(source, str) and not who.is_admin:
        refused = check_data_source(source, who, settings.allowed_data_prefixes)
        if refused is not None:
            return refused
    registration = getattr(spec, "registration", None)
    name = getattr(registration, "model_name", None)
    if isinstance(name, str):
        return check_model_name(name, who)
    return None


# --- data ---------------------------------------------------------------------------------------------------------


def _real_location_readable(source: str, allowed: Iterable[str], who: Principal) -> bool:
    """A local source's real path, symlinks resolved, must be under a prefix too, or inside a dataset ``who`` may
    read (the job checks again at every open: workers.storage.read_access)."""
    if source.startswith("s3://"):
        return True
    path = unquote(urlparse(source).path) if source.startswith("file://") else source
    try:
        from workers.storage import Storage

        storage = Storage.from_settings()
    except Exception:  # a storage that cannot be named holds no dataset to read: the prefixes alone decide
        storage = None
    return real_path_readable(path, allowed, who.owner, storage)


def _refuse_data(source: str, message: str, status: int = 403) -> Refusal:
    return Refusal(status, f"data.source: {message}", [{"loc": "data.source", "msg": message}])


def check_data_source(source: str, who: Principal, allowed: tuple[str, ...] | list[str]) -> Refusal | None:
    """None when the user ``who`` may read ``source``; the source kinds are told apart as the workers' resolver
    (workers.storage.resolver.Storage.resolve) tells them, by the text alone."""
    from workers.storage import DATASET_NAME, StorageError, StorageUnreachable

    if source.startswith("builtin:"):
        return None
    if source.startswith("s3://") or source.startswith("file://") or not DATASET_NAME.fullmatch(source):
        if under_prefixes(source, allowed) and _real_location_readable(source, allowed, who):
            return None
        return _refuse_data(source, not_readable_message(source, allowed))
    try:
        from workers.storage import Storage

        manifest = Storage.from_settings().manifest(source)
    except StorageUnreachable:
        return _refuse_data(
            source,
            "the storage does not answer, so whether you may read this dataset cannot be checked; submit again later",
            status=503,
        )
    except StorageError:  # no such dataset, an incomplete one, or a manifest that cannot be read: all the same
        manifest = None
    if manifest is not None and (manifest.get("owner") == who.owner or manifest.get("shared") is True):
        return None
    return _refuse_data(
        source,
        f"no dataset '{source}' that you may read: a user reads the datasets they pushed "
        f"and the ones shared with `aeforge data share` (`aeforge data ls` lists them)",
    )


# --- model names --------------------------------------------------------------------------------------------------


def check_model_name(name: str, who: Principal, tracking_uri: str | None = None) -> Refusal | None:
    """None unless the registered model ``name`` exists with another owner (then a 409 naming it and its owner).
    MLflow not answering lets the job through: its registration checks again."""
    uri = tracking_uri or worker_settings.mlflow_tracking_uri()
    try:
        owner = registered_model_owner(name, uri)
    except Exception as exc:
        log.warning(
            "cannot look registered model %r up in MLflow (%s); the job will check its owner", name, type(exc).__name__
        )
        return None
    if owner is None:
        # A new name is reserved now, as the owner's registered model (with no versions yet): of two owners racing
        # for it, the second is refused here rather than after training, when it registers.
        try:
            owner = reserve_model_name(name, who.owner, uri)
        except Exception as exc:
            log.warning("cannot reserve registered model %r in MLflow (%s); the job will", name, type(exc).__name__)
            return None
    if owner is None or owner == who.owner:
        return None
    message = (
        f"the registered model '{name}' belongs to {owner}: a job of {who.owner} cannot add versions to it "
        f"or move its aliases; choose another register.model_name"
    )
    return Refusal(409, f"register.model_name: {message}", [{"loc": "register.model_name", "msg": message}])


def registered_model_owner(name: str, tracking_uri: str, timeout_s: float = MLFLOW_TIMEOUT_S) -> str | None:
    """The owner tag of registered model ``name``; None when there is no such model or it has no owner yet. An
    MLflow server is asked over its REST API with a short timeout (MLflow's client retries for minutes); a sqlite
    store that does not exist yet holds no models and is not created."""
    if tracking_uri.startswith(("http://", "https://")):
        return _owner_over_rest(name, tracking_uri, timeout_s)
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
        if path != ":memory:" and not Path(path).exists():
            return None
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri).get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return (model.tags or {}).get(OWNER_TAG) or None


def reserve_model_name(name: str, owner: str, tracking_uri: str, timeout_s: float = MLFLOW_TIMEOUT_S) -> str | None:
    """Create registered model ``name`` with ``owner``'s tag (no versions: the job registers them); the owner that
    holds the name afterwards (another one's when it was taken meanwhile; None for an untagged model)."""
    if tracking_uri.startswith(("http://", "https://")):
        import httpx

        headers, auth = _rest_auth()
        response = httpx.post(
            f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/registered-models/create",
            json={"name": name, "tags": [{"key": OWNER_TAG, "value": owner}]},
            headers=headers,
            auth=auth,
            timeout=timeout_s,
        )
        if response.status_code == 200:
            return owner
        if "ALREADY_EXISTS" in response.text:
            return _owner_over_rest(name, tracking_uri, timeout_s)
        response.raise_for_status()
        raise RuntimeError(f"MLflow answered {response.status_code}")
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri).create_registered_model(
            name, tags={OWNER_TAG: owner}
        )
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        return registered_model_owner(name, tracking_uri, timeout_s)
    return owner


def _rest_auth() -> tuple[dict[str, str], tuple[str, str] | None]:
    env = os.environ.get
    headers: dict[str, str] = {}
    auth: tuple[str, str] | None = None
    if env("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {env('MLFLOW_TRACKING_TOKEN')}"
    elif env("MLFLOW_TRACKING_USERNAME"):
        auth = (env("MLFLOW_TRACKING_USERNAME", ""), env("MLFLOW_TRACKING_PASSWORD") or "")
    return headers, auth


def _owner_over_rest(name: str, tracking_uri: str, timeout_s: float) -> str | None:
    import httpx

    headers, auth = _rest_auth()
    response = httpx.get(
        f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/registered-models/get",
        params={"name": name},
        headers=headers,
        auth=auth,
        timeout=timeout_s,
    )
    if response.status_code == 404 and "RESOURCE_DOES_NOT_EXIST" in response.text:
        return None
    response.raise_for_status()
    tags = response.json().get("registered_model", {}).get("tags") or []
    return next((t.get("value") for t in tags if t.get("key") == OWNER_TAG), None) or None


# --- priority classes and quotas ----------------------------------------------------------------------------------


def minimum_request(spec: Any) -> dict[str, float]:
    """The least a job holds while it runs: the whole job for a train, one trial for a sweep (its driver runs fewer
    trials at once when fewer fit)."""
    if getattr(spec, "kind", None) == "sweep":
        from jobs.spec import trial_cpus

        r = spec.resources
        return {"CPU": trial_cpus(r), "GPU": float(r.workers * r.gpus_per_worker)}
    request: dict[str, float] = spec.resource_request()
    return request


def check_priority(
    policy: Policy, who: Principal, class_name: str | None, priority: int | None, spec: Any
) -> Refusal | tuple[str, int]:
    """The class and priority a submission is queued with, or why not: a raw priority is an admin's; a class must
    exist and be one ``who`` may use (403 naming the ones they may); a job that can never fit its team's quota plus
    borrowing limit is refused now rather than left waiting forever."""
    allowed = [c.name for c in policy.allowed_classes(who)]
    if priority is not None:
        if not who.is_admin:
            msg = f"a raw priority is for admins; name a priority_class instead ({', '.join(allowed) or 'none'})"
            return Refusal(403, f"priority: {msg}", [{"loc": "priority", "msg": msg}])
        if class_name is not None:
            msg = "give priority_class or priority, not both"
            return Refusal(422, f"priority: {msg}", [{"loc": "priority", "msg": msg}])
    klass = policy.priority_class(class_name)
    if klass is None:
        msg = f"no class {class_name!r}; the classes are {', '.join(c.name for c in policy.classes)}"
        return Refusal(422, f"priority_class: {msg}", [{"loc": "priority_class", "msg": msg}])
    if klass.name not in allowed:
        msg = f"{who.owner} may not use class {klass.name!r}; classes you may use: {', '.join(allowed) or 'none'}"
        return Refusal(403, f"priority_class: {msg}", [{"loc": "priority_class", "msg": msg}])
    why = never_fits_team(policy.team_of(who.owner), minimum_request(spec))
    if why is not None:
        return Refusal(422, f"resources: {why}", [{"loc": "resources", "msg": why}])
    return klass.name, klass.value if priority is None else priority
