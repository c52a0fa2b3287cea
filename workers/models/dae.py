"""Denoising autoencoder (Vincent et al. 2008, 2010): encode a corrupted x~, reconstruct the clean x.

Corruptions (``model.corruption``):
- ``mask``: a fraction ``level`` of each image's pixels, chosen at random, set to 0 (Vincent et al.'s
  "masking noise": exactly that many pixels per image, all channels of a pixel together);
- ``gaussian``: additive N(0, level^2) noise, clipped back to [0, 1] so the input stays an image;
- ``salt_pepper``: a fraction ``level`` of the pixels set to 0 or 1 with equal probability.
The loss is d[x, g(f(x~))]: the reconstruction of the corrupted input against the clean input. At evaluation
and serving time the model encodes clean inputs (forward / representation), as a denoiser's features are used.
"""

from __future__ import annotations

import torch

from workers.config import DEFAULT_CORRUPTION_KIND, DEFAULT_CORRUPTION_LEVEL
from workers.models.ae import PlainAutoencoder
from workers.models.base import GatherFn, LossOutput, Noise
from workers.models.registry import register


def corruption_noise(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> Noise:
    """The random draws a corruption of ``kind`` uses on batch ``x``: a uniform draw per pixel (which pixels a
    mask or salt-and-pepper picks), a uniform draw per pixel for salt or pepper, or a normal draw per value."""
    b, _, h, w = x.shape
    if kind == "mask":
        return {"pick": torch.rand(b, h * w, device=x.device, generator=generator)}
    if kind == "gaussian":
        return {"gauss": torch.randn(x.shape, device=x.device, generator=generator)}
    if kind == "salt_pepper":
        return {
            "pick": torch.rand(b, h * w, device=x.device, generator=generator),
            "salt": torch.rand(b, 1, h, w, device=x.device, generator=generator),
        }
    raise ValueError(f"corruption kind must be 'mask', 'gaussian' or 'salt_pepper', not {kind!r}")


def _exact_fraction_mask(x: torch.Tensor, fraction: float, pick: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) boolean mask with exactly round(fraction * H * W) True pixels in each image: the pixels of the
    k smallest draws in ``pick`` (B, H * W)."""
    b, _, h, w = x.shape
    pixels = h * w
    k = int(round(fraction * pixels))
    if k == 0:
        return torch.zeros(b, 1, h, w, dtype=torch.bool, device=x.device)
    if k >= pixels:
        return torch.ones(b, 1, h, w, dtype=torch.bool, device=x.device)
    # kthvalue is one pass, no full sort.
    threshold = pick.kthvalue(k, dim=1, keepdim=True).values
    return (pick <= threshold).view(b, 1, h, w)


def apply_corruption(x: torch.Tensor, kind: str, level: float, noise: Noise) -> torch.Tensor:
    """The corrupted copy x~ of a batch of images in [0, 1], from the draws of :func:`corruption_noise`."""
    if kind == "mask":
        return x.masked_fill(_exact_fraction_mask(x, level, noise["pick"]), 0.0)
    if kind == "gaussian":
        return (x + level * noise["gauss"].to(x.dtype)).clamp_(0.0, 1.0)
    if kind == "salt_pepper":
        chosen = _exact_fraction_mask(x, level, noise["pick"])
        salt = noise["salt"] < 0.5
        x = x.masked_fill(chosen & salt, 1.0)
        return x.masked_fill(chosen & ~salt, 0.0)
    raise ValueError(f"corruption kind must be 'mask', 'gaussian' or 'salt_pepper', not {kind!r}")


def corrupt(x: torch.Tensor, kind: str, level: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The corrupted copy x~ of a batch of images in [0, 1]."""
    return apply_corruption(x, kind, level, corruption_noise(x, kind, generator))


@register("dae")
class DenoisingAutoencoder(PlainAutoencoder):
    stochastic = False

    def _corruption(self) -> tuple[str, float]:
        # The fields, not config.effective_corruption: that builds a default CorruptionConfig, and pydantic's
        # validation would break the compiled training step's graph in two at every step.
        c = self.config.corruption
        return (DEFAULT_CORRUPTION_KIND, DEFAULT_CORRUPTION_LEVEL) if c is None else (c.kind, c.level)

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return corrupt(x, *self._corruption(), generator)

    def draw_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Noise:
        return corruption_noise(x, self._corruption()[0], generator)

    def loss(self, x: torch.Tensor, noise: Noise | None = None, gather: GatherFn | None = None) -> LossOutput:
        noise = self.draw_noise(x) if noise is None else noise
        recon = self.reconstruction_loss(apply_corruption(x, *self._corruption(), noise), x).mean()
        return LossOutput(loss=recon, parts={"recon": recon})
