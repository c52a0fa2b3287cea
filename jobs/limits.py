"""What a job must fit besides its schema: the limits of the components it reaches (the lengths MLflow stores)
and the memory of the largest node. Checked when a job is submitted (services.api) and by `aeforge validate`, so a
job that cannot work is refused with the field's path and the numbers, instead of failing on the cluster (and
being retried there: a component's refusal looks like an outage to the queue).

MLflow's limits are its own (mlflow.utils.validation; the model registry's description columns hold 5,000
characters). Each text is measured as the job will write it: the spec's own words plus the lines aeforge adds.
"""

from __future__ import annotations

from typing import Any

from jobs.spec import JobSpec
from workers.protocol import new_job_id

try:  # MLflow's own limits, so they follow the installed version
    from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH, MAX_TAG_VAL_LENGTH
except ImportError:  # pragma: no cover - older layouts
    MAX_EXPERIMENT_TAG_VAL_LENGTH, MAX_TAG_VAL_LENGTH = 5000, 5000
# The model registry's description columns (registered_models.description, model_versions.description: String(5000)
# in mlflow/store/model_registry/dbmodels/models.py); a PostgreSQL or MySQL store refuses longer ones.
MAX_REGISTRY_DESCRIPTION_LENGTH = 5000
# Room a version's description keeps for what only the run knows: its metrics table and its pictures' links.
VERSION_DESCRIPTION_RESERVE = 3000

GIB = 1024**3


def _error(loc: str, msg: str) -> dict[str, str]:
    return {"loc": loc, "msg": msg}


def mlflow_limit_errors(spec: JobSpec) -> list[dict[str, str]]:
    """The fields whose text would exceed what MLflow stores, each with the numbers."""
    from jobs.lineage import (
        experiment_description,
        generated_description,
        model_description,
        run_description,
        trial_description,
    )

    job_id = new_job_id(spec.name)  # as long as the real one
    errors = []
    alias = "best" if spec.kind == "sweep" else None
    experiment = len(experiment_description(spec, alias))
    if experiment > MAX_EXPERIMENT_TAG_VAL_LENGTH:
        own = len(spec.description or "")
        room = MAX_EXPERIMENT_TAG_VAL_LENGTH - (experiment - own)
        errors.append(
            _error(
                "description",
                f"{own:,} characters; the experiment's description (this text plus aeforge's {experiment - own:,}) "
                f"may hold {MAX_EXPERIMENT_TAG_VAL_LENGTH:,} in MLflow: at most {max(room, 0):,} here",
            )
        )
    texts = [run_description(spec, job_id)]
    if spec.sweep is not None:
        values = {key: max(v, key=lambda x: len(str(x))) for key, v in spec.sweep.space().items() if v}
        texts.append(trial_description(spec, job_id, values))
    longest = max(len(t) for t in texts)
    if longest > MAX_TAG_VAL_LENGTH:
        errors.append(
            _error(
                "data.source",
                f"a run's description names the data source and would be {longest:,} characters; MLflow keeps "
                f"{MAX_TAG_VAL_LENGTH:,} in a run tag: use a shorter path or dataset name",
            )
        )
    if spec.registration is not None:
        own = len(spec.registration.description or "")
        model = len(model_description(spec, spec.registration.alias))
        version = own + len(generated_description(spec, job_id, {})) + VERSION_DESCRIPTION_RESERVE
        need = max(model, version)
        if own and need > MAX_REGISTRY_DESCRIPTION_LENGTH:
            room = own - (need - MAX_REGISTRY_DESCRIPTION_LENGTH)
            errors.append(
                _error(
                    "register.description",
                    f"{own:,} characters; the registered model's and its versions' descriptions (this text plus "
                    f"aeforge's summary, metrics and pictures) may hold {MAX_REGISTRY_DESCRIPTION_LENGTH:,} in "
                    f"MLflow's registry: at most {max(room, 0):,} here",
                )
            )
    return errors


# --- memory -------------------------------------------------------------------------------------------------------

# Image shapes when the spec alone does not tell: the architecture's own size, else the smallest image a reader
# makes (a lower bound, so a refusal is certain).
_ARCHITECTURE_SIZES = {"conv64": 64, "conv28": 28}
_SMALLEST_IMAGE = 8
_BUILTIN_SHAPES = {"dsprites": ((1, 64, 64), 737_280)}


def _image_shape(spec: JobSpec) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) and an example count for the estimate: exact for builtin data, else a lower bound."""
    data = spec.data
    if data.source.startswith("builtin:") and data.source[len("builtin:") :] in _BUILTIN_SHAPES:
        shape, count = _BUILTIN_SHAPES[data.source[len("builtin:") :]]
        return shape, min(count, data.limit or count)
    size = _ARCHITECTURE_SIZES.get(spec.model.architecture) or data.image_size or _SMALLEST_IMAGE
    channels = 3 if data.image_size is not None and not data.grayscale else 1
    return (channels, size, size), data.limit or 1000


def training_memory(spec: JobSpec) -> tuple[int, str]:
    """(bytes, what they are) one Ray Train worker of the job needs to train its largest model (a sweep: its
    largest latent size, for each variant; a pack: that many models at once): weights, gradients, Adam's moments
    and the activations the loss keeps (workers.pack.training_bytes, counted on the meta device)."""
    from workers.pack import training_bytes

    shape, count = _image_shape(spec)
    batch = spec.train.batch_size
    models = [spec.model]
    pack = 1
    if spec.sweep is not None:
        space = spec.sweep.space()
        latent = max(space.get("latent_dim") or [spec.model.latent_dim])
        variants = space.get("variant") or [spec.model.variant]
        models = [spec.with_trial({"variant": v, "latent_dim": latent}).model for v in dict.fromkeys(variants)]
        if isinstance(spec.sweep.pack, int):
            pack = min(spec.sweep.pack, spec.num_trials())
    need = max(training_bytes(m, shape, count, batch) for m in models) * pack
    largest = max(models, key=lambda m: m.latent_dim)
    what = (
        f"{pack} x " if pack > 1 else ""
    ) + f"{largest.variant} ({largest.architecture}, latent_dim {largest.latent_dim}) at batch_size {batch}"
    return need, what


def memory_errors(spec: JobSpec, largest_node_memory: float | None) -> list[dict[str, str]]:
    """A field error when one worker of the job needs more memory than the largest node has (Ray's ``memory``
    resource of that node); none when that memory is not known."""
    if not largest_node_memory or largest_node_memory <= 0:
        return []
    need, what = training_memory(spec)
    if need <= largest_node_memory:
        return []
    return [
        _error(
            "train.batch_size",
            f"one worker needs about {need / GIB:,.1f} GiB to train {what} (weights, gradients, Adam's moments and "
            f"activations), and the largest node has {largest_node_memory / GIB:,.1f} GiB; lower train.batch_size, "
            f"model.latent_dim or model.hidden_dims" + (", or sweep.pack" if spec.sweep is not None else ""),
        )
    ]


def submission_errors(spec: JobSpec, largest_node_memory: float | None = None) -> list[dict[str, str]]:
    """Every reason ``spec`` cannot work that the schema does not catch (MLflow's lengths, memory)."""
    return mlflow_limit_errors(spec) + memory_errors(spec, largest_node_memory)


# A spec whose memory estimate runs the same torch code as any other's: warm_up's.
_WARM_UP_SPEC = """
name: warm-up
model: {variant: beta_vae, architecture: mlp, latent_dim: 2, likelihood: bernoulli}
data: {source: builtin:dsprites}
"""


def warm_up() -> None:
    """Run one memory estimate, so that its first-call cost (torch's meta-device kernels load and compile their
    dispatch on first use: 2.5 s on an idle 2-core machine, 7 s and more on a busy one) is paid when the service
    starts, not by its first submission (a CLI waits 30 s for an answer)."""
    from jobs.spec import parse_spec

    training_memory(parse_spec(_WARM_UP_SPEC, "<warm-up>"))


def check_submission_limits(spec: JobSpec, largest_node_memory: float | None = None, source: str = "<spec>") -> Any:
    """``spec`` when it fits; SpecError with every field error when it does not."""
    from jobs.spec import SpecError

    errors = submission_errors(spec, largest_node_memory)
    if errors:
        raise SpecError(errors, source)
    return spec
