import pytest
import torch

from tests.workers.models.common import blobs, fit, make
from workers.losses import reconstruction_distance


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_loss_is_the_distance_between_x_and_its_reconstruction(likelihood):
    model = make("ae", likelihood=likelihood)
    x = blobs(16)
    out = model.loss(x)
    assert set(out.parts) == {"recon"}
    expected = reconstruction_distance(model.decode_logits(model.encode(x).mean), x, likelihood).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_code_is_deterministic_and_there_is_no_prior():
    model = make("ae")
    x = blobs(4)
    assert torch.equal(model.encode(x).mean, model.encode(x).mean)
    assert model.encode(x).logvar is None
    with pytest.raises(ValueError, match="no prior"):
        model.sample(4)


def test_training_lowers_the_reconstruction_error():
    first, last = fit(make("ae"), blobs(64))
    assert last < 0.6 * first
