import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workers.data.base import DataError
from workers.data.folder import read_folder
from workers.data.idx import IMAGES_MAGIC, LABELS_MAGIC, labels_path_for, read_idx, read_idx_header
from workers.data.npz import read_npz, read_npz_header

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
LABELS = RNG.integers(0, 10, size=20, dtype=np.uint8)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = False) -> Path:
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


# --- IDX -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_idx_pair_with_the_usual_names(tmp_path, compress):
    suffix = ".gz" if compress else ""
    images = write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", IMAGES, IMAGES_MAGIC, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", LABELS, LABELS_MAGIC, compress)
    data = read_idx(images)
    assert len(data) == 20 and data.image_shape == (1, 28, 28)
    assert torch.equal(data.images(torch.arange(20)), torch.from_numpy(IMAGES).float().unsqueeze(1) / 255)
    assert data.labels.tolist() == LABELS.tolist() and data.num_classes == int(LABELS.max()) + 1
    assert read_idx_header(images) == (20, 28, 28)


def test_idx_gzip_is_detected_by_content_and_labels_by_name(tmp_path):
    # gzip-compressed but not called .gz; the labels file is raw and called .gz-less "X-labels.idx"
    images = write_idx(tmp_path / "digits-images.idx", IMAGES, IMAGES_MAGIC, compress=True)
    write_idx(tmp_path / "digits-labels.idx", LABELS, LABELS_MAGIC)
    data = read_idx(images)
    assert data.labels.tolist() == LABELS.tolist()
    assert torch.equal(data.images(torch.tensor([7])), torch.from_numpy(IMAGES[7:8]).float().unsqueeze(1) / 255)
    # t10k names, labels compressed while images are not
    t10k = write_idx(tmp_path / "t10k-images-idx3-ubyte", IMAGES, IMAGES_MAGIC)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", LABELS[::-1].copy(), LABELS_MAGIC, compress=True)
    assert labels_path_for(t10k) == tmp_path / "t10k-labels-idx1-ubyte.gz"
    assert read_idx(t10k).labels.tolist() == LABELS[::-1].tolist()


def test_idx_without_labels_and_with_explicit_labels(tmp_path):
    images = write_idx(tmp_path / "mnist-train.idx.gz", IMAGES, IMAGES_MAGIC, compress=True)
    assert read_idx(images).labels is None
    other = write_idx(tmp_path / "elsewhere.bin", LABELS, LABELS_MAGIC)
    assert read_idx(images, labels_path=other).labels.tolist() == LABELS.tolist()


def test_idx_wrong_magic_names_the_file(tmp_path):
    labels_as_images = write_idx(tmp_path / "train-labels-idx1-ubyte", LABELS, LABELS_MAGIC)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: magic number 2049 .*expected 2051"):
        read_idx(labels_as_images)
    junk = tmp_path / "junk-idx3-ubyte"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DataError, match="junk-idx3-ubyte: magic number"):
        read_idx(junk)


def test_idx_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "cut-images-idx3-ubyte"
    path.write_bytes(idx_bytes(IMAGES, IMAGES_MAGIC)[:-100])
    with pytest.raises(
        DataError, match=r"cut-images-idx3-ubyte: the header announces 20x28x28 = 15680 values, the file holds 15580"
    ):
        read_idx(path)
    gz = tmp_path / "cut-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(idx_bytes(IMAGES, IMAGES_MAGIC))[:-50])
    with pytest.raises(DataError, match="cut-images-idx3-ubyte.gz"):
        read_idx(gz)


def test_idx_label_count_mismatch_names_the_file(tmp_path):
    images = write_idx(tmp_path / "train-images-idx3-ubyte", IMAGES, IMAGES_MAGIC)
    write_idx(tmp_path / "train-labels-idx1-ubyte", LABELS[:19], LABELS_MAGIC)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: 19 labels for 20 images"):
        read_idx(images)


def test_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothing-idx3-ubyte: no such file"):
        read_idx(tmp_path / "nothing-idx3-ubyte")


# --- npz -------------------------------------------------------------------------------------------------


def test_npz_layouts_and_dtypes(tmp_path):
    nhwc = RNG.integers(0, 256, size=(6, 12, 10, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=nhwc, y=np.arange(6) % 2)
    data = read_npz(tmp_path / "rgb.npz")
    assert data.image_shape == (3, 12, 10) and data.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert torch.equal(data.images(torch.arange(6)), torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255)

    nchw = np.moveaxis(nhwc, 3, 1)
    np.savez_compressed(tmp_path / "chw.npz", x=nchw)
    assert torch.equal(read_npz(tmp_path / "chw.npz").images(torch.arange(6)), data.images(torch.arange(6)))
    assert read_npz_header(tmp_path / "chw.npz") == (6, (3, 12, 10), False)

    binary = RNG.random((5, 8, 8)) > 0.5
    np.savez(tmp_path / "bool.npz", imgs=binary)
    assert torch.equal(
        read_npz(tmp_path / "bool.npz").images(torch.arange(5)), torch.from_numpy(binary).float().unsqueeze(1)
    )

    floats = RNG.random((4, 8, 8, 1)).astype(np.float32)
    np.savez(tmp_path / "float.npz", images=floats)
    served = read_npz(tmp_path / "float.npz").images(torch.arange(4))
    assert served.shape == (4, 1, 8, 8)
    assert float((served - torch.from_numpy(floats).permute(0, 3, 1, 2)).abs().max()) <= 0.5 / 255 + 1e-6


def test_npz_factors(tmp_path):
    factors = np.stack(np.meshgrid(np.arange(3), np.arange(4), indexing="ij"), -1).reshape(-1, 2)  # 12 x 2
    images = RNG.integers(0, 256, size=(12, 8, 8), dtype=np.uint8)
    np.savez(
        tmp_path / "named.npz",
        images=images,
        factors=factors,
        factor_names=np.array(["colour", "size"]),
        factor_sizes=np.array([3, 5]),
    )
    data = read_npz(tmp_path / "named.npz")
    assert data.has_factors and data.factor_names == ("colour", "size") and data.factor_sizes == (3, 5)
    assert data.factors(torch.tensor([0, 5, 11])).tolist() == [[0, 0], [1, 1], [2, 3]]
    assert read_npz_header(tmp_path / "named.npz") == (12, (1, 8, 8), True)

    np.savez(tmp_path / "bare.npz", images=images, factors=factors)
    bare = read_npz(tmp_path / "bare.npz")
    assert bare.factor_sizes == (3, 4) and bare.factor_names == ("factor_0", "factor_1")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"pixels": np.zeros((3, 8, 8), np.uint8)}, r"no images array \(expected one of the keys"),
        ({"images": np.full((3, 8, 8), 1.5, np.float32)}, r"float images in 'images' must lie in \[0, 1\]"),
        ({"images": np.full((3, 8, 8), np.nan, np.float32)}, r"must lie in \[0, 1\]"),
        (
            {"images": np.zeros((3, 8, 8), np.uint8), "factors": np.zeros((2, 2), np.int64)},
            r"'factors' has 2 rows for 3 images",
        ),
        (
            {"images": np.zeros((3, 8, 8), np.uint8), "labels": np.zeros(4, np.int64)},
            r"'labels' has 4 rows for 3 images",
        ),
        (
            {"images": np.zeros((3, 8, 8), np.uint8), "factors": np.full((3, 1), 4), "factor_sizes": np.array([3])},
            r"factor column 0 takes value 4, beyond its size 3",
        ),
        ({"images": np.zeros((3, 8), np.uint8)}, r"images must have shape"),
        ({"images": np.zeros((3, 2, 8, 3), np.uint8)}, r"cannot tell the channel axis"),
    ],
)
def test_npz_errors_name_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        read_npz(path)
    assert str(path) in str(info.value)


def test_npz_unreadable_or_missing(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip archive at all")
    for reader in (read_npz, read_npz_header):
        with pytest.raises(DataError, match="garbage.npz: cannot read"):
            reader(path)
    with pytest.raises(DataError, match="absent.npz: no such file"):
        read_npz(tmp_path / "absent.npz")


# --- image folders ---------------------------------------------------------------------------------------


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def banded(width: int, height: int) -> np.ndarray:
    """RGB image: black outer quarters along the longer side, white middle half."""
    array = np.zeros((height, width, 3), np.uint8)
    if width >= height:
        array[:, width // 4 : width - width // 4] = 255
    else:
        array[height // 4 : height - height // 4] = 255
    return array


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "shapes"
    for i in range(3):
        write_png(root / "wide" / f"w{i}.png", banded(40, 20))  # landscape
        write_png(root / "tall" / f"t{i}.png", banded(18, 36))  # portrait
    return root


def test_folder_resize_crop_and_labels(image_folder):
    data = read_folder(image_folder, image_size=16, grayscale=True)
    assert len(data) == 6 and data.image_shape == (1, 16, 16)
    # ImageFolder classes: subfolders in sorted order ("tall" = 0, "wide" = 1), files sorted within.
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1] and data.num_classes == 2
    images = data.images(torch.arange(6))
    # Shorter side to 16, then the centre square: only the white middle half of each picture survives.
    assert float(images.mean()) > 0.95
    rgb = read_folder(image_folder, image_size=12, grayscale=False)
    assert rgb.image_shape == (3, 12, 12)


def test_folder_crop_keeps_the_centre(tmp_path):
    array = np.zeros((20, 40), np.uint8)
    array[:, :20] = 255  # left half white: the centre crop of 20x20 is half white, half black
    write_png(tmp_path / "pics" / "a.png", array)
    image = read_folder(tmp_path / "pics", image_size=20).images(torch.tensor([0]))[0, 0]
    assert float(image[:, :8].mean()) > 0.95 and float(image[:, 12:].mean()) < 0.05


def test_folder_without_classes(tmp_path):
    write_png(tmp_path / "one" / "only" / "a.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "one" / "only" / "b.jpg", np.zeros((8, 8), np.uint8))
    data = read_folder(tmp_path / "one")
    assert data.labels is None and data.image_shape == (1, 8, 8) and len(data) == 2


def test_folder_errors_name_the_folder_or_file(tmp_path, image_folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    with pytest.raises(DataError, match="empty: no images found"):
        read_folder(tmp_path / "empty")
    broken = image_folder / "wide" / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match="broken.png: cannot read the image"):
        read_folder(image_folder, image_size=16)
    broken.unlink()
    with pytest.raises(DataError, match=r"differs from .* set data.image_size"):
        read_folder(image_folder)  # two sizes and no image_size
    with pytest.raises(DataError, match="nowhere: no such folder"):
        read_folder(tmp_path / "nowhere")
