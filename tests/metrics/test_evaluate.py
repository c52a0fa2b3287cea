import math

import pytest
import torch

from tests.metrics.standins import OracleVAE, StandInModel, factor_grid
from workers.config import EvalConfig
from workers.data.base import ImageDataset
from workers.metrics import evaluate

SIZES = (3, 4, 5, 6)
SMALL = EvalConfig(iwae_samples=5, max_examples=100, num_train=300, num_test=150)
BASIC = {"eval/elbo", "eval/recon", "eval/kl"}
VAE_ONLY = {"eval/iwae_ll", "eval/mi", "eval/tc", "eval/dwkl"}
FACTOR = {"eval/mig", "eval/sap", "eval/dci_disentanglement", "eval/dci_completeness", "eval/dci_informativeness",
          "eval/factor_vae", "eval/beta_vae"}


def test_a_vae_on_ground_truth_data_gets_every_metric_and_keeps_its_mode():
    model = StandInModel(image_shape=(1, 1, 4), latent_dim=3)
    model.train()
    out = evaluate(model, factor_grid(SIZES), SMALL, batch_size=64)
    assert set(out) == BASIC | VAE_ONLY | FACTOR | {"eval/mig_exact"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["eval/iwae_ll"] >= out["eval/elbo"] - 0.5
    assert model.training
    model.eval()
    assert evaluate(model, factor_grid(SIZES), SMALL, batch_size=64) == out  # same seed, same numbers
    assert not model.training


def test_an_oracle_code_scores_high_on_every_disentanglement_metric():
    out = evaluate(OracleVAE(4), factor_grid(SIZES, repeats=2), SMALL, batch_size=64)
    for name in ("eval/mig", "eval/mig_exact", "eval/dci_disentanglement", "eval/dci_completeness"):
        assert out[name] > 0.9, name
    assert out["eval/factor_vae"] == 1.0
    assert out["eval/beta_vae"] > 0.9
    assert out["eval/dci_informativeness"] > 0.95


def test_an_autoencoder_gets_reconstruction_and_the_factor_scores_only():
    model = StandInModel(image_shape=(1, 1, 4), stochastic=False)
    out = evaluate(model, factor_grid(SIZES), SMALL, batch_size=64)
    assert set(out) == {"eval/recon"} | FACTOR


def test_factors_come_from_the_full_data_set_when_given():
    grid = factor_grid(SIZES)
    val_without_factors = ImageDataset("val", grid.images(torch.arange(len(grid))).mul(255).to(torch.uint8))
    model = StandInModel(image_shape=(1, 1, 4))
    assert set(evaluate(model, val_without_factors, SMALL)) == BASIC | VAE_ONLY
    with_full = evaluate(model, val_without_factors, SMALL, full=grid)
    assert set(with_full) == BASIC | VAE_ONLY | FACTOR | {"eval/mig_exact"}
    off = SMALL.model_copy(update={"disentanglement": False})
    assert set(evaluate(model, val_without_factors, off, full=grid)) == BASIC | VAE_ONLY


def test_scores_that_need_two_varying_factors_are_left_out_without_them():
    out = evaluate(StandInModel(image_shape=(1, 1, 2)), factor_grid((1, 6), repeats=5), SMALL, batch_size=64)
    assert "eval/mig" in out and "eval/factor_vae" not in out and "eval/beta_vae" not in out


def test_the_model_mode_is_restored_when_a_metric_fails():
    model = StandInModel(image_shape=(1, 1, 4))
    model.train()
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, factor_grid(SIZES).subset(torch.arange(0)), SMALL)
    assert model.training
