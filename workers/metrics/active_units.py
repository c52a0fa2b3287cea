"""Active units and posterior collapse (VAE family): is the latent space used at all?

A latent dimension is *active* when its posterior mean moves with the data: Burda et al. (2016, "Importance
Weighted Autoencoders", section 5.2) count unit j active when Cov_x(E_q(z|x)[z_j]) > 0.01, the variance over the
data of the posterior mean. A model with no active unit encodes nothing about its input: every image gets the same
posterior, the decoder draws from the prior, and its disentanglement scores are the binned noise of a constant
code. The KL per latent says the same from the other side: KL(q(z|x) || p(z)) is the information each code carries
about x (in nats, averaged over the data), and a latent space whose KL per latent is near 0 carries none.

A model is *collapsed* when it has no active unit, or its KL per latent (eval/kl / latent_dim) is below
``kl_per_latent_floor``. Both thresholds are the spec's (``eval.active_unit_variance`` and
``eval.collapse_kl_per_latent``). Reported as ``active_units`` (a count), ``kl_per_latent`` and ``collapsed``
(1.0 or 0.0, so it travels with the other metrics through Ray Tune, MLflow and the registry's tags).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model's class, for the annotations only (models import metrics' helpers)
    from workers.models.base import Autoencoder

import torch

from workers.data.base import ImageDataset
from workers.metrics.sampling import encode_rows, example_rows

# Burda et al.'s threshold on the variance over the data of a unit's posterior mean.
ACTIVE_UNIT_VARIANCE = 0.01
# Below this many nats per latent dimension, on average, the codes say next to nothing about the images: a working
# beta-VAE on dSprites carries several nats per used latent; a collapsed one 0.01-0.07 (the sweep of issue 20:
# eval/kl 0.10-0.37 over 5-10 latents).
COLLAPSE_KL_PER_LATENT = 0.1


def unit_variances(mean: torch.Tensor) -> torch.Tensor:
    """Per latent dimension, the variance over the rows of the posterior means ``mean`` (N, D): (D,), float64."""
    if mean.ndim != 2 or mean.shape[0] < 2:
        raise ValueError(f"active units need the posterior means of at least 2 rows as (N, D), not {tuple(mean.shape)}")
    return mean.double().var(dim=0, unbiased=True)


def count_active(mean: torch.Tensor, threshold: float = ACTIVE_UNIT_VARIANCE) -> int:
    """How many latent dimensions' posterior means vary over the rows by more than ``threshold`` (Burda et al.)."""
    return int((unit_variances(mean) > threshold).sum())


def is_collapsed(active: int, kl: float, latent_dim: int, kl_per_latent_floor: float = COLLAPSE_KL_PER_LATENT) -> bool:
    """Posterior collapse: no active unit, or a mean KL per latent dimension below ``kl_per_latent_floor`` (a KL
    that is not finite is no evidence of use either)."""
    per_latent = kl / max(latent_dim, 1)
    return active == 0 or not per_latent >= kl_per_latent_floor


@torch.no_grad()
def active_units(
    model: Autoencoder,
    dataset: ImageDataset,
    max_examples: int,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    *,
    kl: float,
    variance_threshold: float = ACTIVE_UNIT_VARIANCE,
    kl_per_latent_floor: float = COLLAPSE_KL_PER_LATENT,
) -> dict[str, float]:
    """``active_units``, ``kl_per_latent`` and ``collapsed`` of a VAE-family ``model`` on up to ``max_examples``
    rows of ``dataset``; ``kl`` is the model's mean KL(q(z|x) || p(z)) per example on the same data (eval/kl)."""
    rows = example_rows(dataset, max_examples, generator)
    if len(rows) < 2:
        raise ValueError(f"active units need at least 2 rows; data set '{dataset.name}' gave {len(rows)}")
    mean, _ = encode_rows(model, dataset, rows, batch_size)
    active = count_active(mean, variance_threshold)
    latent_dim = int(mean.shape[1])
    return {
        "active_units": float(active),
        "kl_per_latent": kl / max(latent_dim, 1),
        "collapsed": float(is_collapsed(active, kl, latent_dim, kl_per_latent_floor)),
    }
