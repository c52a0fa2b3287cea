"""What every autoencoder variant is: an encoder f, a decoder g, and a loss.

A variant is one file in this folder that subclasses :class:`Autoencoder`, implements :meth:`loss`, and
registers itself with ``@register("name")``. Everything else (training loop, metrics, pictures, MLflow)
talks to this interface only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from workers.config import ModelConfig
from workers.errors import AeforgeError

# Collects a tensor from every DDP rank along dim 0, keeping gradients for the local part
# (torch.distributed.nn.functional.all_gather). None when running in one process.
GatherFn = Callable[[torch.Tensor], torch.Tensor]


class NoPrior(AeforgeError, ValueError):
    """Sampling asked of a deterministic autoencoder, which has no prior."""


@dataclass
class Posterior:
    """q(z|x). For deterministic autoencoders ``logvar`` is None and ``mean`` is the code f(x)."""

    mean: torch.Tensor
    logvar: torch.Tensor | None = None

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.logvar is None:
            return self.mean
        eps = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype, generator=generator)
        return self.mean + eps * torch.exp(0.5 * self.logvar)  # reparameterisation trick


@dataclass
class LossOutput:
    """The objective to minimise and its named parts.

    ``parts`` holds scalar tensors (not yet synced to the host: the loop decides when to read them):
    always ``recon``; ``kl`` for the VAE family; ``mi``, ``tc`` and ``dwkl`` for beta-TCVAE.
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class Autoencoder(nn.Module):
    """Base class. Subclasses set ``stochastic`` and implement :meth:`loss`."""

    variant: str = ""
    stochastic: bool = False

    def __init__(self, config: ModelConfig, image_shape: tuple[int, int, int], dataset_size: int):
        super().__init__()
        from workers.models.architectures import build_decoder, build_encoder

        self.config = config
        self.image_shape = tuple(image_shape)
        self.latent_dim = config.latent_dim
        self.dataset_size = int(dataset_size)  # N, for the minibatch TC estimators
        encoder_out = 2 * config.latent_dim if self.stochastic else config.latent_dim
        self.encoder = build_encoder(config, self.image_shape, encoder_out)
        self.decoder = build_decoder(config, self.image_shape, config.latent_dim)

    # --- the two networks -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Posterior:
        h = self.encoder(x)
        if not self.stochastic:
            return Posterior(mean=h)
        mean, logvar = h.chunk(2, dim=-1)
        return Posterior(mean=mean, logvar=logvar)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output before the output non-linearity, shaped like an image batch."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1]: sigmoid of the logits (the Bernoulli mean, or the clamped Gaussian mean)."""
        return torch.sigmoid(self.decode_logits(z))

    # --- what users and MLflow call ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction g(mean of f(x)) in [0, 1]. One tensor out, so MLflow can serve and trace it."""
        return self.decode(self.encode(x).mean)

    @torch.no_grad()
    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """The code used by metrics and probes: the posterior mean."""
        return self.encode(x).mean

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images decoded from z ~ N(0, I). Only the VAE family has that prior."""
        if not self.stochastic:
            raise NoPrior(f"variant '{self.variant}' has no prior to sample from; use a vae, beta_vae or beta_tcvae")
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, device=device, generator=generator)
        return self.decode(z)

    # --- training ---------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, gather: GatherFn | None = None) -> LossOutput:  # pragma: no cover
        raise NotImplementedError


class LossModule(nn.Module):
    """Wraps a model so that DDP's forward computes the loss (DDP syncs gradients only through forward)."""

    def __init__(self, model: Autoencoder, gather: GatherFn | None = None):
        super().__init__()
        self.model = model
        self.gather = gather

    def forward(self, x: torch.Tensor) -> LossOutput:
        return self.model.loss(x, gather=self.gather)
