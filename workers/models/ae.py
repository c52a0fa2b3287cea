"""Autoencoder: a deterministic bottleneck z = f(x), trained to make g(f(x)) close to x.

The distance d[x, g(f(x))] is binary cross-entropy for ``likelihood: bernoulli`` and squared error for
``gaussian`` (losses.reconstruction_distance). There is no prior, so nothing to sample from.
"""

from __future__ import annotations

import torch

from workers.losses import reconstruction_distance
from workers.models.base import Autoencoder, GatherFn, LossOutput, Noise
from workers.models.registry import register


@register("ae")
class PlainAutoencoder(Autoencoder):
    stochastic = False

    def reconstruction_loss(self, x_in: torch.Tensor, x_target: torch.Tensor) -> torch.Tensor:
        """Per-example d[x_target, g(f(x_in))]."""
        logits = self.decode_logits(self.encode(x_in).mean)
        return reconstruction_distance(logits, x_target, self.config.likelihood)

    def loss(self, x: torch.Tensor, noise: Noise | None = None, gather: GatherFn | None = None) -> LossOutput:
        recon = self.reconstruction_loss(x, x).mean()
        return LossOutput(loss=recon, parts={"recon": recon})
