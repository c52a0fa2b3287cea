import pytest
import torch

from tests.workers.models.common import blobs, fit, make
from workers.losses import kl_standard_normal, reconstruction_nll


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_loss_is_the_negative_elbo_with_one_reparameterised_sample(likelihood):
    model = make("vae", likelihood=likelihood)
    x = blobs(16)
    torch.manual_seed(3)
    out = model.loss(x)
    assert set(out.parts) == {"recon", "kl"}
    torch.manual_seed(3)
    posterior = model.encode(x)
    z = posterior.sample()
    recon = reconstruction_nll(model.decode_logits(z), x, likelihood).mean()
    kl = kl_standard_normal(posterior.mean, posterior.logvar).mean()
    assert out.parts["recon"].item() == pytest.approx(recon.item(), rel=1e-6)
    assert out.parts["kl"].item() == pytest.approx(kl.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx((recon + kl).item(), rel=1e-6)


def test_gradients_flow_through_the_sample_to_the_encoder():
    model = make("vae")
    model.loss(blobs(8)).loss.backward()
    first = next(m for m in model.encoder if isinstance(m, torch.nn.Linear))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_samples_from_the_prior_are_images():
    model = make("vae")
    images = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    again = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again)


def test_training_raises_the_elbo():
    first, last = fit(make("vae"), blobs(64), steps=200)
    assert last < 0.7 * first
