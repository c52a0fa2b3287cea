import pytest
import torch

from tests.workers.metrics.standins import StandInModel
from workers.data.base import DataError, ImageDataset
from workers.metrics.probe import fine_tune, linear_probe

CLASSES = 3


def labelled(n, seed):
    """Three classes, each a bright patch in its own part of a 4x4 image, plus noise: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=g)
    images = 0.3 * torch.rand((n, 1, 4, 4), generator=g)
    rows = torch.arange(n)
    images[rows, 0, labels, :] += 0.7
    return ImageDataset(f"patches-{seed}", (images * 255).to(torch.uint8), labels=labels, num_classes=CLASSES)


def test_linear_probe_on_frozen_codes_is_well_above_chance():
    model = StandInModel(latent_dim=6)
    out = linear_probe(model, labelled(300, 0), labelled(200, 1))
    assert set(out) == {"probe/linear_accuracy"}
    assert out["probe/linear_accuracy"] > 0.8


def test_fine_tuning_a_copy_of_the_encoder_is_accurate_and_leaves_the_model_unchanged():
    model = StandInModel(latent_dim=2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = fine_tune(model, labelled(300, 0), labelled(200, 1), epochs=15, lr=3e-2, batch_size=32)
    assert out["probe/finetune_accuracy"] > 0.9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_probes_need_labels_and_sane_settings():
    unlabelled = ImageDataset("pixels", torch.zeros(10, 1, 4, 4, dtype=torch.uint8))
    model = StandInModel()
    with pytest.raises(DataError, match="needs class labels, and the training data set 'pixels' has none"):
        linear_probe(model, unlabelled, labelled(10, 1))
    with pytest.raises(DataError, match="test data set 'pixels' has none"):
        fine_tune(model, labelled(10, 0), unlabelled, epochs=1, lr=1e-3)
    with pytest.raises(ValueError, match="epochs"):
        fine_tune(model, labelled(10, 0), labelled(10, 1), epochs=0, lr=1e-3)
    one_class = ImageDataset(
        "same", torch.zeros(10, 1, 4, 4, dtype=torch.uint8), labels=torch.zeros(10, dtype=torch.long)
    )
    with pytest.raises(DataError, match="at least 2 classes"):
        linear_probe(model, one_class, labelled(10, 1))
