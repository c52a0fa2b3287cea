"""Small stand-ins for the metric tests: ground-truth data whose images encode their factors, and models that
only have the attributes the metrics use (encode, decode_logits, representation, config, stochastic,
latent_dim, dataset_size)."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from workers.config import ModelConfig
from workers.data.base import ImageDataset
from workers.models.base import Posterior


def grid_factors(sizes) -> torch.Tensor:
    """Every combination of factor values, one row each (N, K)."""
    return torch.tensor(list(itertools.product(*[range(s) for s in sizes])), dtype=torch.long)


def factor_grid(sizes, repeats: int = 1, labels: bool = False, name: str = "grid") -> ImageDataset:
    """A plain ImageDataset over the full grid (each combination ``repeats`` times); image = the factor values
    as pixels of a (1, 1, K) image, so a representation can read the factors back."""
    factors = grid_factors(sizes).repeat(repeats, 1)
    images = factors.to(torch.uint8).view(len(factors), 1, 1, len(sizes))
    return ImageDataset(
        name,
        images,
        labels=factors[:, 0].clone() if labels else None,
        factors=factors,
        factor_names=[f"f{k}" for k in range(len(sizes))],
        factor_sizes=sizes,
    )


class RenderedFactorGrid(ImageDataset):
    """A ground-truth data set that renders any factor combination itself, as dSprites does."""

    def __init__(self, sizes):
        factors = grid_factors(sizes)
        super().__init__(
            "rendered-grid",
            factors.to(torch.uint8).view(len(factors), 1, 1, len(sizes)),
            factors=factors,
            factor_names=[f"f{k}" for k in range(len(sizes))],
            factor_sizes=sizes,
        )
        self.rendered = 0

    def sample_factors(self, n, generator=None):
        return torch.stack([torch.randint(s, (n,), generator=generator) for s in self.factor_sizes], dim=1)

    def images_from_factors(self, factors, generator=None):
        self.rendered += len(factors)
        return factors.float().view(len(factors), 1, 1, -1) / 255.0


def read_factors(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.flatten(1) * 255.0)


def aligned_representation(noise: float = 0.01, extra_dims: int = 2, seed: int = 0):
    """codes = factors + tiny noise, plus ``extra_dims`` pure-noise dimensions."""
    g = torch.Generator().manual_seed(seed)

    def represent(x):
        f = read_factors(x)
        extra = torch.randn(len(f), extra_dims, generator=g)
        return torch.cat([f + noise * torch.randn(f.shape, generator=g), extra], 1)

    return represent


def random_representation(dims: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(len(x), dims, generator=g)


class StandInModel(nn.Module):
    """A tiny MLP autoencoder with the model interface; ``stochastic`` selects VAE or plain AE."""

    def __init__(
        self,
        image_shape=(1, 4, 4),
        latent_dim=3,
        stochastic=True,
        likelihood="bernoulli",
        dataset_size=100,
        hidden=32,
        seed=0,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.config = ModelConfig(
            variant="vae" if stochastic else "ae", architecture="mlp", latent_dim=latent_dim, likelihood=likelihood
        )
        self.stochastic = stochastic
        self.latent_dim = latent_dim
        self.dataset_size = dataset_size
        self.image_shape = tuple(image_shape)
        pixels = int(torch.tensor(image_shape).prod())
        out = 2 * latent_dim if stochastic else latent_dim
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.Tanh(), nn.Linear(hidden, out))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, pixels), nn.Unflatten(1, self.image_shape)
        )

    def encode(self, x):
        h = self.encoder(x)
        if not self.stochastic:
            return Posterior(mean=h)
        mean, logvar = h.chunk(2, dim=-1)
        return Posterior(mean=mean, logvar=logvar)

    def decode_logits(self, z):
        return self.decoder(z)

    @torch.no_grad()
    def representation(self, x):
        return self.encode(x).mean


class OracleVAE(nn.Module):
    """A VAE-shaped model on factor-grid images whose posterior is N(factors, std^2) on the first K dimensions
    (``aligned``) or the prior N(0, I) everywhere (not aligned); ``extra_dims`` more dimensions are the prior."""

    stochastic = True

    def __init__(self, num_factors, aligned=True, std=0.05, extra_dims=1):
        super().__init__()
        self.latent_dim = num_factors + extra_dims
        self.config = ModelConfig(variant="vae", architecture="mlp", latent_dim=self.latent_dim)
        self.dataset_size = 1000
        self.aligned, self.std, self.extra_dims = aligned, std, extra_dims
        self.decoder = nn.Linear(self.latent_dim, num_factors)

    def encode(self, x):
        f = read_factors(x)
        zeros = torch.zeros(len(f), self.extra_dims)
        if self.aligned:
            mean = torch.cat([f, zeros], 1)
            logvar = torch.cat([torch.full_like(f, 2 * torch.log(torch.tensor(self.std)).item()), zeros], 1)
        else:
            mean = torch.zeros(len(f), self.latent_dim)
            logvar = torch.zeros(len(f), self.latent_dim)
        return Posterior(mean=mean, logvar=logvar)

    def decode_logits(self, z):
        return self.decoder(z).view(len(z), 1, 1, -1)

    @torch.no_grad()
    def representation(self, x):
        return self.encode(x).mean
