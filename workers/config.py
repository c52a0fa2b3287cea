"""Configuration of what runs on a worker: the model, its data, its training and its evaluation.

These pydantic models are the worker-side half of the job spec. ``jobs/spec.py`` composes them with the
job-level sections (resources, sweep, register), so a field is declared once and validated once.
Unknown keys are errors everywhere (``extra="forbid"``), and every number is finite (``allow_inf_nan=False``: an
``.inf`` or ``NaN`` is an error naming its field).
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Variant = Literal["ae", "dae", "vae", "beta_vae", "beta_tcvae"]
# chen2018_mlp: Chen et al. 2018's dSprites MLP (encoder 1200-1200 ReLU, decoder 1200-1200-1200 tanh).
Architecture = Literal["mlp", "chen2018_mlp", "conv28", "conv64"]
# torch.compile's modes: 'reduce-overhead' replays CUDA graphs (fewer kernel launches, for small models);
# 'max-autotune*' also benchmarks kernel choices while compiling (minutes up front).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

# Variants whose encoder is a Gaussian posterior q(z|x) with a N(0, I) prior.
STOCHASTIC_VARIANTS = ("vae", "beta_vae", "beta_tcvae")
# Variants with a beta: the weight on the KL (beta_vae) or on the total correlation (beta_tcvae).
BETA_VARIANTS = ("beta_vae", "beta_tcvae")


# Upper bounds on a run's length: a typo such as `steps: 10**30` is an error, not a job that runs until cancelled.
MAX_STEPS = 10**9
# Bounds on the size knobs: each is far past what a real run uses (disentanglement_lib: latent 10, batch 64, conv
# 32-64 channels; Burda et al.'s IWAE: k = 5000), and small enough that a typo (a 10**9) is refused at submit
# instead of allocating for minutes or failing on a worker. The memory a job needs is estimated too (jobs.limits).
MAX_LATENT_DIM = 4096
MAX_HIDDEN_LAYERS = 16
MAX_HIDDEN_WIDTH = 65_536
MAX_BATCH_SIZE = 65_536
MAX_IWAE_SAMPLES = 5_000
MAX_EVAL_ROWS = 10_000_000
MAX_IMAGE_SIZE = 1024
MAX_MAX_FAILURES = 100
MAX_CHECKPOINTS_KEPT = 100
MAX_FINETUNE_EPOCHS = 1000
# The data sets `builtin:NAME` names (workers.data.BUILTINS, kept equal by a test): known when a spec is validated.
BUILTIN_DATA = ("dsprites",)
MAX_EPOCHS = 10**6


class StrictModel(BaseModel):
    # Subclasses that set their own model_config keep these (pydantic merges a parent's config into a child's).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# A denoising autoencoder's corruption when the spec gives none. Plain constants as well as the field defaults: the
# compiled training step reads them without building a CorruptionConfig (pydantic's validation is not traceable).
DEFAULT_CORRUPTION_KIND: Final = "mask"
DEFAULT_CORRUPTION_LEVEL = 0.5


class CorruptionConfig(StrictModel):
    """How a denoising autoencoder corrupts its input (Vincent et al. 2008/2010)."""

    kind: Literal["mask", "gaussian", "salt_pepper"] = DEFAULT_CORRUPTION_KIND
    # mask: fraction of pixels set to 0; gaussian: noise standard deviation; salt_pepper: fraction of pixels
    # set to 0 or 1 with equal probability.
    level: float = Field(DEFAULT_CORRUPTION_LEVEL, ge=0.0, le=1.0)


class ModelConfig(StrictModel):
    variant: Variant = "vae"
    architecture: Architecture = "conv64"
    latent_dim: int = Field(10, ge=1, le=MAX_LATENT_DIM)
    beta: float | None = Field(None, ge=0.0, description="weight on KL (beta_vae) or on TC (beta_tcvae)")
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    tc_estimator: Literal["mss", "mws"] | None = None
    corruption: CorruptionConfig | None = None
    hidden_dims: list[int] = Field(
        default_factory=lambda: [512, 256], max_length=MAX_HIDDEN_LAYERS, description="mlp only"
    )
    # beta_tcvae under DDP: estimate TC over the global batch (posterior parameters gathered across ranks).
    gather_global_batch: bool = True

    @field_validator("hidden_dims")
    @classmethod
    def _hidden_widths(cls, v: list[int]) -> list[int]:
        if any(not 1 <= width <= MAX_HIDDEN_WIDTH for width in v):
            raise ValueError(f"each hidden layer is 1 to {MAX_HIDDEN_WIDTH:,} units wide")
        return v

    @model_validator(mode="after")
    def _variant_fields(self) -> ModelConfig:
        # Every problem at once, each at its own field (jobs.spec reads the "@field: message" lines back).
        problems = []
        if self.corruption is not None and self.variant != "dae":
            problems.append(f"@corruption: is only for variant 'dae', not '{self.variant}'")
        if self.tc_estimator is not None and self.variant != "beta_tcvae":
            problems.append(f"@tc_estimator: is only for variant 'beta_tcvae', not '{self.variant}'")
        if self.beta is not None and self.variant not in BETA_VARIANTS:
            problems.append(f"@beta: is only for variants 'beta_vae' and 'beta_tcvae', not '{self.variant}'")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # Resolved values: the defaults each variant uses when a field is left out.
    @property
    def effective_beta(self) -> float:
        if self.variant not in BETA_VARIANTS:
            return 1.0  # a plain VAE is a beta-VAE with beta = 1; autoencoders have no KL term
        return 4.0 if self.beta is None else self.beta

    @property
    def effective_tc_estimator(self) -> str:
        return self.tc_estimator or "mss"

    @property
    def effective_corruption(self) -> CorruptionConfig:
        return self.corruption or CorruptionConfig()

    @property
    def stochastic(self) -> bool:
        return self.variant in STOCHASTIC_VARIANTS


class DataConfig(StrictModel):
    # builtin:NAME | a dataset name pushed with `aeforge data push` | s3://bucket/key | a local path
    # At most a path's length on Linux (PATH_MAX): it is also written into run descriptions and tags, which MLflow
    # bounds (jobs.limits).
    source: str = Field("builtin:dsprites", min_length=1, max_length=4096)
    format: Literal["idx", "npz", "folder", "hdf5"] | None = Field(
        None, description="inferred from the source if left out"
    )
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    image_size: int | None = Field(
        None, ge=8, le=MAX_IMAGE_SIZE, description="image folders: resize and centre-crop to this size"
    )
    grayscale: bool = Field(True, description="image folders: convert to one channel")
    limit: int | None = Field(None, ge=2, le=10**9, description="use only the first N examples (quick runs)")

    @field_validator("source")
    @classmethod
    def _known_builtin(cls, v: str) -> str:
        # `builtin:../x` or `builtin:/abs` would only fail when the job starts: the name is checked here.
        if v.startswith("builtin:") and v[len("builtin:") :] not in BUILTIN_DATA:
            raise ValueError(f"unknown builtin data set {v[len('builtin:') :]!r}; known: {', '.join(BUILTIN_DATA)}")
        return v


class OptimizerConfig(StrictModel):
    name: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1.0e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)


class TrainConfig(StrictModel):
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE, description="per worker; global batch = batch_size x workers")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool | None = Field(
        None,
        description="torch.compile the training step's forward pass and loss (TorchInductor); null: on for "
        "CUDA, off on CPU (where compiling needs a C++ compiler and costs tens of seconds up front). Checkpoints and "
        "registered models are the same either way",
    )
    compile_mode: CompileMode | None = Field(
        None,
        description="torch.compile mode when compiling; null: 'reduce-overhead' (CUDA graphs) on one CUDA "
        "process, 'default' under DDP and on CPU",
    )
    grad_clip: float | None = Field(None, gt=0.0)
    checkpoint_every: int = Field(5000, ge=1, le=MAX_STEPS)
    eval_every: int | None = Field(None, ge=1, le=MAX_STEPS)
    log_every: int = Field(50, ge=1, le=MAX_STEPS)
    seed: int = 0
    num_to_keep: int = Field(2, ge=1, le=MAX_CHECKPOINTS_KEPT, description="checkpoints kept")
    max_failures: int = Field(2, ge=0, le=MAX_MAX_FAILURES, description="worker failures survived by resuming")
    max_hours: float | None = Field(
        None,
        gt=0.0,
        description="wall-clock limit: a job (attempt) running longer is "
        "stopped and failed by the queue, not retried (default: no limit)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        # Every problem at once, each at its own field (jobs.spec reads the "@field: message" lines back).
        problems = []
        if self.compile is False and self.compile_mode is not None:
            problems.append(
                f"@compile_mode: is set ({self.compile_mode}) but 'compile' is false; drop compile_mode or set "
                f"compile: true"
            )
        if self.steps is not None and self.epochs is not None:
            problems.append("@epochs: give either 'steps' or 'epochs', not both")
        if problems:
            raise ValueError("\n".join(problems))
        if self.steps is None and self.epochs is None:
            self.__dict__["steps"] = 300_000  # disentanglement_lib's protocol
        return self


class EvalConfig(StrictModel):
    """What the end-of-run (and every eval_every steps) evaluation computes."""

    iwae_samples: int = Field(
        50, ge=1, le=MAX_IWAE_SAMPLES, description="k for the importance-weighted log-likelihood bound"
    )
    max_examples: int = Field(
        2000, ge=10, le=MAX_EVAL_ROWS, description="validation examples used for ELBO/IWAE/decomposition"
    )
    disentanglement: bool = Field(
        True, description="MIG, SAP, DCI, FactorVAE and beta-VAE scores where the data has factors"
    )
    active_unit_variance: float = Field(
        0.01,
        gt=0.0,
        description="VAE family: a latent is active when its posterior mean's variance over the data exceeds this "
        "(Burda et al.'s 0.01); eval/active_units counts them",
    )
    collapse_kl_per_latent: float = Field(
        0.1,
        ge=0.0,
        description="VAE family: a model with no active unit, or with eval/kl per latent below this many nats, is "
        "collapsed (eval/collapsed 1): registered without its alias, never a sweep's best",
    )
    num_train: int = Field(2000, ge=10, le=MAX_EVAL_ROWS, description="points used to fit the disentanglement scores")
    num_test: int = Field(1000, ge=10, le=MAX_EVAL_ROWS)
    pictures: bool = True
    probe: bool = Field(True, description="labelled data: test accuracy of a linear probe on the frozen codes")
    probe_finetune_epochs: int = Field(
        0,
        ge=0,
        le=MAX_FINETUNE_EPOCHS,
        description="labelled data: also fine-tune a copy of the encoder "
        "with a linear head for this many epochs over num_train rows (0: off)",
    )
    probe_finetune_lr: float = Field(1.0e-3, gt=0.0)
    factors: list[str] | None = Field(
        None,
        min_length=1,
        description="the ground-truth factors the disentanglement scores use, by name (default: "
        "all; eval/mig_chen: on dSprites, Chen et al.'s four, shape left out); checked against the data's factors",
    )
    mig_chen_rows: int | None = Field(
        5_000,
        ge=2,
        le=MAX_EVAL_ROWS,
        description="eval/mig_chen: rows whose posteriors form its mixtures; null: every row of the data "
        "set, as Chen et al. (on dSprites 737,280: seconds on a GPU, many minutes on a CPU); N: a random N rows (the "
        "default 5,000: about 2 s on a CPU core for a conv64 model, 10,000 about 5 s)",
    )
    mig_chen_samples: int = Field(
        10_000, ge=1, le=MAX_EVAL_ROWS, description="eval/mig_chen: samples per entropy (Chen et al.'s 10,000)"
    )

    @field_validator("factors")
    @classmethod
    def _distinct_factors(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"each factor once: {v} names one twice")
        return v
