import pytest
import torch

from tests.workers.metrics.standins import (
    RenderedFactorGrid,
    aligned_representation,
    factor_grid,
    random_representation,
    read_factors,
)
from workers.data.base import DataError, ImageDataset
from workers.metrics.factor_vae import factor_vae_score

SIZES = (3, 4, 5, 6)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("make", [lambda: factor_grid(SIZES), lambda: RenderedFactorGrid(SIZES)])
def test_aligned_codes_score_one_and_random_codes_about_chance(make):
    data = make()
    aligned = factor_vae_score(aligned_representation(), data, 100, 60, 500, 32, 256, seeded())
    assert aligned["eval_accuracy"] == 1.0 and aligned["train_accuracy"] == 1.0
    assert aligned["num_active_dims"] == 6
    chance = factor_vae_score(random_representation(6), data, 100, 60, 500, 32, 256, seeded())
    assert chance["eval_accuracy"] < 0.25 + 0.2
    if isinstance(data, RenderedFactorGrid):
        assert data.rendered >= (100 + 60) * 32  # the votes' images came from images_from_factors


def test_collapsed_dimensions_are_pruned_and_all_collapsed_scores_zero():
    def with_dead_dims(x):
        f = read_factors(x)
        return torch.cat([0.001 * torch.randn(len(f), 3), f + 0.01 * torch.randn(f.shape)], 1)

    data = factor_grid(SIZES)
    out = factor_vae_score(with_dead_dims, data, 80, 40, 300, 32, 256, seeded())
    assert out["num_active_dims"] == 4 and out["eval_accuracy"] == 1.0
    dead = factor_vae_score(lambda x: torch.zeros(len(x), 4), data, 10, 10, 100, 16, 256, seeded())
    assert dead == {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0.0}


def test_works_on_a_split_that_lacks_most_factor_combinations():
    split = factor_grid(SIZES).subset(torch.randperm(360, generator=seeded(5))[:150])  # 150 of 360 combinations
    out = factor_vae_score(aligned_representation(), split, 60, 40, 200, 16, 256, seeded())
    assert out["eval_accuracy"] == 1.0


def test_needs_factors_and_two_varying_ones():
    plain = ImageDataset("pictures", torch.zeros(4, 1, 1, 4, dtype=torch.uint8))
    with pytest.raises(DataError, match="FactorVAE score needs ground-truth factors, and data set 'pictures'"):
        factor_vae_score(aligned_representation(), plain, 10, 10, 10)
    with pytest.raises(ValueError, match=r"at least 2 factors with more than one value.*\[1, 5\]"):
        factor_vae_score(aligned_representation(), factor_grid((1, 5)), 10, 10, 10)
