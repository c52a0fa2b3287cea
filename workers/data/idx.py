"""MNIST-style IDX files (MNIST, Fashion-MNIST, EMNIST), raw or gzip-compressed.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one big-endian
int32 per dimension, then the values. Images are magic 2051 (uint8, 3 dims: N, H, W); labels are magic 2049
(uint8, 1 dim: N). Gzip is recognised by its magic bytes, whatever the file is called.
"""

from __future__ import annotations

import gzip
import io
import math
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from workers.data.base import DataError, ImageDataset

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
GZIP_MAGIC = b"\x1f\x8b"
_KIND = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def _read_bytes(path: Path, limit: int | None = None) -> bytes:
    """The file's (decompressed) bytes; only the first ``limit`` of them when given."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with _open(path) as f:
            data: bytes = f.read() if limit is None else f.read(limit)
            return data
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read the IDX file: {exc}") from None


def _parse_header(path: Path, head: bytes, magic: int) -> tuple[int, ...]:
    if len(head) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(head)} bytes)")
    found = int.from_bytes(head[:4], "big")
    if found != magic:
        what = f" (an IDX {_KIND[found]} file)" if found in _KIND else ""
        raise DataError(f"{path}: magic number {found}{what}, expected {magic} (IDX {_KIND[magic]})")
    ndim = head[3]
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({len(head)} bytes, {ndim} dimensions announced)")
    return tuple(int.from_bytes(head[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))


def read_idx_header(path: str | Path, magic: int = IMAGES_MAGIC) -> tuple[int, ...]:
    """The dimensions an IDX file announces, reading its header only."""
    path = Path(path)
    head = _read_bytes(path, 16)
    return _parse_header(path, head, magic)


def read_idx_array(path: str | Path, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file with the given magic number; its size must match its header."""
    path = Path(path)
    data = _read_bytes(path)
    dims = _parse_header(path, data, magic)
    offset = 4 + 4 * len(dims)
    expected = math.prod(dims)
    if len(data) - offset != expected:
        raise DataError(
            f"{path}: the header announces {'x'.join(map(str, dims))} = {expected} values, "
            f"the file holds {len(data) - offset} (truncated or not an IDX file)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def labels_path_for(images_path: str | Path) -> Path | None:
    """The labels file next to an images file, by the usual names: ``train-images-idx3-ubyte[.gz]`` ->
    ``train-labels-idx1-ubyte[.gz]``, ``X-images.idx`` -> ``X-labels.idx``; None when there is none."""
    images_path = Path(images_path)
    name = images_path.name
    if "images" not in name:
        return None
    stem = re.sub(r"\.gz$", "", name.replace("images", "labels").replace("idx3", "idx1"))
    for candidate in (stem, stem + ".gz"):
        path = images_path.with_name(candidate)
        if path != images_path and path.is_file():
            return path
    return None


def read_idx(path: str | Path, labels_path: str | Path | None = None, name: str | None = None) -> ImageDataset:
    """An IDX images file, with its labels from ``labels_path`` or, when not given, the labels file next to it."""
    path = Path(path)
    images = read_idx_array(path, IMAGES_MAGIC)
    if images.ndim != 3:
        raise DataError(f"{path}: IDX images must have 3 dimensions (N, H, W), not {images.ndim}")
    labels_path = Path(labels_path) if labels_path is not None else labels_path_for(path)
    labels = None
    if labels_path is not None:
        labels_u8 = read_idx_array(labels_path, LABELS_MAGIC)
        if labels_u8.ndim != 1:
            raise DataError(f"{labels_path}: IDX labels must have 1 dimension, not {labels_u8.ndim}")
        if len(labels_u8) != len(images):
            raise DataError(f"{labels_path}: {len(labels_u8)} labels for {len(images)} images in {path}")
        labels = torch.from_numpy(labels_u8.astype(np.int64))
    images_u8 = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W); copy: frombuffer is read-only
    return ImageDataset(name or path.name, images_u8, labels=labels)
