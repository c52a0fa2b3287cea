"""The importance-weighted log-likelihood bound of Burda et al. (2016)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model's class, for the annotations only (models import metrics' helpers)
    from workers.models.base import Autoencoder

import math

import torch

from workers.data.base import ImageDataset
from workers.losses import log_normal_density, reconstruction_nll
from workers.metrics.sampling import example_rows, model_device, noise_generator, require_stochastic


@torch.no_grad()
def iwae_log_likelihood(
    model: Autoencoder,
    dataset: ImageDataset,
    k: int,
    max_examples: int,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    max_decoded: int = 4096,
) -> dict[str, float]:
    """log 1/k sum_i p(x|z_i) p(z_i) / q(z_i|x) with z_i ~ q(z|x), averaged over up to ``max_examples`` rows.

    A lower bound on log p(x) that tightens as k grows (k = 1 is the ELBO). The k samples are drawn and decoded
    in chunks of at most ``max_decoded`` images, so memory does not grow with k. VAE family only.
    """
    require_stochastic(model, "the IWAE bound")
    if k < 1:
        raise ValueError(f"iwae_samples (k) must be at least 1, not {k}")
    device = model_device(model)
    rows = example_rows(dataset, max_examples, generator)
    noise = noise_generator(device, generator)
    likelihood = model.config.likelihood
    total = torch.zeros((), dtype=torch.float64, device=device)
    for chunk in rows.split(batch_size):
        x = dataset.images(chunk).to(device)
        posterior = model.encode(x)
        mean, logvar = posterior.mean.float(), posterior.stochastic_logvar().float()
        std = torch.exp(0.5 * logvar)
        b, d = mean.shape
        samples_per_pass = max(1, max_decoded // b)
        log_sum_w = torch.full((b,), -math.inf, device=device)
        for first in range(0, k, samples_per_pass):
            kc = min(samples_per_pass, k - first)
            eps = torch.randn((kc, b, d), device=device, generator=noise)
            z = mean + eps * std  # (kc, b, d)
            logits = model.decode_logits(z.reshape(kc * b, d))
            targets = x.unsqueeze(0).expand(kc, *x.shape).reshape(kc * b, *x.shape[1:])
            log_px_given_z = -reconstruction_nll(logits, targets, likelihood).view(kc, b)
            log_pz = log_normal_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(dim=-1)
            log_qz_given_x = log_normal_density(z, mean, logvar).sum(dim=-1)
            log_w = log_px_given_z + log_pz - log_qz_given_x
            log_sum_w = torch.logaddexp(log_sum_w, torch.logsumexp(log_w, dim=0))
        total += (log_sum_w - math.log(k)).sum().double()
    return {"iwae_ll": float(total / len(rows))}
