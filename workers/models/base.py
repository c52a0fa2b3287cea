"""What every autoencoder variant is: an encoder f, a decoder g, and a loss.

A variant is one file in this folder that subclasses :class:`Autoencoder`, implements :meth:`loss`, and
registers itself with ``@register("name")``. Everything else (training loop, metrics, pictures, MLflow)
talks to this interface only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.config import ModelConfig
from workers.errors import AeforgeError

# Collects a tensor from every DDP rank along dim 0, keeping gradients for the local part
# (torch.distributed.nn.functional.all_gather). None when running in one process.
GatherFn = Callable[[torch.Tensor], torch.Tensor]
# One training step's random draws, by name (Autoencoder.draw_noise).
Noise = dict[str, torch.Tensor]


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
        return self.reparameterise(eps)

    def stochastic_logvar(self) -> torch.Tensor:
        """``logvar`` of a stochastic code (NoPrior for a deterministic one, which has none)."""
        if self.logvar is None:
            raise NoPrior("a deterministic code has no variance: only vae, beta_vae and beta_tcvae have one")
        return self.logvar

    def reparameterise(self, eps: torch.Tensor) -> torch.Tensor:
        """z = mean + eps * std for standard normal ``eps`` (the reparameterisation trick), in the mean's dtype."""
        return self.mean + eps.to(self.mean.dtype) * torch.exp(0.5 * self.stochastic_logvar())

    def kl_per_dimension(self) -> torch.Tensor | None:
        """(B, D) KL(q(z_d|x) || N(0, 1)) of each latent dimension in closed form; None for deterministic codes.
        Averaged over data it says how much information each dimension carries (the beta-TCVAE paper orders
        its traversal rows by it)."""
        if self.logvar is None:
            return None
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


@dataclass
class CodeStatistics:
    """Where the training data's codes lie, per latent dimension: the mean and standard deviation of the codes
    (posterior means for the VAE family) and, for the VAE family, the mean KL(q(z_d|x) || N(0, 1))."""

    mean: torch.Tensor
    std: torch.Tensor
    kl: torch.Tensor | None


@dataclass
class LossOutput:
    """The objective to minimise and its named parts.

    ``parts`` holds scalar tensors (not yet synced to the host: the loop decides when to read them):
    always ``recon``; ``kl`` for the VAE family; ``mi``, ``tc`` and ``dwkl`` for beta-TCVAE.
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


# Buffers (saved with the weights, so in checkpoints and in the pickled MLflow model) recording where the training
# data's codes lie; NaN until :meth:`Autoencoder.record_code_statistics` has run at the end of training.
CODE_STATISTICS_BUFFERS = ("code_mean", "code_std", "code_kl")


class Autoencoder(nn.Module):
    """Base class. Subclasses set ``stochastic`` and implement :meth:`loss`."""

    variant: str = ""
    stochastic: bool = False
    # Buffers (register_buffer below), declared for the type checker: nn.Module's __getattr__ returns a union.
    code_mean: torch.Tensor
    code_std: torch.Tensor
    code_kl: torch.Tensor

    def __init__(self, config: ModelConfig, image_shape: tuple[int, int, int], dataset_size: int):
        super().__init__()
        from workers.models.architectures import build_decoder, build_encoder

        self.config = config
        channels, height, width = image_shape
        self.image_shape = (int(channels), int(height), int(width))
        self.latent_dim = config.latent_dim
        self.dataset_size = int(dataset_size)  # N, for the minibatch TC estimators
        encoder_out = 2 * config.latent_dim if self.stochastic else config.latent_dim
        self.encoder = build_encoder(config, self.image_shape, encoder_out)
        self.decoder = build_decoder(config, self.image_shape, config.latent_dim)
        # A deterministic code has no prior to say its scale: a traversal of a loaded model needs these to know
        # which values its codes take. Buffers rather than metadata: they travel with the state dict and the
        # pickled model alike, so every way of loading a model finds them.
        for name in CODE_STATISTICS_BUFFERS:
            self.register_buffer(name, torch.full((config.latent_dim,), math.nan))

    # --- the two networks -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Posterior:
        h = self.encoder(x)
        if not self.stochastic:
            return Posterior(mean=h)
        mean, logvar = h.chunk(2, dim=-1)
        return Posterior(mean=mean, logvar=logvar)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output before the output non-linearity, shaped like an image batch."""
        logits: torch.Tensor = self.decoder(z)
        return logits

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

    @torch.no_grad()
    def traverse(
        self, x: torch.Tensor | None = None, steps: int = 9, sds: float = 2.0, ranges: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Latent traversals as images, (D, steps, C, H, W): row d decodes the starting code with z_d set to
        ``steps`` evenly spaced values, the other dimensions held. The start is the posterior mean of image ``x``
        (C, H, W), else the centre of the codes. The values span ``ranges`` (D, 2) of (low, high) when given, else
        ``sds`` standard deviations either side of that centre: of the prior N(0, 1) for the VAE family (the
        papers' -2..2), of the training data's codes (recorded at the end of training) for autoencoders, whose
        codes have no prior to fix their scale."""
        if steps < 2:
            raise ValueError(f"steps must be at least 2, not {steps}")
        device = next(self.parameters()).device
        d = self.latent_dim
        stats = None if self.stochastic else self.code_statistics()
        if stats is None and not self.stochastic and (ranges is None or x is None):
            raise NoPrior(
                f"variant '{self.variant}' has no prior, and this model has no recorded code statistics "
                f"to say where its codes lie (it was saved before training recorded them): pass an image "
                f"x and ranges, a (latent_dim, 2) tensor of (low, high) per dimension"
            )
        centre = torch.zeros(d, device=device) if stats is None else stats.mean.to(device)
        if ranges is not None:
            ranges = torch.as_tensor(ranges, dtype=torch.float32, device=device).reshape(d, 2)
        else:
            spread = torch.ones(d, device=device) if stats is None else stats.std.to(device)
            ranges = torch.stack([centre - sds * spread, centre + sds * spread], dim=1)
        start = centre if x is None else self.encode(x.reshape(1, *self.image_shape).to(device).float()).mean[0]
        t = torch.linspace(0.0, 1.0, steps, device=device)
        values = ranges[:, :1] + (ranges[:, 1:] - ranges[:, :1]) * t  # (D, steps)
        codes = start.float().expand(d, steps, d).clone()  # codes[row, step] = start with z_row replaced
        rows = torch.arange(d, device=device)
        codes[rows, :, rows] = values
        return self.decode(codes.reshape(d * steps, d)).reshape(d, steps, *self.image_shape)

    # --- where the codes lie -----------------------------------------------------------------------
    @torch.no_grad()
    def record_code_statistics(self, batches: Iterable[torch.Tensor]) -> CodeStatistics | None:
        """Encode ``batches`` of images (the training data) and keep per latent dimension the codes' mean and
        standard deviation and (VAE family) the mean KL to the prior, in the model's buffers. Runs in eval mode
        and gives the caller's mode back. Returns what it recorded."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        count = 0
        total = torch.zeros(self.latent_dim, dtype=torch.float64)
        squares = torch.zeros(self.latent_dim, dtype=torch.float64)
        kl_total = torch.zeros(self.latent_dim, dtype=torch.float64)
        try:
            for x in batches:
                posterior = self.encode(x.to(device).float())
                codes = posterior.mean.double().cpu()
                count += len(codes)
                total += codes.sum(0)
                squares += codes.pow(2).sum(0)
                kl = posterior.kl_per_dimension()
                if kl is not None:
                    kl_total += kl.double().sum(0).cpu()
        finally:
            self.train(was_training)
        if count == 0:
            raise ValueError("no images to record the code statistics from")
        mean = total / count
        # The population variance, floored at 0 against rounding; one image gives 0.
        std = (squares / count - mean.pow(2)).clamp_min(0.0).sqrt()
        self.code_mean.copy_(mean.float())
        self.code_std.copy_(std.float())
        if self.stochastic:
            self.code_kl.copy_((kl_total / count).float())
        else:
            self.code_kl.fill_(math.nan)
        return self.code_statistics()

    def code_statistics(self) -> CodeStatistics | None:
        """The recorded statistics, or None for a model that has none: one not trained to the end yet, or saved
        before aeforge recorded them (its checkpoint or pickle has no such buffers)."""
        buffers = self.__dict__.get("_buffers", {})
        mean, std, kl = (buffers.get(name) for name in CODE_STATISTICS_BUFFERS)
        if mean is None or std is None or not bool(torch.isfinite(mean).all() and torch.isfinite(std).all()):
            return None
        has_kl = kl is not None and bool(torch.isfinite(kl).all())
        return CodeStatistics(
            mean=mean.detach().float().cpu(),
            std=std.detach().float().cpu(),
            kl=kl.detach().float().cpu() if has_kl else None,
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints written before the code statistics existed lack these buffers: load them as "not recorded"
        # (NaN) instead of refusing the whole checkpoint. load_state_dict hands this method its own copy.
        for name in CODE_STATISTICS_BUFFERS:
            buffer = self._buffers.get(name)
            if buffer is not None:
                state_dict.setdefault(prefix + name, buffer.detach().clone())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # --- training ---------------------------------------------------------------------------------
    def draw_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Noise:
        """All the randomness one training step on batch ``x`` uses (the reparameterisation's normal draws, a
        denoiser's corruption), drawn from ``generator`` (the global one when None). :meth:`loss` takes it as an
        input: a step's randomness then comes from one generator per model wherever the step runs (one process,
        DDP, compiled, or one model among several trained together), and the loss itself draws nothing."""
        return {}

    def loss(self, x: torch.Tensor, noise: Noise | None = None, gather: GatherFn | None = None) -> LossOutput:
        """The training loss on batch ``x`` with the step's ``noise`` (:meth:`draw_noise`; drawn here from the
        global generator when None)."""
        raise NotImplementedError  # pragma: no cover


class LossModule(nn.Module):
    """Wraps a model so that DDP's forward computes the loss (DDP syncs gradients only through forward)."""

    def __init__(self, model: Autoencoder, gather: GatherFn | None = None):
        super().__init__()
        self.model = model
        self.gather = gather

    def forward(self, x: torch.Tensor, noise: Noise | None = None) -> LossOutput:
        return self.model.loss(x, noise, gather=self.gather)
