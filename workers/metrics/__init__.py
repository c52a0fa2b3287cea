"""Evaluation of a trained autoencoder: one file per metric, and :func:`evaluate`, which the training loop calls.

What :func:`evaluate` reports (keys prefixed ``eval/``), and on which examples:

- ``elbo``, ``recon``, ``kl`` (``recon`` only for deterministic autoencoders): ``max_examples`` validation rows;
- VAE family: ``iwae_ll`` (k = ``iwae_samples``) and ``mi``, ``tc``, ``dwkl`` on the same validation rows, and
  the model's health on them: ``active_units`` (Burda et al.: latents whose posterior mean varies over the data by
  more than ``active_unit_variance``), ``kl_per_latent`` and ``collapsed`` (1.0: no active unit, or a KL per
  latent below ``collapse_kl_per_latent``; see active_units.py). The registry never gives a collapsed model an
  alias, and a sweep never ranks it best;
- labelled data with ``probe`` on: ``probe_linear_accuracy`` (a logistic regression on the frozen posterior means
  of up to ``num_train`` training rows, tested on up to ``num_test`` validation rows) and, with
  ``probe_finetune_epochs`` > 0, ``probe_finetune_accuracy`` (a copy of the encoder and a linear head trained end
  to end): the encoder as a pre-trained classifier, as the lecture shows;
- data with ground-truth factors and ``disentanglement`` on, drawn from ``full`` (the whole ground-truth data set)
  when given, else from the validation set: ``mig`` (disentanglement_lib's: means, 20 bins, all factors),
  ``sap``, ``dci_*`` on one shared draw of ``num_train`` + ``num_test`` codes; ``factor_vae`` and ``beta_vae``
  on their own votes (sizes below); ``mig_exact`` (Chen et al.'s estimator, VAE family) on ``max_examples`` rows;
  ``mig_chen`` (Chen et al.'s published convention, VAE family: see mig.py) on ``mig_chen_rows`` rows (null: all)
  with ``mig_chen_samples`` samples per entropy. ``factors`` (default: all) names the factors every score uses;
  left unset, ``mig_chen`` scores Chen et al.'s choice (dSprites without shape).

Sizes: disentanglement_lib votes with batches of 64 images, 10,000 training and 5,000 evaluation votes per
score. Here each score gets ``num_train // VOTES_PER_POINT`` training and ``num_test // VOTES_PER_POINT``
evaluation votes of ``VOTE_BATCH`` images (FactorVAE) or pairs (beta-VAE), so that with num_train = 2000 and
num_test = 1000 a small model is evaluated in seconds on a CPU; raise num_train/num_test for published-size
estimates. DCI fits 10 boosting stages at learning rate 0.5 instead of 100 at 0.1 (see dci.py for how
close that comes).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch

from workers.config import EvalConfig
from workers.data.base import DataError, ImageDataset
from workers.metrics.active_units import active_units
from workers.metrics.beta_vae_score import beta_vae_score
from workers.metrics.dci import dci_from_codes
from workers.metrics.elbo import elbo
from workers.metrics.factor_vae import factor_vae_score
from workers.metrics.iwae import iwae_log_likelihood
from workers.metrics.mig import mig_chen, mig_exact, mig_from_codes
from workers.metrics.probe import fine_tune, linear_probe
from workers.metrics.sampling import FactorSampler, factor_columns, model_device
from workers.metrics.sap import sap_from_codes
from workers.metrics.tc_decomposition import tc_decomposition

VOTE_BATCH = 64  # images per FactorVAE vote, pairs per beta-VAE point (disentanglement_lib's batch_size)
VOTES_PER_POINT = 10  # FactorVAE votes / beta-VAE points = num_train // 10 and num_test // 10

__all__ = ["check_scored_factors", "evaluate"]


def _generator(seed: int, stream: str) -> torch.Generator:
    # One random stream per metric: resizing or dropping one metric leaves the others' samples unchanged.
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(stream.encode())) % 2**63)


# Told the metric an evaluation starts next, how many it has computed before it and how many it computes in all.
MetricStart = Callable[[str, int, int], None]


def evaluation_plan(model, val: ImageDataset, config: EvalConfig, *, full=None, train=None) -> list[str]:
    """The metrics :func:`evaluate` computes for this model and data, in its order (``eval/`` names; a part that
    yields several, such as dci, by its one name)."""
    plan = ["eval/elbo"]
    if model.stochastic:
        plan += ["eval/iwae_ll", "eval/tc decomposition", "eval/active_units"]
    if config.probe and train is not None and _has_classes(train) and _has_classes(val):
        plan.append("eval/probes")
    truth = full if full is not None else val
    if config.disentanglement and truth.has_factors:
        plan += ["eval/codes", "eval/mig", "eval/sap", "eval/dci"]
        columns = None if config.factors is None else factor_columns(truth, config.factors)
        if len(_scored_factors(truth, columns)) >= 2:
            plan += ["eval/factor_vae", "eval/beta_vae"]
        if model.stochastic:
            plan += ["eval/mig_exact", "eval/mig_chen"]
    return plan


def evaluate(
    model,
    val: ImageDataset,
    config: EvalConfig,
    *,
    batch_size: int = 256,
    seed: int = 0,
    full: ImageDataset | None = None,
    train: ImageDataset | None = None,
    on_metric: MetricStart | None = None,
) -> dict[str, float]:
    """Every metric that applies to this model and data (see the module doc), as ``{"eval/NAME": value}``;
    ``on_metric`` is told each metric as it starts (a progress display's "evaluating eval/mig (5 of 11)").

    Runs in eval mode without gradients on the model's device and restores the model's train/eval mode.
    FactorVAE and beta-VAE scores need two factors that vary; with fewer they are left out.
    """
    device = model_device(model)
    was_training = model.training
    plan = evaluation_plan(model, val, config, full=full, train=train)

    def starting(name: str) -> None:
        if on_metric is not None:
            on_metric(name, plan.index(name), len(plan))

    model.eval()
    out: dict[str, float] = {}
    try:
        with torch.no_grad():
            # The same validation rows (same stream) for ELBO, IWAE and the decomposition, so they compare.
            starting("eval/elbo")
            out.update(elbo(model, val, config.max_examples, batch_size, _generator(seed, "val")))
            if model.stochastic:
                starting("eval/iwae_ll")
                out.update(
                    iwae_log_likelihood(
                        model, val, config.iwae_samples, config.max_examples, batch_size, _generator(seed, "val")
                    )
                )
                starting("eval/tc decomposition")
                parts = tc_decomposition(model, val, config.max_examples, batch_size, _generator(seed, "val"))
                out.update({k: parts[k] for k in ("mi", "tc", "dwkl")})
                starting("eval/active_units")
                out.update(
                    active_units(
                        model,
                        val,
                        config.max_examples,
                        batch_size,
                        _generator(seed, "val"),
                        kl=out["kl"],
                        variance_threshold=config.active_unit_variance,
                        kl_per_latent_floor=config.collapse_kl_per_latent,
                    )
                )

            if "eval/probes" in plan and train is not None:
                starting("eval/probes")
                out.update(_probes(model, train, val, config, batch_size, seed))

            truth = full if full is not None else val
            if "eval/codes" in plan:
                out.update(_disentanglement(model, truth, config, batch_size, seed, device, starting))
    finally:
        model.train(was_training)
    return {f"eval/{name}": float(value) for name, value in out.items()}


def _scored_factors(truth: ImageDataset, columns: list[int] | None) -> list[int]:
    """The factors the vote-based scores use: those that vary, among the chosen ``columns`` (None: all)."""
    return [k for k, size in enumerate(truth.require_factor_sizes()) if size > 1 and (columns is None or k in columns)]


def check_scored_factors(config: EvalConfig, dataset: ImageDataset | None) -> None:
    """DataError naming ``eval.factors`` unless every factor it names is one of the data's: checked before training
    starts, so a typo does not surface only at the end of a long run."""
    if config.factors is None or not config.disentanglement:
        return
    if dataset is None or not dataset.has_factors:
        name = "the data" if dataset is None else f"data set '{dataset.name}'"
        raise DataError(f"eval.factors: {name} has no ground-truth factors to score")
    try:
        factor_columns(dataset, config.factors)
    except ValueError as exc:
        raise DataError(f"eval.{exc}") from None


def _has_classes(dataset: ImageDataset) -> bool:
    return dataset.labels is not None and len(dataset) > 0 and int(dataset.labels.unique().numel()) >= 2


def _probes(
    model, train: ImageDataset, val: ImageDataset, config: EvalConfig, batch_size: int, seed: int
) -> dict[str, float]:
    sizes = {"max_train": config.num_train, "max_test": config.num_test, "seed": seed}
    out = {
        "probe_linear_accuracy": linear_probe(model, train, val, batch_size=batch_size, **sizes)[
            "probe/linear_accuracy"
        ]
    }
    if config.probe_finetune_epochs > 0:
        with torch.enable_grad():
            out["probe_finetune_accuracy"] = fine_tune(
                model, train, val, config.probe_finetune_epochs, config.probe_finetune_lr, **sizes
            )["probe/finetune_accuracy"]
    return out


def _disentanglement(
    model,
    truth: ImageDataset,
    config: EvalConfig,
    batch_size: int,
    seed: int,
    device: torch.device,
    starting: Callable[[str], None],
) -> dict[str, float]:
    def representation(x: torch.Tensor) -> torch.Tensor:
        return model.representation(x.to(device))

    out: dict[str, float] = {}
    starting("eval/codes")
    sampler = FactorSampler(truth, _generator(seed, "codes"), "the disentanglement scores")
    train_codes, train_factors, test_codes, test_factors = sampler.train_test_codes(
        representation, config.num_train, config.num_test, batch_size
    )

    columns = None if config.factors is None else factor_columns(truth, config.factors)
    if columns is not None:
        train_factors, test_factors = train_factors[:, columns], test_factors[:, columns]
    starting("eval/mig")
    out["mig"] = mig_from_codes(train_codes, train_factors)
    starting("eval/sap")
    out["sap"] = sap_from_codes(train_codes, train_factors, test_codes, test_factors)
    starting("eval/dci")
    dci = dci_from_codes(train_codes, train_factors, test_codes, test_factors, seed=seed)
    out.update({f"dci_{k}": v for k, v in dci.items()})

    if len(_scored_factors(truth, columns)) >= 2:
        votes_train = max(2, config.num_train // VOTES_PER_POINT)
        votes_test = max(1, config.num_test // VOTES_PER_POINT)
        starting("eval/factor_vae")
        out["factor_vae"] = factor_vae_score(
            representation,
            truth,
            votes_train,
            votes_test,
            config.num_train,
            VOTE_BATCH,
            batch_size,
            _generator(seed, "factor_vae"),
            factors=config.factors,
        )["eval_accuracy"]
        starting("eval/beta_vae")
        out["beta_vae"] = beta_vae_score(
            representation,
            truth,
            votes_train,
            votes_test,
            VOTE_BATCH,
            batch_size,
            _generator(seed, "beta_vae"),
            factors=config.factors,
        )["eval_accuracy"]
    if model.stochastic:
        starting("eval/mig_exact")
        out["mig_exact"] = mig_exact(
            model, truth, config.max_examples, batch_size, _generator(seed, "mig_exact"), factors=config.factors
        )
        starting("eval/mig_chen")
        out["mig_chen"] = mig_chen(
            model,
            truth,
            config.factors,
            config.mig_chen_rows,
            config.mig_chen_samples,
            batch_size,
            _generator(seed, "mig_chen"),
        )
    return out
