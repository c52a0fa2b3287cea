import math

import numpy as np
import pytest
import torch

from tests.workers.metrics.standins import (
    OracleVAE,
    RenderedFactorGrid,
    StandInModel,
    aligned_representation,
    factor_grid,
    random_representation,
    read_factors,
)
from workers.data.base import DataError, ImageDataset
from workers.metrics.mig import discretize, mig, mig_exact, mig_from_codes
from workers.models.base import Posterior

SIZES = (3, 4, 5, 6)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def random_factors(n, sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(s, size=n) for s in sizes], axis=1)


def test_codes_equal_to_the_factors_score_about_one_and_random_codes_about_zero():
    factors = random_factors(2000)
    rng = np.random.default_rng(1)
    aligned = np.concatenate([factors + 0.01 * rng.normal(size=factors.shape), rng.normal(size=(2000, 2))], 1)
    assert mig_from_codes(aligned, factors) > 0.9
    assert mig_from_codes(rng.normal(size=(2000, 6)), factors) < 0.05


def test_a_code_that_mixes_two_factors_scores_lower_than_one_per_factor():
    factors = random_factors(2000, (4, 4))
    separate = factors.astype(float)
    mixed = np.stack([factors[:, 0] + factors[:, 1], factors[:, 0] - factors[:, 1]], 1).astype(float)
    assert mig_from_codes(mixed, factors) < mig_from_codes(separate, factors) - 0.3


def test_constant_factors_are_left_out_and_one_code_dimension_is_allowed():
    factors = random_factors(1000, (3,))
    with_constant = np.concatenate([factors, np.zeros((1000, 1), dtype=int)], 1)
    codes = factors.astype(float)
    assert mig_from_codes(codes, with_constant) == pytest.approx(mig_from_codes(codes, factors))
    assert mig_from_codes(codes, factors) == pytest.approx(1.0)  # one dimension: the runner-up counts as 0
    with pytest.raises(ValueError, match="single value"):
        mig_from_codes(codes, np.zeros((1000, 1), dtype=int))
    with pytest.raises(ValueError, match="same N"):
        mig_from_codes(codes[:10], factors)


def test_discretize_uses_equal_width_bins_over_each_dimensions_range():
    codes = np.array([[0.0, 5.0], [0.49, 5.0], [0.51, 6.0], [1.0, 7.0]])
    assert discretize(codes, 2).tolist() == [[1, 1], [1, 1], [2, 2], [2, 2]]


@pytest.mark.parametrize("make", [lambda: factor_grid(SIZES), lambda: RenderedFactorGrid(SIZES)])
def test_mig_on_a_data_set_reads_codes_through_the_representation(make):
    data = make()
    assert mig(aligned_representation(), data, 1000, 128, seeded()) > 0.9
    assert mig(random_representation(6), data, 1000, 128, seeded()) < 0.05


def only_first_factor(x):
    f = read_factors(x)
    return torch.cat([f[:, :1], torch.randn(len(f), 2)], 1)


def test_a_factor_subset_is_scored_alone():
    data = factor_grid((4, 4))
    assert mig(only_first_factor, data, 1000, 256, seeded(), factors=["f0"]) > 0.9
    both = mig(only_first_factor, data, 1000, 256, seeded())
    assert 0.4 < both < 0.55


class FirstFactorVAE(OracleVAE):
    def encode(self, x):
        f0 = read_factors(x)[:, :1]
        zeros = torch.zeros(len(x), 1)
        logvar = torch.cat([torch.full_like(f0, math.log(0.05**2)), zeros], 1)
        return Posterior(mean=torch.cat([f0, zeros], 1), logvar=logvar)


def test_exact_mig_of_an_aligned_posterior_is_about_one_and_of_the_prior_zero():
    data = factor_grid(SIZES, repeats=3)
    assert mig_exact(OracleVAE(4, aligned=True), data, 600, 128, seeded()) > 0.9
    assert abs(mig_exact(OracleVAE(4, aligned=False), data, 600, 128, seeded())) < 0.05
    two = factor_grid((4, 4), repeats=10)
    assert mig_exact(FirstFactorVAE(2), two, 160, 64, seeded(), factors=["f0"]) > 0.9
    assert 0.4 < mig_exact(FirstFactorVAE(2), two, 160, 64, seeded()) < 0.55


def test_exact_mig_needs_a_vae_and_factors():
    with pytest.raises(ValueError, match="deterministic autoencoder"):
        mig_exact(StandInModel(stochastic=False, image_shape=(1, 1, 4)), factor_grid(SIZES), 100)
    plain = ImageDataset("pictures", torch.zeros(4, 1, 1, 4, dtype=torch.uint8))
    with pytest.raises(DataError, match="'pictures' has none"):
        mig_exact(OracleVAE(4), plain, 100)
    with pytest.raises(DataError, match="'pictures' has none"):
        mig(aligned_representation(), plain, 100)
