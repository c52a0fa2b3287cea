"""What MLflow shows about a job besides its numbers: the experiment's description and tags, each run's description,
source and user, and the data set a run trained on, recorded as an MLflow dataset input (name, digest, source,
schema, profile).

All of it is worked out on the job's driver from the spec and the data check (``jobs.spec.check_data``), before
training starts, so a run's page says what it is while it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobs.spec import JobSpec
from workers.config import BETA_VARIANTS

# mlflow.source.type values: a spec file run with `aeforge run`, or a job the queue ran.
SPEC_FILE_SOURCE_TYPE = "LOCAL"
QUEUE_SOURCE_TYPE = "JOB"
# Experiment tags; each lists every value the experiment's jobs had (workers.tracking.listed_value).
KIND_TAG, VARIANT_TAG, DATASET_TAG = "aeforge.kind", "aeforge.variant", "aeforge.dataset"
# MLflow keeps at most 36 characters of a dataset digest; the full sha256 goes into the profile.
DIGEST_LENGTH = 16


# --- the experiment -------------------------------------------------------------------------------------------


def _variants(spec: JobSpec) -> list[str]:
    if spec.sweep is not None and spec.sweep.variant:
        return list(dict.fromkeys(spec.sweep.variant))
    return [spec.model.variant]


def experiment_tags(spec: JobSpec) -> dict[str, str]:
    """aeforge.kind, aeforge.variant (every variant a sweep tries) and aeforge.dataset (the data source)."""
    return {KIND_TAG: spec.kind, VARIANT_TAG: ", ".join(_variants(spec)), DATASET_TAG: spec.data.source}


def model_summary(spec: JobSpec) -> str:
    """ "beta_vae (mlp, latent size 3, beta 4)": the model a spec trains, in one phrase."""
    model = spec.model
    parts = [model.architecture, f"latent size {model.latent_dim}"]
    if model.variant in BETA_VARIANTS:
        parts.append(f"beta {model.effective_beta:g}")
    return f"{model.variant} ({', '.join(parts)})"


def _value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# A swept dimension with more values than this is summarised (count, first and last): a sweep may list thousands,
# and the descriptions these summaries go into have MLflow's length limits (jobs.limits).
LISTED_VALUES = 12


def _values_text(values: list) -> str:
    if len(values) <= LISTED_VALUES:
        return ", ".join(_value_text(v) for v in values)
    return f"{len(values):,} values: {_value_text(values[0])}, {_value_text(values[1])}, … {_value_text(values[-1])}"


def _sweep_summary(spec: JobSpec) -> str:
    """ "a grid sweep of 4 trials over beta 1, 4 × latent_dim 2, 10, ranked by eval/mig (max)"."""
    assert spec.sweep is not None
    space = " × ".join(f"{key} {_values_text(list(values))}" for key, values in spec.sweep.space().items())
    metric = spec.sweep.metric
    return (
        f"a {spec.sweep.search} sweep of {spec.num_trials()} trials over {space}, ranked by {metric.name} "
        f"({metric.mode})"
    )


def _sweep_model(spec: JobSpec) -> str:
    """The model a sweep varies, without the values its trials choose: "beta_vae (mlp)", "ae, vae (conv64)"."""
    return f"{', '.join(_variants(spec))} ({spec.model.architecture})"


def experiment_description(spec: JobSpec, alias: str | None = None) -> str:
    """The experiment page's description (Markdown), written by the experiment's first job. The UI shows its first
    line until expanded, so that line says what the runs are. ``alias``: the one its models are registered under
    (default: the spec's; a sweep's best trial gets "best")."""
    if spec.kind == "sweep":
        first = (
            f"**aeforge** runs of `{spec.name}`: {_sweep_model(spec)} on `{spec.data.source}`, {_sweep_summary(spec)}"
        )
    else:
        first = f"**aeforge** runs of `{spec.name}`: {model_summary(spec)} trained on `{spec.data.source}`"
    lines = [first + "."]
    if spec.description:
        lines += ["", spec.description]
    lines += [
        "",
        "Each job is one run named after its job id (`aeforge status JOB_ID`); a sweep is a parent run "
        "with one nested run per trial, named `<spec>-t<index>-<swept values>`.",
    ]
    if spec.registration is not None:
        alias = alias or spec.registration.alias
        shown = f"@{alias}" if alias else ""
        lines += [
            "",
            f"Models are registered as `{spec.registration.model_name}` "
            f"(`aeforge models show {spec.registration.model_name}{shown}`).",
        ]
    return "\n".join(lines)


# --- a run ------------------------------------------------------------------------------------------------------


def run_description(spec: JobSpec, job_id: str) -> str:
    """A job's run page description: what it trains, on what, for how long."""
    if spec.kind == "sweep":
        return (
            f"Sweep job `{job_id}` of the spec `{spec.name}`: {_sweep_model(spec)} on `{spec.data.source}`, "
            f"{_sweep_summary(spec)}."
        )
    budget = f"{spec.train.steps} steps" if spec.train.steps is not None else f"{spec.train.epochs} epochs"
    r = spec.resources
    return (
        f"Job `{job_id}` of the spec `{spec.name}`: {model_summary(spec)} trained on `{spec.data.source}`, "
        f"{budget} of batch {spec.train.batch_size} on {r.workers} worker{'s' if r.workers != 1 else ''}."
    )


def trial_description(spec: JobSpec, sweep_job_id: str, values: Mapping[str, Any]) -> str:
    """A sweep trial's run page description: its values, the model they make, and its sweep."""
    chosen = ", ".join(f"{key} {_value_text(value)}" for key, value in values.items())
    return f"Trial of sweep `{sweep_job_id}` ({chosen}): {model_summary(spec)} trained on `{spec.data.source}`."


def source_tags(job_id: str, spec_file: str | Path | None, user: str) -> dict[str, str]:
    """Where a run came from, as the run page's "Source" and "User" show it: the spec file `aeforge run` was given
    (its full path), or else the queue's job ("aeforge job ID"); and whose job it is (``user``)."""
    from workers.tracking import SOURCE_NAME_TAG, SOURCE_TYPE_TAG, USER_TAG

    if spec_file is not None:
        tags = {SOURCE_NAME_TAG: str(Path(spec_file).expanduser().resolve()), SOURCE_TYPE_TAG: SPEC_FILE_SOURCE_TYPE}
    else:
        tags = {SOURCE_NAME_TAG: f"aeforge job {job_id}", SOURCE_TYPE_TAG: QUEUE_SOURCE_TYPE}
    tags[USER_TAG] = user
    return tags


# --- the data set, as an MLflow dataset input ---------------------------------------------------------------------


def _pushed_dataset(source: str, storage) -> dict[str, Any] | None:
    """The manifest of the pushed dataset ``source`` names, or None when it names something else (the resolver's
    rule: a local path wins over a dataset of the same name)."""
    from workers.storage.datasets import DATASET_NAME

    if "://" in source or source.startswith("builtin:") or os.path.exists(os.path.expanduser(source)):
        return None
    if not DATASET_NAME.fullmatch(source):
        return None
    return storage.manifest(source)


def _folder_listing_digest(folder: Path) -> str:
    """A folder's files by relative path and size (hashing every image of a large folder would cost minutes)."""
    listing = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _describe_source(spec: JobSpec, storage) -> tuple[str, str, str, dict[str, Any]]:
    """(name, source type, source JSON, facts about the content including its full ``sha256``) of the data source."""
    from mlflow.data.code_dataset_source import CodeDatasetSource

    from workers.data import BUILTINS
    from workers.storage.objects import sha256_file

    source = spec.data.source
    if source.startswith("builtin:"):
        name = source[len("builtin:") :]
        make = BUILTINS[name]
        generator = f"{make.__module__}.{make.__qualname__}"
        # Generated, not stored: what identifies the data is the generator and its parameters.
        parameters = {"builtin": name, "generator": generator}
        return (
            name,
            "code",
            json.dumps(CodeDatasetSource({"aeforge.builtin": name, "generator": generator}).to_dict()),
            {
                "generated_by": generator,
                "sha256": hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest(),
                "digest_of": "the generator and its parameters",
            },
        )
    manifest = _pushed_dataset(source, storage)
    if manifest is not None:
        uri = storage.uri(f"datasets/{source}")
        content = sorted(f"{f['path']} {f['sha256']}" for f in manifest["files"])
        facts = {
            "sha256": hashlib.sha256("\n".join(content).encode()).hexdigest(),
            "digest_of": "the sha256 of each of its files (its manifest)",
            "files": len(manifest["files"]),
            "bytes": manifest.get("size"),
            "format": manifest.get("format"),
            "pushed": manifest.get("created"),
        }
        for key in ("examples", "image_shape", "factors", "classes"):
            if manifest.get(key) is not None:
                facts[f"manifest_{key}"] = manifest[key]
        return source, "s3" if uri.startswith("s3://") else "local", json.dumps({"uri": uri}), facts
    local = Path(storage.resolve(source))
    if "://" in source:
        uri = source
    else:
        uri = local.expanduser().resolve().as_uri()
    name = source.rstrip("/").rsplit("/", 1)[-1] or source
    if local.is_dir():
        facts = {"sha256": _folder_listing_digest(local), "digest_of": "its files' relative paths and sizes"}
    else:
        facts = {"sha256": sha256_file(local), "digest_of": "the file's bytes", "bytes": local.stat().st_size}
    return name, "s3" if uri.startswith("s3://") else "local", json.dumps({"uri": uri}), facts


def training_dataset(spec: JobSpec, storage, info: Mapping[str, Any]):
    """The data a job trains on, as an ``mlflow.entities.Dataset``: its name, a digest of its content and of the
    spec's selection from it (limit, image size, colour), its source (a pushed dataset's storage URI, an s3:// or
    local file's URI, or for a builtin the generator), the images' tensor schema, and a profile (examples, image
    shape, factors, the split, the full sha256). ``info`` is what ``check_data`` returned for the spec."""
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset
    from mlflow.types import Schema, TensorSpec

    name, source_type, source_json, facts = _describe_source(spec, storage)
    data = spec.data
    selection = {"limit": data.limit, "format": data.format, "image_size": data.image_size, "grayscale": data.grayscale}
    digest = hashlib.sha256(json.dumps({"content": facts["sha256"], **selection}, sort_keys=True).encode()).hexdigest()
    image_shape = [int(d) for d in info["image_shape"]]
    examples = int(info["num_examples"])
    schema = TensorDatasetSchema(features=Schema([TensorSpec(np.dtype("float32"), (-1, *image_shape), "images")]))
    profile = {
        "examples": examples if data.limit is None else min(examples, data.limit),
        "examples_in_source": examples,
        "image_shape": image_shape,
        "has_factors": bool(info["has_factors"]),
        "val_fraction": data.val_fraction,
        "split_seed": spec.train.seed,
        **{k: v for k, v in selection.items() if v is not None},
        **facts,
    }
    return Dataset(
        name=name,
        digest=digest[:DIGEST_LENGTH],
        source_type=source_type,
        source=source_json,
        schema=json.dumps(schema.to_dict()),
        profile=json.dumps(profile, default=str),
    )


# The metrics a generated description names, in this order, when the run reported them.
KEY_METRICS = (
    "eval/elbo",
    "eval/iwae_ll",
    "eval/recon",
    "eval/kl",
    "eval/tc",
    "eval/mig",
    "eval/dci_disentanglement",
    "eval/sap",
    "eval/factor_vae",
)


def model_description(spec: JobSpec, alias: str | None) -> str:
    """The registered model page's description (Markdown): what its versions are, where their details are, and how
    to load the one ``alias`` points at."""
    assert spec.registration is not None
    name = spec.registration.model_name
    lines = [spec.registration.description, ""] if spec.registration.description else []
    lines += [
        f"Autoencoders trained by **aeforge** from the spec `{spec.name}`: {model_summary(spec)} on "
        f"`{spec.data.source}`.",
        "",
        "Each version's description lists its final metrics and shows its run's pictures; its tags hold the "
        "variant, beta, latent size, data set, job and metrics. The model's tags describe its latest version.",
        "",
        "An alias moves to a new version only when it finished, is healthy (not collapsed) and is not worse than "
        "the version the alias pointed at; each version's description says what it was compared with.",
        "",
    ]
    ref = f"{name}@{alias}" if alias else f"{name}/VERSION"
    lines += [
        f"Load one with `aeforge models show {ref}` or "
        f'`mlflow.pytorch.load_model("models:/{ref}")` (aeforge installed).',
    ]
    return "\n".join(lines)


def generated_description(spec: JobSpec, job_id: str, metrics: Mapping[str, Any]) -> str:
    model = spec.model
    what = f"{model.variant} ({model.architecture}, latent_dim={model.latent_dim}"
    if model.variant in BETA_VARIANTS:
        what += f", beta={model.effective_beta:g}"
    what += f") trained on {spec.data.source} by job {job_id}"
    shown = [
        f"{name}={float(metrics[name]):.4g}" for name in KEY_METRICS if isinstance(metrics.get(name), (int, float))
    ]
    return what + (f"; {', '.join(shown)}" if shown else "")
