"""workers.data.summary: what `data push` finds by opening the files with the reader a job uses (small files in the
exact layouts of dSprites, 3D Shapes, MPI3D, CelebA, MNIST), and what it refuses, naming the user's file."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from tests.workers.data.test_known_files import (
    DSPRITES_NAME,
    SMALL_GRID,
    every_value,
    grid,
    labels_of,
    shapes3d_images,
    write_dsprites,
    write_h5,
)
from tests.workers.data.test_readers import IMAGES, LABELS, write_idx, write_png
from workers.data import mpi3d
from workers.data.base import DataError
from workers.data.idx import IMAGES_MAGIC, LABELS_MAGIC
from workers.data.summary import DataSummary, summarize

DSPRITES_FACTORS = (("shape", 3), ("scale", 6), ("orientation", 40), ("pos_x", 32), ("pos_y", 32))
SHAPES3D_FACTORS = (
    ("floor_hue", 10),
    ("wall_hue", 10),
    ("object_hue", 10),
    ("scale", 8),
    ("shape", 4),
    ("orientation", 15),
)


def test_dsprites_npz(tmp_path):
    factors = np.array(list(itertools.product(range(3), [0, 5], [0, 39], [0, 31], [1, 30])), np.int64)
    path = tmp_path / DSPRITES_NAME
    write_dsprites(path, factors)
    summary = summarize([path])
    assert summary == DataSummary(48, (1, 64, 64), None, DSPRITES_FACTORS)
    assert summary.manifest_fields() == {
        "examples": 48,
        "image_shape": [1, 64, 64],
        "classes": None,
        "factors": [{"name": n, "size": s} for n, s in DSPRITES_FACTORS],
    }


def test_shapes3d_h5(tmp_path):
    factors = every_value(30)
    path = write_h5(tmp_path / "3dshapes.h5", shapes3d_images(factors), labels_of(factors))
    assert summarize([path]) == DataSummary(30, (3, 64, 64), None, SHAPES3D_FACTORS)


def test_mpi3d_npz(tmp_path, monkeypatch):
    monkeypatch.setattr(mpi3d, "GRID", SMALL_GRID)
    sizes = tuple(s for _, s in SMALL_GRID)
    path = tmp_path / "mpi3d_toy.npz"
    np.savez(path, images=shapes3d_images(grid(sizes)))
    assert summarize([path]) == DataSummary(72, (3, 64, 64), None, SMALL_GRID)


def test_celeba_folder_is_scanned_with_the_stored_size(tmp_path):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((218, 178, 3), 40 * i, np.uint8)).save(folder / f"{i + 1:06d}.jpg")
    (folder / "list_attr_celeba.txt").write_text("not an image: uploaded, not read\n")
    assert summarize([folder]) == DataSummary(4, (3, 218, 178), None, None)
    assert summarize([folder], "folder") == DataSummary(4, (3, 218, 178), None, None)


def test_folder_by_class_with_mixed_sizes(tmp_path):
    for i in range(2):
        write_png(tmp_path / "cats" / f"c{i}.png", np.zeros((20, 30), np.uint8))
        write_png(tmp_path / "dogs" / f"d{i}.png", np.zeros((24, 24), np.uint8))
        write_png(tmp_path / "owls" / f"o{i}.png", np.zeros((24, 24), np.uint8))
    assert summarize([tmp_path]) == DataSummary(6, None, 3, None)


def test_idx_labels_count_only_when_pushed_with_the_images(tmp_path):
    images = write_idx(tmp_path / "train-images-idx3-ubyte", IMAGES, IMAGES_MAGIC)
    labels = write_idx(tmp_path / "train-labels-idx1-ubyte", LABELS, LABELS_MAGIC)
    classes = int(LABELS.max()) + 1
    assert summarize([images, labels]) == DataSummary(20, (1, 28, 28), classes, None)
    # The labels lie next to the images here, but a job gets only what was pushed: no labels.
    assert summarize([images]) == DataSummary(20, (1, 28, 28), None, None)


def test_npz_with_labels(tmp_path):
    path = tmp_path / "faces.npz"
    np.savez(path, images=np.zeros((5, 16, 16, 3), np.uint8), labels=np.array([0, 1, 2, 1, 0]))
    assert summarize([path]) == DataSummary(5, (3, 16, 16), 3, None)


@pytest.mark.parametrize(
    "name,fault",
    [
        ("train-images.idx", "magic number"),
        ("faces.npz", "cannot read the .npz archive"),
        ("3dshapes.h5", "cannot read the HDF5 file"),
        ("mpi3d_toy.npz", "cannot read the .npz archive"),
    ],
)
def test_random_bytes_are_refused_naming_the_file(tmp_path, name, fault):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(3).bytes(4096))
    with pytest.raises(DataError, match=fault) as info:
        summarize([path])
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "aeforge-push-" not in message  # the user's file, not the staging link


def test_refusals_of_folders_formats_and_empty_files(tmp_path):
    folder = tmp_path / "faces"
    write_png(folder / "a.png", np.zeros((8, 8), np.uint8))
    (folder / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="cannot read the image") as info:
        summarize([folder])
    assert str(folder / "b.jpg") in str(info.value)
    with pytest.raises(DataError, match="does not apply to a folder"):
        summarize([folder], "npz")
    empty = tmp_path / "empty.npz"
    np.savez(empty, images=np.zeros((0, 8, 8), np.uint8))
    with pytest.raises(DataError, match=f"^{empty}: holds no images$"):
        summarize([empty])
    with pytest.raises(DataError, match="format 'folder' needs a folder"):
        summarize([empty], "folder")
    labels = write_idx(tmp_path / "train-labels-idx1-ubyte", LABELS, LABELS_MAGIC)
    with pytest.raises(DataError, match=r"\(an IDX labels file\), expected 2051") as info:
        summarize([labels], "idx")  # the labels given first: a job would read them as the images
    assert str(info.value).startswith(str(labels))
