"""The job spec: what a user writes, submits and gets validated before anything runs.

The worker-side sections (model, data, train, eval) are the pydantic models of ``workers.config``; this module
adds the job-level ones (resources, sweep, register) and the rules that span sections. ``parse_spec`` turns
YAML/JSON text into a :class:`JobSpec` or raises :class:`SpecError` with one entry per problem, each naming its
field path. ``check_data`` is the second stage, run before training: it opens the data source (cheaply) and
checks that the architecture fits its images.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
import re
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.config import (
    BETA_VARIANTS,
    MAX_LATENT_DIM,
    STOCHASTIC_VARIANTS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    StrictModel,
    TrainConfig,
    Variant,
)
from workers.errors import AeforgeError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# The most trials one sweep may run (its grid times num_samples, or its random draws). The count is checked
# before any trial is built, so a spec that asks for millions is refused at once.
MAX_TRIALS = 10_000
# Per-worker and per-job bounds that keep a job's resource request a finite number (the queue stores it).
MAX_WORKERS = 4096
MAX_CPUS_PER_WORKER = 1024.0
MAX_GPUS_PER_WORKER = 16.0


class SpecError(AeforgeError):
    """A spec that cannot run. ``errors`` lists {"loc": "model.beta", "msg": "..."} entries."""

    def __init__(self, errors: list[dict[str, str]], source: str = "<spec>"):
        # A message that starts with its own field path (a DataError's "data.source: ...") says it once.
        errors = [{**e, "msg": _without_field(e["loc"], e["msg"])} for e in errors]
        self.errors = errors
        self.source = source
        lines = [f"{source}: {len(errors)} error{'s' if len(errors) != 1 else ''}"]
        lines += [f"  {e['loc']}: {e['msg']}" for e in errors]
        super().__init__("\n".join(lines))


def _without_field(loc: str, msg: str) -> str:
    """``msg`` without a leading ``loc:`` (or the field's last name), which the error's location already says."""
    for prefix in (f"{loc}: ", f"{loc.rsplit('.', 1)[-1]}: "):
        while msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


class Resources(StrictModel):
    workers: int = Field(1, ge=1, le=MAX_WORKERS, description="Ray Train workers (DDP processes)")
    gpus_per_worker: float = Field(0, ge=0, le=MAX_GPUS_PER_WORKER)
    cpus_per_worker: float = Field(1, gt=0, le=MAX_CPUS_PER_WORKER)

    def per_worker(self) -> dict[str, float]:
        """Ray Train's resources_per_worker."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}


class BetaRange(StrictModel):
    start: float = Field(..., ge=0)
    stop: float = Field(..., ge=0)
    num: int = Field(..., ge=1, le=MAX_TRIALS)
    spacing: Literal["linear", "log"] = "linear"

    @model_validator(mode="after")
    def _positive_for_log(self) -> BetaRange:
        if self.spacing == "log" and (self.start <= 0 or self.stop <= 0):
            raise ValueError("a log-spaced range needs start > 0 and stop > 0")
        return self

    def values(self) -> list[float]:
        if self.num == 1:
            return [self.start]
        if self.spacing == "linear":
            step = (self.stop - self.start) / (self.num - 1)
            return [round(self.start + i * step, 10) for i in range(self.num)]
        lo, hi = math.log(self.start), math.log(self.stop)
        return [round(math.exp(lo + i * (hi - lo) / (self.num - 1)), 10) for i in range(self.num)]


class SweepMetric(StrictModel):
    name: str = "eval/elbo"
    mode: Literal["max", "min"] = "max"


class SweepConfig(StrictModel):
    beta: list[float] | BetaRange | None = None
    latent_dim: list[int] | None = None
    seed: list[int] | None = None
    variant: list[Variant] | None = None
    search: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, ge=1, le=MAX_TRIALS, description="grid: repeats of the grid; random: trials drawn")
    metric: SweepMetric = Field(default_factory=SweepMetric)
    max_concurrent_trials: int | None = Field(
        None, ge=1, le=MAX_TRIALS, description="default: as many as the cluster fits"
    )
    register_all: bool = Field(False, description="also register every non-best trial's model")
    pack: int | Literal["auto"] = Field(
        1,
        description="trials trained together as one pack, in one Ray Train run: "
        "1 (each trial its own run), a pack size, or auto (enough packs to fill "
        "the trials that run at once)",
    )

    @field_validator("pack")
    @classmethod
    def _pack_positive(cls, v):
        if isinstance(v, int) and not 1 <= v <= MAX_TRIALS:
            raise ValueError(
                f"a pack holds at least 1 trial (1: every trial trains on its own) and at most {MAX_TRIALS:,}, "
                f"the most a sweep runs"
            )
        return v

    @field_validator("beta")
    @classmethod
    def _beta_non_negative(cls, v):
        if isinstance(v, list) and any(b < 0 for b in v):
            raise ValueError("beta values must be >= 0")
        return v

    @field_validator("latent_dim")
    @classmethod
    def _latent_positive(cls, v):
        if v is not None and any(not 1 <= d <= MAX_LATENT_DIM for d in v):
            raise ValueError(f"latent_dim values must be 1 to {MAX_LATENT_DIM}")
        return v

    def num_trials(self) -> int:
        """How many trials this sweep runs, counted without building them: the product of the grid's lengths
        times its repeats, or the random draws."""
        if self.search == "random":
            return self.num_samples
        return math.prod(len(values) for values in self.space().values()) * self.num_samples

    def space(self) -> dict[str, list]:
        """The searched dimensions and their values (empty lists kept, so validation can name them)."""
        out: dict[str, list] = {}
        if self.beta is not None:
            out["beta"] = self.beta.values() if isinstance(self.beta, BetaRange) else list(self.beta)
        for key in ("latent_dim", "seed", "variant"):
            values = getattr(self, key)
            if values is not None:
                out[key] = list(values)
        return out


class RegisterConfig(StrictModel):
    model_name: str = Field(..., pattern=NAME_PATTERN)
    alias: str | None = Field(
        "candidate",
        pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
        description="the alias a finished, healthy version takes when it is not worse than the version the alias "
        "points at (null: register without an alias)",
    )
    description: str | None = None
    metric: SweepMetric | None = Field(
        None,
        description="what 'not worse' means when the alias moves (default: a sweep's metric, else eval/elbo (max) "
        "for the VAE family and eval/recon (min) for autoencoders)",
    )


class JobSpec(StrictModel):
    # "register" would shadow BaseModel.register: the field is `registration`, written `register` in specs.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    name: str = Field(..., pattern=NAME_PATTERN)
    kind: Literal["train", "sweep"] = "train"
    description: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    resources: Resources = Field(default_factory=Resources)
    sweep: SweepConfig | None = None
    registration: RegisterConfig | None = Field(None, alias="register")

    @model_validator(mode="after")
    def _cross_section_rules(self) -> JobSpec:
        errors: list[tuple[str, str]] = []
        if self.kind == "sweep" and self.sweep is None:
            errors.append(("sweep", "a job of kind 'sweep' needs a 'sweep' section"))
        if self.kind == "train" and self.sweep is not None:
            errors.append(("sweep", "only a job of kind 'sweep' takes a 'sweep' section (set kind: sweep)"))
        variants = [self.model.variant]
        if self.sweep is not None:
            space = self.sweep.space()
            if not space:
                errors.append(
                    ("sweep", "the search space is empty: give at least one of beta, latent_dim, seed, variant")
                )
            for key, values in space.items():
                if not values:
                    errors.append((f"sweep.{key}", "an empty list searches nothing; give at least one value"))
            trials = self.sweep.num_trials()
            if trials > MAX_TRIALS:
                how = (
                    "num_samples"
                    if self.sweep.search == "random"
                    else " x ".join(f"{len(v)} {k}" for k, v in space.items())
                    + (f" x {self.sweep.num_samples} num_samples" if self.sweep.num_samples > 1 else "")
                )
                errors.append(
                    (
                        "sweep",
                        f"the sweep would run {trials:,} trials ({how}); at most {MAX_TRIALS:,} "
                        f"trials per sweep: search fewer values or split it into several sweeps",
                    )
                )
            variants = space.get("variant") or variants
            if "beta" in space and not all(v in BETA_VARIANTS for v in variants):
                bad = sorted({v for v in variants if v not in BETA_VARIANTS})
                errors.append(
                    ("sweep.beta", f"sweeping beta needs variant beta_vae or beta_tcvae, not {', '.join(bad)}")
                )
            # A variant's own settings apply to that variant's trials (with_trial drops them from the others).
            if "variant" in space and self.model.tc_estimator is not None and "beta_tcvae" not in variants:
                errors.append(("model.tc_estimator", "is only for beta_tcvae, and the sweep has no beta_tcvae trial"))
            if "variant" in space and self.model.corruption is not None and "dae" not in variants:
                errors.append(("model.corruption", "is only for dae, and the sweep has no dae trial"))
            if self.sweep.pack != 1 and self.sweep.search != "grid":
                errors.append(
                    (
                        "sweep.pack",
                        "packs need search: grid (a random search draws its trials one at a time); use pack: 1",
                    )
                )
            metric = self.sweep.metric.name
            known = reported_metrics(self, variants)
            if metric not in known and not _metric_needs_factors(metric):
                errors.append(
                    ("sweep.metric.name", f"no trial reports '{metric}'; reported: {', '.join(sorted(known))}")
                )
            elif metric in POSTERIOR_FACTOR_METRICS and not all(v in STOCHASTIC_VARIANTS for v in variants):
                errors.append(
                    (
                        "sweep.metric.name",
                        f"'{metric}' needs a posterior: only vae, beta_vae and beta_tcvae trials report it",
                    )
                )
            elif _metric_needs_factors(metric) and not self.eval.disentanglement:
                errors.append(("sweep.metric.name", f"no trial reports '{metric}': eval.disentanglement is off"))
        if self.registration is not None and self.registration.metric is not None:
            metric = self.registration.metric.name
            known = reported_metrics(self, variants)
            if metric not in known and not _metric_needs_factors(metric):
                errors.append(
                    ("register.metric.name", f"no run reports '{metric}'; reported: {', '.join(sorted(known))}")
                )
        if "beta_tcvae" in variants and self.train.batch_size < 2:
            errors.append(("train.batch_size", "beta_tcvae's minibatch TC estimators need a batch of at least 2"))
        if self.train.precision == "bf16" and self.resources.gpus_per_worker == 0:
            errors.append(("train.precision", "bf16 needs GPUs (resources.gpus_per_worker > 0); use fp32 on CPU"))
        if errors:
            # Raised as one ValueError; parse_spec splits it back into field-level entries.
            raise ValueError("\n".join(f"@{loc}: {msg}" for loc, msg in errors))
        return self

    # --- derived ----------------------------------------------------------------------------------
    def gate_metric(self) -> SweepMetric:
        """The metric an alias moves by (jobs/gate.py): register.metric, else the sweep's, else the ELBO (max) for
        the VAE family and the reconstruction error (min) for autoencoders."""
        if self.registration is not None and self.registration.metric is not None:
            return self.registration.metric
        if self.sweep is not None:
            return self.sweep.metric
        if self.model.variant in STOCHASTIC_VARIANTS:
            return SweepMetric(name="eval/elbo", mode="max")
        return SweepMetric(name="eval/recon", mode="min")

    def resource_request(self) -> dict[str, float]:
        """What the whole job holds on the cluster while it runs: every worker, plus a little for the driver."""
        r = self.resources
        trials = 1
        if self.kind == "sweep" and self.sweep is not None:
            trials = self.max_concurrent_trials(None)
        return {
            "CPU": float(r.workers * r.cpus_per_worker * trials),
            "GPU": float(r.workers * r.gpus_per_worker * trials),
        }

    def trial_configs(self) -> list[dict[str, Any]]:
        """The grid of a sweep (one dict per trial, before random sampling and repeats)."""
        if self.sweep is None:
            return [{}]
        space = self.sweep.space()
        keys = list(space)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]

    def trial_packs(self, size: int) -> list[list[dict[str, Any]]]:
        """The grid's trials (with its repeats), each with its ``index`` in the grid, in packs of at most ``size``:
        trials of one variant and latent size together (they differ in beta and seed), in grid order."""
        assert self.sweep is not None
        rows = [{**row, "index": i} for i, row in enumerate(self.trial_configs() * self.sweep.num_samples)]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows:
            key = (row.get("variant", self.model.variant), row.get("latent_dim", self.model.latent_dim))
            groups.setdefault(key, []).append(row)
        return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]

    def packs_line(self, size: int) -> str:
        """Which trials (by grid index) go together in packs of ``size``: "2 packs: t00, t01; t02, t03"."""
        packs = self.trial_packs(size)
        listing = "; ".join(", ".join(f"t{row['index']:02d}" for row in pack) for pack in packs)
        return f"{len(packs)} pack{'s' if len(packs) != 1 else ''}: {listing}"

    def pack_size(
        self,
        concurrent: int,
        free_bytes: float | None = None,
        image_shape: tuple[int, int, int] | None = None,
        dataset_size: int = 1,
    ) -> tuple[int, str]:
        """The pack size of this sweep and a line saying why: ``sweep.pack``, or for auto the smaller of two:
        enough packs of each group (variant x latent size) to keep ``concurrent`` trials running (more packs than
        slots only queue, fewer leave slots idle), and as many models as half of ``free_bytes`` (the memory of the
        device a pack trains on) holds, each model's need counted from its size at the spec's batch
        (workers.pack.training_bytes, for the largest model of the sweep on ``image_shape``)."""
        assert self.sweep is not None
        if self.sweep.pack != "auto":
            return int(self.sweep.pack), f"sweep.pack: {self.sweep.pack}"
        largest = max(len(group) for group in self.trial_packs(self.num_trials()))
        size = max(1, math.ceil(largest / max(1, concurrent)))
        why = f"the largest group of {largest} trials over {concurrent} at once"
        if free_bytes is not None and image_shape is not None:
            from workers.pack import training_bytes

            biggest = max(self.trial_configs(), key=lambda t: t.get("latent_dim", self.model.latent_dim))
            need = training_bytes(
                self.with_trial({k: v for k, v in biggest.items() if k != "seed"}).model,
                image_shape,
                dataset_size,
                self.train.batch_size,
            )
            fits = max(1, int(PACK_MEMORY_FRACTION * free_bytes // need))
            a_model = f"{need / 2**20:.0f} MiB" if need >= 2**20 else f"{need / 2**10:.0f} KiB"
            why += f"; {fits} fit in half of {free_bytes / 2**30:.1f} GiB at {a_model} a model"
            size = min(size, fits)
        return size, f"sweep.pack auto: {size} ({why})"

    def num_trials(self) -> int:
        """How many trials a sweep runs: the grid times its repeats, or the random draws (the grid is not built)."""
        assert self.sweep is not None
        return self.sweep.num_trials()

    def max_concurrent_trials(self, cluster: dict[str, float] | None) -> int:
        """The spec's cap, never more than the cluster fits (a trial started without room for its workers would
        wait on them inside Ray Train and time out); without a cap, as many as the cluster fits; at least 1."""
        assert self.sweep is not None
        n = self.num_trials()
        if self.sweep.max_concurrent_trials is not None:
            n = min(n, self.sweep.max_concurrent_trials)
        if cluster is None:
            return n if self.sweep.max_concurrent_trials is not None else 1
        return max(1, min(n, trials_that_fit(self.resources, cluster)))

    def with_trial(self, trial: dict[str, Any]) -> JobSpec:
        """This spec with one trial's values put into the model/train sections."""
        data = self.model_dump(mode="json")
        for key, value in trial.items():
            if key == "seed":
                data["train"]["seed"] = value
            else:
                data["model"][key] = value
        if data["model"]["variant"] != "beta_tcvae":
            data["model"]["tc_estimator"] = None
        if data["model"]["variant"] != "dae":
            data["model"]["corruption"] = None
        if data["model"]["variant"] not in BETA_VARIANTS:
            data["model"]["beta"] = None
        data["kind"] = "train"
        data["sweep"] = None
        return JobSpec.model_validate(data)


# A sweep trial's driver (the Tune function that builds its TorchTrainer) only waits on the trainer: it holds this
# sliver of a CPU, so that trials never hold whole CPUs their own workers need (two nested trials on 2 CPUs would
# deadlock).
TRIAL_DRIVER_CPU = 0.01
# The share of a device's free memory packs may plan to fill (the rest: the framework, the data, fragmentation).
PACK_MEMORY_FRACTION = 0.5


def trial_cpus(resources: Resources) -> float:
    """CPUs one sweep trial holds while it runs: its workers and its driver."""
    return resources.workers * resources.cpus_per_worker + TRIAL_DRIVER_CPU


def trials_that_fit(resources: Resources, cluster: dict[str, float]) -> int:
    """How many sweep trials of these resources the cluster holds at once (their drivers included)."""
    # Rounded so that 2 CPUs hold 2 trials of 0.99 CPU despite float error.
    fits = int(round(cluster.get("CPU", 0) / trial_cpus(resources), 9))
    if resources.gpus_per_worker:
        fits = min(fits, int(round(cluster.get("GPU", 0) / (resources.workers * resources.gpus_per_worker), 9)))
    return fits


def check_cluster(spec: JobSpec, cluster: dict[str, float]) -> int:
    """How many trials of a sweep run at once on this cluster ({"CPU": n, "GPU": m}); SpecError naming
    ``resources`` when not even one trial fits, so that nothing starts."""
    r = spec.resources
    if trials_that_fit(r, cluster) >= 1:
        return spec.max_concurrent_trials(cluster)
    need = f"{r.workers} worker(s) x {r.cpus_per_worker:g} CPU"
    if r.gpus_per_worker:
        need += f" and {r.gpus_per_worker:g} GPU"
    raise SpecError(
        [
            {
                "loc": "resources",
                "msg": (
                    f"a trial needs {need} plus {TRIAL_DRIVER_CPU:g} CPU for its driver, and the cluster has "
                    f"{cluster.get('CPU', 0):g} CPU and {cluster.get('GPU', 0):g} GPU in all, so no trial can ever start; "
                    f"lower resources.workers / cpus_per_worker / gpus_per_worker or use a larger cluster"
                ),
            }
        ]
    )


def reported_metrics(spec: JobSpec, variants: Sequence[str] | None = None) -> set[str]:
    """Metric names every trial of this spec reports (those that need data factors are added by check_data)."""
    variants = variants or [spec.model.variant]
    names = {"train/loss", "train/recon", "eval/recon", "eval/elbo"}
    if all(v in STOCHASTIC_VARIANTS for v in variants):
        names |= {"train/kl", "eval/kl", "eval/iwae_ll", "eval/mi", "eval/tc", "eval/dwkl"}
        names |= {"eval/active_units", "eval/kl_per_latent", "eval/collapsed"}
    if all(v == "beta_tcvae" for v in variants):
        names |= {"train/mi", "train/tc", "train/dwkl"}
    return names


FACTOR_METRICS = {
    "eval/mig",
    "eval/mig_exact",
    "eval/mig_chen",
    "eval/sap",
    "eval/dci_disentanglement",
    "eval/dci_completeness",
    "eval/dci_informativeness",
    "eval/factor_vae",
    "eval/beta_vae",
}


# Factor metrics computed from the posterior q(z|x): the VAE family's only.
POSTERIOR_FACTOR_METRICS = ("eval/mig_exact", "eval/mig_chen")


def _metric_needs_factors(name: str) -> bool:
    return name in FACTOR_METRICS


# --- parsing ----------------------------------------------------------------------------------------------


# pydantic names the branch of a union in an error's location (sweep.beta.list[float], sweep.beta.BetaRange,
# function-after[...]); a user knows the field, not the branch. Field names are identifiers; branch names are
# not, or are class names.
def _is_branch(part) -> bool:
    return isinstance(part, str) and (not part.isidentifier() or part[:1].isupper())


# Errors that only say "this branch of the union did not match" when another branch said something useful.
_BRANCH_MISMATCH = {"list_type", "model_type", "dict_type", "model_attributes_type"}


def _loc(parts: tuple) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not _is_branch(p):
            out += ("." if out else "") + str(p)
    return out or "<spec>"


def _model_at(parts: tuple) -> type[BaseModel] | None:
    """The spec's model class at a validation error's location (its last part, the key, left out), or None."""
    model: Any = JobSpec
    for part in parts:
        if isinstance(part, int) or _is_branch(part):
            continue
        fields = {**model.model_fields, **{f.alias: f for f in model.model_fields.values() if f.alias}}
        if part not in fields:
            return None
        model = _model_in(fields[part].annotation)
        if model is None:
            return None
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (through Optional, unions and lists), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _nearest(word: str, choices: list[str]) -> str | None:
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return found[0] if found else None


def _shown(value: Any) -> str:
    """A bad value as the spec wrote it, short."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _explained(err: Any) -> str:
    """pydantic's message for one error, with the bad value echoed and the nearest valid key or value offered."""
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        model = _model_at(err["loc"][:-1])
        keys = sorted({f.alias or name for name, f in model.model_fields.items()}) if model else []
        near = _nearest(key, keys)
        hint = f"; did you mean '{near}'?" if near else (f" (keys here: {', '.join(keys)})" if keys else "")
        return f"unknown key '{key}'{hint}"
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    if kind in ("literal_error", "enum"):
        options = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        near = _nearest(str(value), options) if isinstance(value, str) else None
        return f"{_shown(value)} is not one of {', '.join(options)}" + (f"; did you mean '{near}'?" if near else "")
    if kind not in ("missing",) and isinstance(value, (str, int, float, bool)) and not msg.startswith("@"):
        return f"{msg}, got {_shown(value)}"
    return msg


def _errors_from_validation(exc: ValidationError) -> list[dict[str, str]]:
    raw = exc.errors()
    in_union = [e for e in raw if any(_is_branch(p) for p in e["loc"])]
    useful_locs = {_loc(e["loc"]) for e in in_union if e["type"] not in _BRANCH_MISMATCH}
    errors: list[dict[str, str]] = []
    for err in raw:
        loc = _loc(err["loc"])
        if err in in_union and err["type"] in _BRANCH_MISMATCH and loc in useful_locs:
            continue
        msg = _explained(err)
        if msg.startswith("@"):  # rules across fields: one entry per line, each at its own field path
            for line in msg.splitlines():
                where, _, what = line[1:].partition(": ")
                errors.append({"loc": where if loc == "<spec>" else f"{loc}.{where}", "msg": what})
            continue
        errors.append({"loc": loc, "msg": msg})
    seen, unique = set(), []
    for e in errors:
        key = (e["loc"], e["msg"])
        if key not in seen:
            seen.add(key)
            unique.append(e)
    return unique


SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_spec(text: str, source: str = "<spec>") -> JobSpec:
    """YAML or JSON text to a validated JobSpec, or SpecError listing every problem by field path."""
    return spec_from_data(_parse_text(text, source), source)


def _parse_text(text: str, source: str) -> Any:
    """YAML or JSON text to its data, or SpecError saying where the text is not YAML."""
    try:
        # JSON is YAML. libyaml's loader where installed: the pure-Python one took most of a submission's time.
        return yaml.load(text, Loader=SAFE_LOADER)
    except RecursionError:
        raise SpecError([{"loc": "<file>", "msg": "the spec is nested too deeply to be a job spec"}], source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        if "maximum nesting depth" in problem:  # libyaml's own bound, where the pure-Python parser recursed
            raise SpecError(
                [{"loc": "<file>", "msg": "the spec is nested too deeply to be a job spec"}], source
            ) from None
        raise SpecError([{"loc": "<file>", "msg": f"not valid YAML/JSON at {where}: {problem}"}], source) from None
    except (ValueError, TypeError, OverflowError) as exc:
        # A scalar YAML recognises but cannot build: a date like 2020-13-45, an int of more than 4300 digits, a
        # `!!int abc`.
        raise SpecError([{"loc": "<file>", "msg": f"not a valid YAML/JSON value: {exc}"}], source) from None


def spec_from_data(data: Any, source: str = "<spec>") -> JobSpec:
    """Parsed YAML/JSON (a mapping of sections) to a validated JobSpec, or SpecError by field path."""
    if data is None:
        raise SpecError([{"loc": "<file>", "msg": "the spec is empty"}], source)
    if not isinstance(data, dict):
        raise SpecError(
            [{"loc": "<file>", "msg": f"the spec must be a mapping of sections, not a {type(data).__name__}"}], source
        )
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        errors = _errors_from_validation(exc)
        unknown = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
    if unknown:
        # pydantic checks the rules across a section's fields only once every field of it is valid. An unknown key
        # is no rule's input: the spec without them is checked again, so that its other errors come in this round
        # too, not in the next one.
        try:
            JobSpec.model_validate(_without_keys(copy.deepcopy(data), unknown))
        except (ValidationError, RecursionError) as again:
            if isinstance(again, ValidationError):
                seen = {(e["loc"], e["msg"]) for e in errors}
                errors += [e for e in _errors_from_validation(again) if (e["loc"], e["msg"]) not in seen]
    raise SpecError(errors, source) from None


def _without_keys(data: Any, locations: list[tuple]) -> Any:
    """``data`` with the key at each of pydantic's error ``locations`` removed (union branch names skipped)."""
    for loc in locations:
        parts = [p for p in loc if not _is_branch(p)]
        node = data
        for part in parts[:-1]:
            if (
                isinstance(node, dict)
                and part in node
                or isinstance(node, list)
                and isinstance(part, int)
                and part < len(node)
            ):
                node = node[part]
            else:
                node = None
                break
        if isinstance(node, dict) and parts:
            node.pop(parts[-1], None)
    return data


def parse_spec_json(text: str, source: str = "<spec>") -> JobSpec:
    """The JSON the queue stored for a job (``spec_json``) to a JobSpec. JSON is read as JSON, never as YAML: YAML
    reads JSON's escaped surrogate pairs (an emoji written by ``json.dumps``) as two lone surrogates."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SpecError([{"loc": "<file>", "msg": f"the stored spec is not valid JSON: {exc}"}], source) from None
    return spec_from_data(data, source)


def load_spec(path: str | Path, settings: Sequence[str] = ()) -> JobSpec:
    """The spec in a file, with ``settings`` (``section.key=value``, `aeforge run --set`) applied to it before it
    is validated: a bad value or an unknown key is named by its field path as it would be in the file, with the
    setting it came from."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([{"loc": "<file>", "msg": f"no such spec file: {path}"}], str(path))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([{"loc": "<file>", "msg": f"cannot read {path}: {exc}"}], str(path)) from None
    if not settings:
        return parse_spec(text, str(path))
    data = apply_settings(_parse_text(text, str(path)), settings, str(path))
    try:
        return spec_from_data(data, str(path))
    except SpecError as exc:
        raise SpecError([_naming_setting(e, settings) for e in exc.errors], exc.source) from None


def parse_setting(setting: str, source: str = "<spec>") -> tuple[list[str], Any]:
    """``train.optimizer.lr=1e-3`` -> (["train", "optimizer", "lr"], 0.001): the value read as YAML (a number,
    true/false, null, a [list], or else a string), as it would be in the file."""
    path, sep, text = setting.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) for k in keys):
        raise SpecError(
            [
                {
                    "loc": "--set",
                    "msg": f"{setting!r} is not PATH=VALUE with a dotted path of spec keys (e.g. train.steps=100)",
                }
            ],
            source,
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(
            [{"loc": ".".join(keys), "msg": f"not a valid YAML value in --set {setting}: {problem}"}], source
        ) from None
    return keys, value


def apply_settings(data: Any, settings: Sequence[str], source: str = "<spec>") -> dict[str, Any]:
    """A spec's parsed data with each ``section.key=value`` setting put in, sections made where missing. Only the
    path's shape is checked here (a value cannot hold a key); whether the key exists and the value fits is the
    validation's to say, as for a file."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(
            [{"loc": "<file>", "msg": f"the spec must be a mapping of sections, not a {type(data).__name__}"}], source
        )
    data = copy.deepcopy(data)
    for setting in settings:
        keys, value = parse_setting(setting, source)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise SpecError(
                    [
                        {
                            "loc": where,
                            "msg": f"is a value ({child!r}), not a section: --set {setting} cannot put a key in it",
                        }
                    ],
                    source,
                )
            node = child
        node[keys[-1]] = value
    return data


def _naming_setting(error: dict[str, str], settings: Sequence[str]) -> dict[str, str]:
    """A validation error about a field a setting wrote, with that setting named."""
    for setting in reversed(settings):  # the last setting of a path is the one in force
        path = setting.partition("=")[0].strip()
        loc = error["loc"]
        if loc == path or loc.startswith((path + ".", path + "[")) or path.startswith(loc + "."):
            return {**error, "msg": f"{error['msg']} (from --set {setting})"}
    return error


def json_schema() -> dict:
    return JobSpec.model_json_schema()


# --- the data-aware stage ---------------------------------------------------------------------------------


def check_data(spec: JobSpec, resolve: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Open the data source cheaply and check the spec against it, before any training starts.

    Returns {"num_examples", "image_shape", "has_factors"}; raises SpecError naming ``data.source`` or
    ``model.architecture``.
    """
    from workers.data import DataError, check_source, known_factor_names
    from workers.models.architectures import check_fits

    try:
        info = check_source(spec.data, resolve=resolve)
    except DataError as exc:
        raise SpecError([{"loc": "data.source", "msg": str(exc)}]) from None
    num_examples, image_shape, has_factors = info[0], tuple(info[1]), bool(info[2])
    errors = []
    try:
        check_fits(spec.model.architecture, image_shape)
    except ValueError as exc:
        errors.append({"loc": "model.architecture", "msg": str(exc)})
    n_train = num_examples if spec.data.limit is None else min(num_examples, spec.data.limit)
    n_train = int(n_train * (1 - spec.data.val_fraction))
    global_batch = spec.train.batch_size * spec.resources.workers
    if n_train < global_batch:
        errors.append(
            {
                "loc": "train.batch_size",
                "msg": f"the global batch ({global_batch}) is larger than the training set ({n_train} examples)",
            }
        )
    if spec.eval.factors is not None and spec.eval.disentanglement:
        names = known_factor_names(spec.data)
        if not has_factors:
            errors.append({"loc": "eval.factors", "msg": "the data has no ground-truth factors to score"})
        elif names is not None and (unknown := [f for f in spec.eval.factors if f not in names]):
            errors.append(
                {
                    "loc": "eval.factors",
                    "msg": f"{', '.join(map(repr, unknown))}: not a factor of "
                    f"{spec.data.source} (factors: {', '.join(names)})",
                }
            )
    if spec.sweep is not None:
        metric = spec.sweep.metric.name
        if _metric_needs_factors(metric) and not (has_factors and spec.eval.disentanglement):
            why = "the data has no ground-truth factors" if not has_factors else "eval.disentanglement is off"
            errors.append({"loc": "sweep.metric.name", "msg": f"no trial reports '{metric}': {why}"})
    if errors:
        raise SpecError(errors)
    return {"num_examples": num_examples, "image_shape": image_shape, "has_factors": has_factors}
