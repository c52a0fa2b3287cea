"""The loss terms against references: Monte Carlo for the KL, Gaussians of known total correlation for the
beta-TCVAE estimators."""

import math

import pytest
import torch

from workers.losses import (
    kl_standard_normal,
    log_normal_density,
    reconstruction_distance,
    reconstruction_nll,
    tc_terms,
)


def test_closed_form_kl_matches_a_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 3, generator=g)
    logvar = torch.randn(4, 3, generator=g) * 0.5
    samples = 200_000
    z = mean + torch.exp(0.5 * logvar) * torch.randn(samples, 4, 3, generator=g)
    log_q = log_normal_density(z, mean, logvar).sum(-1)
    log_p = log_normal_density(z, torch.zeros(()), torch.zeros(())).sum(-1)
    monte_carlo = (log_q - log_p).mean(0)
    closed = kl_standard_normal(mean, logvar)
    assert closed.shape == (4,)
    assert torch.allclose(monte_carlo, closed, atol=0.02, rtol=0.01)
    assert kl_standard_normal(torch.zeros(2, 5), torch.zeros(2, 5)).abs().max() < 1e-7


def test_reconstruction_terms_per_example():
    x = torch.tensor([[[[0.0, 1.0]]], [[[1.0, 1.0]]]])  # (2, 1, 1, 2)
    logits = torch.zeros_like(x)
    bce = reconstruction_nll(logits, x, "bernoulli")
    assert torch.allclose(bce, torch.full((2,), 2 * math.log(2)))
    assert torch.allclose(reconstruction_distance(logits, x, "bernoulli"), bce)
    # Gaussian decoder with variance 1/2: squared error plus the normalising constant per pixel.
    sq = reconstruction_distance(logits, x, "gaussian")
    assert torch.allclose(sq, torch.tensor([0.5, 0.5]))
    constant = 2 * 0.5 * (math.log(2 * math.pi) + math.log(0.5))
    assert torch.allclose(reconstruction_nll(logits, x, "gaussian"), sq + constant)
    with pytest.raises(ValueError, match="likelihood"):
        reconstruction_nll(logits, x, "poisson")


def _posteriors(correlation: torch.Tensor, m: int, std: float, seed: int):
    """Posteriors N(mu_n, std^2 I) whose mixture (the aggregate posterior q(z)) is exactly N(0, S) with
    S = (1 - std^2) C + std^2 I, whose total correlation is -1/2 log det S (S has a unit diagonal)."""
    g = torch.Generator().manual_seed(seed)
    d = correlation.shape[0]
    mu = torch.randn(m, d, generator=g) @ torch.linalg.cholesky(correlation).T * math.sqrt(1 - std**2)
    logvar = torch.full((m, d), 2 * math.log(std))
    z = mu + std * torch.randn(m, d, generator=g)
    s = (1 - std**2) * correlation + std**2 * torch.eye(d)
    return z, mu, logvar, float(-0.5 * torch.logdet(s))


CORRELATED = torch.tensor([[1.0, 0.8, 0.3], [0.8, 1.0, 0.2], [0.3, 0.2, 1.0]])


@pytest.mark.parametrize("estimator", ["mss", "mws"])
def test_tc_is_about_zero_for_independent_latents(estimator):
    z, mu, logvar, truth = _posteriors(torch.eye(3), 3000, 0.3, seed=1)
    assert truth == pytest.approx(0.0, abs=1e-6)
    tc = tc_terms(z, mu, logvar, dataset_size=3000, estimator=estimator)["tc"].mean().item()
    # The minibatch estimators are biased upwards at finite M (about +0.03 here); the truth is 0 and the
    # correlated case below is 0.42, so 0.06 still tells them apart.
    assert abs(tc) < 0.06


@pytest.mark.parametrize("estimator", ["mss", "mws"])
def test_tc_of_a_correlated_gaussian_is_minus_half_log_det_of_its_correlation(estimator):
    z, mu, logvar, truth = _posteriors(CORRELATED, 3000, 0.3, seed=2)
    assert truth == pytest.approx(0.4165, abs=1e-3)
    tc = tc_terms(z, mu, logvar, dataset_size=3000, estimator=estimator)["tc"].mean().item()
    assert tc == pytest.approx(truth, abs=0.06)


def test_mws_and_mss_agree_on_large_batches():
    z, mu, logvar, _ = _posteriors(CORRELATED, 3000, 0.3, seed=3)
    mss = tc_terms(z, mu, logvar, 3000, "mss")
    mws = tc_terms(z, mu, logvar, 3000, "mws")
    for part in ("mi", "tc", "dwkl"):
        assert mss[part].mean().item() == pytest.approx(mws[part].mean().item(), abs=0.02)


def test_the_three_terms_sum_to_the_per_example_kl_estimate():
    z, mu, logvar, _ = _posteriors(CORRELATED, 64, 0.5, seed=4)
    terms = tc_terms(z, mu, logvar, 10_000, "mss")
    log_q_given_x = log_normal_density(z, mu, logvar).sum(-1)
    log_p = log_normal_density(z, torch.zeros(()), torch.zeros(())).sum(-1)
    assert torch.allclose(terms["mi"] + terms["tc"] + terms["dwkl"], log_q_given_x - log_p, atol=1e-4)


def test_a_gathered_batch_gives_each_rank_the_global_estimate():
    """Rank 1's rows estimated against the gathered global batch equal the same rows of the one-process estimate."""
    z, mu, logvar, _ = _posteriors(CORRELATED, 32, 0.5, seed=5)
    whole = tc_terms(z, mu, logvar, 1000, "mss")
    rank1 = tc_terms(z[16:], mu, logvar, 1000, "mss", self_index=torch.arange(16, 32))
    for part in ("mi", "tc", "dwkl"):
        assert torch.allclose(rank1[part], whole[part][16:], atol=1e-5)


def test_estimator_errors_are_plain():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="at least 2"):
        tc_terms(z, z, z, 10)
    with pytest.raises(ValueError, match="mss' or 'mws"):
        tc_terms(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2), 10, "bogus")
