import pytest
import torch

from tests.workers.metrics.standins import StandInModel
from tests.workers.metrics.test_elbo import binary_images
from workers.metrics.elbo import elbo
from workers.metrics.iwae import iwae_log_likelihood


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_iwae_bound_is_above_the_elbo_and_grows_with_k():
    data = binary_images(n=200)
    model = StandInModel(latent_dim=4)
    with torch.no_grad():  # a wide, uninformative posterior makes the bounds far apart
        model.encoder[-1].bias[4:] += 1.0
    lower = elbo(model, data, 200, 64, seeded())["elbo"]
    bounds = {k: iwae_log_likelihood(model, data, k, 200, 64, seeded())["iwae_ll"] for k in (1, 10, 100)}
    # k = 1 is the ELBO, up to the noise of a one-sample KL (the ELBO here has the closed form).
    assert bounds[1] == pytest.approx(lower, abs=1.0)
    assert bounds[10] > lower + 1.0
    assert bounds[100] > bounds[10] + 0.1
    assert bounds[100] < 0


def test_chunking_over_k_gives_the_same_estimate():
    data = binary_images(n=40)
    model = StandInModel()
    one_pass = iwae_log_likelihood(model, data, 300, 40, 40, seeded(1), max_decoded=100_000)["iwae_ll"]
    chunked = iwae_log_likelihood(model, data, 300, 40, 40, seeded(1), max_decoded=50)["iwae_ll"]
    assert chunked == pytest.approx(one_pass, abs=0.02)


def test_iwae_needs_a_vae_and_a_positive_k():
    data = binary_images(n=10)
    with pytest.raises(ValueError, match="variant 'ae' is a deterministic autoencoder"):
        iwae_log_likelihood(StandInModel(stochastic=False), data, 5, 10)
    with pytest.raises(ValueError, match="iwae_samples"):
        iwae_log_likelihood(StandInModel(), data, 0, 10)
