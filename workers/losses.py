"""The terms of the autoencoder objectives, as per-example tensors.

Conventions: images ``x`` are (B, C, H, W) in [0, 1]; decoder outputs are logits of the same shape; latent
tensors are (B, D). Every function returns one value per example (shape (B,)) unless it says otherwise, so the
callers decide how to reduce (mean over the batch for training; sums over a data set for evaluation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)

# The Gaussian decoder has a fixed variance of 1/2, so its negative log-likelihood is the summed squared error
# plus a constant: the "l2" reconstruction loss of disentanglement_lib, as a proper density.
GAUSSIAN_DECODER_VAR = 0.5


def reconstruction_nll(logits: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """-log p(x|z) per example, summed over pixels.

    bernoulli: binary cross-entropy of sigmoid(logits) against x (x may be grey levels in [0, 1]);
    gaussian: N(x; sigmoid(logits), 1/2 I).
    """
    logits = logits.float()
    x = x.float()
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif likelihood == "gaussian":
        mean = torch.sigmoid(logits)
        nll = (x - mean).pow(2) / (2 * GAUSSIAN_DECODER_VAR) + 0.5 * (LOG_2PI + math.log(GAUSSIAN_DECODER_VAR))
    else:
        raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', not {likelihood!r}")
    return nll.flatten(1).sum(dim=1)


def reconstruction_distance(recon_logits: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The autoencoder's d[x, g(f(x))] per example: BCE for 'bernoulli', squared error for 'gaussian'.

    Unlike :func:`reconstruction_nll` the Gaussian case has no constant: a deterministic autoencoder has no
    density to normalise.
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(recon_logits.float(), x.float(), reduction="none").flatten(1).sum(1)
    if likelihood == "gaussian":
        return (torch.sigmoid(recon_logits.float()) - x.float()).pow(2).flatten(1).sum(1)
    raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', not {likelihood!r}")


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag exp(logvar)) || N(0, I)) in closed form, summed over latent dimensions."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def log_normal_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mean, exp(logvar)); broadcasts, no reduction."""
    return -0.5 * (LOG_2PI + logvar + (z - mean).pow(2) * torch.exp(-logvar))


def _log_importance_weights(
    batch_size: int, dataset_size: int, self_index: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Minibatch stratified sampling (MSS) weights of Chen et al. 2018, one row per local example.

    Row i weights the M posteriors of the global batch when estimating q(z_i): the example's own posterior
    gets 1/N, the next one (cyclically) (N - M + 1) / (N (M - 1)), every other 1/(M - 1); each row sums to 1.
    Chen et al.'s reference code sets the last row's special entry one row too early; this does not.
    """
    m = batch_size
    n = float(dataset_size)
    strat_weight = (n - m + 1) / (n * (m - 1))
    rows = self_index.shape[0]
    w = torch.full((rows, m), 1.0 / (m - 1), device=device)
    w[torch.arange(rows, device=device), self_index] = 1.0 / n
    # The paper's other special entry: the posterior right after the example's own (cyclically).
    w[torch.arange(rows, device=device), (self_index + 1) % m] = strat_weight
    return w.log()


def tc_terms(
    z: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    dataset_size: int,
    estimator: str = "mss",
    self_index: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """beta-TCVAE's split of the aggregate KL into index-code MI, total correlation and dimension-wise KL.

    ``z`` (B, D): the local samples z_i ~ q(z|x_i). ``mean``/``logvar`` (M, D): the posterior parameters of the
    whole minibatch the estimator averages over (M = B in one process; the gathered global batch under DDP).
    ``self_index`` (B,): the position of each local example inside those M rows (default: 0..B-1).
    ``dataset_size`` is the true N of the training set; both estimators need it.

    Returns per-example tensors (B,): ``mi`` = log q(z|x) - log q(z), ``tc`` = log q(z) - sum_j log q(z_j),
    ``dwkl`` = sum_j log q(z_j) - log p(z). Their sum is the per-example KL estimate log q(z|x) - log p(z).
    """
    b, _ = z.shape
    m = mean.shape[0]
    if self_index is None:
        if m != b:
            raise ValueError("self_index is required when the posterior batch is larger than the sample batch")
        self_index = torch.arange(b, device=z.device)
    if m < 2:
        raise ValueError("the minibatch TC estimators need at least 2 examples in the batch")

    # log q(z_i | x_j) per dimension: (B, M, D)
    log_qz_given_x_all = log_normal_density(z.unsqueeze(1), mean.unsqueeze(0), logvar.unsqueeze(0))
    rows = torch.arange(b, device=z.device)
    log_qz_given_x = log_qz_given_x_all[rows, self_index].sum(dim=-1)  # (B,)
    log_pz = log_normal_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(dim=-1)

    if estimator == "mws":
        # Minibatch weighted sampling: q(z) ~ 1/M sum_j q(z | x_j). Chen et al.'s code divides by N*M instead;
        # that shifts every log-density by the constant log N (same gradients) and TC by (D - 1) log N, so its
        # reported TC is not comparable with MSS. Dividing by M makes both converge to the same value as M -> N.
        log_norm = math.log(m)
        log_qz = torch.logsumexp(log_qz_given_x_all.sum(dim=-1), dim=1) - log_norm
        log_prod_qzj = (torch.logsumexp(log_qz_given_x_all, dim=1) - log_norm).sum(dim=-1)
    elif estimator == "mss":
        log_w = _log_importance_weights(m, dataset_size, self_index, z.device)  # (B, M)
        log_qz = torch.logsumexp(log_w + log_qz_given_x_all.sum(dim=-1), dim=1)
        log_prod_qzj = torch.logsumexp(log_w.unsqueeze(-1) + log_qz_given_x_all, dim=1).sum(dim=-1)
    else:
        raise ValueError(f"tc_estimator must be 'mss' or 'mws', not {estimator!r}")

    return {
        "mi": log_qz_given_x - log_qz,
        "tc": log_qz - log_prod_qzj,
        "dwkl": log_prod_qzj - log_pz,
    }
