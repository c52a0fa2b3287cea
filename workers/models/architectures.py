"""Encoder and decoder networks: ``mlp`` (any image size), ``chen2018_mlp`` (any size), ``conv28`` (28 or 32 px),
``conv64`` (64 px).

``conv64`` is the encoder/decoder of Burgess et al. 2018 as disentanglement_lib builds it: four 4x4 stride-2
convolutions with 32, 32, 64, 64 channels, a 256-unit fully connected layer, and the mirror image for the
decoder. ``conv28`` is the same idea with two convolutions (32, 64), for MNIST-sized images. Decoders output
logits; the variant decides the likelihood. ``chen2018_mlp`` is Chen et al. 2018's dSprites network
(``vae_quant.py``'s MLPEncoder/MLPDecoder): encoder pixels-1200-1200-out with ReLU, decoder z-1200-1200-1200-pixels
with tanh; ``hidden_dims`` does not apply to it.
"""

from __future__ import annotations

import math

from torch import nn

from workers.config import ModelConfig

CONV64_CHANNELS = (32, 32, 64, 64)
CONV28_CHANNELS = (32, 64)
FC_UNITS = 256
CONV28_SIZES = (28, 32)
CHEN2018_UNITS = 1200
ARCHITECTURES = ("mlp", "chen2018_mlp", "conv28", "conv64")


def check_fits(architecture: str, image_shape: tuple[int, ...]) -> None:
    """Raise ValueError, saying which sizes fit, when ``architecture`` cannot take images of ``image_shape``."""
    if len(image_shape) != 3:
        raise ValueError(f"images must be (channels, height, width), not {tuple(image_shape)}")
    c, h, w = image_shape
    size = f"{c}x{h}x{w}"
    if architecture in ("mlp", "chen2018_mlp"):
        return
    if architecture == "conv64":
        if (h, w) != (64, 64):
            raise ValueError(
                f"architecture 'conv64' takes 64x64 images, and the data's are {size}; "
                f"use 'mlp' (any size) or 'conv28' (28 or 32 px), or resize the images"
            )
        return
    if architecture == "conv28":
        if h != w or h not in CONV28_SIZES:
            raise ValueError(
                f"architecture 'conv28' takes 28x28 or 32x32 images, and the data's are {size}; "
                f"use 'mlp' (any size) or 'conv64' (64 px), or resize the images"
            )
        return
    raise ValueError(f"unknown architecture '{architecture}'; known: {', '.join(ARCHITECTURES)}")


def _mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return layers


def _conv_encoder(channels_in: int, channels: tuple[int, ...], side: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = channels_in
    for ch in channels:
        # kernel 4, stride 2, padding 1 halves the side exactly, as TensorFlow's "same" padding does here.
        layers += [nn.Conv2d(c, ch, 4, 2, 1), nn.ReLU()]
        c = ch
    final_side = side // 2 ** len(channels)
    layers += [nn.Flatten(), nn.Linear(c * final_side * final_side, FC_UNITS), nn.ReLU(), nn.Linear(FC_UNITS, out_dim)]
    return nn.Sequential(*layers)


def _conv_decoder(latent_dim: int, channels: tuple[int, ...], side: int, channels_out: int) -> nn.Sequential:
    final_side = side // 2 ** len(channels)
    top = channels[-1]
    layers: list[nn.Module] = [
        nn.Linear(latent_dim, FC_UNITS),
        nn.ReLU(),
        nn.Linear(FC_UNITS, top * final_side * final_side),
        nn.ReLU(),
        nn.Unflatten(1, (top, final_side, final_side)),
    ]
    reversed_channels = list(reversed(channels))  # e.g. 64, 64, 32, 32
    outs = reversed_channels[1:] + [channels_out]
    for i, (a, b) in enumerate(zip(reversed_channels, outs)):
        layers.append(nn.ConvTranspose2d(a, b, 4, 2, 1))
        if i < len(outs) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def build_encoder(config: ModelConfig, image_shape: tuple[int, int, int], out_dim: int) -> nn.Module:
    """x (B, C, H, W) -> (B, out_dim): the code, or the posterior's mean and log-variance side by side."""
    check_fits(config.architecture, image_shape)
    c, h, _ = image_shape
    if config.architecture == "mlp":
        return nn.Sequential(nn.Flatten(), *_mlp([math.prod(image_shape), *config.hidden_dims, out_dim]))
    if config.architecture == "chen2018_mlp":
        units = [CHEN2018_UNITS] * 2
        return nn.Sequential(nn.Flatten(), *_mlp([math.prod(image_shape), *units, out_dim]))
    channels = CONV64_CHANNELS if config.architecture == "conv64" else CONV28_CHANNELS
    return _conv_encoder(c, channels, h, out_dim)


def build_decoder(config: ModelConfig, image_shape: tuple[int, int, int], latent_dim: int) -> nn.Module:
    """z (B, latent_dim) -> logits (B, C, H, W)."""
    check_fits(config.architecture, image_shape)
    c, h, _ = image_shape
    if config.architecture == "mlp":
        sizes = [latent_dim, *reversed(config.hidden_dims), math.prod(image_shape)]
        return nn.Sequential(*_mlp(sizes), nn.Unflatten(1, tuple(image_shape)))
    if config.architecture == "chen2018_mlp":
        sizes = [latent_dim, *[CHEN2018_UNITS] * 3, math.prod(image_shape)]
        return nn.Sequential(*_mlp(sizes, nn.Tanh), nn.Unflatten(1, tuple(image_shape)))
    channels = CONV64_CHANNELS if config.architecture == "conv64" else CONV28_CHANNELS
    return _conv_decoder(latent_dim, channels, h, c)
