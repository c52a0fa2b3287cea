"""Active units (Burda et al.) and the collapse flag: counted from the variance of the posterior means over the
data, and reported by every VAE-family evaluation."""

import pytest
import torch

from tests.workers.metrics.standins import OracleVAE, StandInModel, factor_grid
from workers.config import EvalConfig
from workers.metrics import evaluate
from workers.metrics.active_units import active_units, count_active, is_collapsed, unit_variances

SIZES = (3, 4, 5)
SMALL = EvalConfig(iwae_samples=2, max_examples=200, num_train=100, num_test=50, disentanglement=False)


def test_a_unit_is_active_when_its_posterior_mean_varies_by_more_than_the_threshold():
    g = torch.Generator().manual_seed(0)
    # Standard deviations 1, 0.2 (variance 0.04), 0.05 (variance 0.0025) and 0 over 5,000 rows.
    mean = torch.randn(5000, 4, generator=g) * torch.tensor([1.0, 0.2, 0.05, 0.0])
    variances = unit_variances(mean)
    assert variances.tolist() == pytest.approx([1.0, 0.04, 0.0025, 0.0], rel=0.1, abs=1e-9)
    assert count_active(mean) == 2  # Burda et al.'s 0.01
    assert count_active(mean, threshold=0.001) == 3
    assert count_active(torch.zeros(10, 3)) == 0
    with pytest.raises(ValueError, match="at least 2 rows"):
        count_active(torch.zeros(1, 3))


def test_collapsed_means_no_active_unit_or_too_little_kl_per_latent():
    assert is_collapsed(0, 25.0, 10)  # no active unit, whatever the KL says
    assert is_collapsed(3, 0.37, 10, 0.1)  # 0.037 nats per latent: the collapsed sweep
    assert not is_collapsed(3, 12.0, 10, 0.1)
    assert is_collapsed(3, float("nan"), 10)  # a KL that is not a number is no evidence of use
    assert not is_collapsed(1, 0.05, 1, 0.0)  # a floor of 0 leaves only the active-unit rule


def test_an_oracle_posterior_has_its_factor_units_active_and_a_prior_posterior_none():
    data = factor_grid(SIZES, repeats=2)
    aligned = active_units(OracleVAE(3, extra_dims=2), data, 500, 64, torch.Generator().manual_seed(0), kl=5.0)
    assert aligned == {"active_units": 3.0, "kl_per_latent": 1.0, "collapsed": 0.0}
    prior = active_units(OracleVAE(3, aligned=False), data, 500, 64, torch.Generator().manual_seed(0), kl=0.0)
    assert prior["active_units"] == 0.0 and prior["collapsed"] == 1.0


def test_every_vae_evaluation_reports_health_and_an_autoencoders_does_not():
    data = factor_grid(SIZES, repeats=2)
    healthy = evaluate(OracleVAE(3, extra_dims=1), data, SMALL, batch_size=64)
    assert healthy["eval/active_units"] == 3.0 and healthy["eval/collapsed"] == 0.0
    assert healthy["eval/kl_per_latent"] == pytest.approx(healthy["eval/kl"] / 4)
    collapsed = evaluate(OracleVAE(3, aligned=False), data, SMALL, batch_size=64)
    assert collapsed["eval/active_units"] == 0.0 and collapsed["eval/collapsed"] == 1.0
    # The thresholds are the spec's: a floor above the oracle's KL per latent calls it collapsed too.
    strict = SMALL.model_copy(update={"collapse_kl_per_latent": healthy["eval/kl_per_latent"] + 1.0})
    assert evaluate(OracleVAE(3, extra_dims=1), data, strict, batch_size=64)["eval/collapsed"] == 1.0
    plain = evaluate(StandInModel(image_shape=(1, 1, 3), stochastic=False), data, SMALL, batch_size=64)
    assert not {"eval/active_units", "eval/collapsed"} & set(plain)
