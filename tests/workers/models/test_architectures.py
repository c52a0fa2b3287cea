import pytest
import torch

from workers.config import ModelConfig
from workers.models import VARIANTS, build_model
from workers.models.architectures import check_fits


@pytest.mark.parametrize(
    "architecture, shape",
    [
        ("mlp", (1, 8, 8)),
        ("mlp", (3, 20, 12)),
        ("conv28", (1, 28, 28)),
        ("conv28", (3, 32, 32)),
        ("conv64", (1, 64, 64)),
    ],
)
@pytest.mark.parametrize("variant", ["ae", "vae"])
def test_every_architecture_encodes_and_decodes_its_image_size(architecture, shape, variant):
    model = build_model(ModelConfig(variant=variant, architecture=architecture, latent_dim=5), shape, 100)
    x = torch.rand(3, *shape)
    posterior = model.encode(x)
    assert posterior.mean.shape == (3, 5)
    assert (posterior.logvar is None) == (variant == "ae")
    assert model.decode_logits(posterior.mean).shape == (3, *shape)
    out = model(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_conv64_is_the_burgess_disentanglement_lib_network():
    model = build_model(ModelConfig(variant="vae", architecture="conv64", latent_dim=10), (1, 64, 64), 100)
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    linears = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(1024, 256), (256, 20)]
    deconvs = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [d.out_channels for d in deconvs] == [64, 32, 32, 1]


@pytest.mark.parametrize(
    "architecture, shape, message",
    [
        ("conv64", (1, 28, 28), "takes 64x64 images, and the data's are 1x28x28"),
        ("conv28", (1, 64, 64), "takes 28x28 or 32x32 images, and the data's are 1x64x64"),
        ("conv28", (1, 28, 32), "28x28 or 32x32"),
        ("bogus", (1, 8, 8), "unknown architecture 'bogus'"),
    ],
)
def test_an_architecture_that_does_not_fit_is_a_plain_error(architecture, shape, message):
    with pytest.raises(ValueError, match=message):
        check_fits(architecture, shape)


def test_build_model_checks_the_image_size_first():
    with pytest.raises(ValueError, match="conv64"):
        build_model(ModelConfig(variant="vae", architecture="conv64"), (1, 28, 28), 100)


def test_every_variant_of_the_spec_is_registered():
    assert set(VARIANTS) == {"ae", "dae", "vae", "beta_vae", "beta_tcvae"}
    assert all(VARIANTS[name].variant == name for name in VARIANTS)
