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
from workers.models.base import GatherFn, LossOutput
from workers.models.registry import register


def _exact_fraction_mask(x: torch.Tensor, fraction: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, 1, H, W) boolean mask with exactly round(fraction * H * W) True pixels in each image."""
    b, _, h, w = x.shape
    pixels = h * w
    k = int(round(fraction * pixels))
    if k == 0:
        return torch.zeros(b, 1, h, w, dtype=torch.bool, device=x.device)
    if k >= pixels:
        return torch.ones(b, 1, h, w, dtype=torch.bool, device=x.device)
    noise = torch.rand(b, pixels, device=x.device, generator=generator)
    # The k smallest draws of each row are the chosen pixels; kthvalue is one pass, no full sort.
    threshold = noise.kthvalue(k, dim=1, keepdim=True).values
    return (noise <= threshold).view(b, 1, h, w)


def corrupt(x: torch.Tensor, kind: str, level: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The corrupted copy x~ of a batch of images in [0, 1]."""
    if kind == "mask":
        return x.masked_fill(_exact_fraction_mask(x, level, generator), 0.0)
    if kind == "gaussian":
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return (x + level * noise).clamp_(0.0, 1.0)
    if kind == "salt_pepper":
        chosen = _exact_fraction_mask(x, level, generator)
        salt = torch.rand(chosen.shape, device=x.device, generator=generator) < 0.5
        x = x.masked_fill(chosen & salt, 1.0)
        return x.masked_fill(chosen & ~salt, 0.0)
    raise ValueError(f"corruption kind must be 'mask', 'gaussian' or 'salt_pepper', not {kind!r}")


@register("dae")
class DenoisingAutoencoder(PlainAutoencoder):
    stochastic = False

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # The fields, not config.effective_corruption: that builds a default CorruptionConfig, and pydantic's
        # validation would break the compiled training step's graph in two at every step.
        c = self.config.corruption
        if c is None:
            return corrupt(x, DEFAULT_CORRUPTION_KIND, DEFAULT_CORRUPTION_LEVEL, generator)
        return corrupt(x, c.kind, c.level, generator)

    def loss(self, x: torch.Tensor, gather: GatherFn | None = None) -> LossOutput:
        recon = self.reconstruction_loss(self.corrupt(x), x).mean()
        return LossOutput(loss=recon, parts={"recon": recon})
