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
- :func:`mig_chen`: the same estimator in Chen et al.'s own convention, as their ``disentanglement_metrics.py``
  computes the published dSprites numbers: every row of the data set, at most 10,000 samples per entropy, shape
  left out, each factor normalised by log of its number of values, negative information clipped to 0.

The first two use every ground-truth factor, shape (categorical) included, unless ``factors`` names a subset. Factors that
take one value in the evaluated sample carry no information and are left out of the average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import mutual_info_score

from workers.data.base import DataError, ImageDataset
from workers.data.dsprites import FACTOR_NAMES as DSPRITES_FACTOR_NAMES
from workers.losses import LOG_2PI
from workers.metrics.sampling import (
    FactorSampler,
    Representation,
    encode_stochastic_rows,
    example_rows,
    factor_columns,
    model_device,
    noise_generator,
    require_factors,
    require_stochastic,
)
from workers.models.base import Posterior

# Densities evaluated at once, (samples, rows, dimensions): 16 MiB on a CPU (cache-sized), 512 MiB on a GPU, where
# a small block would leave the device waiting on kernel launches (Chen et al.'s full dSprites figure is 3.7e11).
_BLOCK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 27}
# Chen et al. 2018's dSprites MIG scores these four factors (their compute_metric_shapes), and draws at most
# this many samples for each entropy (estimate_entropies' n_samples).
CHEN2018_DSPRITES_FACTORS = ("scale", "orientation", "pos_x", "pos_y")
CHEN2018_SAMPLES = 10_000


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


def mutual_info_matrix(codes, factors, num_bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(I, H): the plug-in mutual information I[j, k] between binned code dimension j and factor k, (D, K) in
    nats, and each factor's entropy H[k], (K,), from codes (N, D) and discrete factors (N, K), both array-likes.
    I / H is the share of a factor's information one latent holds: the matrix the run's ``mutual_information``
    picture shows, and MIG's raw material."""
    codes = np.asarray(codes, dtype=np.float64)
    factors = np.asarray(factors)
    if codes.ndim != 2 or factors.ndim != 2 or codes.shape[0] != factors.shape[0]:
        raise ValueError(f"codes (N, D) and factors (N, K) must have the same N; got {codes.shape} and {factors.shape}")
    binned = discretize(codes, num_bins)
    entropy = np.array([mutual_info_score(factors[:, k], factors[:, k]) for k in range(factors.shape[1])])
    mutual_info = np.array(
        [
            [mutual_info_score(factors[:, k], binned[:, j]) for k in range(factors.shape[1])]
            for j in range(codes.shape[1])
        ]
    ).reshape(codes.shape[1], factors.shape[1])
    return mutual_info, entropy


def mig_from_codes(codes, factors, num_bins: int = 20) -> float:
    """disentanglement_lib's MIG of codes (N, D) against discrete factors (N, K), both array-likes."""
    mutual_info, entropy = mutual_info_matrix(codes, factors, num_bins)
    informative = entropy > 0
    if not informative.any():
        raise DataError("MIG: every factor takes a single value in the sample; there is nothing to measure")
    return _gap_score(mutual_info[:, informative], entropy[informative])


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


def mixture_entropies(samples: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per code dimension j, -1/S sum_s log( 1/M sum_m q(z_sj | x_m) ): the entropy of z_j under the mixture of
    the M Gaussian posteriors (``mean``, ``logvar``: (M, D)), estimated at the S points ``samples`` (S, D);
    float64, on the posteriors' device, a block of samples at a time (see _BLOCK_ELEMENTS)."""
    m, d = mean.shape
    total = torch.zeros(d, dtype=torch.float64, device=mean.device)
    block = max(1, _BLOCK_ELEMENTS.get(mean.device.type, _BLOCK_ELEMENTS["cpu"]) // (m * d))
    # log N(z; mean, var) = offset - (z - mean)^2 * half_precision, with the per-row parts computed once (the
    # logsumexp's own exp is then the only one per density).
    half_precision = (0.5 * torch.exp(-logvar)).unsqueeze(0)
    offset = (-0.5 * (LOG_2PI + logvar)).unsqueeze(0)
    for first in range(0, samples.shape[0], block):
        log_q = offset - (samples[first : first + block].unsqueeze(1) - mean.unsqueeze(0)).square_() * half_precision
        total += (torch.logsumexp(log_q, dim=1) - math.log(m)).sum(dim=0).double()  # log_q: (b, M, D)
    return -total / max(1, samples.shape[0])


def _posterior_samples(
    model, dataset: ImageDataset, rows: torch.Tensor, batch_size: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, logvar, z) of the given rows: one z ~ q(z|x) per row, drawn on the model's device."""
    noise = noise_generator(model_device(model), generator)
    mean, logvar = encode_stochastic_rows(model, dataset, rows, batch_size)
    return mean, logvar, Posterior(mean=mean, logvar=logvar).sample(noise)


def _entropies(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    z: torch.Tensor,
    values: torch.Tensor,
    samples: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """H(z_j) (D,) and H(z_j | v_k) (K, D) of N rows' posteriors (``mean``, ``logvar``: (N, D)), their samples ``z``
    and factor values (N, K): H(z_j) is the entropy of the mixture of all N posteriors, H(z_j | v_k) = sum_v p(v)
    H(z_j | v_k = v) with each term the mixture of the rows sharing v and p(v) their share. Each entropy is
    estimated at its rows' own samples, at most ``samples`` of them drawn at random (None: all, in order)."""
    n, d = mean.shape

    def own(rows: torch.Tensor) -> torch.Tensor:  # disentanglement_metrics.py: randperm(S)[:n_samples]
        if samples is None:
            return rows
        return rows[torch.randperm(len(rows), generator=generator)[:samples].to(rows.device)]

    marginal = mixture_entropies(z[own(torch.arange(n, device=mean.device))], mean, logvar)
    conditional = torch.zeros(values.shape[1], d, dtype=torch.float64, device=mean.device)
    for f in range(values.shape[1]):
        for value in torch.unique(values[:, f]):
            members = torch.nonzero(values[:, f] == value).flatten()
            conditional[f] += len(members) / n * mixture_entropies(z[own(members)], mean[members], logvar[members])
    return marginal, conditional


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
    rows = example_rows(dataset, max_examples, generator)
    s = len(rows)
    if s < 2:
        raise ValueError(f"mig_exact needs at least 2 examples; data set '{dataset.name}' gave {s}")
    mean, logvar, z = _posterior_samples(model, dataset, rows, batch_size, generator)
    values = dataset.factors(rows).long().to(mean.device)[:, columns]  # (S, K)
    entropy_z, conditional_entropy = _entropies(mean, logvar, z, values)
    mutual_info = (entropy_z.unsqueeze(0) - conditional_entropy).T.cpu().numpy()  # (D, K)

    factor_values = values.cpu().numpy()
    entropy_v = np.array([mutual_info_score(factor_values[:, f], factor_values[:, f]) for f in range(values.shape[1])])
    informative = entropy_v > 0
    if not informative.any():
        raise DataError("mig_exact: every factor takes a single value in the sample; there is nothing to measure")
    return _gap_score(mutual_info[:, informative], entropy_v[informative])


def chen2018_factor_columns(dataset: ImageDataset, factors: Sequence[str | int] | None = None) -> list[int]:
    """The factors :func:`mig_chen` scores: ``factors`` when given; else, on dSprites, the four Chen et al. scored
    (shape left out); else every factor."""
    if factors is None and tuple(dataset.factor_names or ()) == DSPRITES_FACTOR_NAMES:
        factors = CHEN2018_DSPRITES_FACTORS
    return factor_columns(dataset, factors)


def mig_chen_from_posteriors(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    z: torch.Tensor,
    values: torch.Tensor,
    factor_sizes: Sequence[int],
    samples: int = CHEN2018_SAMPLES,
    generator: torch.Generator | None = None,
) -> float:
    """Chen et al.'s MIG from the posteriors (``mean``, ``logvar``: (N, D)) of N rows, one sample ``z`` (N, D) of
    each, and the rows' values (N, K) of the K scored factors, whose numbers of values are ``factor_sizes``.

    - H(z_j) = -E log 1/N sum_n q(z_j | x_n): the expectation over ``samples`` of the N samples drawn at random
      (all of them when N is smaller), the mixture over all N rows;
    - H(z_j | v_k) = sum_v p(v) H(z_j | v_k = v), each term the same estimate over the rows with v_k = v (their own
      samples, at most ``samples`` of them, and the mixture over all of them); p(v) is the rows' share, which on
      a full grid is Chen's 1 / (number of values);
    - I = H(z_j) - H(z_j | v_k), sorted over j, clipped at 0, divided by log(number of values of v_k);
    - MIG = mean over factors of (largest - second largest). A factor with one value in the rows scores 0.
    """
    n, d = mean.shape
    if n < 2:
        raise ValueError(f"mig_chen needs at least 2 rows, not {n}")
    if values.shape != (n, len(factor_sizes)):
        raise ValueError(f"mig_chen: values must be (N, K) = ({n}, {len(factor_sizes)}), not {tuple(values.shape)}")
    device = mean.device
    marginal, conditional = _entropies(mean, logvar, z, values.long().to(device), samples, generator)
    mutual_info = (marginal.unsqueeze(0) - conditional).sort(dim=1, descending=True).values.clamp(min=0)  # (K, D)
    sizes = torch.tensor([float(s) for s in factor_sizes], dtype=torch.float64, device=device)
    scored = sizes > 1
    if not bool(scored.any()):
        raise DataError("mig_chen: every scored factor has a single value; there is nothing to measure")
    normalised = mutual_info[scored] / sizes[scored].log().unsqueeze(1)
    second = normalised[:, 1] if d > 1 else torch.zeros_like(normalised[:, 0])
    return float((normalised[:, 0] - second).mean())


@torch.no_grad()
def mig_chen(
    model,
    dataset: ImageDataset,
    factors: Sequence[str | int] | None = None,
    rows: int | None = None,
    samples: int = CHEN2018_SAMPLES,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """MIG as Chen et al. 2018 publish it (``disentanglement_metrics.py``, ``mutual_info_metric_shapes``).

    What follows their code exactly, on dSprites and on any data set whose factors form a full grid (every
    combination once, as dSprites' 737,280 rows do):

    - which factors: on dSprites scale, orientation, pos_x and pos_y, shape left out (``factors`` overrides;
      elsewhere every factor);
    - the rows: every row of the data set, each encoded to its Gaussian posterior q(z|x) and sampled once;
    - the samples: each entropy is averaged over at most ``samples`` (their 10,000) of those samples, drawn at
      random without replacement, against the mixture over every row (for H(z_j)) or every row sharing the
      factor's value (for H(z_j | v_k));
    - the normalisation: log of the factor's number of values (log 6, log 40, log 32, log 32), and negative
      mutual information clipped to 0 (see :func:`mig_chen_from_posteriors`).

    Where it departs:

    - ``rows`` = M < N: a random M rows stand in for the data set (mixtures over M posteriors, conditional groups
      of about M / (number of values) rows, weighted by their share of the M): a cheaper estimate of the same
      quantity, for CPUs; ``rows`` = None is Chen's. The full dSprites estimate is 3.7e11 Gaussian densities
      (10,000 samples x 737,280 rows x 10 dimensions x 5 entropies): seconds on a GPU, many minutes on a CPU.
    - Posteriors are this model's N(mean, exp(logvar)); their code parametrises by log sigma (the same density).
    - On data that is not a full grid, conditional entropies are weighted by the values' shares of the rows
      (theirs: uniformly), and log(number of values) is an upper bound on the factor's entropy, not equal to it.
    - Densities are float32 and sums float64, on the model's device; theirs are float32 on CUDA.
    """
    require_stochastic(model, "mig_chen")
    require_factors(dataset, "mig_chen")
    if samples < 1:
        raise ValueError(f"mig_chen: samples must be at least 1, not {samples}")
    columns = chen2018_factor_columns(dataset, factors)
    index = torch.arange(len(dataset)) if rows is None else example_rows(dataset, rows, generator)
    if len(index) < 2:
        raise ValueError(f"mig_chen needs at least 2 rows; data set '{dataset.name}' gave {len(index)}")
    mean, logvar, z = _posterior_samples(model, dataset, index, batch_size, generator)
    values = dataset.factors(index).long()[:, columns]
    sizes = [dataset.require_factor_sizes()[c] for c in columns]
    return mig_chen_from_posteriors(mean, logvar, z, values, sizes, samples, generator)
