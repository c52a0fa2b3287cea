"""NumPy ``.npz`` archives: an images array, optional labels, optional ground-truth factors.

Keys: images as ``images``, ``x`` or ``imgs`` with shape (N, H, W), (N, H, W, C) or (N, C, H, W) and values
uint8 0..255, bool, or float in [0, 1]; labels as ``labels`` or ``y`` (N,); factors as ``factors`` (N, K)
integer grid indices, with optional ``factor_names`` (K,) and ``factor_sizes`` (K,) (max + 1 when missing).

Two well-known archives are recognised by their keys and read by their own modules: DeepMind's dSprites
(``imgs`` + ``latents_classes``: :mod:`workers.data.dsprites_npz`) and MPI3D (a name starting with ``mpi3d`` and
only ``images``: :mod:`workers.data.mpi3d`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from workers.data.base import DataError, ImageDataset
from workers.data.lazy import channels_first_shape

IMAGE_KEYS = ("images", "x", "imgs")
LABEL_KEYS = ("labels", "y")


def _first_key(keys, wanted: tuple[str, ...]) -> str | None:
    return next((k for k in wanted if k in keys), None)


def _member_shape(path: Path, archive: zipfile.ZipFile, key: str) -> tuple[int, ...]:
    with archive.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
    return tuple(shape)


def _known_archive(path: Path):
    """(reader, header reader) of a known data set's archive (told by its keys and name), else None."""
    if not zipfile.is_zipfile(path):
        return None
    from workers.data import dsprites_npz, mpi3d  # they build on this module
    from workers.data.lazy import npz_keys

    keys = npz_keys(path)
    if dsprites_npz.is_dsprites(keys):
        return dsprites_npz.read_dsprites_npz, dsprites_npz.read_dsprites_npz_header
    if mpi3d.is_mpi3d(path, keys):
        return mpi3d.read_mpi3d, mpi3d.read_mpi3d_header
    return None


def read_npz_header(path: str | Path) -> tuple[int, tuple[int, int, int], bool]:
    """(example count, (C, H, W), has factors) from the array headers only, without reading the data."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    known = _known_archive(path)
    if known is not None:
        return known[1](path)
    try:
        with zipfile.ZipFile(path) as archive:
            keys = {n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")}
            key = _first_key(keys, IMAGE_KEYS)
            if key is None:
                raise DataError(
                    f"{path}: no images array (expected one of the keys {list(IMAGE_KEYS)}; found {sorted(keys)})"
                )
            shape = _member_shape(path, archive, key)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read the .npz archive: {exc}") from None
    image_shape, _ = channels_first_shape(path, shape)
    return shape[0], image_shape, "factors" in keys


def _images_u8(path: Path, key: str, array: np.ndarray) -> torch.Tensor:
    _, channels_last = channels_first_shape(path, array.shape)
    if array.ndim == 3:
        array = array[:, None]
    elif channels_last:
        array = np.moveaxis(array, 3, 1)
    if array.dtype == np.uint8:
        out = array
    elif array.dtype == np.bool_:
        out = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if not np.isfinite(array).all() or low < 0.0 or high > 1.0:
            raise DataError(f"{path}: float images in '{key}' must lie in [0, 1]; found values in [{low}, {high}]")
        out = np.rint(array * 255.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0 or high > 255:
            raise DataError(f"{path}: integer images in '{key}' must lie in 0..255; found values in [{low}, {high}]")
        out = array.astype(np.uint8)
    else:
        raise DataError(f"{path}: images in '{key}' have dtype {array.dtype}; expected uint8, bool or float")
    return torch.from_numpy(np.ascontiguousarray(out))


def _integer_column(path: Path, key: str, array: np.ndarray, n: int, ndim: int) -> np.ndarray:
    if array.ndim != ndim:
        raise DataError(f"{path}: '{key}' must have {ndim} dimension(s), not shape {array.shape}")
    if array.shape[0] != n:
        raise DataError(f"{path}: '{key}' has {array.shape[0]} rows for {n} images")
    if np.issubdtype(array.dtype, np.floating) and np.array_equal(array, np.rint(array)):
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer) or (array.size and int(array.min()) < 0):
        raise DataError(f"{path}: '{key}' must hold non-negative integers (dtype {array.dtype})")
    return array.astype(np.int64)


def read_npz(path: str | Path, name: str | None = None) -> ImageDataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    known = _known_archive(path)
    if known is not None:
        return known[0](path, name=name)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read the .npz archive: {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz archive (a single array); save with numpy.savez(images=...)")
    with archive:
        try:
            key = _first_key(archive.files, IMAGE_KEYS)
            if key is None:
                raise DataError(
                    f"{path}: no images array (expected one of the keys {list(IMAGE_KEYS)}; found {archive.files})"
                )
            images = _images_u8(path, key, archive[key])
            n = images.shape[0]
            labels = None
            label_key = _first_key(archive.files, LABEL_KEYS)
            if label_key is not None:
                labels = torch.from_numpy(_integer_column(path, label_key, archive[label_key], n, 1))
            factors = names = sizes = None
            if "factors" in archive.files:
                table = _integer_column(path, "factors", archive["factors"], n, 2)
                k = table.shape[1]
                names = _factor_names(path, archive, k)
                sizes = _factor_sizes(path, archive, table)
                factors = torch.from_numpy(table)
            elif "factor_names" in archive.files or "factor_sizes" in archive.files:
                raise DataError(f"{path}: 'factor_names'/'factor_sizes' given without a 'factors' array")
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{path}: cannot read the .npz archive: {exc}") from None
    return ImageDataset(
        name or path.name, images, labels=labels, factors=factors, factor_names=names, factor_sizes=sizes
    )


def _factor_names(path: Path, archive, k: int) -> tuple[str, ...]:
    if "factor_names" not in archive.files:
        return tuple(f"factor_{j}" for j in range(k))
    names = archive["factor_names"]
    if names.shape != (k,):
        raise DataError(f"{path}: 'factor_names' must hold {k} names (one per factor column), not shape {names.shape}")
    return tuple(str(s) for s in names.tolist())


def _factor_sizes(path: Path, archive, table: np.ndarray) -> tuple[int, ...]:
    k = table.shape[1]
    observed = table.max(axis=0) + 1 if len(table) else np.zeros(k, dtype=np.int64)
    if "factor_sizes" not in archive.files:
        return tuple(int(s) for s in observed)
    sizes = archive["factor_sizes"]
    if sizes.shape != (k,) or not np.issubdtype(sizes.dtype, np.integer):
        raise DataError(
            f"{path}: 'factor_sizes' must hold {k} integers (one per factor column), not {sizes.dtype} {sizes.shape}"
        )
    if (observed > sizes).any():
        bad = int(np.argmax(observed > sizes))
        raise DataError(
            f"{path}: factor column {bad} takes value {int(observed[bad]) - 1}, beyond its size {int(sizes[bad])}"
        )
    return tuple(int(s) for s in sizes)
