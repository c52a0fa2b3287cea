import pytest
import torch

from tests.workers.metrics.standins import (
    RenderedFactorGrid,
    aligned_representation,
    factor_grid,
    random_representation,
)
from workers.data.base import DataError, ImageDataset
from workers.metrics.beta_vae_score import beta_vae_score

SIZES = (3, 4, 5, 6)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("make", [lambda: factor_grid(SIZES), lambda: RenderedFactorGrid(SIZES)])
def test_aligned_codes_score_high_and_random_codes_about_chance(make):
    data = make()
    aligned = beta_vae_score(aligned_representation(), data, 120, 60, 32, 256, seeded())
    assert aligned["eval_accuracy"] > 0.95
    chance = beta_vae_score(random_representation(6), data, 120, 60, 32, 256, seeded())
    assert chance["eval_accuracy"] < 0.25 + 0.2


def test_works_on_a_split_that_lacks_most_factor_combinations():
    split = factor_grid(SIZES).subset(torch.randperm(360, generator=seeded(5))[:150])  # 150 of 360 combinations
    assert beta_vae_score(aligned_representation(), split, 80, 40, 16, 256, seeded())["eval_accuracy"] > 0.95


def test_needs_factors_two_varying_ones_and_pairs():
    plain = ImageDataset("pictures", torch.zeros(4, 1, 1, 4, dtype=torch.uint8))
    with pytest.raises(DataError, match="beta-VAE score needs ground-truth factors, and data set 'pictures'"):
        beta_vae_score(aligned_representation(), plain, 10, 10)
    with pytest.raises(ValueError, match="at least 2 factors with more than one value"):
        beta_vae_score(aligned_representation(), factor_grid((5, 1)), 10, 10)
    with pytest.raises(ValueError, match="pair_batch_size"):
        beta_vae_score(aligned_representation(), factor_grid(SIZES), 10, 10, pair_batch_size=0)
