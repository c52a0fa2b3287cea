"""3D Shapes (Burgess & Kim 2018): ``3dshapes.h5``, read lazily with h5py.

Datasets: ``images`` (480,000 x 64 x 64 x 3 uint8) and ``labels`` (480,000 x 6 float64 factor values). Each
label column's sorted distinct values become the grid indices 0..size-1 of :data:`FACTORS`; a column with another
number of distinct values is a DataError. The labels are read at open (23 MB); the images never are: every batch
reads its rows from the file (in increasing order, as HDF5 wants, then put back in the caller's order). The file
is opened lazily in each process, so the data set pickles without an open handle (a Ray worker reopens it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from workers.data.base import DataError
from workers.data.lazy import FileStore, channels_first_shape, ground_truth_dataset

# (name, size) of each label column, in the file's order.
FACTORS = (
    ("floor_hue", 10),
    ("wall_hue", 10),
    ("object_hue", 10),
    ("scale", 8),
    ("shape", 4),
    ("orientation", 15),
)
IMAGES_KEY = "images"
LABELS_KEY = "labels"


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency
        raise DataError("reading HDF5 files (3D Shapes) needs the h5py package: pip install h5py") from None
    return h5py


class H5Store(FileStore):
    """An HDF5 dataset of images (N, H, W[, C]), opened on first use in each process."""

    def __init__(
        self,
        path: Path,
        key: str,
        stored_shape: tuple[int, ...],
        channels_last: bool,
        image_shape: tuple[int, int, int],
    ):
        super().__init__(path, stored_shape, channels_last, image_shape)
        self.key = key
        self._file: Any = None  # an h5py File and Dataset (h5py has no type annotations)
        self._dataset: Any = None
        self._pid: int | None = None

    def dataset(self):
        if self._dataset is None or self._pid != os.getpid():
            self._file = _h5py().File(self.path, "r")
            self._dataset = self._file[self.key]
            self._pid = os.getpid()
        return self._dataset

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        # One slice per run of consecutive rows: h5py's point selection (dataset[rows]) is about 30 times slower
        # (81 ms against 2.4 ms for 64 random rows of 3dshapes.h5).
        dataset = self.dataset()
        out = np.empty((len(rows), *self.stored_shape[1:]), dtype=dataset.dtype)
        starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)
        for begin, end in zip(starts, [*starts[1:], len(rows)]):
            out[begin:end] = dataset[int(rows[begin]) : int(rows[begin]) + int(end - begin)]
        return out

    def _read_slice(self, start: int, stop: int) -> np.ndarray:
        return self.dataset()[start:stop]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._dataset = self._pid = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_file=None, _dataset=None, _pid=None)
        return state


def _datasets(path: Path, f):
    h5py = _h5py()
    found = []
    for key in (IMAGES_KEY, LABELS_KEY):
        obj = f.get(key)
        if not isinstance(obj, h5py.Dataset):
            raise DataError(
                f"{path}: no '{key}' dataset; a 3D Shapes file holds '{IMAGES_KEY}' (N, 64, 64, 3) uint8 "
                f"and '{LABELS_KEY}' (N, {len(FACTORS)}) float; found {sorted(f.keys())}"
            )
        found.append(obj)
    images, labels = found
    if images.dtype != np.uint8:
        raise DataError(f"{path}: '{IMAGES_KEY}' must be uint8, not {images.dtype}")
    if len(labels.shape) != 2 or labels.shape[1] != len(FACTORS):
        raise DataError(
            f"{path}: '{LABELS_KEY}' must have shape (N, {len(FACTORS)}) "
            f"({', '.join(n for n, _ in FACTORS)}), not {labels.shape}"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{path}: '{LABELS_KEY}' has {labels.shape[0]} rows for {images.shape[0]} images")
    return images, labels


def _open(path: Path):
    h5py = _h5py()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the HDF5 file: {exc}") from None


def read_shapes3d_header(path: str | Path) -> tuple[int, tuple[int, int, int], bool]:
    """(image count, (C, H, W), True) from the dataset shapes only."""
    path = Path(path)
    with _open(path) as f:
        images, _ = _datasets(path, f)
        shape = tuple(images.shape)
    image_shape, _ = channels_first_shape(path, shape)
    return shape[0], image_shape, True


def factor_table(path: Path, labels: np.ndarray) -> np.ndarray:
    """Grid indices (N, K) of the label values: each column's sorted distinct values are 0..size-1."""
    if not np.isfinite(labels).all():
        raise DataError(f"{path}: '{LABELS_KEY}' holds values that are not finite")
    table = np.empty(labels.shape, dtype=np.int64)
    for k, (name, size) in enumerate(FACTORS):
        values, table[:, k] = np.unique(labels[:, k], return_inverse=True)
        if len(values) != size:
            raise DataError(
                f"{path}: '{LABELS_KEY}' column {k} ({name}) takes {len(values)} distinct values; 3D Shapes has "
                f"{size} (the grid {' x '.join(f'{n} {s}' for n, s in FACTORS)})"
            )
    return table


def read_shapes3d(path: str | Path, name: str | None = None):
    path = Path(path)
    with _open(path) as f:
        images, labels = _datasets(path, f)
        shape = tuple(images.shape)
        image_shape, channels_last = channels_first_shape(path, shape)
        values = np.asarray(labels[()], dtype=np.float64)
    table = factor_table(path, values)
    store = H5Store(path, IMAGES_KEY, shape, channels_last, image_shape)
    return ground_truth_dataset(
        name or path.name, store, tuple(n for n, _ in FACTORS), tuple(s for _, s in FACTORS), table
    )
