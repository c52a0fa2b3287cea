import math

import pytest
import torch

from tests.workers.metrics.standins import OracleVAE, StandInModel, factor_grid, read_factors
from tests.workers.metrics.test_elbo import binary_images
from workers.metrics.tc_decomposition import tc_decomposition
from workers.models.base import Posterior


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dataset_size", [None, 5000])
def test_parts_add_up_to_the_kl_on_average(dataset_size):
    model = StandInModel(latent_dim=4)
    out = tc_decomposition(model, binary_images(n=600), 600, 128, seeded(), dataset_size=dataset_size)
    assert set(out) == {"mi", "tc", "dwkl", "kl"}
    assert out["mi"] + out["tc"] + out["dwkl"] == pytest.approx(out["kl"], abs=0.1)
    assert out["mi"] >= 0 and out["kl"] > 0


def test_distinct_narrow_posteriors_carry_log_n_nats_about_the_index():
    data = factor_grid((3, 4, 5))  # 60 distinct examples
    model = OracleVAE(3, aligned=True, std=0.01)
    whole = tc_decomposition(model, data, 1000, 16, seeded())  # S = N: the exact aggregate posterior
    assert whole["mi"] == pytest.approx(math.log(60), abs=0.01)
    # S < N: each example's own posterior weighs 1/N, as in the sum over the whole data set.
    sampled = tc_decomposition(model, data, 1000, 16, seeded(), dataset_size=6000)
    assert sampled["mi"] == pytest.approx(math.log(6000), abs=0.05)


def test_posterior_equal_to_the_prior_has_no_mi_tc_or_dwkl():
    out = tc_decomposition(OracleVAE(3, aligned=False), factor_grid((3, 4, 5)), 1000, 16, seeded(), dataset_size=500)
    for part in ("mi", "tc", "dwkl", "kl"):
        assert out[part] == pytest.approx(0.0, abs=1e-5)


class DuplicatedCode(OracleVAE):
    """Both latent dimensions copy factor 0: the aggregate posterior lies on the diagonal."""

    def encode(self, x):
        f0 = read_factors(x)[:, :1]
        return Posterior(mean=torch.cat([f0, f0], 1), logvar=torch.full((len(x), 2), math.log(0.01**2)))


def test_two_copies_of_one_factor_have_a_total_correlation_of_its_entropy():
    model = DuplicatedCode(1, extra_dims=1)
    out = tc_decomposition(model, factor_grid((3, 2), repeats=10), 1000, 64, seeded())
    assert out["tc"] == pytest.approx(math.log(3), abs=0.01)


def test_decomposition_errors_name_the_problem():
    with pytest.raises(ValueError, match="deterministic autoencoder"):
        tc_decomposition(StandInModel(stochastic=False), binary_images(n=10), 10)
    with pytest.raises(ValueError, match="at least 2 examples"):
        tc_decomposition(StandInModel(), binary_images(n=1), 10)
    with pytest.raises(ValueError, match="dataset_size"):
        tc_decomposition(StandInModel(), binary_images(n=10), 10, dataset_size=5)
