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
from tests.workers.metrics.test_sap import codes_for
from workers.metrics.dci import dci, dci_from_codes, importance_matrix

SIZES = (3, 4, 5, 6)


def test_aligned_codes_are_disentangled_complete_and_informative():
    train, test = random_factors(800, SIZES, 0), random_factors(400, SIZES, 1)
    out = dci_from_codes(codes_for(train, True), train, codes_for(test, True, 1), test)
    assert out["disentanglement"] > 0.9
    assert out["completeness"] > 0.9
    assert out["informativeness"] > 0.95


def test_random_codes_are_neither_disentangled_nor_informative():
    train, test = random_factors(800, SIZES, 0), random_factors(400, SIZES, 1)
    out = dci_from_codes(codes_for(train, False), train, codes_for(test, False, 1), test)
    assert out["disentanglement"] < 0.15
    assert out["completeness"] < 0.15
    assert out["informativeness"] < np.mean([1 / s for s in SIZES]) + 0.1


def test_one_code_for_two_factors_is_complete_but_not_disentangled():
    train, test = random_factors(800, (4, 4), 0), random_factors(400, (4, 4), 1)
    joint = lambda f: (4 * f[:, :1] + f[:, 1:]).astype(float)  # both factors in one dimension
    importance, _ = importance_matrix(joint(train), train, joint(test), test)
    assert importance.shape == (1, 2)
    out = dci_from_codes(joint(train), train, joint(test), test)
    assert out["completeness"] == 1.0  # one code dimension: each factor lives in it alone
    assert out["disentanglement"] < 0.1
    assert out["informativeness"] > 0.95


def test_constant_factors_are_left_out_and_bad_shapes_are_errors():
    train, test = random_factors(300, (3,), 0), random_factors(100, (3,), 1)
    zeros = lambda f: np.zeros((len(f), 1), dtype=int)
    with pytest.raises(ValueError, match="single value"):
        dci_from_codes(train.astype(float), zeros(train), test.astype(float), zeros(test))
    with pytest.raises(ValueError, match="same code and factor dimensions"):
        dci_from_codes(train.astype(float), train, np.zeros((100, 2)), test)


@pytest.mark.parametrize("make", [lambda: factor_grid(SIZES), lambda: RenderedFactorGrid(SIZES)])
def test_dci_on_a_data_set(make):
    data = make()
    g = lambda: torch.Generator().manual_seed(0)
    assert dci(aligned_representation(), data, 600, 300, 128, g())["disentanglement"] > 0.9
    assert dci(random_representation(6), data, 600, 300, 128, g())["disentanglement"] < 0.15
