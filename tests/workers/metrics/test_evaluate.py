import math

import pytest
import torch

from tests.workers.metrics.standins import OracleVAE, StandInModel, factor_grid
from tests.workers.metrics.test_probe import labelled
from workers.config import EvalConfig
from workers.data.base import ImageDataset
from workers.metrics import evaluate

SIZES = (3, 4, 5, 6)
SMALL = EvalConfig(iwae_samples=5, max_examples=100, num_train=300, num_test=150)
BASIC = {"eval/elbo", "eval/recon", "eval/kl"}
VAE_ONLY = {
    "eval/iwae_ll",
    "eval/mi",
    "eval/tc",
    "eval/dwkl",
    "eval/active_units",
    "eval/kl_per_latent",
    "eval/collapsed",
}
FACTOR = {
    "eval/mig",
    "eval/sap",
    "eval/dci_disentanglement",
    "eval/dci_completeness",
    "eval/dci_informativeness",
    "eval/factor_vae",
    "eval/beta_vae",
}


def test_a_vae_on_ground_truth_data_gets_every_metric_and_keeps_its_mode():
    model = StandInModel(image_shape=(1, 1, 4), latent_dim=3)
    model.train()
    out = evaluate(model, factor_grid(SIZES), SMALL, batch_size=64)
    assert set(out) == BASIC | VAE_ONLY | FACTOR | {"eval/mig_exact", "eval/mig_chen"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["eval/iwae_ll"] >= out["eval/elbo"] - 0.5
    assert model.training
    model.eval()
    assert evaluate(model, factor_grid(SIZES), SMALL, batch_size=64) == out  # same seed, same numbers
    assert not model.training


def test_an_oracle_code_scores_high_on_every_disentanglement_metric():
    out = evaluate(OracleVAE(4), factor_grid(SIZES, repeats=2), SMALL, batch_size=64)
    for name in ("eval/mig", "eval/mig_exact", "eval/mig_chen", "eval/dci_disentanglement", "eval/dci_completeness"):
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
    assert set(with_full) == BASIC | VAE_ONLY | FACTOR | {"eval/mig_exact", "eval/mig_chen"}
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


def test_labelled_data_gets_the_encoder_as_a_classifier():
    """factor_grid(labels=True) labels each image with its first factor, which the oracle's code holds: the linear
    probe reads it back; a fine-tuned head is reported only when asked for; without training data there is none."""
    grid = factor_grid(SIZES, repeats=2, labels=True)
    train, val = grid.subset(torch.arange(0, len(grid), 2)), grid.subset(torch.arange(1, len(grid), 2))
    out = evaluate(OracleVAE(4), val, SMALL, batch_size=64, train=train)
    assert out["eval/probe_linear_accuracy"] > 0.95
    assert "eval/probe_finetune_accuracy" not in out
    assert "eval/probe_linear_accuracy" not in evaluate(OracleVAE(4), val, SMALL, batch_size=64)

    model = StandInModel(latent_dim=2)
    tuned = evaluate(
        model,
        labelled(200, 1),
        SMALL.model_copy(update={"probe_finetune_epochs": 15, "probe_finetune_lr": 3e-2}),
        batch_size=32,
        train=labelled(300, 0),
    )
    assert tuned["eval/probe_finetune_accuracy"] > 0.9  # 3 classes: chance is 1/3
    assert "eval/probe_linear_accuracy" in tuned
    assert torch.is_grad_enabled()  # the caller's grad mode is back
    off = SMALL.model_copy(update={"probe": False})
    assert "eval/probe_linear_accuracy" not in evaluate(OracleVAE(4), val, off, batch_size=64, train=train)


def first_factor_only(x):
    """A code that holds factor f0 and nothing else of the factors."""
    from tests.workers.metrics.standins import read_factors

    f = read_factors(x)
    return torch.cat([f[:, :1], torch.zeros(len(f), 2)], 1)


class FirstFactorOracle(OracleVAE):
    def encode(self, x):
        from workers.models.base import Posterior

        mean = first_factor_only(x)
        logvar = torch.cat([torch.full((len(x), 1), -6.0), torch.zeros(len(x), 2)], 1)
        return Posterior(mean=mean, logvar=logvar)

    def representation(self, x):
        return first_factor_only(x)


def test_eval_factors_choose_the_factors_every_score_uses():
    grid = factor_grid((4, 4), repeats=4)
    every = evaluate(FirstFactorOracle(2, extra_dims=1), grid, SMALL, batch_size=64)
    only_f0 = evaluate(
        FirstFactorOracle(2, extra_dims=1), grid, SMALL.model_copy(update={"factors": ["f0"]}), batch_size=64
    )
    for name in ("eval/mig", "eval/mig_exact", "eval/mig_chen"):
        assert 0.4 < every[name] < 0.6, name  # f0 found, f1 not: half the factors
        assert only_f0[name] > 0.9, name
    assert "eval/factor_vae" not in only_f0  # one scored factor: nothing to tell apart


def test_eval_factors_are_checked_against_the_data_before_training():
    from workers.data.base import DataError
    from workers.metrics import check_scored_factors

    grid = factor_grid(SIZES)
    check_scored_factors(SMALL.model_copy(update={"factors": ["f1", "f3"]}), grid)
    with pytest.raises(DataError, match=r"eval.factors: 'shape' is not a factor of data set 'grid'"):
        check_scored_factors(SMALL.model_copy(update={"factors": ["shape"]}), grid)
    with pytest.raises(DataError, match="eval.factors: data set 'val' has no ground-truth factors"):
        check_scored_factors(SMALL.model_copy(update={"factors": ["f1"]}), ImageDataset("val", grid._images))
    with pytest.raises(ValueError, match="names one twice"):
        EvalConfig(factors=["f1", "f1"])


def test_each_metric_is_announced_as_it_starts_in_the_planned_order():
    """What a job's "evaluating eval/mig (5 of 12)" phase lines are made of."""
    from workers.metrics import evaluation_plan

    seen: list[tuple[str, int, int]] = []
    data = factor_grid(SIZES)
    out = evaluate(OracleVAE(4), data, SMALL, batch_size=64, on_metric=lambda *told: seen.append(told))
    plan = evaluation_plan(OracleVAE(4), data, SMALL)
    assert [name for name, _, _ in seen] == plan
    assert [(done, total) for _, done, total in seen] == [(k, len(plan)) for k in range(len(plan))]
    assert {"eval/elbo", "eval/mig", "eval/mig_chen"} <= set(plan) and set(out) >= {"eval/elbo", "eval/mig"}
