import pytest
import torch

from tests.workers.models.common import blobs, make
from workers.losses import log_normal_density, tc_terms


def test_loss_is_recon_plus_mi_plus_beta_tc_plus_dimension_wise_kl():
    model = make("beta_tcvae", beta=6.0)
    out = model.loss(blobs(32))
    p = out.parts
    assert set(p) == {"recon", "kl", "mi", "tc", "dwkl"}
    expected = p["recon"] + p["mi"] + 6.0 * p["tc"] + p["dwkl"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("estimator", ["mss", "mws"])
def test_the_three_terms_add_up_to_the_sampled_kl(estimator):
    """mi + tc + dwkl = E[log q(z|x) - log p(z)], whose expectation is the closed-form KL."""
    model = make("beta_tcvae", tc_estimator=estimator, dataset_size=10_000)
    x = blobs(64)
    torch.manual_seed(0)
    out = model.loss(x)
    torch.manual_seed(0)
    posterior = model.encode(x)
    z = posterior.mean + torch.randn_like(posterior.mean) * torch.exp(0.5 * posterior.logvar)
    sampled_kl = (
        log_normal_density(z, posterior.mean, posterior.logvar).sum(-1)
        - log_normal_density(z, torch.zeros(()), torch.zeros(())).sum(-1)
    ).mean()
    total = out.parts["mi"] + out.parts["tc"] + out.parts["dwkl"]
    assert total.item() == pytest.approx(sampled_kl.item(), abs=1e-4)


def test_the_estimator_uses_the_true_data_set_size():
    x = blobs(16)
    parts = {}
    for n in (16, 100_000):
        model = make("beta_tcvae", dataset_size=n, tc_estimator="mss")
        torch.manual_seed(0)
        parts[n] = model.loss(x).parts["mi"].item()
    assert parts[16] != pytest.approx(parts[100_000], abs=1e-3)
    assert make("beta_tcvae", dataset_size=737_280).dataset_size == 737_280


def test_with_a_gather_the_estimator_sees_the_global_batch():
    """In one process the rank is 0: the local rows come first in the gathered batch, and the terms equal those
    computed over the whole (local + other ranks') batch for those rows."""
    model = make("beta_tcvae", dataset_size=1000)
    x = blobs(16)
    other_mean, other_logvar = torch.randn(48, 3), torch.randn(48, 3) * 0.1
    calls = []

    def gather(t):
        calls.append(t.shape)
        return torch.cat([t, other_mean if len(calls) == 1 else other_logvar])

    torch.manual_seed(0)
    out = model.loss(x, gather=gather)
    assert calls == [(16, 3), (16, 3)]
    torch.manual_seed(0)
    posterior = model.encode(x)
    z = posterior.mean + torch.randn_like(posterior.mean) * torch.exp(0.5 * posterior.logvar)
    terms = tc_terms(
        z,
        torch.cat([posterior.mean, other_mean]),
        torch.cat([posterior.logvar, other_logvar]),
        1000,
        "mss",
        self_index=torch.arange(16),
    )
    assert out.parts["tc"].item() == pytest.approx(terms["tc"].mean().item(), rel=1e-5)
    # and it differs from the local-batch estimate
    torch.manual_seed(0)
    assert model.loss(x).parts["tc"].item() != pytest.approx(out.parts["tc"].item(), rel=1e-3)


def test_a_batch_of_one_is_refused_by_the_estimator():
    with pytest.raises(ValueError, match="at least 2"):
        make("beta_tcvae").loss(blobs(1))
