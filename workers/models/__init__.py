"""The autoencoder family behind one registry: ``build_model(config, image_shape, dataset_size)``.

Adding a variant is one new file here (a subclass of :class:`workers.models.base.Autoencoder` decorated with
``@register("name")``) and one import line below.
"""

from __future__ import annotations

from workers.config import ModelConfig
from workers.models.architectures import check_fits
from workers.models.base import Autoencoder, LossOutput, Posterior
from workers.models.registry import VARIANTS, register

# Importing a variant's module registers it.
from workers.models import ae, dae, vae, beta_vae, beta_tcvae  # noqa: F401  isort: skip

__all__ = ["Autoencoder", "LossOutput", "Posterior", "VARIANTS", "build_model", "register"]


def build_model(config: ModelConfig, image_shape: tuple[int, int, int], dataset_size: int) -> Autoencoder:
    """A freshly initialised model of ``config.variant`` for images of ``image_shape`` (C, H, W).

    ``dataset_size`` is the training set's N: the beta-TCVAE minibatch estimators need it, the others keep it
    for the record. Raises ValueError when the architecture does not fit the images or the variant is unknown.
    """
    try:
        cls = VARIANTS[config.variant]
    except KeyError:
        raise ValueError(f"unknown variant '{config.variant}'; known: {', '.join(sorted(VARIANTS))}") from None
    check_fits(config.architecture, tuple(image_shape))
    if dataset_size < 1:
        raise ValueError(f"dataset_size must be at least 1, not {dataset_size}")
    return cls(config, image_shape, dataset_size)  # Autoencoder makes it a tuple of ints
