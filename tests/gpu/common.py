"""What the GPU tests share: the protocol's model at a small step count, on a slice of dSprites, and the skip that
keeps them out of the way on a machine without CUDA (CI, the development machines).

They run on the device machine through ``benchmarks/device_suite.py`` (``pytest -m gpu tests/gpu``), where Ray,
MLflow and boto3 are not installed: nothing here may import them.
"""

from __future__ import annotations

import pytest
import torch

from workers.config import EvalConfig, ModelConfig, TrainConfig
from workers.data.dsprites import DSprites

NO_CUDA = "no CUDA"

# Every test in tests/gpu: selected by `pytest -m gpu`, skipped with a reason where there is no GPU.
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

# Only the training is tested here; the evaluation has its own (CPU) tests.
NO_EVAL = EvalConfig(disentanglement=False, pictures=False, probe=False)
# Rows of dSprites the tests train on: 64 batches of 64, enough that no step of a 20-step test repeats a batch.
ROWS = 4096


def protocol_model(variant: str = "beta_tcvae") -> ModelConfig:
    """disentanglement_lib's model (conv64, z = 10) for ``variant``."""
    extra = {"beta": 6.0} if variant in ("beta_vae", "beta_tcvae") else {}
    return ModelConfig(variant=variant, architecture="conv64", latent_dim=10, **extra)


def short_train(**fields) -> TrainConfig:
    """A protocol-like TrainConfig (batch 64, Adam 1e-4) for a few steps, the loss read back at every step. Eager
    unless ``compile=True`` is given: compiling costs seconds per run, and only the compile test is about it."""
    base = {
        "steps": 20,
        "batch_size": 64,
        "log_every": 1,
        "checkpoint_every": 10**6,
        "seed": 0,
        "compile": False,
        "optimizer": {"name": "adam", "lr": 1e-4},
    }
    return TrainConfig(**{**base, **fields})


def dsprites_rows(n: int = ROWS) -> DSprites:
    """The first ``n`` rows of dSprites, on the host (the loop decides where they go)."""
    return DSprites(limit=n)


def losses(result) -> list[float]:
    return [value for _, value in result.history["train/loss"]]


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
