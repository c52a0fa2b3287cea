import pytest
import torch

from tests.workers.models.common import blobs, fit, make
from workers.losses import reconstruction_distance
from workers.models.dae import corrupt


def test_masking_zeroes_exactly_the_given_fraction_of_pixels():
    x = torch.ones(8, 3, 10, 10)
    out = corrupt(x, "mask", 0.5, torch.Generator().manual_seed(0))
    zero_pixels = (out == 0).all(dim=1)  # all channels of a pixel together
    assert zero_pixels.flatten(1).sum(1).tolist() == [50] * 8
    assert ((out == 0) | (out == 1)).all()
    assert torch.equal(corrupt(x, "mask", 0.0), x)
    assert (corrupt(x, "mask", 1.0) == 0).all()
    # different images lose different pixels
    assert not torch.equal(zero_pixels[0], zero_pixels[1])


def test_salt_and_pepper_sets_the_fraction_to_zero_or_one():
    x = torch.full((4, 1, 20, 20), 0.5)
    out = corrupt(x, "salt_pepper", 0.3, torch.Generator().manual_seed(0))
    changed = out != 0.5
    assert changed.flatten(1).sum(1).tolist() == [120] * 4
    salt, pepper = (out == 1).sum().item(), (out == 0).sum().item()
    assert salt + pepper == 480 and 180 < salt < 300


def test_gaussian_noise_has_the_level_as_its_deviation_and_stays_an_image():
    x = torch.full((16, 1, 32, 32), 0.5)
    out = corrupt(x, "gaussian", 0.1, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).std().item() == pytest.approx(0.1, rel=0.05)
    with pytest.raises(ValueError, match="corruption kind"):
        corrupt(x, "blur", 0.1)


def test_the_loss_compares_the_reconstruction_of_the_corrupted_input_with_the_clean_input():
    model = make("dae", corruption={"kind": "mask", "level": 0.5})
    x = blobs(16)
    torch.manual_seed(7)
    out = model.loss(x)
    torch.manual_seed(7)
    x_tilde = model.corrupt(x)
    expected = reconstruction_distance(model.decode_logits(model.encode(x_tilde).mean), x, "bernoulli").mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not torch.equal(x_tilde, x)
    # With nothing destroyed it is the plain autoencoder's loss.
    clean = make("dae", corruption={"kind": "mask", "level": 0.0})
    plain = make("ae")
    assert clean.loss(x).loss.item() == pytest.approx(plain.loss(x).loss.item(), rel=1e-6)


def test_the_default_corruption_is_half_the_pixels_masked():
    model = make("dae")
    assert (model.config.effective_corruption.kind, model.config.effective_corruption.level) == ("mask", 0.5)


def test_a_denoiser_learns_to_fill_in_destroyed_pixels():
    model = make("dae", corruption={"kind": "mask", "level": 0.25})
    first, last = fit(model, blobs(64), steps=200)
    assert last < 0.7 * first
