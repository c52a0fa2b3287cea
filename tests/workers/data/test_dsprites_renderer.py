"""The dSprites renderer (rows -> sprite index and box corner by division, one scatter) draws exactly the images
the factor-by-factor renderer drew before it: checked against a plain reference written here, pixel by pixel,
and against a fingerprint of the images the earlier renderer produced for a fixed sample of rows."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from workers.data.dsprites import (
    BOX,
    FACTOR_SIZES,
    FRAME,
    NUM_IMAGES,
    DSprites,
    box_corners,
    box_offsets,
    sprite_bank,
)

# SHA-256 of the uint8 images of SAMPLE_ROWS as the per-factor renderer of commit 0a11092 drew them (and their
# pixel count): any change to the sprites, the geometry or the row order changes these.
EARLIER_RENDERER_SHA256 = "f41596003f5cc61fed35914b0c51f9179ef1d85895d2784e8654ee27e4705e13"
EARLIER_RENDERER_PIXELS = 506_275
EVERY_97TH_ROW_SHA256 = "b926bd5cc047ef083bcf7aee936a9c45c02f432241bf97d6432295f5bd22f487"


def sample_rows() -> torch.Tensor:
    """The first and last 64 rows and 4,096 drawn with a fixed seed."""
    drawn = torch.randint(NUM_IMAGES, (4096,), generator=torch.Generator().manual_seed(11))
    return torch.cat([torch.arange(64), drawn, torch.arange(NUM_IMAGES - 64, NUM_IMAGES)])


def fingerprint(images: torch.Tensor) -> str:
    return hashlib.sha256(images.to(torch.uint8).numpy().tobytes()).hexdigest()


def reference_image(row: int) -> np.ndarray:
    """Row ``row`` drawn the obvious way: its factors, its sprite from the bank, pasted at its box's corner."""
    shape, scale, orientation, pos_x, pos_y = np.unravel_index(row, FACTOR_SIZES)
    sprite = sprite_bank()[(shape * FACTOR_SIZES[1] + scale) * FACTOR_SIZES[2] + orientation].reshape(BOX, BOX)
    offsets = box_offsets()
    top, left = int(offsets[pos_y]), int(offsets[pos_x])
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    frame[top : top + BOX, left : left + BOX] = sprite.numpy()
    return frame


def test_rendered_rows_match_a_pixel_by_pixel_reference():
    rows = torch.cat(
        [
            torch.arange(40),
            torch.randint(NUM_IMAGES, (300,), generator=torch.Generator().manual_seed(3)),
            torch.tensor([NUM_IMAGES - 1]),
        ]
    )
    images = DSprites().images(rows)
    expected = np.stack([reference_image(int(r)) for r in rows])[:, None]
    assert images.dtype == torch.float32 and images.shape == (len(rows), 1, FRAME, FRAME)
    np.testing.assert_array_equal(images.numpy(), expected)


def test_images_are_bit_identical_to_the_earlier_renderer():
    data = DSprites()
    images = data.images(sample_rows())
    assert int(images.sum()) == EARLIER_RENDERER_PIXELS
    assert fingerprint(images) == EARLIER_RENDERER_SHA256
    assert fingerprint(data.images(torch.arange(NUM_IMAGES)[::97])) == EVERY_97TH_ROW_SHA256


def test_rows_factors_and_views_render_the_same_images():
    data = DSprites()
    rows = sample_rows()
    by_row = data.images(rows)
    # By factors (what the disentanglement metrics call), through a view of shuffled rows, and one batch at a time.
    assert torch.equal(data.images_from_factors(data.factors(rows)), by_row)
    order = torch.randperm(NUM_IMAGES, generator=torch.Generator().manual_seed(5))
    view = data.subset(order)
    positions = torch.argsort(order)[rows]
    assert torch.equal(view.images(positions), by_row)
    assert torch.equal(torch.cat([data.images(rows[i : i + 64]) for i in range(0, len(rows), 64)]), by_row)


def test_box_corners_follow_the_position_factors():
    corners = box_corners()
    offsets = box_offsets()
    assert corners.shape == (FACTOR_SIZES[3] * FACTOR_SIZES[4],)
    for pos_x, pos_y in [(0, 0), (31, 0), (0, 31), (7, 19), (31, 31)]:
        assert int(corners[pos_x * FACTOR_SIZES[4] + pos_y]) == int(offsets[pos_y]) * FRAME + int(offsets[pos_x])
