"""A folder of PNG/JPEG images, searched recursively.

Like torchvision's ImageFolder, the top-level subfolders are classes (labels in sorted-name order) when there is
more than one of them and no image sits directly in the folder. Each image is resized so its shorter side is
``image_size`` and centre-cropped to a square, then converted to grayscale or RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from workers.data.base import DataError, ImageDataset
from workers.storage.read_access import check_local_read

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden files and folders skipped), in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    files = [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    if not files:
        raise DataError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files, recursively)")
    return sorted(files)


def class_names(folder: Path, files: list[Path]) -> list[str] | None:
    """The class names (top-level subfolders, sorted), or None when the folder is not laid out by class."""
    tops = [p.relative_to(folder).parts for p in files]
    if any(len(parts) == 1 for parts in tops):
        return None
    names = sorted({parts[0] for parts in tops})
    return names if len(names) > 1 else None


def _open_image(path: Path) -> Image.Image:
    real = check_local_read(path)  # each file: one may be a symlink out of the folder a queue job may read
    try:
        with Image.open(real) as image:
            image.load()  # decode now, so the file can close and a damaged file fails here
        return image
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot read the image: {exc}") from None


def _fit(image: Image.Image, size: int | None, grayscale: bool) -> Image.Image:
    image = image.convert("L" if grayscale else "RGB")
    if size is None:
        return image
    width, height = image.size
    ratio = size / min(width, height)
    resized = (max(size, round(width * ratio)), max(size, round(height * ratio)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_shape_of(path: str | Path, image_size: int | None, grayscale: bool) -> tuple[int, int, int]:
    """(C, H, W) that an image becomes after :func:`read_folder`'s resizing and conversion."""
    channels = 1 if grayscale else 3
    if image_size is not None:
        _open_image(Path(path))  # readable at all
        return (channels, image_size, image_size)
    width, height = _open_image(Path(path)).size
    return (channels, height, width)


def read_folder_header(folder: str | Path, image_size: int | None, grayscale: bool) -> tuple[int, tuple[int, int, int]]:
    """(image count, (C, H, W)), opening one image only."""
    files = image_files(folder)
    return len(files), image_shape_of(files[0], image_size, grayscale)


def read_folder(
    folder: str | Path, image_size: int | None = None, grayscale: bool = True, name: str | None = None
) -> ImageDataset:
    """All images of a folder; without ``image_size`` they must all have the same size already."""
    folder = Path(folder)
    files = image_files(folder)
    classes = class_names(folder, files)
    arrays: list[np.ndarray] = []
    for path in files:
        image = _fit(_open_image(path), image_size, grayscale)
        array = np.asarray(image, dtype=np.uint8)
        if arrays and array.shape != arrays[0].shape:
            raise DataError(
                f"{path}: size {image.size[0]}x{image.size[1]} differs from {files[0]}'s "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; set data.image_size to resize and crop all images"
            )
        arrays.append(array)
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if stacked.ndim == 3 else np.moveaxis(stacked, 3, 1)
    labels = None
    if classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[p.relative_to(folder).parts[0]] for p in files], dtype=torch.long)
    return ImageDataset(
        name or folder.name,
        torch.from_numpy(np.ascontiguousarray(stacked)),
        labels=labels,
        num_classes=None if classes is None else len(classes),
    )
