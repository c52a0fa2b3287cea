"""Variational autoencoder (Kingma & Welling 2014): Gaussian q(z|x) with diagonal covariance, N(0, I) prior,
Bernoulli or Gaussian p(x|z).

The loss is the negative ELBO per example, averaged over the batch: -log p(x|z) with one reparameterised sample
z ~ q(z|x), plus beta times the closed-form KL(q(z|x) || N(0, I)). beta = 1 here; beta-VAE reuses this class.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.config import ModelConfig
from workers.losses import kl_standard_normal, reconstruction_nll
from workers.models.base import Autoencoder, GatherFn, LossOutput, Noise
from workers.models.registry import register


@register("vae")
class VAE(Autoencoder):
    stochastic = True
    beta: torch.Tensor  # a buffer (register_buffer below), declared for the type checker

    def __init__(self, config: ModelConfig, image_shape: tuple[int, int, int], dataset_size: int) -> None:
        super().__init__(config, image_shape, dataset_size)
        # beta as a buffer, not a float read from the config: models trained as one (workers/pack.py) share one
        # module's code, and their betas stack with their weights. Not persistent: state dicts are unchanged.
        self.register_buffer("beta", torch.tensor(float(config.effective_beta)), persistent=False)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A model pickled before beta was a buffer (a registered model logged by an older aeforge) gets it back.
        super().__setstate__(state)
        if "beta" not in self._buffers:
            self.register_buffer("beta", torch.tensor(float(self.config.effective_beta)), persistent=False)

    def draw_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Noise:
        # One standard normal draw per example and latent, for the reparameterised sample z ~ q(z|x).
        return {"eps": torch.randn((x.shape[0], self.latent_dim), device=x.device, generator=generator)}

    def loss(self, x: torch.Tensor, noise: Noise | None = None, gather: GatherFn | None = None) -> LossOutput:
        noise = self.draw_noise(x) if noise is None else noise
        posterior = self.encode(x)
        z = posterior.reparameterise(noise["eps"])
        recon = reconstruction_nll(self.decode_logits(z), x, self.config.likelihood).mean()
        kl = kl_standard_normal(posterior.mean.float(), posterior.stochastic_logvar().float()).mean()
        return LossOutput(loss=recon + self.beta * kl, parts={"recon": recon, "kl": kl})
