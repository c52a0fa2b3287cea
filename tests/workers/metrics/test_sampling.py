import pytest
import torch

from tests.workers.metrics.standins import RenderedFactorGrid, factor_grid, read_factors
from workers.data.base import DataError, ImageDataset
from workers.metrics.sampling import FactorSampler, factor_columns


@pytest.mark.parametrize("make", [lambda: factor_grid((3, 4, 5)), lambda: RenderedFactorGrid((3, 4, 5))])
def test_draws_sharing_a_factor_hold_it_and_match_their_images(make):
    data = make()
    sampler = FactorSampler(data, torch.Generator().manual_seed(0))
    assert sampler.renders == isinstance(data, RenderedFactorGrid)
    factor_index = torch.randint(3, (500,))
    values = torch.tensor([2, 3, 4])[factor_index] * (torch.rand(500) > 0.5)  # a valid value of each factor
    draw = sampler.sample_sharing(factor_index, values)
    assert torch.equal(draw.factors[torch.arange(500), factor_index], values)
    assert torch.equal(
        read_factors(torch.cat([sampler.images(draw, s, s + 64) for s in range(0, 500, 64)])), draw.factors.float()
    )
    # The factors that are not held vary.
    others = draw.factors[factor_index == 0][:, 1]
    assert others.unique().numel() == 4


def test_rows_of_an_incomplete_split_are_drawn_from_the_rows_it_has():
    full = factor_grid((3, 4, 5))
    split = full.subset(torch.arange(1, 60, 7))  # 9 rows: most factor combinations are missing, and f2 = 4
    split = split.subset(torch.nonzero(split.factors(torch.arange(9))[:, 2] != 4).flatten())
    sampler = FactorSampler(split, torch.Generator().manual_seed(0))
    rows = split.factors(torch.arange(len(split)))
    draw = sampler.sample_sharing(torch.zeros(50, dtype=torch.long), rows[torch.arange(50) % len(split), 0])
    present = {tuple(r) for r in rows.tolist()}
    assert all(tuple(r) in present for r in draw.factors.tolist())
    with pytest.raises(DataError, match="no row with factor 'f2' = 4"):
        sampler.sample_sharing(torch.tensor([2]), torch.tensor([4]))


def test_data_without_factors_and_bad_factor_names_are_clear_errors():
    plain = ImageDataset("pictures", torch.zeros(4, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(DataError, match="MIG needs ground-truth factors, and data set 'pictures' has none"):
        FactorSampler(plain, what="MIG")
    grid = factor_grid((2, 3))
    assert factor_columns(grid, None) == [0, 1]
    assert factor_columns(grid, ["f1", 0]) == [1, 0]
    with pytest.raises(ValueError, match="'shape' is not a factor of data set 'grid'"):
        factor_columns(grid, ["shape"])
    with pytest.raises(ValueError, match="index 5 is out of range"):
        factor_columns(grid, [5])
