import math

import pytest
import torch

from tests.workers.metrics.standins import StandInModel
from workers.data.base import ImageDataset
from workers.losses import kl_standard_normal, reconstruction_distance
from workers.metrics.elbo import elbo


def binary_images(n=120, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageDataset("bits", (torch.rand((n, *shape), generator=g) > 0.5).to(torch.uint8) * 255)


def test_vae_elbo_is_minus_recon_plus_kl_and_kl_is_closed_form():
    data = binary_images()
    model = StandInModel()
    out = elbo(model, data, max_examples=1000, batch_size=32, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"elbo", "recon", "kl"}
    assert out["elbo"] == pytest.approx(-(out["recon"] + out["kl"]))
    posterior = model.encode(data.images(torch.arange(len(data))))
    assert out["kl"] == pytest.approx(kl_standard_normal(posterior.mean, posterior.logvar).mean().item(), rel=1e-5)
    # 16 Bernoulli pixels from a barely trained decoder: about 16 log 2 nats.
    assert 0.5 * 16 * math.log(2) < out["recon"] < 2 * 16 * math.log(2)


def test_vae_elbo_is_reproducible_with_a_seed_and_uses_at_most_max_examples():
    data = binary_images()
    model = StandInModel()
    a = elbo(model, data, 50, 16, torch.Generator().manual_seed(3))
    b = elbo(model, data, 50, 16, torch.Generator().manual_seed(3))
    assert a == b
    model.decode_logits = lambda z: torch.zeros(len(z), 1, 4, 4)  # p = 1/2 per pixel: recon = 16 log 2
    assert elbo(model, data, 7, 4, torch.Generator().manual_seed(3))["recon"] == pytest.approx(16 * math.log(2))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_autoencoder_reports_only_its_reconstruction_distance(likelihood):
    data = binary_images()
    model = StandInModel(stochastic=False, likelihood=likelihood)
    out = elbo(model, data, max_examples=10_000, batch_size=32)
    assert set(out) == {"recon"}
    x = data.images(torch.arange(len(data)))
    expected = reconstruction_distance(model.decode_logits(model.encode(x).mean), x, likelihood).mean().item()
    assert out["recon"] == pytest.approx(expected, rel=1e-5)


def test_empty_data_set_and_bad_max_examples_are_clear_errors():
    model = StandInModel()
    with pytest.raises(ValueError, match="max_examples"):
        elbo(model, binary_images(), max_examples=0)
    with pytest.raises(ValueError, match="'bits' is empty"):
        elbo(model, binary_images(n=0), max_examples=10)
