import pytest
import torch

from tests.workers.models.common import blobs, make


def test_beta_weighs_the_kl_term():
    x = blobs(16)
    for beta in (1.0, 6.0):
        model = make("beta_vae", beta=beta)
        torch.manual_seed(0)
        out = model.loss(x)
        expected = out.parts["recon"] + beta * out.parts["kl"]
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_beta_defaults_to_four_and_a_plain_vae_is_beta_one():
    assert make("beta_vae").beta == 4.0
    assert make("vae").beta == 1.0


def test_a_large_beta_presses_the_posterior_to_the_prior():
    """After the same training, the KL to N(0, I) is smaller with beta = 16 than with beta = 1."""
    x = blobs(64)
    kls = {}
    for beta in (1.0, 16.0):
        model = make("beta_vae", beta=beta)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(150):
            out = model.loss(x)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        kls[beta] = out.parts["kl"].item()
    assert kls[16.0] < 0.5 * kls[1.0]
