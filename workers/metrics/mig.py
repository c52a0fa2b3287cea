"""Mutual Information Gap (Chen et al. 2018): per factor, the gap between the two code dimensions that share the
most information with it, divided by the factor's entropy, averaged over factors.

Two estimators whose numbers are not comparable with each other:

- :func:`mig` / :func:`mig_from_codes`: disentanglement_lib's. Codes are posterior MEANS (the model's
  ``representation``), each code dimension is discretised into ``num_bins`` equal-width bins over its observed
  range, and I(code_j; v_k) is the plug-in discrete mutual information (``sklearn.metrics.mutual_info_score``),
  divided by the plug-in entropy of v_k. Works for any encoder, deterministic or not.
- :func:`mig_exact`: Chen et al.'s. Uses posterior SAMPLES and the full Gaussian posteriors q(z_j|x) of every
  example in the evaluated set: H(z_j) = -E log 1/S sum_n q(z_j|x_n) and H(z_j|v_k) = -E log of the same mixture
  restricted to the examples sharing v_k, each expectation over one z ~ q(z|x) per example. VAE family only.

Both use every ground-truth factor, shape (categorical) included, unless ``factors`` names a subset. Factors that
take one value in the evaluated sample carry no information and are left out of the average.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import mutual_info_score

from workers.data.base import DataError, ImageDataset
from workers.losses import log_normal_density
from workers.metrics.sampling import (
    FactorSampler,
    Representation,
    encode_rows,
    example_rows,
    factor_columns,
    model_device,
    noise_generator,
    require_factors,
    require_stochastic,
)

_BLOCK_ELEMENTS = 1 << 22


def discretize(codes: np.ndarray, num_bins: int) -> np.ndarray:
    """Each column of ``codes`` (N, D) as bin indices of ``num_bins`` equal-width bins over its range."""
    out = np.zeros(codes.shape, dtype=np.int64)
    for j in range(codes.shape[1]):
        edges = np.histogram(codes[:, j], num_bins)[1][:-1]
        out[:, j] = np.digitize(codes[:, j], edges)
    return out


def _gap_score(mutual_info: np.ndarray, entropy: np.ndarray) -> float:
    """Mean over factors of (top-1 - top-2 MI over code dims) / H(v_k); ``mutual_info`` is (D, K).

    With a single code dimension the runner-up is taken as 0.
    """
    ranked = np.sort(mutual_info, axis=0)[::-1]
    second = ranked[1] if ranked.shape[0] > 1 else np.zeros_like(ranked[0])
    return float(np.mean((ranked[0] - second) / entropy))


def mig_from_codes(codes, factors, num_bins: int = 20) -> float:
    """disentanglement_lib's MIG of codes (N, D) against discrete factors (N, K), both array-likes."""
    codes = np.asarray(codes, dtype=np.float64)
    factors = np.asarray(factors)
    if codes.ndim != 2 or factors.ndim != 2 or codes.shape[0] != factors.shape[0]:
        raise ValueError(f"codes (N, D) and factors (N, K) must have the same N; got {codes.shape} and {factors.shape}")
    binned = discretize(codes, num_bins)
    entropy = np.array([mutual_info_score(factors[:, k], factors[:, k]) for k in range(factors.shape[1])])
    informative = entropy > 0
    if not informative.any():
        raise DataError("MIG: every factor takes a single value in the sample; there is nothing to measure")
    kept = np.flatnonzero(informative)
    mutual_info = np.array(
        [[mutual_info_score(factors[:, k], binned[:, j]) for k in kept] for j in range(codes.shape[1])]
    )
    return _gap_score(mutual_info, entropy[informative])


def mig(
    representation: Representation,
    dataset: ImageDataset,
    num_train: int,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    factors: Sequence[str | int] | None = None,
    num_bins: int = 20,
) -> float:
    """disentanglement_lib's MIG on ``num_train`` ground-truth draws; ``representation`` maps an image batch (on
    the data set's device) to codes (posterior means for a VAE)."""
    sampler = FactorSampler(dataset, generator, "MIG")
    columns = factor_columns(dataset, factors)
    draw = sampler.sample(num_train)
    codes = sampler.codes(draw, representation, batch_size).cpu().numpy()
    return mig_from_codes(codes, draw.factors[:, columns].numpy(), num_bins)


@torch.no_grad()
def mig_exact(
    model,
    dataset: ImageDataset,
    max_examples: int,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    factors: Sequence[str | int] | None = None,
) -> float:
    """Chen et al.'s MIG over a sample of S = min(max_examples, len(dataset)) distinct rows (see module doc).

    Every density is a mixture over those S posteriors, so the estimate is exact over the data set when S = N.
    I(z_j; v_k) = H(z_j) - H(z_j | v_k), normalised by the entropy of v_k in the sample.
    """
    require_stochastic(model, "mig_exact")
    require_factors(dataset, "mig_exact")
    columns = factor_columns(dataset, factors)
    device = model_device(model)
    rows = example_rows(dataset, max_examples, generator)
    s = len(rows)
    if s < 2:
        raise ValueError(f"mig_exact needs at least 2 examples; data set '{dataset.name}' gave {s}")
    noise = noise_generator(device, generator)
    mean, logvar = encode_rows(model, dataset, rows, batch_size)
    z = mean + torch.randn(mean.shape, device=device, generator=noise) * torch.exp(0.5 * logvar)
    values = dataset.factors(rows).long().to(device)[:, columns]  # (S, K)
    d, k = mean.shape[1], values.shape[1]
    # How many sampled examples share example n's value of factor k: (S, K).
    group_size = torch.stack([torch.bincount(values[:, f])[values[:, f]] for f in range(k)], dim=1).float()

    log_marginal = torch.zeros(d, dtype=torch.float64, device=device)  # sum_n log q(z_nj)
    log_conditional = torch.zeros(k, d, dtype=torch.float64, device=device)  # sum_n log q(z_nj | v_k(n))
    block = max(1, _BLOCK_ELEMENTS // (s * d))
    for first in range(0, s, block):
        last = min(first + block, s)
        log_q = log_normal_density(z[first:last].unsqueeze(1), mean.unsqueeze(0), logvar.unsqueeze(0))  # (b, S, D)
        log_marginal += (torch.logsumexp(log_q, dim=1) - math.log(s)).sum(dim=0).double()
        same = values[first:last].unsqueeze(1) == values.unsqueeze(0)  # (b, S, K): m shares factor k with n
        for f in range(k):
            mask = torch.where(same[:, :, f], 0.0, -math.inf).unsqueeze(-1)
            log_mix = torch.logsumexp(log_q + mask, dim=1) - group_size[first:last, f].log().unsqueeze(-1)
            log_conditional[f] += log_mix.sum(dim=0).double()
    entropy_z = -log_marginal / s  # (D,)
    conditional_entropy = -log_conditional / s  # (K, D)
    mutual_info = (entropy_z.unsqueeze(0) - conditional_entropy).T.cpu().numpy()  # (D, K)

    factor_values = values.cpu().numpy()
    entropy_v = np.array([mutual_info_score(factor_values[:, f], factor_values[:, f]) for f in range(k)])
    informative = entropy_v > 0
    if not informative.any():
        raise DataError("mig_exact: every factor takes a single value in the sample; there is nothing to measure")
    return _gap_score(mutual_info[:, informative], entropy_v[informative])
