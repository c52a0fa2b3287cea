"""dSprites (Matthey et al. 2017), rendered procedurally from its factor grid.

737,280 binary 64x64 images: shape (square, ellipse, heart) x scale (6 values, 0.5..1) x orientation (40 values
in [0, 2*pi)) x pos_x (32) x pos_y (32); row ``i`` has factors ``unravel_index(i, FACTOR_SIZES)`` (row-major).
Nothing but a bank of the 3*6*40 = 720 sprites is stored (1.6 MB): a batch is rendered by scattering each
sprite into an empty frame at its position, so any row, or any factor combination, costs the same on CPU or GPU.
Because pos_x and pos_y are the last two factors, row ``r``'s sprite is ``r // 1024`` and its position is
``r % 1024``, so a batch is six tensor operations whatever its size. Rendering beats a rendered cache: on one
CPU thread a batch of 64 renders in ~0.2 ms against ~0.5 ms to unpack the same rows from a bit-packed cache of
the whole set (377 MB; ~25 ms against ~55 ms at batch 2048), so nothing is held but the bank.

Geometry (pixels, rows grow downwards): a scale-1 square is 16 px wide; every sprite lives in a 24x24 box that
holds it at any orientation; the box's top-left corner sits at ``round(pos * 40)`` so sprites never leave the
frame, and the sprite's centre of mass lands at ``11.5 + round(40 * pos)`` (whole pixels). pos_x moves right,
pos_y moves down; orientation turns counter-clockwise as seen on screen.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import torch

from workers.data.base import DataError, ImageDataset

FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
SHAPES = ("square", "ellipse", "heart")
NUM_IMAGES = math.prod(FACTOR_SIZES)

FRAME = 64
BOX = 24
HALF_SIDE = 8.0  # half the side of a scale-1 square, in pixels
SUPERSAMPLE = 4  # sub-pixel samples per side: a pixel is on when at least half of its samples are inside
ELLIPSE_ASPECT = 0.5  # minor / major semi-axis

# Strides of the row-major order over the grid: row = sum(factor * stride).
_STRIDES = tuple(math.prod(FACTOR_SIZES[k + 1 :]) for k in range(len(FACTOR_SIZES)))
# Rows per sprite: the positions (pos_x, pos_y) vary fastest, so row // POSITIONS is the sprite's index in the
# bank and row % POSITIONS the position's.
POSITIONS = FACTOR_SIZES[3] * FACTOR_SIZES[4]


def scale_values() -> torch.Tensor:
    return torch.linspace(0.5, 1.0, FACTOR_SIZES[1], dtype=torch.float64)


def orientation_values() -> torch.Tensor:
    return torch.arange(FACTOR_SIZES[2], dtype=torch.float64) * (2 * math.pi / FACTOR_SIZES[2])


def position_values() -> torch.Tensor:
    return torch.linspace(0.0, 1.0, FACTOR_SIZES[3], dtype=torch.float64)


def box_offsets() -> torch.Tensor:
    """Top-left pixel of the sprite box for each of the 32 position values (long)."""
    return torch.round(position_values() * (FRAME - BOX)).long()


def box_corners() -> torch.Tensor:
    """Frame pixel (flat, row * FRAME + column) of the sprite box's top-left corner for each position index
    ``pos_x * 32 + pos_y`` (long, POSITIONS values)."""
    offsets = box_offsets()
    return (offsets.view(1, -1) * FRAME + offsets.view(-1, 1)).reshape(-1)  # [pos_x, pos_y] -> row of pos_y


def centre_pixels() -> torch.Tensor:
    """Pixel coordinate (column for pos_x, row for pos_y) of the sprite's centre for each position value."""
    return box_offsets().double() + (BOX - 1) / 2


def _heart_inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # The classic implicit heart (x^2 + y^2 - 1)^3 <= x^2 y^3 (y up), about as wide as the unit square.
    inside: np.ndarray = (u * u + v * v - 1.0) ** 3 - u * u * v**3 <= 0.0
    return inside


@functools.lru_cache(maxsize=1)
def _heart_centroid_y() -> float:
    grid = np.linspace(-1.5, 1.5, 601)
    u, v = np.meshgrid(grid, grid)
    return float(v[_heart_inside(u, v)].mean())


@functools.lru_cache(maxsize=1)
def sprite_bank() -> torch.Tensor:
    """All 720 sprites, float32 {0, 1}, shape (3 * 6 * 40, BOX * BOX), in (shape, scale, orientation) order."""
    # Sample points of every pixel of the box, relative to the box centre, in pixels, y up.
    sub = ((np.arange(BOX * SUPERSAMPLE) + 0.5) / SUPERSAMPLE - BOX / 2).astype(np.float32)
    x, y = np.meshgrid(sub, -sub)  # rows grow downwards on screen, y grows upwards
    theta = orientation_values().numpy().astype(np.float32)[:, None, None]
    # Rotating the shape by +theta is sampling it at the points rotated by -theta.
    u0 = np.cos(theta) * x + np.sin(theta) * y
    v0 = -np.sin(theta) * x + np.cos(theta) * y
    heart_dy = np.float32(_heart_centroid_y())
    sprites = np.empty((len(SHAPES), FACTOR_SIZES[1], FACTOR_SIZES[2], BOX, BOX), dtype=np.float32)
    for j, scale in enumerate(scale_values().numpy().astype(np.float32)):
        u, v = u0 / (HALF_SIDE * scale), v0 / (HALF_SIDE * scale)
        inside = {
            "square": np.maximum(np.abs(u), np.abs(v)) <= 1.0,
            "ellipse": u * u + (v / ELLIPSE_ASPECT) ** 2 <= 1.0,
            "heart": _heart_inside(u, v + heart_dy),
        }
        for i, shape in enumerate(SHAPES):
            coverage = inside[shape].reshape(-1, BOX, SUPERSAMPLE, BOX, SUPERSAMPLE).mean(axis=(2, 4))
            sprites[i, j] = coverage >= 0.5
    return torch.from_numpy(sprites.reshape(-1, BOX * BOX))


class DSprites(ImageDataset):
    """dSprites, or a view of some of its rows (a split, a shard, the first ``limit`` rows).

    Labels: none. Factors: the grid indices of :data:`FACTOR_NAMES`. ``sample_factors`` draws rows of this view
    uniformly, which for the whole data set is the uniform distribution over the grid.
    """

    def __init__(self, limit: int | None = None, device: torch.device | str = "cpu"):
        super().__init__("dsprites", None, factor_names=FACTOR_NAMES, factor_sizes=FACTOR_SIZES)
        if limit is not None and limit < 0:
            raise DataError(f"dsprites: limit must be at least 0, not {limit}")
        device = torch.device(device)
        self._bank = sprite_bank().to(device)
        self._corners = box_corners().to(device)
        rows, cols = torch.meshgrid(torch.arange(BOX), torch.arange(BOX), indexing="ij")
        self._box_flat = (rows * FRAME + cols).reshape(1, -1).to(device)  # frame positions of the box pixels
        self._strides = torch.tensor(_STRIDES, dtype=torch.long, device=device)
        self._sizes = torch.tensor(FACTOR_SIZES, dtype=torch.long, device=device)
        # A view is either the first ``_length`` rows (``_rows`` None) or the rows listed in ``_rows``.
        self._rows: torch.Tensor | None = None
        self._length = NUM_IMAGES if limit is None else min(int(limit), NUM_IMAGES)

    # --- shape ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._length

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, FRAME, FRAME)

    @property
    def device(self) -> torch.device:
        return self._bank.device

    @property
    def has_factors(self) -> bool:
        return True

    # --- access --------------------------------------------------------------------------------------
    def images(self, index: torch.Tensor) -> torch.Tensor:
        return self._render(self._global_rows(index.to(self.device)))

    def factors(self, index: torch.Tensor) -> torch.Tensor:
        return self._factors_of_rows(self._global_rows(index.to(self.device)))

    def sample_factors(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        rows = torch.randint(len(self), (n,), generator=generator)
        return self.factors(rows).cpu()

    def images_from_factors(self, factors: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The image of each factor row, exactly (no randomness: ``generator`` is unused)."""
        if factors.ndim != 2 or factors.shape[1] != len(FACTOR_SIZES):
            raise DataError(f"dsprites: factors must have shape (B, {len(FACTOR_SIZES)}), not {tuple(factors.shape)}")
        if factors.device.type == "cpu" and len(factors):  # checked where it costs no device sync
            low, high = factors.min(dim=0).values, factors.max(dim=0).values
            sizes = torch.tensor(FACTOR_SIZES)
            if bool((low < 0).any()) or bool((high >= sizes).any()):
                raise DataError(
                    f"dsprites: factor values out of range: columns {list(FACTOR_NAMES)} take values "
                    f"0..size-1 with sizes {list(FACTOR_SIZES)}, got minima {low.tolist()} and maxima {high.tolist()}"
                )
        return self._render(self.row_of_factors(factors.to(self.device)))

    def row_of_factors(self, factors: torch.Tensor) -> torch.Tensor:
        """Row of the full data set holding each factor vector (``ravel_multi_index`` over the grid)."""
        return (factors.long() * self._strides.to(factors.device)).sum(dim=1)

    # --- derived data sets ---------------------------------------------------------------------------
    def subset(self, index: torch.Tensor) -> DSprites:
        index = index.to(self.device)
        if index.dtype == torch.bool:
            index = torch.nonzero(index).flatten()
        index = index.long()
        n = len(self)
        if len(index) and (bool((index < -n).any()) or bool((index >= n).any())):
            raise IndexError(f"dsprites: subset index out of range for a data set of {n} rows")
        view = copy.copy(self)  # shares the sprite bank; ``to`` on either replaces tensors, never edits them
        view._rows = self._global_rows(torch.where(index < 0, index + n, index))
        view._length = int(index.shape[0])
        return view

    def to(self, device: torch.device | str) -> DSprites:
        for attr in ("_bank", "_corners", "_box_flat", "_strides", "_sizes"):
            setattr(self, attr, getattr(self, attr).to(device))
        if self._rows is not None:
            self._rows = self._rows.to(device)
        return self

    def nbytes(self) -> int:
        tensors = [self._bank, self._corners, self._box_flat, self._strides, self._sizes]
        if self._rows is not None:
            tensors.append(self._rows)
        return int(sum(t.numel() * t.element_size() for t in tensors))

    # --- rendering -----------------------------------------------------------------------------------
    def _global_rows(self, index: torch.Tensor) -> torch.Tensor:
        index = index.long()
        return index if self._rows is None else self._rows[index]

    def _factors_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.div(rows.unsqueeze(1), self._strides, rounding_mode="floor") % self._sizes

    def _render(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, 1, 64, 64) float {0, 1} images of the given rows of the full grid (long, on this data set's device)."""
        batch = rows.shape[0]
        sprite = torch.div(rows, POSITIONS, rounding_mode="floor")
        corner = self._corners[rows % POSITIONS]
        frame = torch.zeros(batch, FRAME * FRAME, dtype=self._bank.dtype, device=self._bank.device)
        # Each box pixel goes to a distinct frame pixel, so the scatter has no collisions (deterministic).
        frame.scatter_(1, corner.unsqueeze(1) + self._box_flat, self._bank[sprite])
        return frame.view(batch, 1, FRAME, FRAME)


def load_dsprites(limit: int | None = None) -> DSprites:
    return DSprites(limit=limit)
