"""The model registry: trained autoencoders logged to their MLflow run and registered under the spec's name.

A registered version carries what `aeforge models list/show` prints without opening the run: tags for the
variant, beta, latent size, data and job, and the key metrics as ``metric.<name>`` tags. Its description (the
version page in MLflow's UI) lists the final metrics and shows the run's pictures; the registered model has a
description and tags saying what its latest version is. Models are logged in MLflow's pickle format, so loading
one gives back the :class:`~workers.models.base.Autoencoder` with its methods (encode, decode, sample); loading
needs aeforge's ``workers`` package importable.

Aliases move only on purpose (jobs/gate.py): a job always registers a version (it is the record), but the alias
the spec or command asks for moves to it only when it is finished, healthy and not worse than the version the alias
points at on the spec's metric (``--force`` overrides that last check). The decision, in one line, is written into
the version's description and its ``alias_decision`` tag, and returned to the caller to print.

A registered model belongs to the owner who created it (its ``aeforge.owner`` tag): a job of another owner cannot add
versions to it or move its aliases. A job's owner is AEFORGE_JOB_OWNER, which the queue sets to the job's owner;
``aeforge run`` (no queue) registers as this machine's user. A model registered before owners were recorded has no
tag: the first job to register to it claims it.
"""

from __future__ import annotations

import copy
import getpass
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import numpy as np

from jobs.gate import AliasDecision, Incumbent, decide, health
from jobs.lineage import KEY_METRICS, generated_description, model_description
from jobs.spec import JobSpec
from workers import settings
from workers.errors import AeforgeError
from workers.models.base import Autoencoder
from workers.tracking import all_pages, use_tracking_uri
from workers.tracking import client as tracking_client

METRIC_TAG_PREFIX = "metric."
PICTURES_PATH = "pictures"
INPUT_EXAMPLE_BATCH = 2
OWNER_TAG = "aeforge.owner"
# Version tags of the gate: the metric (and mode) the version is compared by, and the last alias decision about it.
GATE_METRIC_TAG = "gate_metric"
DECISION_TAG = "alias_decision"


def decision_tag(alias: str) -> str:
    """The version tag that holds the last decision about ``@alias`` for it: ``alias_decision.<alias>``."""
    return f"{DECISION_TAG}.{alias}"


# The heading of the paragraphs a version's description gets for each alias decision (`models show` prints them).
DECISION_HEADING = "**Alias:**"
# log_and_register's default alias: the spec's register.alias.
SPEC_ALIAS: Any = object()
# The pictures a version's page shows inline, in this order (what the model does to and makes of images); the
# others (curves, embeddings, templates) are linked by name, since a page of every picture is too long to read.
INLINE_PICTURES = ("reconstructions", "traversal", "samples")
# The version tags the registered model also carries, describing its latest version.
MODEL_TAG_KEYS = ("variant", "architecture", "latent_dim", "beta", "dataset", "job_id")


class ModelLookupError(AeforgeError):
    """An unknown registered model, alias or version; the message says what exists instead."""


class RegistrationError(AeforgeError, ValueError):
    """A registration the spec asks for that cannot be made (a reserved alias, no `register` section)."""


# --- logging and registering -----------------------------------------------------------------------------


def check_alias(alias: str) -> None:
    # MLflow reserves "latest" and "v<number>" (they already mean a version).
    if alias.lower() == "latest" or re.fullmatch(r"v\d+", alias.lower()):
        raise RegistrationError(
            f"register.alias: '{alias}' is reserved by MLflow (it names a version); choose another alias"
        )


def job_owner() -> str:
    """Whose name a job registers under: AEFORGE_JOB_OWNER (the queue's job owner), else this machine's user."""
    owner = os.environ.get("AEFORGE_JOB_OWNER")
    if owner:
        return owner
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        raise RegistrationError("cannot tell whose model this is: set AEFORGE_JOB_OWNER to your user name") from None


def _check_owner(name: str, found: str | None, owner: str) -> None:
    if found is not None and found != owner:
        raise RegistrationError(
            f"register.model_name: the registered model '{name}' belongs to {found}; a job of "
            f"{owner} cannot add versions to it or move its aliases: choose another model_name"
        )


def _claim_model(mlflow_client, name: str, owner: str, description: str) -> None:
    """Make registered model ``name`` one ``owner`` may add to: create it with its owner tag and ``description``,
    or check the tag of the one that exists (an untagged one, registered before owners were recorded, is claimed;
    one without a description gets ``description``, one written in the UI is kept)."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name, tags={OWNER_TAG: owner}, description=description)
        return
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    registered = mlflow_client.get_registered_model(name)
    found = (registered.tags or {}).get(OWNER_TAG)
    _check_owner(name, found, owner)
    if found is None:
        mlflow_client.set_registered_model_tag(name, OWNER_TAG, owner)
    if not registered.description:
        mlflow_client.update_registered_model(name, description=description)


def version_tags(
    spec: JobSpec, job_id: str, metrics: Mapping[str, Any], extra_tags: Mapping[str, Any] | None
) -> dict[str, str]:
    model = spec.model
    tags = {
        "variant": model.variant,
        "architecture": model.architecture,
        "latent_dim": str(model.latent_dim),
        "likelihood": model.likelihood,
        "dataset": spec.data.source,
        "job_id": job_id,
    }
    if model.stochastic:
        tags["beta"] = repr(model.effective_beta)
    if model.variant == "beta_tcvae":
        tags["tc_estimator"] = model.effective_tc_estimator
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[f"{METRIC_TAG_PREFIX}{name}"] = repr(float(value))
    for key, value in (extra_tags or {}).items():
        tags[str(key)] = str(value)
    return tags


def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    """A Markdown table of the final evaluation metrics (and the last training loss)."""
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    shown = sorted(k for k in numbers if k.startswith("eval/")) + [k for k in ("train/loss",) if k in numbers]
    if not shown:
        return []
    return ["| metric | final value |", "| --- | ---: |"] + [f"| {k} | {numbers[k]:.6g} |" for k in shown]


def _pictures_section(mlflow_client, run) -> list[str]:
    """Markdown that links the run's picture folder and each picture, and shows the INLINE_PICTURES (served by the
    tracking server's get-artifact endpoint, relative to the UI's address); nothing when the run has no pictures."""
    from mlflow.exceptions import MlflowException

    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    try:
        files = [f.path for f in mlflow_client.list_artifacts(run_id, PICTURES_PATH) if not f.is_dir]
    except MlflowException:
        return []
    pictures = sorted(f for f in files if f.lower().endswith((".png", ".jpg", ".jpeg", ".gif", ".svg")))
    if not pictures:
        return []
    folder = f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/{PICTURES_PATH}"
    link = {path: f"get-artifact?path={quote(path, safe='')}&run_uuid={run_id}" for path in pictures}
    named = {path.rsplit("/", 1)[-1].rsplit(".", 1)[0]: path for path in pictures}
    listed = " · ".join(f"[{path.rsplit('/', 1)[-1]}]({link[path]})" for path in pictures)
    lines = [f"**Pictures** of run [{run_id}]({folder}) (`{run.info.artifact_uri}/{PICTURES_PATH}`): {listed}"]
    for name in INLINE_PICTURES:
        if name in named:
            lines += ["", f"![{name}]({link[named[name]]})"]
    return lines


def version_description(
    spec: JobSpec, job_id: str, metrics: Mapping[str, Any], mlflow_client=None, run=None, note: str | None = None
) -> str:
    """A version's description (Markdown): the spec's register.description if any, the generated summary line,
    ``note``, the final metrics as a table and, given the run, its pictures. The alias decisions are added after
    the summary (:func:`apply_gate`)."""
    parts = [spec.registration.description] if spec.registration is not None and spec.registration.description else []
    parts.append(generated_description(spec, job_id, metrics))
    if note:
        parts.append(note)
    table = _metrics_table(metrics)
    if table:
        parts.append("\n".join(table))
    if run is not None and mlflow_client is not None:
        pictures = _pictures_section(mlflow_client, run)
        if pictures:
            parts.append("\n".join(pictures))
    return "\n\n".join(parts)


def _final_step(mlflow_client, run_id: str, metrics: Mapping[str, Any]) -> int:
    """The step of the run's final evaluation (where its last metrics were logged), so that the logged model
    carries those metrics; 0 when the run logged none."""
    for key in (*KEY_METRICS, *sorted(metrics)):
        if key in metrics:
            history = mlflow_client.get_metric_history(run_id, key)
            if history:
                return max(m.step for m in history)
    return 0


def input_example(model: Autoencoder, batch: int = INPUT_EXAMPLE_BATCH) -> np.ndarray:
    """A fixed small batch of images in [0, 1], float32, shaped like the model's input."""
    rng = np.random.default_rng(0)
    return rng.random((batch, *model.image_shape), dtype=np.float32)


def _pip_requirements() -> list[str]:
    import cloudpickle
    import mlflow
    import pydantic
    import torch

    torch_version = torch.__version__.split("+")[0]
    return [
        f"torch=={torch_version}",
        f"mlflow=={mlflow.__version__}",
        f"cloudpickle=={cloudpickle.__version__}",
        f"numpy=={np.__version__}",
        f"pydantic=={pydantic.__version__}",
    ]


def log_and_register(
    model: Autoencoder,
    spec: JobSpec,
    job_id: str,
    run_id: str,
    metrics: Mapping[str, Any],
    *,
    extra_tags: Mapping[str, Any] | None = None,
    alias: str | None = SPEC_ALIAS,
    tracking_uri: str | None = None,
    owner: str | None = None,
    force: bool = False,
    note: str | None = None,
) -> dict[str, Any]:
    """Log ``model`` on MLflow run ``run_id``, register it as a new version of ``spec.registration.model_name``,
    tag and describe the version, and move the alias to it if the gate lets it (jobs/gate.py: the spec's alias
    unless ``alias`` is given, None for none; ``force`` moves it even when the version is worse than the one the
    alias points at). ``note``: a line the description gets (why a sweep registered this trial).
    The model must be ``owner``'s (default :func:`job_owner`) or new: another owner's is a RegistrationError before
    anything is logged.

    Returns {"model_uri": "models:/NAME/VERSION", "name", "version", "alias" (the alias now on this version, or
    None), "requested_alias", "alias_moved", "decision" (the one line that says why), "logged_model_uri", "run_id"}.
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    if spec.registration is None:
        raise RegistrationError(
            f"job {job_id}: the spec has no 'register' section, so there is no model name to register under"
        )
    name = spec.registration.model_name
    alias = spec.registration.alias if alias is SPEC_ALIAS else alias
    if alias is not None:
        check_alias(alias)
    uri = tracking_uri or settings.mlflow_tracking_uri()
    mlflow_client = tracking_client(uri)
    _claim_model(mlflow_client, name, owner or job_owner(), model_description(spec, alias))

    cpu_model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    example = input_example(cpu_model)
    with torch.no_grad():
        output = cpu_model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    gate_metric = spec.gate_metric()
    # Everything inside the block: the registry store looks a logged model up in MLflow's *global* tracking store,
    # which is not aeforge's when MLFLOW_TRACKING_URI is unset (the embedded sqlite default under AEFORGE_HOME).
    with use_tracking_uri(uri):
        # The logged model is made in the run's own experiment first: given only run_id, MLflow 3 would make it in
        # experiment 0, whose artifacts live under ./mlruns of whatever directory this process started in.
        run = mlflow_client.get_run(run_id)
        logged = mlflow_client.create_logged_model(
            run.info.experiment_id, name="model", source_run_id=run_id, params=dict(run.data.params)
        )
        # run_id and step: the run lists the model among its outputs (the run page's "Logged models"), and the
        # model carries the metrics of the run's final evaluation.
        info = mlflow.pytorch.log_model(
            pytorch_model=cpu_model,
            name="model",
            serialization_format="pickle",
            input_example=example,
            signature=signature,
            pip_requirements=_pip_requirements(),
            run_id=run_id,
            model_id=logged.model_id,
            step=_final_step(mlflow_client, run_id, metrics),
        )

        tags = version_tags(spec, job_id, metrics, extra_tags)
        tags[GATE_METRIC_TAG] = f"{gate_metric.name} {gate_metric.mode}"
        description = version_description(spec, job_id, metrics, mlflow_client, run, note=note)
        version = mlflow_client.create_model_version(
            name,
            source=info.model_uri,
            run_id=run_id,
            tags=tags,
            description=description,
            model_id=info.model_id,
        )
        model_tags = mlflow_client.get_registered_model(name).tags or {}
        for key in MODEL_TAG_KEYS:
            if key in tags:
                mlflow_client.set_registered_model_tag(name, key, tags[key])
            elif key in model_tags:  # e.g. no beta on an autoencoder registered after a beta-VAE
                mlflow_client.delete_registered_model_tag(name, key)
    decision = None
    if alias is not None:
        decision = apply_gate(mlflow_client, name, str(version.version), alias, force=force)
    return registration_result(version, alias, decision)


def registration_result(version, requested_alias: str | None, decision: AliasDecision | None) -> dict[str, Any]:
    """What registering (or finding) a version returns: :func:`version_info`, and what happened to the alias."""
    moved = decision is not None and decision.moved
    return {
        **version_info(version, requested_alias if moved else None),
        "requested_alias": requested_alias,
        "alias_moved": moved,
        "decision": decision.message if decision is not None else "registered without an alias",
    }


def _incumbent(mlflow_client, name: str, alias: str) -> Incumbent | None:
    registered = mlflow_client.get_registered_model(name)
    current = (registered.aliases or {}).get(alias)
    if current is None:
        return None
    _, metrics = _split_tags(mlflow_client.get_model_version(name, str(current)).tags or {})
    return Incumbent(str(current), metrics)


def _run_status(mlflow_client, run_id: str | None) -> str:
    """'finished' unless the version's run ended FAILED or KILLED (a run still RUNNING is the job registering
    it: its training and evaluation are done)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return "finished"
    try:
        status = mlflow_client.get_run(run_id).info.status
    except MlflowException:
        return "finished"  # the run was deleted; the version's metrics still say what it was
    return "failed" if status == "FAILED" else "killed" if status == "KILLED" else "finished"


def apply_gate(
    mlflow_client, name: str, version: str, alias: str, *, force: bool = False, by: str | None = None
) -> AliasDecision:
    """Decide whether ``@alias`` moves to ``version`` of ``name`` (jobs/gate.py: finished, healthy, not worse than
    the version the alias points at on the version's gate metric, unless ``force``), move it if so, and record the
    decision on the version: its ``alias_decision`` tag and a paragraph of its description. ``by``: who asked
    (a promotion), written into that paragraph."""
    target = mlflow_client.get_model_version(name, version)
    tags, metrics = _split_tags(target.tags or {})
    metric, _, mode = tags.get(GATE_METRIC_TAG, "").partition(" ")
    if not metric:  # a version registered before the gate: judge it as a spec of its variant would
        stochastic = tags.get("variant") in ("vae", "beta_vae", "beta_tcvae")
        metric, mode = ("eval/elbo", "max") if stochastic else ("eval/recon", "min")
    decision = decide(
        alias,
        version,
        metrics,
        metric,
        mode or "max",
        _incumbent(mlflow_client, name, alias),
        force=force,
        status=_run_status(mlflow_client, target.run_id),
    )
    if decision.moved:
        mlflow_client.set_registered_model_alias(name, alias, version)
    mlflow_client.set_model_version_tag(name, version, decision_tag(alias), decision.message[:5000])
    when = datetime.now(UTC).isoformat(timespec="seconds")
    paragraph = f"{DECISION_HEADING} {decision.message}" + (f" (by {by}, {when})" if by else f" ({when})")
    mlflow_client.update_model_version(name, version, description=_with_paragraph(target.description, paragraph))
    return decision


# MLflow's limit on a version's description.
DESCRIPTION_LIMIT = 20_000


def _with_paragraph(description: str | None, paragraph: str) -> str:
    """``description`` with an alias decision added after the summary line and the earlier decisions (before the
    metrics table and pictures), within MLflow's length limit (the oldest decisions give way first)."""
    parts = [p for p in (description or "").split("\n\n") if p]
    at = next((i for i, p in enumerate(parts) if p.startswith(("| ", "**Pictures**", "!["))), len(parts))
    parts.insert(at, paragraph)
    text = "\n\n".join(parts)
    while len(text) > DESCRIPTION_LIMIT:
        older = [i for i, p in enumerate(parts) if p.startswith(DECISION_HEADING) and p != paragraph]
        if not older:
            return text[:DESCRIPTION_LIMIT]
        del parts[older[0]]
        text = "\n\n".join(parts)
    return text


_DECISION_SUFFIX = re.compile(r" \((?:by .*, )?\d{4}-\d\d-\d\dT[\d:]+\+00:00\)$")


def description_decisions(description: str | None) -> list[str]:
    """The alias decisions a version's description records, oldest first, without their dates."""
    return [
        _DECISION_SUFFIX.sub("", paragraph[len(DECISION_HEADING) :].strip())
        for paragraph in (description or "").split("\n\n")
        if paragraph.startswith(DECISION_HEADING)
    ]


def registered_version_of_run(
    name: str, run_id: str, *, alias: str | None = None, tracking_uri: str | None = None
) -> dict[str, Any] | None:
    """The version of model ``name`` already registered from MLflow run ``run_id`` (a job run again after it
    registered its model), as :func:`log_and_register` returns it; None if there is none. When no decision about
    ``alias`` was recorded on that version (the first attempt died between registering and deciding), the gate
    decides now."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or settings.mlflow_tracking_uri()
    mlflow_client = tracking_client(uri)
    if "'" in name or "'" in run_id:
        raise ValueError(f"model name {name!r} and run id {run_id!r} cannot contain quotes")
    try:
        found = mlflow_client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if not found:
        return None
    version = max(found, key=lambda v: int(v.version))
    if alias is None:
        return registration_result(version, None, None)
    registered = mlflow_client.get_registered_model(name)
    aliases = {a: str(v) for a, v in (registered.aliases or {}).items()}
    recorded = (version.tags or {}).get(decision_tag(alias))
    if aliases.get(alias) == str(version.version):
        decision = AliasDecision(alias, str(version.version), True, recorded or f"@{alias} is on v{version.version}")
    elif recorded is not None:
        decision = AliasDecision(alias, str(version.version), False, recorded)
    else:
        check_alias(alias)
        _check_owner(name, (registered.tags or {}).get(OWNER_TAG), job_owner())
        decision = apply_gate(mlflow_client, name, str(version.version), alias)
    return registration_result(version, alias, decision)


def version_info(version, alias: str | None) -> dict[str, Any]:
    """A registered model version as :func:`log_and_register` returns one."""
    return {
        "model_uri": f"models:/{version.name}/{version.version}",
        "name": version.name,
        "version": str(version.version),
        "alias": alias,
        "logged_model_uri": version.source,
        "run_id": version.run_id,
    }


# --- moving aliases by hand -----------------------------------------------------------------------------------


def _owned_model(mlflow_client, uri: str, name: str):
    """Registered model ``name``, checked to be :func:`job_owner`'s (an untagged one may be changed by anyone)."""
    from mlflow.exceptions import MlflowException

    try:
        registered = mlflow_client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = _registered_names(mlflow_client)
        listed = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") if known else "none"
        raise ModelLookupError(f"no registered model named '{name}' in {uri} (registered models: {listed})") from None
    found = (registered.tags or {}).get(OWNER_TAG)
    owner = job_owner()
    if found is not None and found != owner:
        raise RegistrationError(
            f"the registered model '{name}' belongs to {found}; {owner} cannot move or remove its aliases"
        )
    return registered


def _alias_name(alias: str) -> str:
    alias = alias[1:] if alias.startswith("@") else alias
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", alias):
        raise RegistrationError(
            f"alias '{alias}': an alias starts with a letter and holds letters, digits, '_' and '-' (at most 64)"
        )
    check_alias(alias)
    return alias


def promote(name: str, version: str, alias: str, *, force: bool = False, tracking_uri: str | None = None) -> dict:
    """Point ``@alias`` of model ``name`` at ``version`` through the gate (finished, healthy, not worse than the
    version the alias points at unless ``force``), as its owner. Returns {"name", "version", "alias", "moved",
    "decision"}; a version the gate refuses leaves the alias where it was (``moved`` False)."""
    uri = tracking_uri or settings.mlflow_tracking_uri()
    mlflow_client = tracking_client(uri)
    alias = _alias_name(alias)
    _owned_model(mlflow_client, uri, name)
    _, target = _resolve(mlflow_client, uri, f"{name}/{version}")
    decision = apply_gate(mlflow_client, name, str(target.version), alias, force=force, by=f"promoted by {job_owner()}")
    return {
        "name": name,
        "version": str(target.version),
        "alias": alias,
        "moved": decision.moved,
        "decision": decision.message,
    }


def remove_alias(name: str, alias: str, tracking_uri: str | None = None) -> dict:
    """Remove ``@alias`` from model ``name``, as its owner; the version it pointed at records the removal.
    Returns {"name", "alias", "version" (the version it pointed at)}."""
    uri = tracking_uri or settings.mlflow_tracking_uri()
    mlflow_client = tracking_client(uri)
    alias = _alias_name(alias)
    registered = _owned_model(mlflow_client, uri, name)
    aliases = {a: str(v) for a, v in (registered.aliases or {}).items()}
    if alias not in aliases:
        raise ModelLookupError(f"model '{name}' has no alias '{alias}'; {_aliases_text(aliases)}")
    version = aliases[alias]
    mlflow_client.delete_registered_model_alias(name, alias)
    target = mlflow_client.get_model_version(name, version)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    paragraph = f"{DECISION_HEADING} @{alias} removed from v{version} by {job_owner()} ({when})"
    mlflow_client.update_model_version(name, version, description=_with_paragraph(target.description, paragraph))
    return {"name": name, "alias": alias, "version": version}


def compare(name: str, first: str, second: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Two versions of model ``name`` side by side: {"name", "versions": [describe(v1), describe(v2)],
    "metrics": [{"metric", "values": [a, b], "difference": b - a}], "tags": [{"tag", "values"}] (the tags that
    differ), "health": [label, label]}."""
    uri = tracking_uri or settings.mlflow_tracking_uri()
    left = describe(f"{name}/{first}", uri)
    right = describe(f"{name}/{second}", uri)
    metrics = []
    for key in sorted(set(left["metrics"]) | set(right["metrics"])):
        a, b = left["metrics"].get(key), right["metrics"].get(key)
        metrics.append({"metric": key, "values": [a, b], "difference": None if a is None or b is None else b - a})
    tags = [
        {"tag": key, "values": [left["tags"].get(key), right["tags"].get(key)]}
        for key in sorted(set(left["tags"]) | set(right["tags"]))
        if left["tags"].get(key) != right["tags"].get(key) and not key.startswith(DECISION_TAG)
    ]
    verdicts = [health(v["metrics"]) for v in (left, right)]
    return {
        "name": name,
        "versions": [left, right],
        "metrics": metrics,
        "tags": tags,
        "health": [v.label if v.healthy else v.reason for v in verdicts],
    }


# --- looking models up --------------------------------------------------------------------------------------


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """ "NAME@alias" -> (NAME, "alias", alias); "NAME/3" -> (NAME, "version", "3"); "NAME" or "NAME/latest" ->
    (NAME, None, None). A models:/ prefix is accepted."""
    text = ref[len("models:/") :] if ref.startswith("models:/") else ref
    if not text or text.startswith(("@", "/")):
        raise ModelLookupError(f"'{ref}' is not a model reference; use NAME, NAME@ALIAS or NAME/VERSION")
    if "@" in text:
        name, _, alias = text.partition("@")
        if not alias:
            raise ModelLookupError(f"'{ref}' names no alias after '@'")
        return name, "alias", alias
    if "/" in text:
        name, _, version = text.partition("/")
        if version == "latest":
            return name, None, None
        if not version.isdigit():
            raise ModelLookupError(f"'{ref}': the version after '/' must be a number (or 'latest'), not '{version}'")
        return name, "version", version
    return text, None, None


def _all_versions(mlflow_client, name: str) -> list:
    return sorted(all_pages(mlflow_client.search_model_versions, f"name='{name}'"), key=lambda v: int(v.version))


def _registered_names(mlflow_client) -> list[str]:
    return sorted(m.name for m in all_pages(mlflow_client.search_registered_models))


def _aliases_text(aliases: Mapping[str, str]) -> str:
    if not aliases:
        return "it has no aliases"
    return "its aliases: " + ", ".join(f"{a} (version {v})" for a, v in sorted(aliases.items()))


def _resolve(mlflow_client, uri: str, ref: str):
    """(RegisteredModel, ModelVersion) for a reference, or ModelLookupError saying what exists."""
    from mlflow.exceptions import MlflowException

    name, kind, value = parse_ref(ref)
    try:
        registered = mlflow_client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = _registered_names(mlflow_client)
        listed = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") if known else "none"
        raise ModelLookupError(f"no registered model named '{name}' in {uri} (registered models: {listed})") from None
    aliases = {a: str(v) for a, v in (registered.aliases or {}).items()}
    if kind == "alias":
        if value not in aliases:
            raise ModelLookupError(f"model '{name}' has no alias '{value}'; {_aliases_text(aliases)}")
        return registered, mlflow_client.get_model_version(name, aliases[value])
    versions = _all_versions(mlflow_client, name)
    if not versions:
        raise ModelLookupError(f"model '{name}' has no versions yet")
    if kind == "version":
        for v in versions:
            if str(v.version) == value:
                return registered, v
        numbers = ", ".join(str(v.version) for v in versions)
        raise ModelLookupError(f"model '{name}' has no version {value}; its versions: {numbers}")
    return registered, versions[-1]


def resolve(ref: str, tracking_uri: str | None = None):
    """The ModelVersion a reference points at, or ModelLookupError saying what exists."""
    uri = tracking_uri or settings.mlflow_tracking_uri()
    return _resolve(tracking_client(uri), uri, ref)[1]


def load_model(ref: str, tracking_uri: str | None = None, map_location: str = "cpu") -> Autoencoder:
    """The registered autoencoder ``ref`` points at ("NAME@alias", "NAME/3", "NAME" for the latest version, or a
    models:/ URI), in eval mode on ``map_location``."""
    import mlflow.pytorch

    uri = tracking_uri or settings.mlflow_tracking_uri()
    version = resolve(ref, uri)
    with use_tracking_uri(uri):
        model = mlflow.pytorch.load_model(f"models:/{version.name}/{version.version}", map_location=map_location)
    if not isinstance(model, Autoencoder):
        raise ModelLookupError(
            f"model '{version.name}' version {version.version} is a {type(model).__name__}, not an aeforge autoencoder"
        )
    return model.eval()


def _split_tags(tags: Mapping[str, str]) -> tuple[dict[str, str], dict[str, float]]:
    plain, metrics = {}, {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                metrics[key[len(METRIC_TAG_PREFIX) :]] = float(value)
            except ValueError:
                plain[key] = value
        else:
            plain[key] = value
    return plain, metrics


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds")


def describe(ref: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """One version's tags, metrics, aliases, run and the locations of its run's pictures."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or settings.mlflow_tracking_uri()
    mlflow_client = tracking_client(uri)
    registered, version = _resolve(mlflow_client, uri, ref)
    tags, metrics = _split_tags(version.tags or {})
    pictures: list[str] = []
    run_artifact_uri = None
    if version.run_id:
        try:
            run_artifact_uri = mlflow_client.get_run(version.run_id).info.artifact_uri
            pictures = [
                f"{run_artifact_uri}/{f.path}"
                for f in mlflow_client.list_artifacts(version.run_id, PICTURES_PATH)
                if not f.is_dir
            ]
        except MlflowException:
            pass  # the run was deleted: the version still describes itself
    return {
        "name": version.name,
        "version": str(version.version),
        "aliases": sorted(a for a, v in (registered.aliases or {}).items() if str(v) == str(version.version)),
        "description": version.description or "",
        "status": version.status,
        "created": _iso(version.creation_timestamp),
        "run_id": version.run_id,
        "source": version.source,
        "model_uri": f"models:/{version.name}/{version.version}",
        "tags": tags,
        "metrics": metrics,
        "run_artifact_uri": run_artifact_uri,
        "pictures": sorted(pictures),
    }


def list_models(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every registered model: its number of versions, aliases, and its latest version's tags."""
    uri = tracking_uri or settings.mlflow_tracking_uri()
    mlflow_client = tracking_client(uri)
    out = []
    for name in _registered_names(mlflow_client):
        registered = mlflow_client.get_registered_model(name)
        versions = _all_versions(mlflow_client, name)
        latest = versions[-1] if versions else None
        tags, metrics = _split_tags(latest.tags or {}) if latest else ({}, {})
        out.append(
            {
                "name": name,
                "versions": len(versions),
                "latest_version": str(latest.version) if latest else None,
                "aliases": {a: str(v) for a, v in sorted((registered.aliases or {}).items())},
                "description": registered.description or "",
                "latest_tags": tags,
                "latest_metrics": metrics,
            }
        )
    return out
