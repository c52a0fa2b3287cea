"""Data sets whose images stay where they are (a file, or a compact array) and are decoded one batch at a time.

A :class:`RowStore` serves the images of some rows of a whole file: :class:`ArrayStore` (a uint8 array in memory),
:class:`MemmapStore` (an uncompressed ``.npy`` member of an ``.npz``, memory-mapped at its offset inside the zip)
and the file-backed stores of the readers (``shapes3d.H5Store``, ``dsprites_npz.PackedBitsStore``).
A :class:`LazyImageDataset` is a view of a store (all its rows, or those a split, a shard or ``limit`` picked):
``subset`` makes another view of the same store, ``to(device)`` moves only what is in memory (a file stays a
file; the training loop moves each batch), and pickling never carries an open file (stores reopen per process).

Ground-truth factors: a table of grid indices (kept in the smallest integer type), or, when the rows are the
full factor grid in row-major order, nothing at all (the factors of row r are ``unravel_index(r, sizes)``).
When the rows hold every grid cell exactly once, the data set is a :class:`GridImageDataset`, which renders any
factor combination by looking up its row, as the builtin dSprites does, so the disentanglement metrics draw
factors freely; otherwise the metrics draw rows (see ``workers.metrics.sampling``).
"""

from __future__ import annotations

import copy
import math
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from workers.data.base import DataError, ImageDataset

MAX_CHANNELS = 4

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we skip, file name length, extra field length
_LOCAL_MAGIC = b"PK\x03\x04"


# --- npy members of zip archives ---------------------------------------------------------------------------


def read_npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` stream ``f``, leaving ``f`` at the first data byte."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:  # 2.0 and 3.0 share the layout (3.0 only allows UTF-8 in the header)
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(int(d) for d in shape), bool(fortran), dtype


def member_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The ``.npy`` header of member ``key`` (without ``.npy``), reading only the header's bytes."""
    with archive.open(key + ".npy") as f:
        return read_npy_header(f)


def npz_keys(path: Path) -> list[str]:
    """The array names in an ``.npz`` archive (its central directory only)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: cannot read the .npz archive: {exc}") from None


def stored_member_offset(path: Path, archive: zipfile.ZipFile, key: str) -> int | None:
    """File offset of the first data byte of member ``key``'s array, when the member is stored uncompressed
    (``numpy.savez``), so the array can be memory-mapped; None when it is compressed."""
    info = archive.getinfo(key + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    if info.flag_bits & 0x1:
        raise DataError(f"{path}: member '{key}' is encrypted")
    with open(path, "rb") as f:
        # The local header's name and extra field can differ from the central directory's: read its own lengths.
        f.seek(info.header_offset)
        head = f.read(_LOCAL_HEADER.size)
        if len(head) < _LOCAL_HEADER.size:
            raise DataError(f"{path}: truncated zip archive (member '{key}')")
        magic, name_len, extra_len = _LOCAL_HEADER.unpack(head)
        if magic != _LOCAL_MAGIC:
            raise DataError(f"{path}: damaged zip archive (no local header for member '{key}')")
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        f.seek(start)
        shape, _, dtype = read_npy_header(f)
        offset = f.tell()
        file_size = f.seek(0, 2)
    data_bytes = math.prod(shape) * dtype.itemsize
    if offset - start + data_bytes != info.file_size or offset + data_bytes > file_size:
        raise DataError(
            f"{path}: member '{key}' is truncated or inconsistent with its header "
            f"({'x'.join(map(str, shape))} {dtype} = {data_bytes} bytes)"
        )
    return offset


# --- row stores --------------------------------------------------------------------------------------------


def to_chw(block: np.ndarray, channels_last: bool) -> torch.Tensor:
    """uint8 (B, C, H, W) from a block of stored rows (B, H, W), (B, H, W, C) or (B, C, H, W)."""
    if block.ndim == 3:
        block = block[:, None]
    elif channels_last:
        block = np.moveaxis(block, 3, 1)
    return torch.from_numpy(np.ascontiguousarray(block))


class RowStore:
    """The images of a whole file, by row: ``images(rows)`` is float [0, 1] (B, C, H, W) on ``device``."""

    shape: tuple[int, int, int, int]  # (N, C, H, W)

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def images(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> RowStore:
        """A store on ``device``; file-backed stores stay on the CPU (their batches are moved by the caller)."""
        return self

    def nbytes(self) -> int:
        """Bytes this store holds in memory (not counting what the operating system caches of a file)."""
        return 0


class ArrayStore(RowStore):
    """uint8 (N, C, H, W) images in memory."""

    def __init__(self, images_u8: torch.Tensor):
        self._images = images_u8
        n, c, h, w = images_u8.shape
        self.shape = (n, c, h, w)

    @property
    def device(self) -> torch.device:
        return self._images.device

    def images(self, rows: torch.Tensor) -> torch.Tensor:
        return self._images[rows.to(self._images.device)].float().div_(255.0)

    def to(self, device: torch.device | str) -> ArrayStore:
        return self if self._images.device == torch.device(device) else ArrayStore(self._images.to(device))

    def nbytes(self) -> int:
        return int(self._images.numel() * self._images.element_size())


class FileStore(RowStore):
    """Rows read from a file on demand, in increasing order (what HDF5 needs, and what disks like best)."""

    def __init__(
        self, path: Path, stored_shape: tuple[int, ...], channels_last: bool, image_shape: tuple[int, int, int]
    ):
        self.path = Path(path)
        self.stored_shape = tuple(stored_shape)
        self.channels_last = channels_last
        self.shape = (int(stored_shape[0]), *image_shape)

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        """The stored rows ``rows`` (strictly increasing, non-empty), in the stored layout."""
        raise NotImplementedError

    def images(self, rows: torch.Tensor) -> torch.Tensor:
        wanted = rows.detach().cpu().numpy().astype(np.int64).reshape(-1)
        if len(wanted) == 0:
            return torch.empty((0, *self.image_shape), dtype=torch.float32)
        if int(wanted.min()) < 0 or int(wanted.max()) >= len(self):
            raise IndexError(f"{self.path}: row out of range for a file of {len(self)} rows")
        unique, inverse = np.unique(wanted, return_inverse=True)
        if unique[-1] - unique[0] + 1 == len(unique):  # a contiguous run: one slice read
            block = self._read_slice(int(unique[0]), int(unique[-1]) + 1)
        else:
            block = self._read_sorted(unique)
        if len(unique) != len(wanted) or not np.array_equal(unique, wanted):
            block = block[inverse.reshape(-1)]  # back to the caller's order (and repeats)
        return to_chw(block, self.channels_last).float().div_(255.0)

    def _read_slice(self, start: int, stop: int) -> np.ndarray:
        return self._read_sorted(np.arange(start, stop))


class MemmapStore(FileStore):
    """An uncompressed ``.npy`` member of an ``.npz`` archive, memory-mapped at ``offset`` (opened lazily, and
    again in each process that unpickles the store)."""

    def __init__(
        self,
        path: Path,
        offset: int,
        stored_shape: tuple[int, ...],
        dtype: np.dtype,
        channels_last: bool,
        image_shape: tuple[int, int, int],
    ):
        super().__init__(path, stored_shape, channels_last, image_shape)
        self.offset = int(offset)
        self.dtype = np.dtype(dtype)
        self._array: np.memmap | None = None

    def array(self) -> np.memmap:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.stored_shape)
        return self._array

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.array()[rows])

    def _read_slice(self, start: int, stop: int) -> np.ndarray:
        return np.array(self.array()[start:stop])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None
        return state


# --- data sets ---------------------------------------------------------------------------------------------


def _compact(table: np.ndarray, sizes: Sequence[int]) -> torch.Tensor:
    dtype = np.uint8 if max(sizes, default=1) <= 256 else np.int32
    return torch.from_numpy(np.ascontiguousarray(table.astype(dtype)))


class LazyImageDataset(ImageDataset):
    """A view of a :class:`RowStore`, with an optional factor table (one row per row of the view).

    The images are served on the store's device (the CPU for a file); the factors on the CPU.
    """

    def __init__(
        self,
        name: str,
        store: RowStore,
        factors: torch.Tensor | None = None,
        factor_names: Sequence[str] | None = None,
        factor_sizes: Sequence[int] | None = None,
    ):
        super().__init__(name, None, factors=factors, factor_names=factor_names, factor_sizes=factor_sizes)
        self._store = store
        self._rows: torch.Tensor | None = None  # global rows of this view (on the store's device); None: all
        self._length = len(store)

    # --- shape ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._length

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._store.image_shape

    @property
    def device(self) -> torch.device:
        return self._store.device

    @property
    def has_factors(self) -> bool:
        return self.factor_sizes is not None

    @property
    def store(self) -> RowStore:
        return self._store

    # --- access --------------------------------------------------------------------------------------
    def global_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows of the whole file behind rows ``index`` of this view."""
        index = index.long()
        if self._rows is None:
            return index
        return self._rows[index.to(self._rows.device)]

    def images(self, index: torch.Tensor) -> torch.Tensor:
        return self._store.images(self.global_rows(index))

    def factors(self, index: torch.Tensor) -> torch.Tensor:
        if self.factor_sizes is None:
            raise DataError(f"data set '{self.name}' has no ground-truth factors")
        if self._factors is not None:
            return self._factors[index.cpu().long()].long()
        rows = self.global_rows(index).cpu()
        strides = torch.tensor(_strides(self.factor_sizes), dtype=torch.long)
        return torch.div(rows.unsqueeze(1), strides, rounding_mode="floor") % torch.tensor(self.factor_sizes)

    # --- derived data sets ---------------------------------------------------------------------------
    def subset(self, index: torch.Tensor) -> LazyImageDataset:
        index = index.cpu()
        if index.dtype == torch.bool:
            index = torch.nonzero(index).flatten()
        index = index.long()
        n = len(self)
        if len(index) and (bool((index < -n).any()) or bool((index >= n).any())):
            raise IndexError(f"{self.name}: subset index out of range for a data set of {n} rows")
        index = torch.where(index < 0, index + n, index)
        view = copy.copy(self)  # shares the store
        view._rows = self.global_rows(index).to(self._store.device)
        view._length = int(index.shape[0])
        if self._factors is not None:
            view._factors = self._factors[index]
        return view

    def to(self, device: torch.device | str) -> LazyImageDataset:
        """Moves what is in memory (a compact array) to ``device``; a file-backed store stays on the CPU."""
        self._store = self._store.to(device)
        if self._rows is not None:
            self._rows = self._rows.to(self._store.device)
        return self

    def nbytes(self) -> int:
        parts = [t for t in (self._rows, self._factors) if t is not None]
        return self._store.nbytes() + int(sum(t.numel() * t.element_size() for t in parts))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, shape={self.image_shape}, "
            f"store={type(self._store).__name__})"
        )


class GridImageDataset(LazyImageDataset):
    """A lazy data set whose file holds every cell of its factor grid exactly once: ``images_from_factors``
    serves the exact image of any factor combination (also one outside this view, as the builtin dSprites)."""

    def __init__(
        self,
        name: str,
        store: RowStore,
        factor_names: Sequence[str],
        factor_sizes: Sequence[int],
        factors: torch.Tensor | None = None,
        lookup: torch.Tensor | None = None,
    ):
        super().__init__(name, store, factors=factors, factor_names=factor_names, factor_sizes=factor_sizes)
        self._lookup = lookup  # file row of each grid cell (row-major); None: the file is in row-major order

    def images_from_factors(self, factors: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The image of each factor row, exactly (``generator`` is unused)."""
        names, sizes = self.require_factor_names(), self.require_factor_sizes()
        if factors.ndim != 2 or factors.shape[1] != len(sizes):
            raise DataError(f"{self.name}: factors must have shape (B, {len(sizes)}), not {tuple(factors.shape)}")
        factors = factors.cpu().long()
        if len(factors):
            low, high = factors.min(dim=0).values, factors.max(dim=0).values
            if bool((low < 0).any()) or bool((high >= torch.tensor(sizes)).any()):
                raise DataError(
                    f"{self.name}: factor values out of range: columns {list(names)} take values "
                    f"0..size-1 with sizes {list(sizes)}, got minima {low.tolist()} and maxima {high.tolist()}"
                )
        cells = (factors * torch.tensor(_strides(sizes), dtype=torch.long)).sum(dim=1)
        rows = cells if self._lookup is None else self._lookup[cells]
        return self._store.images(rows)

    def nbytes(self) -> int:
        extra = 0 if self._lookup is None else self._lookup.numel() * self._lookup.element_size()
        return super().nbytes() + int(extra)


def _strides(sizes: Sequence[int]) -> tuple[int, ...]:
    return tuple(math.prod(sizes[k + 1 :]) for k in range(len(sizes)))


def ground_truth_dataset(
    name: str,
    store: RowStore,
    factor_names: Sequence[str],
    factor_sizes: Sequence[int],
    table: np.ndarray | None = None,
) -> LazyImageDataset:
    """The data set of ``store`` with factors ``table`` (N, K) grid indices already checked against
    ``factor_sizes``; ``table`` None means the rows are the full grid in row-major order.

    A table that is the row-major grid is dropped (the factors follow from the row); one that holds every cell
    once in another order keeps a lookup; anything else (missing or repeated cells) gives a plain view that the
    metrics draw rows from.
    """
    sizes = tuple(int(s) for s in factor_sizes)
    total = math.prod(sizes)
    n = len(store)
    if table is None:
        if n != total:
            raise DataError(f"{name}: {n} images, but the factor grid {' x '.join(map(str, sizes))} has {total} cells")
        return GridImageDataset(name, store, factor_names, sizes)
    table = np.asarray(table, dtype=np.int64)
    if n == total:
        cells = np.ravel_multi_index(tuple(table.T), sizes)
        if np.array_equal(cells, np.arange(total)):
            return GridImageDataset(name, store, factor_names, sizes)
        if bool((np.bincount(cells, minlength=total) == 1).all()):
            lookup = np.empty(total, dtype=np.int64)
            lookup[cells] = np.arange(total)
            return GridImageDataset(
                name, store, factor_names, sizes, factors=_compact(table, sizes), lookup=torch.from_numpy(lookup)
            )
    return LazyImageDataset(name, store, factors=_compact(table, sizes), factor_names=factor_names, factor_sizes=sizes)


def channels_first_shape(path: Path, shape: tuple[int, ...]) -> tuple[tuple[int, int, int], bool]:
    """(C, H, W) of an images array of the given shape, and whether it is stored channels-last."""
    if len(shape) == 3:
        return (1, shape[1], shape[2]), False
    if len(shape) == 4:
        first, last = shape[1] <= MAX_CHANNELS, shape[3] <= MAX_CHANNELS
        if first and not last:
            return (shape[1], shape[2], shape[3]), False
        if last and not first:
            return (shape[3], shape[1], shape[2]), True
        raise DataError(
            f"{path}: cannot tell the channel axis of images of shape {shape}: "
            f"expected (N, H, W, C) or (N, C, H, W) with C <= {MAX_CHANNELS} and larger H, W"
        )
    raise DataError(f"{path}: images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), not {shape}")
