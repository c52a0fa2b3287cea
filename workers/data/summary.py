"""What a data file or folder holds, found by opening it with the reader a job will use: the check `aeforge data
push` makes before uploading anything, and what it records in the dataset's manifest (``aeforge data ls`` shows it).

Files are read as a job reads them after the download: side by side under their own names, the first one being the
data set (so an IDX images file finds its labels only when they are pushed with it). A folder of images is scanned
rather than decoded whole (a CelebA folder is 200,000 JPEGs): every image's header is read, which refuses files
that are not images, and the first and last images are decoded in full.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from workers.config import DataConfig
from workers.data import read_local
from workers.data.base import DataError, ImageDataset
from workers.data.folder import class_names, image_files


@dataclass(frozen=True)
class DataSummary:
    """``image_shape`` is (C, H, W) as stored (None: a folder of images of different sizes, which a job resizes
    with ``data.image_size``); ``classes`` the number of label classes (None: no labels); ``factors`` the
    ground-truth factors as (name, number of values) (None: none)."""

    examples: int
    image_shape: tuple[int, int, int] | None
    classes: int | None
    factors: tuple[tuple[str, int], ...] | None

    def manifest_fields(self) -> dict[str, Any]:
        """The JSON fields a dataset manifest records (see workers.storage.datasets)."""
        return {
            "examples": self.examples,
            "image_shape": None if self.image_shape is None else list(self.image_shape),
            "classes": self.classes,
            "factors": None if self.factors is None else [{"name": n, "size": s} for n, s in self.factors],
        }


def summarize_dataset(dataset: ImageDataset, where: str | Path | None = None) -> DataSummary:
    """The summary of an opened data set, after reading its first and last images (a lazy reader has read none);
    ``where`` names the file in errors (default: the data set's name)."""
    n = len(dataset)
    if n == 0:
        raise DataError(f"{where or dataset.name}: holds no images")
    dataset.images(torch.tensor(sorted({0, n - 1})))
    factors = None
    if dataset.has_factors:
        factors = tuple(
            (str(name), int(size)) for name, size in zip(dataset.require_factor_names(), dataset.require_factor_sizes())
        )
    classes = dataset.num_classes if dataset.labels is not None else None
    channels, height, width = dataset.image_shape
    return DataSummary(n, (int(channels), int(height), int(width)), classes, factors)


def _decoded(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot read the image: {exc}") from None


def summarize_folder(folder: str | Path) -> DataSummary:
    """Count the images of a folder (as ``read_folder`` finds them), read each one's header, decode the first and
    the last; classes are the top-level subfolders when the folder is laid out by class."""
    folder = Path(folder)
    files = image_files(folder)
    shapes = set()
    for path in files:
        try:
            with Image.open(path) as image:  # reads the header only
                shapes.add((len(image.getbands()), image.height, image.width))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{path}: cannot read the image: {exc}") from None
    for path in {files[0], files[-1]}:
        _decoded(path)
    classes = class_names(folder, files)
    return DataSummary(
        len(files), shapes.pop() if len(shapes) == 1 else None, None if classes is None else len(classes), None
    )


def summarize(paths: Sequence[str | Path], format: str | None = None) -> DataSummary:
    """The summary of what `aeforge data push` uploads: one folder, or files whose first is the data set, read
    with ``format`` (inferred from the first name when None). Raises DataError naming the file and the fault."""
    local_paths = [Path(p) for p in paths]
    if not local_paths:
        raise DataError("no files to read")
    if len(local_paths) == 1 and local_paths[0].is_dir():
        if format not in (None, "folder"):
            raise DataError(f"{local_paths[0]}: format '{format}' does not apply to a folder (use folder)")
        return summarize_folder(local_paths[0])
    if format == "folder":
        raise DataError(f"{local_paths[0]}: format 'folder' needs a folder; this is a file")
    with tempfile.TemporaryDirectory(prefix="aeforge-push-") as staging:
        # The job's view of the files: links under their dataset names, side by side.
        links = {}
        for path in local_paths:
            link = Path(staging) / path.name
            link.symlink_to(path.resolve())
            links[str(link)] = str(path)
        first = Path(staging) / local_paths[0].name
        try:
            return summarize_dataset(read_local(first, DataConfig(source=str(first), format=format)), local_paths[0])
        except DataError as exc:
            message = str(exc)
            for link_name, original in sorted(links.items(), key=lambda item: -len(item[0])):
                message = message.replace(link_name, original)  # name the user's files, not the links
            raise DataError(message) from None
