"""beta-VAE score (Higgins et al. 2017), as disentanglement_lib computes it.

A point: pick a factor k, draw ``pair_batch_size`` pairs of images whose two members share their value of v_k
(every other factor drawn independently), and take the mean over pairs of |code(a) - code(b)|. A logistic
regression learns k from these points; the score is its accuracy on held-out points (chance: 1 / number of
factors).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from workers.data.base import ImageDataset
from workers.metrics.factor_vae import varying_factors
from workers.metrics.sampling import FactorSampler, Representation, factor_columns


def _points(
    sampler: FactorSampler,
    representation: Representation,
    factor_ids: torch.Tensor,
    num_points: int,
    pair_batch_size: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    chosen = factor_ids[torch.randint(len(factor_ids), (num_points,), generator=sampler.generator)]
    per_pair = chosen.repeat_interleave(pair_batch_size)
    first = sampler.sample(num_points * pair_batch_size)
    second = sampler.sample_sharing(per_pair, first.factors[torch.arange(len(first)), per_pair])
    difference = sampler.codes(first, representation, batch_size) - sampler.codes(second, representation, batch_size)
    features = difference.abs().view(num_points, pair_batch_size, -1).mean(dim=1)
    return features.cpu().numpy().astype(np.float64), chosen.numpy()


@torch.no_grad()
def beta_vae_score(
    representation: Representation,
    dataset: ImageDataset,
    num_train: int,
    num_eval: int,
    pair_batch_size: int = 64,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    factors: Sequence[str | int] | None = None,
) -> dict[str, float]:
    """``train_accuracy`` and ``eval_accuracy`` (the score) from ``num_train`` and ``num_eval`` points; a point
    holds one of the scored ``factors`` (default: all) fixed."""
    if pair_batch_size < 1:
        raise ValueError(f"pair_batch_size must be at least 1, not {pair_batch_size}")
    sampler = FactorSampler(dataset, generator, "the beta-VAE score")
    factor_ids = varying_factors(
        sampler, "beta-VAE score", None if factors is None else factor_columns(dataset, factors)
    )
    train_x, train_y = _points(sampler, representation, factor_ids, num_train, pair_batch_size, batch_size)
    eval_x, eval_y = _points(sampler, representation, factor_ids, num_eval, pair_batch_size, batch_size)
    if np.unique(train_y).size < 2:
        raise ValueError(f"the beta-VAE score drew only one factor in {num_train} training points; use more points")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    classifier = LogisticRegression(max_iter=1000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(train_x, train_y)
    return {
        "train_accuracy": float(np.mean(classifier.predict(train_x) == train_y)),
        "eval_accuracy": float(np.mean(classifier.predict(eval_x) == eval_y)),
    }
