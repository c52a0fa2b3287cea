"""eval/mig_chen against a port of Chen et al.'s disentanglement_metrics.py (tests/workers/metrics/chen2018_port.py)
on small full grids whose codes are synthetic: the factors are known, the posteriors made up."""

import math

import pytest
import torch
from torch import nn

from tests.workers.metrics import chen2018_port as port
from tests.workers.metrics.standins import OracleVAE, StandInModel, factor_grid, grid_factors, read_factors
from workers.data.base import DataError, ImageDataset
from workers.data.dsprites import FACTOR_NAMES as DSPRITES_NAMES
from workers.metrics.mig import CHEN2018_DSPRITES_FACTORS, chen2018_factor_columns, mig_chen, mig_chen_from_posteriors
from workers.models.base import Posterior

GRID = (3, 4, 5, 6)


def synthetic_posteriors(sizes, seed=0, dims=5):
    """(factors, mean, logvar): dimension 0 reads factor 1, dimension 1 factor 2 plus some of factor 3, dimension 2
    factor 3, the rest is the prior; log-variances differ by dimension and row."""
    g = torch.Generator().manual_seed(seed)
    factors = grid_factors(sizes)
    scaled = factors.float() / (torch.tensor(sizes).float() - 1).clamp(min=1) * 2 - 1  # each factor in [-1, 1]
    mean = torch.zeros(len(factors), dims)
    mean[:, 0] = 2 * scaled[:, 1]
    mean[:, 1] = 1.5 * scaled[:, 2] + 0.7 * scaled[:, 3]
    mean[:, 2] = 2 * scaled[:, 3]
    logvar = torch.full((len(factors), dims), 0.0)
    logvar[:, :3] = math.log(0.15**2) + 0.3 * torch.rand(len(factors), 3, generator=g)
    z = mean + torch.randn(mean.shape, generator=g) * torch.exp(0.5 * logvar)
    return factors, mean, logvar, z


def port_params(mean, logvar):
    return torch.stack([mean, 0.5 * logvar], dim=-1)  # their Normal is parametrised by (mu, log sigma)


def test_equals_the_port_when_every_sample_is_used():
    factors, mean, logvar, z = synthetic_posteriors(GRID)
    axes = (1, 2, 3)  # factor 0 left out, as dSprites' shape is
    ours = mig_chen_from_posteriors(mean, logvar, z, factors[:, list(axes)], [GRID[a] for a in axes], samples=10_000)
    theirs = port.mutual_info_metric(port_params(mean, logvar), z, GRID, axes, n_samples=10_000)
    assert ours == pytest.approx(theirs, abs=2e-5)
    assert 0.2 < ours < 0.9  # a mixed dimension: neither perfect nor nothing


def test_every_factor_scored_equals_the_port_too():
    factors, mean, logvar, z = synthetic_posteriors(GRID, seed=3)
    ours = mig_chen_from_posteriors(mean, logvar, z, factors, GRID, samples=10_000)
    theirs = port.mutual_info_metric(port_params(mean, logvar), z, GRID, (0, 1, 2, 3), n_samples=10_000)
    assert ours == pytest.approx(theirs, abs=2e-5)


def test_with_fewer_samples_than_rows_both_draw_subsets_and_agree_within_their_noise():
    factors, mean, logvar, z = synthetic_posteriors(GRID, seed=1)
    axes = (1, 2, 3)
    values, sizes = factors[:, list(axes)], [GRID[a] for a in axes]
    exact = mig_chen_from_posteriors(mean, logvar, z, values, sizes, samples=10_000)
    ours = [
        mig_chen_from_posteriors(
            mean, logvar, z, values, sizes, samples=150, generator=torch.Generator().manual_seed(s)
        )
        for s in range(5)
    ]
    theirs = [
        port.mutual_info_metric(
            port_params(mean, logvar), z, GRID, axes, n_samples=150, generator=torch.Generator().manual_seed(100 + s)
        )
        for s in range(5)
    ]
    assert len(set(ours)) > 1  # the subsets differ from draw to draw
    assert sum(ours) / 5 == pytest.approx(sum(theirs) / 5, abs=0.03)
    assert sum(ours) / 5 == pytest.approx(exact, abs=0.03)


class SyntheticVAE(nn.Module):
    """Reads the factors off a factor-grid image and returns the posteriors of :func:`synthetic_posteriors`."""

    stochastic = True

    def __init__(self, sizes, dims=5):
        super().__init__()
        self.sizes = sizes
        _, self.means, self.logvars, _ = synthetic_posteriors(sizes, dims=dims)
        self.strides = torch.tensor([math.prod(sizes[k + 1 :]) for k in range(len(sizes))])
        self.anchor = nn.Linear(1, 1)  # a parameter, so the metrics find the model's device

    def encode(self, x):
        row = (read_factors(x).long() * self.strides).sum(dim=1)
        return Posterior(mean=self.means[row], logvar=self.logvars[row])


def dsprites_named_grid(sizes=(3, 6, 4, 4, 4)) -> ImageDataset:
    grid = factor_grid(sizes)
    grid.factor_names = DSPRITES_NAMES
    return grid


def test_mig_chen_of_a_model_on_a_dsprites_grid_scores_chens_four_factors_like_the_port():
    sizes = (3, 6, 4, 4, 4)
    data = dsprites_named_grid(sizes)
    model = SyntheticVAE(sizes)
    assert chen2018_factor_columns(data) == [1, 2, 3, 4] and CHEN2018_DSPRITES_FACTORS[0] == "scale"
    ours = [mig_chen(model, data, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    # The port on the same posteriors with its own posterior samples: equal up to sampling noise.
    theirs = []
    for s in range(3):
        g = torch.Generator().manual_seed(50 + s)
        z = model.means + torch.randn(model.means.shape, generator=g) * torch.exp(0.5 * model.logvars)
        theirs.append(port.mutual_info_metric(port_params(model.means, model.logvars), z, sizes, (1, 2, 3, 4)))
    assert sum(ours) / 3 == pytest.approx(sum(theirs) / 3, abs=0.02)
    with_shape = mig_chen(model, data, factors=list(DSPRITES_NAMES), generator=torch.Generator().manual_seed(0))
    assert with_shape < min(ours) - 0.05  # shape (no dimension reads it) scores 0 and pulls the mean down


def test_a_random_subset_of_rows_estimates_the_full_grid_figure():
    sizes = (3, 6, 4, 4, 4)
    data, model = dsprites_named_grid(sizes), SyntheticVAE(sizes)
    full = mig_chen(model, data, generator=torch.Generator().manual_seed(0))
    subset = mig_chen(model, data, rows=1200, generator=torch.Generator().manual_seed(0))
    assert subset == pytest.approx(full, abs=0.05)


def test_an_aligned_posterior_scores_about_one_and_the_prior_about_zero():
    data = factor_grid(GRID)
    assert mig_chen(OracleVAE(4, aligned=True), data, generator=torch.Generator().manual_seed(0)) > 0.9
    assert mig_chen(OracleVAE(4, aligned=False), data, generator=torch.Generator().manual_seed(0)) < 0.02


def test_clear_errors():
    data = factor_grid(GRID)
    with pytest.raises(ValueError, match="deterministic autoencoder"):
        mig_chen(StandInModel(stochastic=False, image_shape=(1, 1, 4)), data)
    with pytest.raises(ValueError, match="'colour' is not a factor"):
        mig_chen(OracleVAE(4), data, factors=["colour"])
    plain = ImageDataset("plain", torch.zeros(10, 1, 1, 4, dtype=torch.uint8))
    with pytest.raises(DataError, match="needs ground-truth factors"):
        mig_chen(OracleVAE(4), plain)
    with pytest.raises(ValueError, match="samples must be at least 1"):
        mig_chen(OracleVAE(4), data, samples=0)
