"""beta-TCVAE's split of the KL term over a data set (Chen et al. 2018, their ``elbo_decomposition``).

E_x KL(q(z|x) || p(z)) = I(x; z) [index-code MI] + KL(q(z) || prod_j q(z_j)) [total correlation]
                         + sum_j KL(q(z_j) || p(z_j)) [dimension-wise KL],
with q(z) = 1/N sum_n q(z|x_n) the aggregate posterior over the evaluated data set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model's class, for the annotations only (models import metrics' helpers)
    from workers.models.base import Autoencoder

import torch

from workers.data.base import ImageDataset
from workers.losses import kl_standard_normal, tc_terms
from workers.metrics.sampling import (
    encode_stochastic_rows,
    example_rows,
    model_device,
    noise_generator,
    require_stochastic,
)

# Elements of the (rows, S, D) block of log q(z_i | x_j) evaluated at once.
_BLOCK_ELEMENTS = 1 << 22


@torch.no_grad()
def tc_decomposition(
    model: Autoencoder,
    dataset: ImageDataset,
    max_examples: int,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    dataset_size: int | None = None,
) -> dict[str, float]:
    """``mi``, ``tc``, ``dwkl`` (per-example averages in nats) and ``kl`` (closed form, same examples).

    One z ~ q(z|x) per example for a subset of S = min(max_examples, len(dataset)) rows; q(z) and q(z_j) are
    estimated with the posteriors of that whole subset (``tc_terms`` with M = S) and N = ``dataset_size``
    (default: len(dataset)). When S = N the estimate is Chen et al.'s exact one (1/N sum over all posteriors,
    the "mws" form); when S < N it is minibatch stratified sampling ("mss"), which weighs each example's own
    posterior by 1/N as the full sum does. mi + tc + dwkl = log q(z|x) - log p(z) exactly, per example, so
    their sum is an unbiased estimate of ``kl``.
    """
    require_stochastic(model, "the TC decomposition")
    device = model_device(model)
    rows = example_rows(dataset, max_examples, generator)
    s = len(rows)
    n = len(dataset) if dataset_size is None else int(dataset_size)
    if s < 2:
        raise ValueError(f"the TC decomposition needs at least 2 examples; data set '{dataset.name}' gave {s}")
    if n < s:
        raise ValueError(f"dataset_size ({n}) is smaller than the number of evaluated examples ({s})")
    noise = noise_generator(device, generator)
    mean, logvar = encode_stochastic_rows(model, dataset, rows, batch_size)
    z = mean + torch.randn(mean.shape, device=device, generator=noise) * torch.exp(0.5 * logvar)
    estimator = "mws" if s == n else "mss"
    block = max(1, _BLOCK_ELEMENTS // (s * mean.shape[1]))
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for first in range(0, s, block):
        index = torch.arange(first, min(first + block, s), device=device)
        terms = tc_terms(z[index], mean, logvar, n, estimator=estimator, self_index=index)
        sums += torch.stack([terms["mi"].sum(), terms["tc"].sum(), terms["dwkl"].sum()]).double()
    kl = kl_standard_normal(mean, logvar).double().sum()
    mi, tc, dwkl, kl = (torch.cat([sums, kl.view(1)]) / s).tolist()
    return {"mi": mi, "tc": tc, "dwkl": dwkl, "kl": kl}
