"""The evidence lower bound over a data set, and its two terms, per example."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model's class, for the annotations only (models import metrics' helpers)
    from workers.models.base import Autoencoder

import torch

from workers.data.base import ImageDataset
from workers.losses import kl_standard_normal, reconstruction_distance, reconstruction_nll
from workers.metrics.sampling import example_rows, model_device, noise_generator


@torch.no_grad()
def elbo(
    model: Autoencoder,
    dataset: ImageDataset,
    max_examples: int,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Averages over up to ``max_examples`` rows (one z ~ q(z|x) each) in nats per example.

    VAE family: ``recon`` = -log p(x|z) (reconstruction_nll), ``kl`` = KL(q(z|x) || N(0, I)) in closed form,
    ``elbo`` = -(recon + kl). Deterministic autoencoders: only ``recon``, the distance d[x, g(f(x))] they are
    trained on (reconstruction_distance), since they define no likelihood.
    """
    device = model_device(model)
    rows = example_rows(dataset, max_examples, generator)
    noise = noise_generator(device, generator)
    likelihood = model.config.likelihood
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for chunk in rows.split(batch_size):
        x = dataset.images(chunk).to(device)
        posterior = model.encode(x)
        if model.stochastic:
            z = posterior.sample(noise)
            recon = reconstruction_nll(model.decode_logits(z), x, likelihood)
            kl = kl_standard_normal(posterior.mean.float(), posterior.stochastic_logvar().float())
            sums += torch.stack([recon.sum(), kl.sum()]).double()
        else:
            sums[0] += reconstruction_distance(model.decode_logits(posterior.mean), x, likelihood).sum().double()
    recon, kl = (sums / len(rows)).tolist()
    if not model.stochastic:
        return {"recon": recon}
    return {"elbo": -(recon + kl), "recon": recon, "kl": kl}
