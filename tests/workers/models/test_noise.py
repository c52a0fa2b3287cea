"""A training step's randomness is an input of the loss (Autoencoder.draw_noise): the loss draws nothing of its
own, so a step is a function of (weights, batch, noise) wherever it runs (one process, DDP, compiled, or one model
of several trained together)."""

import pytest
import torch

from tests.workers.models.common import blobs, make

CASES = [
    ("ae", {}),
    ("dae", {"corruption": {"kind": "mask", "level": 0.3}}),
    ("dae", {"corruption": {"kind": "gaussian", "level": 0.2}}),
    ("dae", {"corruption": {"kind": "salt_pepper", "level": 0.2}}),
    ("vae", {}),
    ("beta_vae", {"beta": 4.0}),
    ("beta_tcvae", {"beta": 6.0}),
]
IDS = [f"{v}-{f.get('corruption', {}).get('kind', 'plain')}" for v, f in CASES]


@pytest.mark.parametrize(("variant", "fields"), CASES, ids=IDS)
def test_the_loss_given_its_noise_draws_nothing_and_is_a_function_of_it(variant, fields):
    model = make(variant, **fields)
    x = blobs(16)
    noise = model.draw_noise(x, torch.Generator().manual_seed(3))
    before = torch.get_rng_state()
    first = model.loss(x, noise)
    assert torch.equal(torch.get_rng_state(), before)  # not one draw from the global generator
    second = model.loss(x, noise)
    assert first.loss.item() == second.loss.item()
    assert {k: v.item() for k, v in first.parts.items()} == {k: v.item() for k, v in second.parts.items()}


@pytest.mark.parametrize(("variant", "fields"), CASES, ids=IDS)
def test_without_noise_the_loss_draws_the_same_noise_from_the_global_generator(variant, fields):
    model = make(variant, **fields)
    x = blobs(16)
    torch.manual_seed(11)
    implicit = model.loss(x).loss.item()
    torch.manual_seed(11)
    explicit = model.loss(x, model.draw_noise(x)).loss.item()
    assert implicit == explicit


@pytest.mark.parametrize(
    ("variant", "fields"), [c for c in CASES if c[0] != "ae"], ids=[i for i, c in zip(IDS, CASES) if c[0] != "ae"]
)
def test_noise_follows_its_generator_s_seed(variant, fields):
    model = make(variant, **fields)
    x = blobs(16)

    def drawn(seed):
        return model.draw_noise(x, torch.Generator().manual_seed(seed))

    a, b, c = drawn(1), drawn(1), drawn(2)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert model.loss(x, a).loss.item() != model.loss(x, c).loss.item()
