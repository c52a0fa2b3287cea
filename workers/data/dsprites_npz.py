"""dSprites as DeepMind distributes it: ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``.

Members: ``imgs`` (N, 64, 64) uint8 with values 0/1 (1 is white), ``latents_classes`` (N, 6) int64 grid indices
(colour, shape, scale, orientation, posX, posY), ``latents_values`` (N, 6) float64 and ``metadata``, a pickled
dict. A user's pickle is never unpickled: ``metadata`` (and ``latents_values``) are not read at all, and every
member that is read goes through ``allow_pickle=False``. The constant colour column is dropped; the factors are
named as the builtin dSprites names them (posX/posY are ``pos_x``/``pos_y``).

The real file holds 737,280 images, 3 GB as uint8: ``imgs`` is read from the zip stream in chunks of rows and
kept bit-packed (one bit per pixel, 512 bytes per image, 377 MB in all), so the peak memory stays near the
packed size; ``images()`` unpacks each batch (on the GPU when the packed array was moved there).
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

from workers.data.base import DataError, ImageDataset
from workers.data.lazy import RowStore, ground_truth_dataset, member_header, read_npy_header

FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
IMAGES_KEY = "imgs"
CLASSES_KEY = "latents_classes"
CHUNK_BYTES = 4 * 2**20  # uint8 pixels read (and checked, and packed) at a time: 1,024 dSprites images
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # np.packbits's big-endian bit order


def is_dsprites(keys: Collection[str]) -> bool:
    return IMAGES_KEY in keys and CLASSES_KEY in keys


class PackedBitsStore(RowStore):
    """Binary images as packed bits: uint8 (N, ceil(H * W / 8)), row-major pixels, most significant bit first."""

    def __init__(self, packed: torch.Tensor, height: int, width: int):
        self._packed = packed
        self.shape = (int(packed.shape[0]), 1, int(height), int(width))

    @property
    def device(self) -> torch.device:
        return self._packed.device

    def images(self, rows: torch.Tensor) -> torch.Tensor:
        packed = self._packed[rows.to(self._packed.device).long()]
        bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
        _, _, h, w = self.shape
        return bits.reshape(len(packed), -1)[:, : h * w].float().view(len(packed), 1, h, w)

    def to(self, device: torch.device | str) -> PackedBitsStore:
        if self._packed.device == torch.device(device):
            return self
        return PackedBitsStore(self._packed.to(device), self.shape[2], self.shape[3])

    def nbytes(self) -> int:
        return int(self._packed.numel())


def _checked_headers(path: Path, archive: zipfile.ZipFile) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...]]:
    shape, fortran, dtype = member_header(archive, IMAGES_KEY)
    if len(shape) != 3 or fortran or dtype not in (np.dtype(np.uint8), np.dtype(np.bool_)):
        raise DataError(
            f"{path}: dSprites '{IMAGES_KEY}' must be a C-order uint8 (or bool) array (N, H, W); "
            f"found {dtype} {shape}{' in Fortran order' if fortran else ''}"
        )
    classes_shape, _, classes_dtype = member_header(archive, CLASSES_KEY)
    if len(classes_shape) != 2 or classes_shape[1] != 1 + len(FACTOR_SIZES) or classes_dtype.kind not in "iu":
        raise DataError(
            f"{path}: dSprites '{CLASSES_KEY}' must be an integer array (N, {1 + len(FACTOR_SIZES)}) "
            f"(colour, {', '.join(FACTOR_NAMES)}); found {classes_dtype} {classes_shape}"
        )
    if classes_shape[0] != shape[0]:
        raise DataError(f"{path}: '{CLASSES_KEY}' has {classes_shape[0]} rows for {shape[0]} images")
    return shape, dtype, classes_shape


def read_dsprites_npz_header(path: str | Path) -> tuple[int, tuple[int, int, int], bool]:
    """(image count, (1, H, W), True) from the member headers only."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            shape, _, _ = _checked_headers(path, archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read the dSprites archive: {exc}") from None
    return shape[0], (1, shape[1], shape[2]), True


def _factor_table(path: Path, archive: zipfile.ZipFile) -> np.ndarray:
    with archive.open(CLASSES_KEY + ".npy") as f:
        classes = np.lib.format.read_array(f, allow_pickle=False)
    colour = classes[:, 0]
    if len(colour) and bool((colour != colour[0]).any()):
        raise DataError(f"{path}: the colour column of '{CLASSES_KEY}' varies; dSprites has one colour")
    table = classes[:, 1:].astype(np.int64)
    if len(table):
        low, high = table.min(axis=0), table.max(axis=0)
        if bool((low < 0).any()) or bool((high >= np.array(FACTOR_SIZES)).any()):
            raise DataError(
                f"{path}: '{CLASSES_KEY}' columns {list(FACTOR_NAMES)} must take values 0..size-1 with sizes "
                f"{list(FACTOR_SIZES)}; found minima {low.tolist()} and maxima {high.tolist()}"
            )
    return table


def _packed_images(path: Path, archive: zipfile.ZipFile) -> np.ndarray:
    """``imgs`` bit-packed per row, read in chunks of rows from the (possibly compressed) zip stream."""
    with archive.open(IMAGES_KEY + ".npy") as f:
        (n, h, w), _, _ = read_npy_header(f)
        pixels = h * w
        packed = np.empty((n, math.ceil(pixels / 8)), dtype=np.uint8)
        chunk_rows = max(1, CHUNK_BYTES // max(pixels, 1))
        for start in range(0, n, chunk_rows):
            rows = min(chunk_rows, n - start)
            data = f.read(rows * pixels)
            if len(data) != rows * pixels:
                raise DataError(
                    f"{path}: '{IMAGES_KEY}' is truncated: {n} images announced, "
                    f"the data ends in image {start + len(data) // max(pixels, 1)}"
                )
            chunk = np.frombuffer(data, dtype=np.uint8).reshape(rows, pixels)
            if rows and int(chunk.max()) > 1:
                raise DataError(
                    f"{path}: '{IMAGES_KEY}' holds the value {int(chunk.max())}; dSprites pixels are 0 or 1"
                )
            packed[start : start + rows] = np.packbits(chunk, axis=1)
    return packed


def read_dsprites_npz(path: str | Path, name: str | None = None) -> ImageDataset:
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            shape, _, _ = _checked_headers(path, archive)
            table = _factor_table(path, archive)
            packed = _packed_images(path, archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read the dSprites archive: {exc}") from None
    store = PackedBitsStore(torch.from_numpy(packed), shape[1], shape[2])
    return ground_truth_dataset(name or path.name, store, FACTOR_NAMES, FACTOR_SIZES, table)
