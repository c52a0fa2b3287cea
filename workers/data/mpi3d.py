"""MPI3D (Gondal et al. 2019): ``mpi3d_toy.npz``, ``mpi3d_realistic.npz``, ``mpi3d_real.npz``.

One member, ``images``: 1,036,800 x 64 x 64 x 3 uint8, the :data:`GRID` of factors in row-major order (row ``r``
has factors ``unravel_index(r, sizes)``), so the factors are not stored and any combination's image is one row.
The array is 12.7 GB: stored uncompressed (``numpy.savez``, as distributed) it is memory-mapped at its offset
inside the zip and read a batch at a time, in every worker process. A compressed member cannot be mapped: up to
:data:`MAX_COMPRESSED_BYTES` uncompressed it is read whole into memory; a larger one is a DataError asking to
re-save it uncompressed.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from workers.data.base import DataError
from workers.data.lazy import (
    ArrayStore,
    MemmapStore,
    RowStore,
    channels_first_shape,
    ground_truth_dataset,
    member_header,
    stored_member_offset,
    to_chw,
)

# (name, size) of each factor, in the order the rows run through them (the last varies fastest).
GRID = (
    ("object_color", 6),
    ("object_shape", 6),
    ("object_size", 2),
    ("camera_height", 3),
    ("background_color", 3),
    ("horizontal_axis", 40),
    ("vertical_axis", 40),
)
IMAGES_KEY = "images"
MAX_COMPRESSED_BYTES = 512 * 2**20


def is_mpi3d(path: str | Path, keys) -> bool:
    return Path(path).name.lower().startswith("mpi3d") and set(keys) == {IMAGES_KEY}


def _grid_text() -> str:
    return " x ".join(f"{name} {size}" for name, size in GRID)


def _checked_header(path: Path, archive: zipfile.ZipFile) -> tuple[tuple[int, ...], np.dtype]:
    shape, fortran, dtype = member_header(archive, IMAGES_KEY)
    if fortran or dtype != np.dtype(np.uint8):
        raise DataError(
            f"{path}: MPI3D '{IMAGES_KEY}' must be a C-order uint8 array; found {dtype}"
            f"{' in Fortran order' if fortran else ''}"
        )
    total = math.prod(size for _, size in GRID)
    if len(shape) < 1 or shape[0] != total:
        raise DataError(
            f"{path}: {shape[0] if shape else 0} images, but MPI3D is the grid {_grid_text()} = "
            f"{total:,} images in row-major order"
        )
    return shape, dtype


def read_mpi3d_header(path: str | Path) -> tuple[int, tuple[int, int, int], bool]:
    """(image count, (C, H, W), True) from the member header only."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            shape, _ = _checked_header(path, archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read the MPI3D archive: {exc}") from None
    image_shape, _ = channels_first_shape(path, shape)
    return shape[0], image_shape, True


def read_mpi3d(path: str | Path, name: str | None = None):
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            shape, dtype = _checked_header(path, archive)
            image_shape, channels_last = channels_first_shape(path, shape)
            offset = stored_member_offset(path, archive, IMAGES_KEY)
            store: RowStore
            if offset is not None:
                store = MemmapStore(path, offset, shape, dtype, channels_last, image_shape)
            else:
                size = archive.getinfo(IMAGES_KEY + ".npy").file_size
                if size > MAX_COMPRESSED_BYTES:
                    raise DataError(
                        f"{path}: '{IMAGES_KEY}' is stored compressed ({size / 2**30:.1f} GiB uncompressed), and a "
                        f"compressed member cannot be memory-mapped; re-save it uncompressed, with numpy.savez "
                        f"(not savez_compressed), as the MPI3D files are distributed"
                    )
                with archive.open(IMAGES_KEY + ".npy") as f:
                    array = np.lib.format.read_array(f, allow_pickle=False)
                store = ArrayStore(to_chw(array, channels_last))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read the MPI3D archive: {exc}") from None
    names = tuple(n for n, _ in GRID)
    sizes = tuple(s for _, s in GRID)
    return ground_truth_dataset(name or path.name, store, names, sizes)
