"""A port of Chen et al. 2018's MIG (``disentanglement_metrics.py`` and ``metric_helpers/mi_metric.py`` of
github.com/rtqichen/beta-tcvae), the reference ``workers.metrics.mig.mig_chen`` is tested against.

Kept as their code computes it, step for step: posterior parameters (mu, log sigma) of every row laid out as the
factor grid, one sample per row, ``estimate_entropies`` over a random ``n_samples`` subset of the samples against
the mixture of every row in the set (batches of 10 samples, logsumexp with weight -log N), conditional entropies
as the average over the factor's values of the same estimate on the grid slice, mutual information sorted over
dimensions and clipped at 0, divided by log of the factor's number of values, and MIG the mean gap. Ported: CUDA,
``Variable`` and tqdm dropped; the grid's shape and the scored axes are arguments instead of dSprites' fixed
(3, 6, 40, 32, 32) and axes 1-4, so a small grid can be checked; the random subset takes a generator.
"""

from __future__ import annotations

import math

import torch


def normal_log_density(sample: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """lib/dist.py Normal.log_density: params[..., 0] = mu, params[..., 1] = log sigma."""
    mu, logsigma = params.select(-1, 0), params.select(-1, 1)
    tmp = (sample - mu) * torch.exp(-logsigma)
    return -0.5 * (tmp * tmp + 2 * logsigma + math.log(2 * math.pi))


def estimate_entropies(qz_samples: torch.Tensor, qz_params: torch.Tensor, n_samples: int = 10000,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """E_{q(z_j)}[-log q(z_j)] per dimension; qz_samples (K, N), qz_params (N, K, 2)."""
    qz_samples = qz_samples.index_select(1, torch.randperm(qz_samples.size(1), generator=generator)[:n_samples])
    k_dims, s = qz_samples.size()
    n = qz_params.size(0)
    weights = -math.log(n)
    entropies = torch.zeros(k_dims)
    k = 0
    while k < s:
        batch_size = min(10, s - k)
        logqz_i = normal_log_density(
            qz_samples.view(1, k_dims, s).expand(n, k_dims, s)[:, :, k:k + batch_size],
            qz_params.view(n, k_dims, 1, 2).expand(n, k_dims, s, 2)[:, :, k:k + batch_size])
        k += batch_size
        entropies += -torch.logsumexp(logqz_i + weights, dim=0).sum(1)
    return entropies / s


def compute_metric(marginal_entropies: torch.Tensor, cond_entropies: torch.Tensor, factor_sizes) -> torch.Tensor:
    """mi_metric.py compute_metric_shapes with the factor sizes as an argument (theirs: [6, 40, 32, 32])."""
    mutual_infos = marginal_entropies[None] - cond_entropies
    mutual_infos = torch.sort(mutual_infos, dim=1, descending=True)[0].clamp(min=0)
    mi_normed = mutual_infos / torch.tensor(factor_sizes, dtype=torch.float32).log()[:, None]
    return torch.mean(mi_normed[:, 0] - mi_normed[:, 1])


def mutual_info_metric(qz_params: torch.Tensor, qz_samples: torch.Tensor, grid: tuple[int, ...],
                       scored_axes: tuple[int, ...], n_samples: int = 10000,
                       generator: torch.Generator | None = None) -> float:
    """mutual_info_metric_shapes from the rows' posteriors (N, K, 2) and samples (N, K), rows in the grid's
    row-major order (dSprites: grid (3, 6, 40, 32, 32), scored axes (1, 2, 3, 4))."""
    n, k_dims, _ = qz_params.shape
    qz_params = qz_params.view(*grid, k_dims, 2)
    qz_samples = qz_samples.view(*grid, k_dims)
    marginal_entropies = estimate_entropies(qz_samples.view(n, k_dims).transpose(0, 1),
                                            qz_params.view(n, k_dims, 2), n_samples, generator)
    cond_entropies = torch.zeros(len(scored_axes), k_dims)
    for row, axis in enumerate(scored_axes):
        size = grid[axis]
        for i in range(size):
            samples_i = qz_samples.select(axis, i).contiguous()
            params_i = qz_params.select(axis, i).contiguous()
            cond_entropies[row] += estimate_entropies(samples_i.view(n // size, k_dims).transpose(0, 1),
                                                      params_i.view(n // size, k_dims, 2), n_samples,
                                                      generator) / size
    return float(compute_metric(marginal_entropies, cond_entropies, [grid[a] for a in scored_axes]))
