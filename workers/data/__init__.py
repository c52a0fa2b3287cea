"""Opening the data set a job's ``data`` section names: a builtin, or a file/folder in one of the formats below.

Readers take a local path; where the bytes came from is the business of ``resolve`` (a function from a source
such as ``s3://bucket/key`` or a pushed data set's name to a local path), which callers pass in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.config import DataConfig
from workers.data import dsprites
from workers.data.base import DataError, ImageDataset
from workers.data.folder import read_folder, read_folder_header
from workers.data.formats import infer_format
from workers.data.idx import IMAGES_MAGIC, read_idx, read_idx_header
from workers.data.npz import read_npz, read_npz_header
from workers.data.shapes3d import read_shapes3d, read_shapes3d_header
from workers.storage.read_access import check_local_read

__all__ = [
    "BUILTINS",
    "DataError",
    "ImageDataset",
    "builtin_names",
    "check_source",
    "infer_format",
    "known_factor_names",
    "open_dataset",
    "PreparedData",
    "prepare",
    "read_local",
    "shard",
    "take_first",
    "train_val_split",
]

BUILTIN_PREFIX = "builtin:"
FORMATS = ("idx", "npz", "folder", "hdf5")

# name -> factory(limit=None) -> ImageDataset
BUILTINS: dict[str, Callable[..., ImageDataset]] = {"dsprites": dsprites.load_dsprites}
# name -> (example count, (C, H, W), has factors), known without building the data set
_BUILTIN_HEADERS: dict[str, tuple[int, tuple[int, int, int], bool]] = {
    "dsprites": (dsprites.NUM_IMAGES, (1, dsprites.FRAME, dsprites.FRAME), True),
}

_BUILTIN_FACTOR_NAMES: dict[str, tuple[str, ...]] = {"dsprites": dsprites.FACTOR_NAMES}

Resolver = Callable[[str], "str | Path"]


def builtin_names() -> list[str]:
    return sorted(BUILTINS)


def _format_of(path: Path, config: DataConfig) -> str:
    fmt = config.format or infer_format(path)
    if fmt == "folder" and not path.is_dir():
        raise DataError(f"{path}: data.format is 'folder' but this is a file")
    if fmt != "folder" and path.is_dir():
        raise DataError(f"{path}: data.format is '{fmt}' but this is a folder")
    return fmt


def read_local(path: str | Path, config: DataConfig, name: str | None = None) -> ImageDataset:
    """The data set in a local file or folder, read by ``config.format`` (or the format its name implies)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    fmt = _format_of(path, config)
    if fmt == "idx":
        return read_idx(path, name=name)
    if fmt == "npz":
        return read_npz(path, name=name)
    if fmt == "hdf5":
        dataset: ImageDataset = read_shapes3d(path, name=name)
        return dataset
    return read_folder(path, config.image_size, config.grayscale, name=name)


def _builtin(config: DataConfig) -> str:
    name = config.source[len(BUILTIN_PREFIX) :]
    if name not in BUILTINS:
        raise DataError(f"data.source: unknown builtin '{name}'; known builtins: {', '.join(builtin_names())}")
    if config.format is not None:
        raise DataError(f"data.format: '{config.format}' does not apply to the builtin data set '{name}'")
    return name


def _local_path(config: DataConfig, resolve: Resolver | None) -> Path:
    source = config.source
    if resolve is not None:
        path = Path(resolve(source))
    else:
        if source.startswith("file://"):
            source = source[len("file://") :]
        elif "://" in source:
            raise DataError(f"data.source: '{config.source}' is remote, and no storage is configured to fetch it")
        path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.source: no such file or folder: {path}")
    # The real path, once a queue job may read it: a symlink under an allowed prefix may lead anywhere.
    return check_local_read(path, config.source)


def _display_name(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def take_first(dataset: ImageDataset, limit: int | None) -> ImageDataset:
    """The first ``limit`` rows (all of them when ``limit`` is None or not smaller than the data set)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.subset(torch.arange(limit))


def open_dataset(config: DataConfig, resolve: Resolver | None = None) -> ImageDataset:
    """The data set ``config.source`` names, cut to ``config.limit`` rows."""
    if config.source.startswith(BUILTIN_PREFIX):
        return BUILTINS[_builtin(config)](limit=config.limit)
    path = _local_path(config, resolve)
    return take_first(read_local(path, config, name=_display_name(config.source)), config.limit)


def known_factor_names(config: DataConfig) -> tuple[str, ...] | None:
    """The factor names of a builtin data set, known without opening it; None for files (their reader names their
    factors, and the training loop checks ``eval.factors`` against them before its first step)."""
    if config.source.startswith(BUILTIN_PREFIX):
        return _BUILTIN_FACTOR_NAMES.get(_builtin(config))
    return None


def check_source(config: DataConfig, resolve: Resolver | None = None) -> tuple[int, tuple[int, int, int], bool]:
    """(example count before ``limit``, image shape (C, H, W), has ground-truth factors), reading headers only
    (IDX, npz, HDF5) or one image (folders): cheap enough to run when a spec is validated."""
    if config.source.startswith(BUILTIN_PREFIX):
        return _BUILTIN_HEADERS[_builtin(config)]
    path = _local_path(config, resolve)
    fmt = _format_of(path, config)
    if fmt == "idx":
        dims = read_idx_header(path, IMAGES_MAGIC)
        if len(dims) != 3:
            raise DataError(f"{path}: IDX images must have 3 dimensions (N, H, W), not {len(dims)}")
        return dims[0], (1, dims[1], dims[2]), False
    if fmt == "npz":
        return read_npz_header(path)
    if fmt == "hdf5":
        return read_shapes3d_header(path)
    count, shape = read_folder_header(path, config.image_size, config.grayscale)
    return count, shape, False


def train_val_split(dataset: ImageDataset, val_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """A random split that depends only on (len(dataset), val_fraction, seed); both parts keep the data set's
    row order. A positive fraction of a data set of at least 2 rows gives at least one validation row."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
    n = len(dataset)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_rows, train_rows = perm[:n_val].sort().values, perm[n_val:].sort().values
    return dataset.subset(train_rows), dataset.subset(val_rows)


def shard(dataset: ImageDataset, rank: int, world_size: int, seed: int) -> ImageDataset:
    """Rank ``rank``'s part of a seeded permutation: disjoint across ranks and of equal size (the remainder of
    ``len(dataset) / world_size`` rows is left out), so every rank runs the same number of steps."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if world_size == 1:
        return dataset
    n = len(dataset)
    per_rank = n // world_size
    if per_rank == 0:
        raise DataError(f"data set '{dataset.name}' has {n} rows, fewer than the {world_size} workers sharing it")
    # A stream apart from train_val_split's, so the shards are not a function of the validation draw.
    gen = torch.Generator().manual_seed(seed * 7919 + 104_729)
    rows = torch.randperm(n, generator=gen)[rank * per_rank : (rank + 1) * per_rank].sort().values
    return dataset.subset(rows)


@dataclass
class PreparedData:
    full: ImageDataset
    train: ImageDataset
    val: ImageDataset

    @property
    def ground_truth(self) -> ImageDataset | None:
        """The whole data set when it has ground-truth factors (what the disentanglement scores draw from)."""
        return self.full if self.full.has_factors else None


def prepare(config: DataConfig, seed: int, resolve: Resolver | None = None) -> PreparedData:
    """Open the data and split it; the split depends on the seed only, so every worker gets the same one. With
    ``val_fraction: 0`` the evaluation uses the training data."""
    full = open_dataset(config, resolve=resolve)
    train_part, val_part = train_val_split(full, config.val_fraction, seed)
    return PreparedData(full=full, train=train_part, val=val_part if len(val_part) else train_part)
