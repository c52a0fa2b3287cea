"""The data sets people already hold, read as distributed: dSprites' npz, 3D Shapes' HDF5, MPI3D's npz, and a
CelebA-style folder of JPEGs. The files here are small, with the real keys, dtypes and layouts."""

import itertools
import pickle
import tracemalloc
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from workers.config import DataConfig
from workers.data import FORMATS, check_source, dsprites_npz, infer_format, mpi3d, open_dataset, read_local, shapes3d
from workers.data.base import DataError
from workers.data.lazy import GridImageDataset, LazyImageDataset, MemmapStore
from workers.metrics.factor_vae import factor_vae_score
from workers.metrics.mig import mig
from workers.metrics.sampling import FactorSampler

DSPRITES_NAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
# 3D Shapes' label values (from its generating code): hues in [0, 1), scale, shape id, orientation in degrees.
SHAPES3D_VALUES = (
    np.linspace(0.0, 0.9, 10),
    np.linspace(0.0, 0.9, 10),
    np.linspace(0.0, 0.9, 10),
    np.linspace(0.75, 1.25, 8),
    np.arange(4.0),
    np.linspace(-30.0, 30.0, 15),
)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def grid(sizes) -> np.ndarray:
    return np.array(list(itertools.product(*[range(s) for s in sizes])), dtype=np.int64).reshape(-1, len(sizes))


def check_mig(data, decode, k):
    """MIG of a representation that reads the factors back from the images is high, of random codes about 0.

    (Far from 1 on a few rows that hold every value but not every combination: there the factors are not
    independent, and one factor's code tells about the others.)"""
    g = seeded(5)

    def aligned(x):
        f = decode(x).float()
        return torch.cat([f + 0.01 * torch.randn(f.shape, generator=g), torch.randn(len(f), 2, generator=g)], 1)

    assert mig(aligned, data, 300, batch_size=64, generator=seeded()) > 0.6
    assert mig(lambda x: torch.randn(len(x), k + 2, generator=g), data, 300, batch_size=64, generator=seeded()) < 0.1


# --- dSprites --------------------------------------------------------------------------------------------------


def dsprites_images(factors: np.ndarray, seed: int = 0) -> np.ndarray:
    """0/1 uint8 (N, 64, 64): random pixels, with factor k written in binary in the first 6 pixels of row k."""
    imgs = np.random.default_rng(seed).integers(0, 2, (len(factors), 64, 64), dtype=np.uint8)
    bits = (factors[:, :, None] >> np.arange(6)) & 1  # (N, 5, 6)
    imgs[:, : factors.shape[1], :6] = bits
    return imgs


def decode_dsprites(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0, :5, :6].round().long() << torch.arange(6)).sum(dim=2)


def write_dsprites(
    path: Path,
    factors: np.ndarray,
    compressed: bool = True,
    imgs: np.ndarray | None = None,
    colour: np.ndarray | None = None,
) -> np.ndarray:
    """A file laid out as DeepMind's: imgs, latents_classes (colour first), latents_values, metadata (a pickle)."""
    n = len(factors)
    imgs = dsprites_images(factors) if imgs is None else imgs
    colour = np.zeros((n, 1), np.int64) if colour is None else colour
    classes = np.concatenate([colour, factors], axis=1).astype(np.int64)
    metadata = np.array(
        {
            "date": "April 2017",
            "description": "Disentanglement test Sprites dataset.",
            "latents_names": ("color", "shape", "scale", "orientation", "posX", "posY"),
            "latents_sizes": np.array([1, 3, 6, 40, 32, 32]),
        },
        dtype=object,
    )
    save = np.savez_compressed if compressed else np.savez
    save(path, imgs=imgs, latents_classes=classes, latents_values=classes.astype(np.float64) / 7.0, metadata=metadata)
    return imgs


@pytest.fixture
def dsprites_part(tmp_path):
    """A few hundred rows of the real grid: every shape, some scales, orientations and positions."""
    factors = np.array(list(itertools.product(range(3), [0, 2, 5], [0, 13, 39], [0, 16, 31], [1, 30])), np.int64)
    path = tmp_path / DSPRITES_NAME
    imgs = write_dsprites(path, factors)
    return path, factors, imgs


def test_dsprites_file_images_factors_and_header(dsprites_part):
    path, factors, imgs = dsprites_part
    n = len(factors)
    assert n == 162 and infer_format(path) == "npz"
    config = DataConfig(source=str(path))
    data = open_dataset(config)
    assert isinstance(data, LazyImageDataset) and not isinstance(data, GridImageDataset)  # a part of the grid
    assert len(data) == n and data.image_shape == (1, 64, 64) and data.has_factors
    assert data.factor_names == ("shape", "scale", "orientation", "pos_x", "pos_y")
    assert data.factor_sizes == (3, 6, 40, 32, 32)
    assert check_source(config) == (n, (1, 64, 64), True)
    # pixel value 1 is white: 1.0 as a float image (255 as uint8)
    assert torch.equal(data.images(torch.arange(n)), torch.from_numpy(imgs).float().unsqueeze(1))
    assert data.factors(torch.arange(n)).dtype == torch.long
    assert torch.equal(data.factors(torch.arange(n)), torch.from_numpy(factors))
    # bit-packed: 512 bytes an image, plus the factor table as uint8
    assert data.store.nbytes() == n * 512 and data.nbytes() == n * 512 + n * 5

    rows = torch.tensor([100, 3, 3, 57])
    part = data.subset(rows)
    assert len(part) == 4 and torch.equal(part.images(torch.arange(4)), data.images(rows))
    assert torch.equal(part.factors(torch.arange(4)), torch.from_numpy(factors[[100, 3, 3, 57]]))
    assert part.store is data.store  # the same packed bits
    limited = open_dataset(DataConfig(source=str(path), limit=10))
    assert len(limited) == 10 and torch.equal(limited.images(torch.arange(10)), data.images(torch.arange(10)))

    # Generic images_from_factors: a row with those factors
    wanted = torch.from_numpy(factors[[7, 150]])
    assert torch.equal(data.images_from_factors(wanted, seeded()), data.images(torch.tensor([7, 150])))
    assert not FactorSampler(data).renders  # a part of the grid: the metrics draw rows
    check_mig(data, decode_dsprites, 5)


def test_dsprites_metadata_is_never_unpickled(dsprites_part, monkeypatch):
    path, factors, _ = dsprites_part

    def refuse(*args, **kwargs):
        raise AssertionError("a user's pickle was unpickled")

    real_load, real_read_array = np.load, np.lib.format.read_array

    def guarded_load(*args, allow_pickle=False, **kwargs):
        assert not allow_pickle, "np.load with allow_pickle=True"
        return real_load(*args, allow_pickle=False, **kwargs)

    def guarded_read_array(*args, allow_pickle=False, **kwargs):
        assert not allow_pickle, "read_array with allow_pickle=True"
        return real_read_array(*args, allow_pickle=False, **kwargs)

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", guarded_load)
    monkeypatch.setattr(np.lib.format, "read_array", guarded_read_array)
    with zipfile.ZipFile(path) as archive, archive.open("metadata.npy") as f:  # the trap is armed
        with pytest.raises(AssertionError):
            real_read_array(f, allow_pickle=True)

    config = DataConfig(source=str(path))
    assert check_source(config) == (len(factors), (1, 64, 64), True)
    data = open_dataset(config)
    assert torch.equal(data.factors(torch.arange(len(factors))), torch.from_numpy(factors))


def test_dsprites_reads_in_chunks_and_peaks_near_the_packed_size(tmp_path, monkeypatch):
    factors = grid((3, 6, 4, 4, 7))  # 2016 rows: 8.3 MB as uint8, 1 MB packed
    path = tmp_path / DSPRITES_NAME
    imgs = write_dsprites(path, factors)
    monkeypatch.setattr(dsprites_npz, "CHUNK_BYTES", 50 * 4096)  # 41 chunks, the last one short
    tracemalloc.start()
    try:
        data = read_local(path, DataConfig(source=str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(data.images(torch.arange(len(factors))), torch.from_numpy(imgs).float().unsqueeze(1))
    assert data.store.nbytes() == imgs.nbytes // 8
    # packed (1 MB) + a few times one chunk (the zip stream's buffers), far below the 8.3 MB of unpacked pixels
    assert peak < data.store.nbytes() + 8 * dsprites_npz.CHUNK_BYTES < imgs.nbytes / 2, f"peak {peak} bytes"


def test_dsprites_full_grid_renders_any_factors(tmp_path, monkeypatch):
    sizes = (3, 2, 2, 2, 3)
    monkeypatch.setattr(dsprites_npz, "FACTOR_SIZES", sizes)
    factors = grid(sizes)
    in_order = tmp_path / DSPRITES_NAME
    imgs = write_dsprites(in_order, factors, compressed=False)
    data = read_local(in_order, DataConfig(source=str(in_order)))
    assert isinstance(data, GridImageDataset) and data._factors is None  # row-major grid: no table kept
    assert torch.equal(data.factors(torch.arange(len(factors))), torch.from_numpy(factors))
    assert FactorSampler(data).renders

    perm = np.random.default_rng(3).permutation(len(factors))
    shuffled = tmp_path / "shuffled" / DSPRITES_NAME
    shuffled.parent.mkdir()
    write_dsprites(shuffled, factors[perm], imgs=imgs[perm])
    other = read_local(shuffled, DataConfig(source=str(shuffled)))
    assert isinstance(other, GridImageDataset) and other._factors is not None
    wanted = torch.tensor([[2, 1, 0, 1, 2], [0, 0, 1, 0, 0]])
    rows = [int(np.ravel_multi_index(tuple(w), sizes)) for w in wanted.tolist()]
    expected = torch.from_numpy(imgs[rows]).float().unsqueeze(1)
    view = other.subset(torch.tensor([0, 1]))  # any combination, also outside the view
    for d in (data, other, view):
        assert torch.equal(d.images_from_factors(wanted), expected)
    with pytest.raises(DataError, match="out of range"):
        data.images_from_factors(torch.tensor([[3, 0, 0, 0, 0]]))
    with pytest.raises(DataError, match=r"shape \(B, 5\)"):
        data.images_from_factors(torch.zeros(2, 4, dtype=torch.long))
    score = factor_vae_score(
        lambda x: decode_dsprites(x).float() + 0.01 * torch.randn(len(x), 5), other, 40, 20, 100, 16, 64, seeded()
    )
    assert score["eval_accuracy"] > 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_dsprites_packed_bits_unpack_on_the_gpu(tmp_path):
    factors = grid((3, 6, 2, 2, 3))
    path = tmp_path / DSPRITES_NAME
    imgs = write_dsprites(path, factors)
    data = read_local(path, DataConfig(source=str(path)))
    part = data.subset(torch.arange(5, 105))
    expected = part.images(torch.arange(100))
    on_gpu = part.to("cuda")
    assert on_gpu.device.type == "cuda" and on_gpu.store.nbytes() == len(factors) * 512
    index = torch.randperm(100, device="cuda")
    x = on_gpu.images(index)
    assert x.device.type == "cuda" and torch.equal(x.cpu(), expected[index.cpu()])
    assert torch.equal(on_gpu.factors(index), torch.from_numpy(factors[5:105])[index.cpu()])
    assert torch.equal(x.cpu(), torch.from_numpy(imgs[5:105]).float().unsqueeze(1)[index.cpu()])


@pytest.mark.parametrize(
    "change, message",
    [
        ("values", r"'imgs' holds the value 255; dSprites pixels are 0 or 1"),
        ("colour", r"the colour column of 'latents_classes' varies"),
        ("range", r"must take values 0..size-1 with sizes \[3, 6, 40, 32, 32\]"),
        ("columns", r"'latents_classes' must be an integer array \(N, 6\)"),
    ],
)
def test_dsprites_errors_name_the_file(tmp_path, change, message):
    factors = grid((3, 2, 1, 1, 2))
    imgs = dsprites_images(factors)
    path = tmp_path / DSPRITES_NAME
    if change == "values":
        write_dsprites(path, factors, imgs=imgs * 255)
    elif change == "colour":
        write_dsprites(path, factors, colour=np.arange(len(factors))[:, None] % 2)
    elif change == "range":
        write_dsprites(path, factors + np.array([0, 0, 0, 0, 32]))
    else:
        np.savez(path, imgs=imgs, latents_classes=factors)
    with pytest.raises(DataError, match=message) as info:
        read_local(path, DataConfig(source=str(path)))
    assert str(path) in str(info.value)
    if change == "columns":
        with pytest.raises(DataError, match=message):
            check_source(DataConfig(source=str(path)))


# --- 3D Shapes -------------------------------------------------------------------------------------------------


def shapes3d_images(factors: np.ndarray, seed: int = 1) -> np.ndarray:
    """uint8 (N, 64, 64, 3): noise, with factor k in pixel (0, k) of the red channel."""
    images = np.random.default_rng(seed).integers(0, 256, (len(factors), 64, 64, 3), dtype=np.uint8)
    images[:, 0, : factors.shape[1], 0] = factors
    return images


def decode_rgb(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.round(x[:, 0, 0, :k] * 255).long()


def write_h5(path: Path, images: np.ndarray, labels: np.ndarray, chunks=None) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=chunks)
        f.create_dataset("labels", data=labels)
    return path


def every_value(n: int, sizes=(10, 10, 10, 8, 4, 15), seed: int = 6) -> np.ndarray:
    """n rows of grid indices in which every column takes each of its values (independently shuffled)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.arange(n) % s) for s in sizes], axis=1)


def labels_of(factors: np.ndarray, values=SHAPES3D_VALUES) -> np.ndarray:
    return np.stack([np.asarray(values[k])[factors[:, k]] for k in range(factors.shape[1])], axis=1).astype(np.float64)


def test_shapes3d_h5_lazily_with_the_real_label_values(tmp_path):
    factors = every_value(120)  # every column takes every one of its real values (not every combination)
    images = shapes3d_images(factors)
    path = write_h5(tmp_path / "3dshapes.h5", images, labels_of(factors), chunks=(1, 64, 64, 3))
    assert infer_format(path) == "hdf5" and infer_format(tmp_path / "x.HDF5") == "hdf5" and "hdf5" in FORMATS
    config = DataConfig(source=str(path))
    assert check_source(config) == (120, (3, 64, 64), True)
    data = open_dataset(config)
    assert type(data) is LazyImageDataset and isinstance(data.store, shapes3d.H5Store)
    assert data.factor_names == ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
    assert data.factor_sizes == (10, 10, 10, 8, 4, 15)
    assert torch.equal(data.factors(torch.arange(120)), torch.from_numpy(factors))
    chw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(data.images(torch.arange(120)), chw)
    rows = torch.tensor([77, 3, 119, 3, 0])  # out of order, with a repeat: HDF5 is read in increasing order
    assert torch.equal(data.images(rows), chw[rows])
    runs = torch.tensor([41, 12, 10, 40, 11, 90, 42, 119])  # read as the runs 10-12, 40-42, 90, 119
    assert torch.equal(data.images(runs), chw[runs])
    assert data.store.nbytes() == 0  # no image is held

    part = data.subset(torch.tensor([5, 60, 61]))
    assert part.store is data.store and torch.equal(part.images(torch.tensor([2, 0])), chw[[61, 5]])
    assert torch.equal(part.factors(torch.arange(3)), torch.from_numpy(factors[[5, 60, 61]]))
    moved = part.to("cuda")  # names a device without needing one: a file stays a file
    assert moved.store is data.store and moved.device == torch.device("cpu")

    assert torch.equal(data.images_from_factors(torch.from_numpy(factors[[9, 40]]), seeded()), chw[[9, 40]])
    check_mig(data, lambda x: decode_rgb(x, 6), 6)


def test_shapes3d_small_full_grid_and_shuffled(tmp_path, monkeypatch):
    sizes = (2, 2, 2, 2, 2, 3)
    monkeypatch.setattr(shapes3d, "FACTORS", tuple((n, s) for (n, _), s in zip(shapes3d.FACTORS, sizes)))
    picked = ([0.1, 0.5], [0.0, 0.9], [0.3, 0.7], [0.75, 1.25], [0.0, 3.0], [-30.0, 0.0, 30.0])
    factors = grid(sizes)
    images = shapes3d_images(factors)
    path = write_h5(tmp_path / "3dshapes.h5", images, labels_of(factors, picked))
    data = read_local(path, DataConfig(source=str(path)))
    assert isinstance(data, GridImageDataset) and data._factors is None and FactorSampler(data).renders
    perm = np.random.default_rng(4).permutation(len(factors))
    other = read_local(
        write_h5(tmp_path / "shuffled.hdf5", images[perm], labels_of(factors[perm], picked)),
        DataConfig(source=str(tmp_path / "shuffled.hdf5")),
    )
    assert isinstance(other, GridImageDataset)
    assert torch.equal(other.factors(torch.arange(len(perm))), torch.from_numpy(factors[perm]))
    wanted = torch.tensor([[1, 0, 1, 1, 0, 2], [0, 1, 0, 0, 1, 0]])
    rows = [int(np.ravel_multi_index(tuple(w), sizes)) for w in wanted.tolist()]
    expected = torch.from_numpy(images[rows]).permute(0, 3, 1, 2).float() / 255
    for d in (data, other, other.subset(torch.tensor([4]))):
        assert torch.equal(d.images_from_factors(wanted), expected)
    check_mig(other, lambda x: decode_rgb(x, 6), 6)


def test_shapes3d_label_counts_and_layout_errors(tmp_path):
    factors = every_value(120)
    labels = labels_of(factors)
    labels[labels[:, 5] == 30.0, 5] = -30.0  # orientation: 14 distinct values
    path = write_h5(tmp_path / "3dshapes.h5", shapes3d_images(factors), labels)
    with pytest.raises(
        DataError,
        match=r"3dshapes.h5: 'labels' column 5 \(orientation\) takes 14 distinct values; "
        r"3D Shapes has 15",
    ):
        read_local(path, DataConfig(source=str(path)))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("pictures", data=np.zeros((2, 8, 8), np.uint8))
    for check in (open_dataset, check_source):
        with pytest.raises(DataError, match=r"other.h5: no 'images' dataset"):
            check(DataConfig(source=str(tmp_path / "other.h5")))
    (tmp_path / "junk.h5").write_bytes(b"not an HDF5 file")
    with pytest.raises(DataError, match="junk.h5: cannot read the HDF5 file"):
        check_source(DataConfig(source=str(tmp_path / "junk.h5")))


# --- MPI3D -----------------------------------------------------------------------------------------------------

SMALL_GRID = (
    ("object_color", 2),
    ("object_shape", 3),
    ("object_size", 2),
    ("camera_height", 1),
    ("background_color", 1),
    ("horizontal_axis", 2),
    ("vertical_axis", 3),
)


@pytest.fixture
def small_mpi3d(monkeypatch):
    monkeypatch.setattr(mpi3d, "GRID", SMALL_GRID)
    sizes = tuple(s for _, s in SMALL_GRID)
    factors = grid(sizes)
    return sizes, factors, shapes3d_images(factors, seed=2)


def test_mpi3d_is_memory_mapped_not_read(tmp_path, small_mpi3d, monkeypatch):
    sizes, factors, images = small_mpi3d
    path = tmp_path / "mpi3d_toy.npz"
    np.savez(path, images=images)  # uncompressed, as distributed
    config = DataConfig(source=str(path))
    assert check_source(config) == (72, (3, 64, 64), True)

    def refuse(*args, **kwargs):
        raise AssertionError("the images were read whole")

    monkeypatch.setattr(np, "load", refuse)
    monkeypatch.setattr(np.lib.format, "read_array", refuse)
    data = open_dataset(config)
    assert isinstance(data, GridImageDataset) and isinstance(data.store, MemmapStore)
    assert data.factor_names == tuple(n for n, _ in SMALL_GRID) and data.factor_sizes == sizes
    array = data.store.array()
    assert isinstance(array, np.memmap) and Path(array.filename) == path
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("images.npy")
    assert info.header_offset < data.store.offset < info.header_offset + 30 + 200  # local header + .npy header
    assert path.read_bytes()[data.store.offset : data.store.offset + images[0].nbytes] == images[0].tobytes()
    assert data.nbytes() == 0

    chw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(data.images(torch.arange(72)), chw)
    assert torch.equal(data.images(torch.tensor([70, 2, 2])), chw[[70, 2, 2]])
    assert torch.equal(data.factors(torch.arange(72)), torch.from_numpy(factors))  # implied by the grid
    wanted = torch.tensor([[1, 2, 0, 0, 0, 1, 2], [0, 0, 1, 0, 0, 0, 1]])
    rows = [int(np.ravel_multi_index(tuple(w), sizes)) for w in wanted.tolist()]
    part = data.subset(torch.arange(10, 20))
    assert torch.equal(part.images_from_factors(wanted), chw[rows]) and part.store is data.store
    assert torch.equal(part.factors(torch.tensor([0, 9])), torch.from_numpy(factors[[10, 19]]))
    assert part.to("cuda").device == torch.device("cpu")
    assert FactorSampler(data).renders
    samples = data.sample_factors(500, seeded())
    assert samples.shape == (500, 7) and bool((samples.max(dim=0).values < torch.tensor(sizes)).all())
    check_mig(data, lambda x: decode_rgb(x, 7), 7)


def test_mpi3d_grid_size_compression_and_detection(tmp_path, small_mpi3d, monkeypatch):
    sizes, factors, images = small_mpi3d
    short = tmp_path / "mpi3d_real.npz"
    np.savez(short, images=images[:70])
    for check in (open_dataset, check_source):
        with pytest.raises(
            DataError,
            match=r"mpi3d_real.npz: 70 images, but MPI3D is the grid object_color 2 x "
            r"object_shape 3 x .* vertical_axis 3 = 72 images",
        ):
            check(DataConfig(source=str(short)))

    packed = tmp_path / "mpi3d_realistic.npz"
    np.savez_compressed(packed, images=images)
    small = read_local(packed, DataConfig(source=str(packed)))  # small: read whole
    assert isinstance(small, GridImageDataset) and small.store.nbytes() == images.nbytes
    assert torch.equal(small.images(torch.tensor([5])), torch.from_numpy(images[5:6]).permute(0, 3, 1, 2).float() / 255)
    monkeypatch.setattr(mpi3d, "MAX_COMPRESSED_BYTES", images.nbytes - 1)
    with pytest.raises(
        DataError,
        match=r"mpi3d_realistic.npz: 'images' is stored compressed .* re-save it "
        r"uncompressed",
    ):
        read_local(packed, DataConfig(source=str(packed)))

    other = tmp_path / "toy.npz"  # not called mpi3d*: a plain npz without factors
    np.savez(other, images=images)
    assert check_source(DataConfig(source=str(other))) == (72, (3, 64, 64), False)
    assert not open_dataset(DataConfig(source=str(other))).has_factors


# --- pickling (a Ray worker may receive a data set) ---------------------------------------------------------------


def test_lazy_data_sets_pickle_without_open_files(tmp_path, small_mpi3d):
    _, factors, images = small_mpi3d
    np.savez(tmp_path / "mpi3d_toy.npz", images=images)
    h5_factors = every_value(120)
    write_h5(tmp_path / "3dshapes.h5", shapes3d_images(h5_factors), labels_of(h5_factors))
    write_dsprites(tmp_path / DSPRITES_NAME, grid((3, 2, 2, 1, 2)))
    for name in ("mpi3d_toy.npz", "3dshapes.h5", DSPRITES_NAME):
        data = read_local(tmp_path / name, DataConfig(source=str(tmp_path / name))).subset(torch.tensor([9, 1, 4]))
        before = data.images(torch.arange(3))  # opens the file (or map) in this process
        copy = pickle.loads(pickle.dumps(data))
        assert type(copy) is type(data) and len(copy) == 3
        assert torch.equal(copy.images(torch.arange(3)), before)
        assert torch.equal(copy.factors(torch.arange(3)), data.factors(torch.arange(3)))
    assert getattr(copy.store, "_file", None) is None  # (dSprites: bits in memory, pickled as such)


def test_h5_store_reopens_in_another_process(tmp_path):
    factors = every_value(120)
    path = write_h5(tmp_path / "3dshapes.h5", shapes3d_images(factors), labels_of(factors))
    data = read_local(path, DataConfig(source=str(path)))
    first = data.images(torch.tensor([1]))
    store = data.store
    handle = store._file
    store._pid = -1  # as if this were a forked child: the parent's handle is not used
    assert torch.equal(data.images(torch.tensor([1])), first) and store._file is not handle
    handle.close()
    store.close()


# --- CelebA-style folders -------------------------------------------------------------------------------------------


def test_celeba_sized_jpegs_become_64_pixel_rgb(tmp_path):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for i in range(3):
        array = np.zeros((218, 178, 3), np.uint8)  # CelebA's aligned images: 178 wide, 218 high
        array[:, :, 2] = 200  # blue face area
        array[:20] = array[-20:] = (255, 0, 0)  # red bands at the top and bottom: cropped away
        Image.fromarray(array).save(folder / f"{i + 1:06d}.jpg", quality=95)
    config = DataConfig(source=str(folder), image_size=64, grayscale=False)
    assert check_source(config) == (3, (3, 64, 64), False)
    data = open_dataset(config)
    assert len(data) == 3 and data.image_shape == (3, 64, 64) and data.labels is None and not data.has_factors
    x = data.images(torch.arange(3))
    assert x.shape == (3, 3, 64, 64)
    centre = x[:, :, 32, 32]
    assert bool((centre[:, 2] > 0.7).all()) and bool((centre[:, 0] < 0.1).all())
    # the shorter side (178) becomes 64: 218 -> 78 rows, 7 cut at the top, so the 7.2 px band is almost gone
    assert float(x[:, 0, 2:-2].mean()) < 0.05
