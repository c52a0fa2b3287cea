"""A queue job's readers check where each local file really is (workers.storage.read_access): a symlink under an
allowed prefix that leads to another owner's private dataset, or out of the prefix, is refused at the open, with
the service's refusal text, even when it changed after the job was submitted."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from workers.config import DataConfig
from workers.data import DataError, open_dataset
from workers.storage import Storage
from workers.storage.read_access import not_readable_message


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A job of bob's as the dispatcher starts it: the shared prefix, his name, storage in a local folder."""
    shared = tmp_path / "shared"
    (tmp_path / "alice").mkdir()
    shared.mkdir()
    monkeypatch.setenv("AEFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AEFORGE_STORAGE", (tmp_path / "storage").as_uri())
    monkeypatch.setenv("AEFORGE_JOB_ID", "job-1")
    monkeypatch.setenv("AEFORGE_JOB_OWNER", "bob")
    monkeypatch.setenv("AEFORGE_ALLOWED_DATA_PREFIXES", shared.as_uri() + "/")
    return tmp_path


def npz(path, value: int = 1):
    np.savez(path, images=np.full((4, 8, 8), value, dtype=np.uint8))
    return path


def png(path):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)
    return path


def test_a_file_link_swapped_after_submission_is_refused_at_the_open(node):
    link = node / "shared" / "faces.npz"
    link.symlink_to(npz(node / "shared-real.npz"))  # outside the prefix
    with pytest.raises(DataError) as refused:
        open_dataset(DataConfig(source=str(link)))
    assert str(refused.value) == f"data.source: {not_readable_message(str(link), [(node / 'shared').as_uri() + '/'])}"
    link.unlink()
    link.symlink_to(npz(node / "shared" / "real.npz", 7))  # within the prefix: read
    assert len(open_dataset(DataConfig(source=link.as_uri()))) == 4


def test_another_owners_private_dataset_through_a_link_is_refused_until_shared(node, monkeypatch):
    storage = Storage.from_settings()
    storage.push([npz(node / "alice" / "faces.npz")], "alice-private", format="npz", owner="alice")
    (node / "shared" / "link").symlink_to(node / "storage" / "datasets")
    source = str(node / "shared" / "link" / "alice-private" / "files" / "faces.npz")
    with pytest.raises(DataError, match="is not under a location you may read"):
        open_dataset(DataConfig(source=source))
    monkeypatch.setenv("AEFORGE_JOB_OWNER", "alice")  # her own job reads it by any path
    assert len(open_dataset(DataConfig(source=source))) == 4
    monkeypatch.setenv("AEFORGE_JOB_OWNER", "bob")
    storage.share("alice-private", owner="alice")
    assert len(open_dataset(DataConfig(source=source))) == 4


def test_each_image_of_a_folder_is_checked(node, monkeypatch):
    folder = node / "shared" / "images"
    folder.mkdir()
    png(folder / "a.png")
    (folder / "b.png").symlink_to(png(node / "alice" / "secret.png"))
    with pytest.raises(DataError, match="is not under a location you may read"):
        open_dataset(DataConfig(source=str(folder), format="folder"))
    monkeypatch.delenv("AEFORGE_JOB_ID")  # `aeforge run`: the user's own files, no queue rules
    assert len(open_dataset(DataConfig(source=str(folder), format="folder"))) == 2
