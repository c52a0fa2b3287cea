import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from workers.config import BUILTIN_DATA, DataConfig
from workers.data import (
    BUILTINS,
    DataError,
    ImageDataset,
    builtin_names,
    check_source,
    infer_format,
    open_dataset,
    read_local,
    shard,
    train_val_split,
)
from workers.data.dsprites import DSprites
from workers.data.idx import IMAGES_MAGIC, LABELS_MAGIC


def idx_file(path: Path, array: np.ndarray, magic: int, compress: bool = False, cut: int = 0) -> Path:
    data = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()
    data = data[: len(data) - cut]
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def numbered(n: int) -> ImageDataset:
    """A data set whose label is its row number (and whose pixels say it too)."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return ImageDataset("numbered", images, labels=torch.arange(n))


@pytest.fixture
def npz_path(tmp_path) -> Path:
    path = tmp_path / "toy.npz"
    factors = np.stack([np.arange(30) % 3, np.arange(30) // 3], axis=1)
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (30, 16, 16), dtype=np.uint8), factors=factors)
    return path


def test_builtins():
    assert "dsprites" in BUILTINS and "dsprites" in builtin_names()
    data = open_dataset(DataConfig(source="builtin:dsprites", limit=50))
    assert isinstance(data, DSprites) and len(data) == 50
    assert torch.equal(data.factors(torch.tensor([49])), torch.tensor([[0, 0, 0, 1, 17]]))
    assert check_source(DataConfig(source="builtin:dsprites")) == (737_280, (1, 64, 64), True)
    for check in (open_dataset, check_source):
        with pytest.raises(DataError, match=r"unknown builtin 'mnist'; known builtins: dsprites"):
            check(DataConfig.model_construct(source="builtin:mnist"))  # as an older stored spec could hold
        with pytest.raises(DataError, match="data.format"):
            check(DataConfig(source="builtin:dsprites", format="npz"))


def test_builtin_names_are_checked_when_a_spec_is_validated():
    assert set(BUILTIN_DATA) == set(BUILTINS)
    for source in ("builtin:../x", "builtin:/abs", "builtin:", "builtin:mnist", "builtin:dsprites/../x"):
        with pytest.raises(ValidationError, match="unknown builtin data set"):
            DataConfig(source=source)


def test_infer_format(tmp_path):
    assert infer_format(tmp_path) == "folder"
    assert infer_format(tmp_path / "a.NPZ") == "npz"
    for name in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "mnist.idx", "mnist.idx.gz", "x.ubyte"):
        assert infer_format(tmp_path / name) == "idx"
    with pytest.raises(DataError, match=r"pictures.tar: cannot tell the data format.*\.npz.*IDX.*data.format"):
        infer_format(tmp_path / "pictures.tar")


def test_open_local_files_and_limit(tmp_path, npz_path):
    data = open_dataset(DataConfig(source=str(npz_path)))
    assert len(data) == 30 and data.has_factors and data.name == "toy.npz"
    limited = open_dataset(DataConfig(source=f"file://{npz_path}", limit=7))
    assert len(limited) == 7 and torch.equal(limited.images(torch.arange(7)), data.images(torch.arange(7)))
    assert torch.equal(limited.factors(torch.arange(7)), data.factors(torch.arange(7)))

    images = np.random.default_rng(1).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    raw = idx_file(tmp_path / "digits.bin", images, IMAGES_MAGIC, compress=True)
    with pytest.raises(DataError, match="digits.bin: cannot tell the data format"):
        open_dataset(DataConfig(source=str(raw)))
    assert len(open_dataset(DataConfig(source=str(raw), format="idx"))) == 20  # the format, given

    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 14, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    pics = read_local(folder, DataConfig(source=str(folder), image_size=8, grayscale=False))
    assert pics.image_shape == (3, 8, 8) and len(pics) == 3
    with pytest.raises(DataError, match="toy.npz: data.format is 'folder' but this is a file"):
        open_dataset(DataConfig(source=str(npz_path), format="folder"))


def test_missing_and_remote_sources(tmp_path):
    with pytest.raises(DataError, match=r"data.source: no such file or folder: .*nothing.npz"):
        open_dataset(DataConfig(source=str(tmp_path / "nothing.npz")))
    with pytest.raises(DataError, match=r"data.source: no such file or folder"):
        check_source(DataConfig(source=str(tmp_path / "nothing.npz")))
    with pytest.raises(DataError, match=r"data.source: 's3://bucket/mnist.npz' is remote"):
        open_dataset(DataConfig(source="s3://bucket/mnist.npz"))


def test_resolve_maps_the_source_to_a_local_path(tmp_path, npz_path):
    asked = []

    def resolve(source: str) -> str:
        asked.append(source)
        return str(npz_path)

    config = DataConfig(source="s3://bucket/toy.npz", limit=10)
    assert check_source(config, resolve=resolve) == (30, (1, 16, 16), True)  # the count before limit
    data = open_dataset(config, resolve=resolve)
    assert asked == ["s3://bucket/toy.npz"] * 2 and len(data) == 10 and data.name == "toy.npz"
    with pytest.raises(DataError, match="data.source: no such file or folder"):
        open_dataset(config, resolve=lambda source: str(tmp_path / "gone"))


def test_check_source_reads_headers_only(tmp_path):
    images = np.zeros((20, 28, 28), np.uint8)
    # Truncated data but a sound header: the cheap check sees the header; opening the file finds the damage.
    cut = idx_file(tmp_path / "train-images-idx3-ubyte.gz", images, IMAGES_MAGIC, compress=True, cut=300)
    config = DataConfig(source=str(cut))
    assert check_source(config) == (20, (1, 28, 28), False)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: the header announces"):
        open_dataset(config)
    labels = idx_file(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(20, np.uint8), LABELS_MAGIC)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: magic number 2049"):
        check_source(DataConfig(source=str(labels)))

    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((12, 30), np.uint8)).save(folder / f"{i}.png")
    assert check_source(DataConfig(source=str(folder))) == (4, (1, 12, 30), False)
    assert check_source(DataConfig(source=str(folder), image_size=16, grayscale=False)) == (4, (3, 16, 16), False)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="none: no images found"):
        check_source(DataConfig(source=str(tmp_path / "none")))

    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="bad.npz: no images array"):
        check_source(DataConfig(source=str(bad)))


def test_train_val_split():
    data = numbered(100)
    train, val = train_val_split(data, 0.2, seed=0)
    train_ids, val_ids = train.labels.tolist(), val.labels.tolist()
    assert len(val_ids) == 20 and len(train_ids) == 80
    assert sorted(train_ids + val_ids) == list(range(100))
    assert train_ids == sorted(train_ids)  # rows keep their order
    assert val_ids != list(range(80, 100))  # random, not the tail
    again_train, again_val = train_val_split(data, 0.2, seed=0)
    assert again_val.labels.tolist() == val_ids
    assert train_val_split(data, 0.2, seed=1)[1].labels.tolist() != val_ids
    # images follow their rows
    assert val.images(torch.arange(20))[:, 0, 0, 0].mul(255).round().long().tolist() == val_ids
    train_all, none = train_val_split(data, 0.0, seed=0)
    assert len(train_all) == 100 and len(none) == 0
    assert len(train_val_split(numbered(10), 0.01, seed=0)[1]) == 1  # a positive fraction gives at least one
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(data, 1.0, seed=0)


def test_shard_is_disjoint_and_even():
    data = numbered(103)
    shards = [shard(data, rank, 4, seed=5) for rank in range(4)]
    ids = [s.labels.tolist() for s in shards]
    assert all(len(part) == 25 for part in ids)  # 103 // 4; three rows left out so ranks run equal steps
    assert len(set(sum(ids, []))) == 100
    assert [shard(data, 2, 4, seed=5).labels.tolist()] == [ids[2]]
    assert shard(data, 2, 4, seed=6).labels.tolist() != ids[2]
    assert shard(data, 0, 1, seed=5) is data
    with pytest.raises(ValueError, match="rank 4 is not in a world of size 4"):
        shard(data, 4, 4, seed=0)
    with pytest.raises(DataError, match="fewer than the 4 workers"):
        shard(numbered(3), 0, 4, seed=0)


def test_split_and_shard_dsprites_views():
    data = open_dataset(DataConfig(source="builtin:dsprites", limit=1000))
    train, val = train_val_split(data, 0.1, seed=0)
    assert isinstance(train, DSprites) and (len(train), len(val)) == (900, 100)
    parts = [shard(train, rank, 2, seed=0) for rank in range(2)]
    rows = [data.row_of_factors(p.factors(torch.arange(len(p)))) for p in parts]
    val_rows = data.row_of_factors(val.factors(torch.arange(100)))
    everything = torch.cat(rows + [val_rows])
    assert len(everything.unique()) == 1000 and int(everything.max()) < 1000
    assert torch.equal(parts[1].images(torch.arange(5)), data.images(rows[1][:5]))
