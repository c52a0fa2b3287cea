"""Small models and data for the per-variant tests: an 8x8 mlp unless a test asks for another architecture."""

import torch

from workers.config import ModelConfig
from workers.models import build_model

SHAPE = (1, 8, 8)


def make(variant: str, shape=SHAPE, dataset_size: int = 256, seed: int = 0, **fields):
    torch.manual_seed(seed)
    fields.setdefault("architecture", "mlp")
    fields.setdefault("hidden_dims", [64])
    fields.setdefault("latent_dim", 3)
    return build_model(ModelConfig(variant=variant, **fields), shape, dataset_size)


def blobs(n: int = 64, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    """Binary images of one filled square at a random place: simple structure a few steps can learn."""
    g = torch.Generator().manual_seed(seed)
    _, h, w = shape
    x = torch.zeros(n, *shape)
    for i in range(n):
        r, c = torch.randint(0, h - 3, (1,), generator=g).item(), torch.randint(0, w - 3, (1,), generator=g).item()
        x[i, :, r : r + 3, c : c + 3] = 1.0
    return x


def fit(model, x: torch.Tensor, steps: int = 150, lr: float = 3e-3) -> tuple[float, float]:
    """Full-batch Adam; returns (first loss, mean of the last 10 losses)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model.loss(x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], sum(losses[-10:]) / 10
