"""The encoder as a pre-trained feature extractor for a classifier (needs labelled data).

- :func:`linear_probe`: the frozen representation (posterior mean) -> a logistic regression;
- :func:`fine_tune`: a copy of the model's encoder plus a linear head, trained end to end with cross-entropy.
  The model passed in is left unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model's class, for the annotations only (models import metrics' helpers)
    from workers.models.base import Autoencoder

import copy
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from workers.data.base import DataError, ImageDataset
from workers.metrics.sampling import example_rows, model_device


def _require_labels(dataset: ImageDataset, role: str) -> None:
    if dataset.labels is None:
        raise DataError(f"the probe needs class labels, and the {role} data set '{dataset.name}' has none")
    if len(dataset) == 0:
        raise DataError(f"the {role} data set '{dataset.name}' is empty")


def _stored_labels(dataset: ImageDataset) -> torch.Tensor:
    if dataset.labels is None:
        raise DataError(f"the probe needs class labels, and data set '{dataset.name}' has none")
    return dataset.labels


def _labels(dataset: ImageDataset, rows: torch.Tensor) -> torch.Tensor:
    labels = _stored_labels(dataset)
    return labels[rows.to(labels.device)].long()


def _num_classes(train: ImageDataset, test: ImageDataset) -> int:
    found = [d.num_classes for d in (train, test) if d.num_classes is not None]
    found += [int(_stored_labels(d).max()) + 1 for d in (train, test)]
    return max(found)


@torch.no_grad()
def _features(model: Autoencoder, dataset: ImageDataset, rows: torch.Tensor, batch_size: int) -> np.ndarray:
    device = model_device(model)
    parts = [model.representation(dataset.images(chunk).to(device)).float() for chunk in rows.split(batch_size)]
    return torch.cat(parts).cpu().numpy().astype(np.float64)


def linear_probe(
    model: Autoencoder,
    train: ImageDataset,
    test: ImageDataset,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """Test accuracy of a logistic regression on standardised frozen codes of (up to ``max_train``) training rows."""
    _require_labels(train, "training")
    _require_labels(test, "test")
    generator = torch.Generator().manual_seed(seed)
    train_rows = example_rows(train, max_train or len(train), generator)
    test_rows = example_rows(test, max_test or len(test), generator)
    train_y = _labels(train, train_rows).cpu().numpy()
    if np.unique(train_y).size < 2:
        raise DataError(f"the probe needs at least 2 classes in the training data set '{train.name}'")
    was_training = model.training
    model.eval()
    try:
        train_x = _features(model, train, train_rows, batch_size)
        test_x = _features(model, test, test_rows, batch_size)
    finally:
        model.train(was_training)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(train_x, train_y)
    accuracy = np.mean(classifier.predict(test_x) == _labels(test, test_rows).cpu().numpy())
    return {"probe/linear_accuracy": float(accuracy)}


def fine_tune(
    model: Autoencoder,
    train: ImageDataset,
    test: ImageDataset,
    epochs: int,
    lr: float,
    *,
    batch_size: int = 64,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Test accuracy of copy(encoder) -> posterior mean -> linear head, trained with Adam for ``epochs`` passes
    over (up to ``max_train``) training rows. The decoder of the copy gets no gradient and is unused."""
    _require_labels(train, "training")
    _require_labels(test, "test")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, not {epochs}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, not {lr}")
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    train_rows = example_rows(train, max_train or len(train), generator)
    test_rows = example_rows(test, max_test or len(test), generator)
    encoder = copy.deepcopy(model).to(device)
    with torch.random.fork_rng(devices=[]):  # a seeded head without disturbing the caller's random state
        torch.manual_seed(seed)
        head = torch.nn.Linear(model.latent_dim, _num_classes(train, test)).to(device)
    params = [p for p in encoder.parameters()] + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)

    encoder.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = train_rows[torch.randperm(len(train_rows), generator=generator)]
            for chunk in order.split(batch_size):
                x = train.images(chunk).to(device)
                logits = head(encoder.encode(x).mean.float())
                loss = F.cross_entropy(logits, _labels(train, chunk).to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    encoder.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    with torch.no_grad():
        for chunk in test_rows.split(max(batch_size, 256)):
            logits = head(encoder.encode(test.images(chunk).to(device)).mean.float())
            correct += (logits.argmax(dim=1) == _labels(test, chunk).to(device)).sum()
    return {"probe/finetune_accuracy": correct.item() / len(test_rows)}
