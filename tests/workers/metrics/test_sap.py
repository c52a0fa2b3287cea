import numpy as np
import pytest
import torch

from tests.workers.metrics.standins import (
    RenderedFactorGrid,
    aligned_representation,
    factor_grid,
    random_representation,
)
from tests.workers.metrics.test_mig import random_factors
from workers.metrics.sap import sap, sap_from_codes, sap_score_matrix

# Two-valued factors: disentanglement_lib's one-axis linear classifier separates them perfectly, so an aligned
# code reaches SAP's ceiling, the mean over factors of (1 - chance accuracy). A factor with more values is
# harder for it: a threshold isolates only the end values.
SMALL = (2, 2, 2)
CEILING = np.mean([1 - 1 / s for s in SMALL])


def codes_for(factors, aligned, seed=0):
    rng = np.random.default_rng(seed)
    if aligned:
        return np.concatenate([factors + 0.01 * rng.normal(size=factors.shape), rng.normal(size=(len(factors), 2))], 1)
    return rng.normal(size=(len(factors), factors.shape[1] + 2))


def test_aligned_codes_reach_the_ceiling_and_random_codes_score_about_zero():
    train, test = random_factors(1000, SMALL, 0), random_factors(500, SMALL, 1)
    aligned = sap_from_codes(codes_for(train, True), train, codes_for(test, True, 1), test)
    assert aligned == pytest.approx(CEILING, abs=0.05)
    assert sap_from_codes(codes_for(train, False), train, codes_for(test, False, 1), test) < 0.05


def test_score_matrix_puts_each_factor_on_its_own_code_dimension():
    train, test = random_factors(1000, SMALL, 0), random_factors(500, SMALL, 1)
    scores = sap_score_matrix(codes_for(train, True), train, codes_for(test, True, 1), test)
    assert scores.shape == (5, 3)
    assert np.array_equal(scores.argmax(axis=0), [0, 1, 2])
    assert np.allclose(scores[[0, 1, 2], [0, 1, 2]], 1.0)


def test_many_valued_factors_still_separate_aligned_from_random_codes():
    sizes = (3, 4, 5, 6)
    train, test = random_factors(1000, sizes, 0), random_factors(500, sizes, 1)
    assert sap_from_codes(codes_for(train, True), train, codes_for(test, True, 1), test) > 0.35
    assert sap_from_codes(codes_for(train, False), train, codes_for(test, False, 1), test) < 0.05


def test_constant_factors_are_left_out():
    train, test = random_factors(600, SMALL, 0), random_factors(300, SMALL, 1)
    pad = lambda f: np.concatenate([f, np.zeros((len(f), 1), dtype=int)], 1)
    a, b = codes_for(train, True), codes_for(test, True, 1)
    assert sap_from_codes(a, pad(train), b, pad(test)) == pytest.approx(sap_from_codes(a, train, b, test))
    with pytest.raises(ValueError, match="single value"):
        sap_from_codes(a, np.zeros((600, 1)), b, np.zeros((300, 1)))
    with pytest.raises(ValueError, match="same number of rows"):
        sap_from_codes(a[:5], train, b, test)


@pytest.mark.parametrize("make", [lambda: factor_grid(SMALL), lambda: RenderedFactorGrid(SMALL)])
def test_sap_on_a_data_set(make):
    data = make()
    g = lambda: torch.Generator().manual_seed(0)
    assert sap(aligned_representation(), data, 600, 300, 128, g()) == pytest.approx(CEILING, abs=0.06)
    assert sap(random_representation(5), data, 600, 300, 128, g()) < 0.06
