"""workers.storage on both schemes: a local folder and moto's S3 server over HTTP.

Objects, datasets (push / ls / rm, manifest written last), the resolver (download, verify, cache, re-download of a
damaged copy, concurrent resolves), s3:// sources, the preflight's errors, and the pyarrow filesystem Ray uses.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.s3 import s3_client
from workers.data.base import DataError
from workers.storage import Storage, StorageError
from workers.storage import resolver as storage_module

SECRET = "s3cr3t-never-shown-4711"


@pytest.fixture
def local_env(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("AEFORGE_HOME", str(home))
    monkeypatch.delenv("AEFORGE_STORAGE", raising=False)
    return home


@pytest.fixture(params=["local", "s3"])
def storage(request) -> Storage:
    """Storage.from_settings() on each backend."""
    if request.param == "local":
        request.getfixturevalue("local_env")
    else:
        request.getfixturevalue("s3_env")
    return Storage.from_settings()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def count_dataset_reads(store: Storage, monkeypatch) -> list[str]:
    """Record every object read from storage (each is a download)."""
    reads: list[str] = []
    original = store._open_read

    def recording(relpath):
        reads.append(relpath)
        return original(relpath)

    monkeypatch.setattr(store, "_open_read", recording)
    return reads


def count_s3_downloads(monkeypatch) -> list[str]:
    downloads: list[str] = []
    original = storage_module._S3SourceFetcher._download

    def recording(self, key, etag, size, target):
        downloads.append(key)
        return original(self, key, etag, size, target)

    monkeypatch.setattr(storage_module._S3SourceFetcher, "_download", recording)
    return downloads


# --- settings --------------------------------------------------------------------------------------------------
def test_settings_choose_the_backend(local_env, monkeypatch):
    store = Storage.from_settings()
    assert isinstance(store, Storage) and store.root == local_env / "storage"
    assert store.uri("runs/a.png") == (local_env / "storage" / "runs" / "a.png").as_uri()

    monkeypatch.setenv("AEFORGE_STORAGE", "s3://bucket-x/some/prefix/")
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    store = Storage.from_settings()
    assert isinstance(store, Storage) and (store.bucket, store.prefix) == ("bucket-x", "some/prefix")
    assert store.uri("runs/a.png") == "s3://bucket-x/some/prefix/runs/a.png"
    fs, base = store.pyarrow_filesystem()
    assert base == "bucket-x/some/prefix" and fs.type_name == "s3"

    for bad in ("gs://bucket/x", "s3:///no-bucket", "file://host/x", "relative/path"):
        monkeypatch.setenv("AEFORGE_STORAGE", bad)
        with pytest.raises(StorageError, match="AEFORGE_STORAGE"):
            Storage.from_settings()


def test_s3_clients_have_short_preflight_timeouts_and_compatible_checksums(s3_env):
    conn = Storage.from_settings().s3
    preflight = conn.client(preflight=True).meta.config
    assert preflight.connect_timeout <= 3 and preflight.read_timeout <= 10
    assert preflight.retries["total_max_attempts"] <= 2
    ordinary = conn.client().meta.config
    for config in (preflight, ordinary):
        assert config.s3["addressing_style"] == "path"
        assert config.request_checksum_calculation == "when_required"
        assert config.response_checksum_validation == "when_required"
    assert SECRET not in repr(conn)


# --- objects ---------------------------------------------------------------------------------------------------
def test_objects_round_trip(storage, tmp_path):
    src = write(tmp_path / "in" / "picture.png", b"\x89PNG fake")
    storage.put_file(src, "runs/job-1/pictures/picture.png")
    storage.put_bytes(b'{"loss": 1.5}', "runs/job-1/metrics.json")
    storage.put_bytes(b"other", "runs/job-10/metrics.json")

    assert storage.exists("runs/job-1/metrics.json") and not storage.exists("runs/job-1/nothing.json")
    assert storage.get_bytes("runs/job-1/metrics.json") == b'{"loss": 1.5}'
    out = storage.get_file("runs/job-1/pictures/picture.png", tmp_path / "out" / "p.png")
    assert out.read_bytes() == b"\x89PNG fake"
    # A prefix is a folder: runs/job-1 does not take in runs/job-10.
    assert storage.list_prefix("runs/job-1") == ["runs/job-1/metrics.json", "runs/job-1/pictures/picture.png"]
    assert len(storage.list_prefix("")) == 3

    with pytest.raises(StorageError, match="no object"):
        storage.get_bytes("runs/job-1/nothing.json")
    with pytest.raises(StorageError, match="invalid path"):
        storage.put_bytes(b"x", "runs/../../escape")

    assert storage.delete_prefix("runs/job-1") == 2
    assert storage.list_prefix("runs") == ["runs/job-10/metrics.json"]
    with pytest.raises(StorageError):
        storage.delete_prefix("")


# --- datasets --------------------------------------------------------------------------------------------------
def test_push_ls_rm_round_trip(storage, tmp_path):
    images = write(tmp_path / "train-images.idx3-ubyte", b"images" * 100)
    labels = write(tmp_path / "train-labels.idx1-ubyte", b"labels" * 10)
    manifest = storage.push([images, labels], "mnist-small", format="idx")
    assert manifest["name"] == "mnist-small" and manifest["layout"] == "files" and manifest["format"] == "idx"
    assert manifest["files"] == [
        {"path": "train-images.idx3-ubyte", "size": 600, "sha256": sha(b"images" * 100)},
        {"path": "train-labels.idx1-ubyte", "size": 60, "sha256": sha(b"labels" * 10)},
    ]
    assert manifest["size"] == 660 and manifest["created"]
    stored = json.loads(storage.get_bytes("datasets/mnist-small/manifest.json"))
    assert stored == manifest

    listed = storage.ls()
    assert [m["name"] for m in listed] == ["mnist-small"]

    with pytest.raises(StorageError, match="already exists.*--overwrite"):
        storage.push([images], "mnist-small", format="idx")
    write(images, b"new images")
    replaced = storage.push([images], "mnist-small", format="idx", overwrite=True)
    assert [f["path"] for f in replaced["files"]] == ["train-images.idx3-ubyte"]
    # The overwrite cleared the old dataset's files.
    assert storage.list_prefix("datasets/mnist-small") == [
        "datasets/mnist-small/files/train-images.idx3-ubyte",
        "datasets/mnist-small/manifest.json",
    ]

    assert storage.rm("mnist-small") == 2
    assert storage.ls() == [] and storage.list_prefix("datasets") == []
    with pytest.raises(StorageError, match="no dataset named 'mnist-small'"):
        storage.rm("mnist-small")
    with pytest.raises(StorageError, match="no dataset named 'mnist-small'"):
        storage.manifest("mnist-small")


def test_push_rejects_bad_input(storage, tmp_path):
    a = write(tmp_path / "a.npz", b"a")
    folder = tmp_path / "imgs"
    write(folder / "x.png", b"x")
    with pytest.raises(StorageError, match="invalid dataset name"):
        storage.push([a], "../escape", format="npz")
    with pytest.raises(StorageError, match="invalid dataset name"):
        storage.rm("-bad")
    with pytest.raises(StorageError, match="no such file or folder: .*missing.npz"):
        storage.push([tmp_path / "missing.npz"], "ok", format="npz")
    with pytest.raises(StorageError, match="not a mix"):
        storage.push([folder, a], "ok", format="folder")
    write(tmp_path / "other" / "a.npz", b"b")
    with pytest.raises(StorageError, match="two files named 'a.npz'"):
        storage.push([a, tmp_path / "other" / "a.npz"], "ok", format="npz")
    with pytest.raises(StorageError, match="unknown format 'zip'"):
        storage.push([a], "ok", format="zip")
    assert storage.list_prefix("datasets") == []


def test_push_infers_the_format(storage, tmp_path):
    path = tmp_path / "tiny.npz"
    np.savez(path, images=np.zeros((4, 8, 8), dtype=np.uint8))
    assert storage.push([path], "tiny")["format"] == "npz"


def test_incomplete_dataset_is_never_listed_or_used(storage, tmp_path):
    storage.put_bytes(b"half", "datasets/half/files/a.npz")  # a push that died before its manifest
    assert storage.ls() == []
    with pytest.raises(DataError, match="no dataset of that name"):
        storage.resolve("half")
    a = write(tmp_path / "b.npz", b"bbb")
    storage.push([a], "half", format="npz")  # no --overwrite needed: the leftovers were never a dataset
    assert storage.list_prefix("datasets/half") == ["datasets/half/files/b.npz", "datasets/half/manifest.json"]


def test_failed_overwrite_leaves_no_complete_dataset(storage, tmp_path, monkeypatch):
    a, b = write(tmp_path / "a.npz", b"a" * 10), write(tmp_path / "b.npz", b"b" * 10)
    storage.push([a, b], "ds", format="npz")
    original = storage.put_file
    calls = []

    def failing_second_upload(local, relpath):
        calls.append(relpath)
        if len(calls) == 2:
            raise StorageError("connection lost")
        return original(local, relpath)

    monkeypatch.setattr(storage, "put_file", failing_second_upload)
    with pytest.raises(StorageError, match="connection lost"):
        storage.push([a, b], "ds", format="npz", overwrite=True)
    assert storage.ls() == []
    with pytest.raises(DataError):
        storage.resolve("ds")


def test_a_dataset_has_an_owner_who_alone_replaces_shares_or_removes_it(storage, tmp_path):
    a = write(tmp_path / "a.npz", b"a" * 10)
    pushed = storage.push([a], "faces", format="npz", owner="alice")
    assert pushed["owner"] == "alice" and pushed["shared"] is False
    assert [(m["owner"], m["shared"]) for m in storage.ls()] == [("alice", False)]
    for refused in (
        lambda: storage.push([a], "faces", format="npz", overwrite=True, owner="bob"),
        lambda: storage.share("faces", owner="bob"),
        lambda: storage.rm("faces", owner="bob"),
    ):
        with pytest.raises(StorageError, match="dataset 'faces' belongs to alice: only its owner or an admin"):
            refused()
    assert storage.manifest("faces") == pushed  # untouched

    assert storage.share("faces", owner="alice")["shared"] is True
    assert storage.manifest("faces")["shared"] is True
    replaced = storage.push([a], "faces", format="npz", overwrite=True, owner="root", admin=True)
    assert (replaced["owner"], replaced["shared"]) == ("alice", True)  # an admin's push keeps owner and sharing
    assert storage.share("faces", False, owner="root", admin=True)["shared"] is False
    with pytest.raises(StorageError, match="no dataset named 'nope'"):
        storage.share("nope", owner="alice")

    storage.push([a], "legacy", format="npz")  # no owner: pushed before owners were recorded
    with pytest.raises(StorageError, match="belongs to no one .*only its owner or an admin may share"):
        storage.share("legacy", owner="alice")
    assert storage.rm("legacy", owner="root", admin=True) == 2
    assert storage.rm("faces", owner="alice") == 2


# --- the resolver: datasets ------------------------------------------------------------------------------------
def test_resolve_downloads_verifies_and_caches(storage, tmp_path, monkeypatch):
    images = write(tmp_path / "src" / "train-images.idx3-ubyte", b"I" * 1000)
    labels = write(tmp_path / "src" / "train-labels.idx1-ubyte", b"L" * 100)
    manifest = storage.push([images, labels], "pair", format="idx")
    reads = count_dataset_reads(storage, monkeypatch)

    path = Path(storage.resolve("pair"))
    raw = storage.get_bytes("datasets/pair/manifest.json")
    home = Path(storage.cache_dir).parent
    assert path == home / "cache" / "datasets" / "pair" / sha(raw) / "train-images.idx3-ubyte"
    assert path.read_bytes() == b"I" * 1000
    assert (path.parent / "train-labels.idx1-ubyte").read_bytes() == b"L" * 100  # the pair stays together
    assert sorted(r for r in reads if "/files/" in r) == [
        "datasets/pair/files/train-images.idx3-ubyte",
        "datasets/pair/files/train-labels.idx1-ubyte",
    ]
    mtime = path.stat().st_mtime_ns
    reads.clear()

    assert storage.resolve("pair") == str(path)
    assert [r for r in reads if "/files/" in r] == []  # reused, not downloaded
    assert path.stat().st_mtime_ns == mtime
    assert len(manifest["files"]) == 2


def test_resolve_folder_dataset_returns_the_folder(storage, tmp_path):
    folder = tmp_path / "faces"
    write(folder / "a.png", b"a")
    write(folder / "sub" / "b.png", b"bb")
    manifest = storage.push([folder], "faces", format="folder")
    assert manifest["layout"] == "folder" and [f["path"] for f in manifest["files"]] == ["a.png", "sub/b.png"]
    resolved = Path(storage.resolve("faces"))
    assert resolved.is_dir()
    assert sorted(p.relative_to(resolved).as_posix() for p in resolved.rglob("*") if p.is_file()) == [
        "a.png",
        "sub/b.png",
    ]
    assert (resolved / "sub" / "b.png").read_bytes() == b"bb"


@pytest.mark.parametrize("damage", ["same size", "truncated", "deleted"])
def test_damaged_cached_file_is_downloaded_again(storage, tmp_path, monkeypatch, damage):
    data = bytes(range(256)) * 8
    storage.push([write(tmp_path / "d.npz", data)], "ds", format="npz")
    path = Path(storage.resolve("ds"))
    reads = count_dataset_reads(storage, monkeypatch)
    if damage == "same size":
        path.write_bytes(b"\x00" * len(data))
    elif damage == "truncated":
        path.write_bytes(data[:100])
    else:
        path.unlink()
    assert storage.resolve("ds") == str(path)
    assert path.read_bytes() == data
    assert "datasets/ds/files/d.npz" in reads


def test_damaged_copy_with_unchanged_stat_is_not_used_if_the_record_is_gone(storage, tmp_path):
    """An interrupted fetch (no completion record) re-checks what is already on disk by its sha256."""
    data = b"0123456789" * 50
    storage.push([write(tmp_path / "d.npz", data)], "ds", format="npz")
    path = Path(storage.resolve("ds"))
    for record in path.parent.parent.glob("*.complete.json"):
        record.unlink()
    path.write_bytes(b"X" * len(data))
    assert Path(storage.resolve("ds")).read_bytes() == data


def test_checksum_mismatch_on_download_is_an_error(storage, tmp_path):
    data = b"A" * 300
    storage.push([write(tmp_path / "d.npz", data)], "ds", format="npz")
    storage.put_bytes(b"B" * 300, "datasets/ds/files/d.npz")  # the stored bytes no longer match the manifest
    with pytest.raises(DataError, match="sha256 mismatch"):
        storage.resolve("ds")
    raw = storage.get_bytes("datasets/ds/manifest.json")
    dest = Path(storage.cache_dir) / "datasets" / "ds" / sha(raw)
    assert not (dest / "d.npz").exists()  # nothing unverified where it would be used

    storage.put_bytes(b"A" * 200, "datasets/ds/files/d.npz")
    with pytest.raises(DataError, match="downloaded 200 bytes, expected 300"):
        storage.resolve("ds")


def test_concurrent_resolves_download_once(storage, tmp_path, monkeypatch):
    storage.push([write(tmp_path / "d.npz", b"z" * 100_000)], "ds", format="npz")
    reads = count_dataset_reads(storage, monkeypatch)
    results, errors = [], []

    def resolve():
        try:
            results.append(storage.resolve("ds"))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and Path(results[0]).read_bytes() == b"z" * 100_000
    assert [r for r in reads if "/files/" in r] == ["datasets/ds/files/d.npz"]


def test_resolve_local_paths_and_unknown_names(storage, tmp_path, monkeypatch):
    local = write(tmp_path / "local.npz", b"x")
    assert storage.resolve(str(local)) == str(local)
    assert storage.resolve("builtin:dsprites") == "builtin:dsprites"
    assert storage.resolve("some/missing/file.npz") == "some/missing/file.npz"  # the data module reports it
    assert storage.resolve(local.as_uri()) == str(local)
    with pytest.raises(DataError, match="'nothing-here'.*no dataset of that name"):
        storage.resolve("nothing-here")
    # An existing local file wins over a dataset of the same name.
    storage.push([local], "local.npz", format="npz")
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("local.npz") == "local.npz"


# --- the resolver: s3:// sources -------------------------------------------------------------------------------
def test_s3_object_source_is_cached_by_etag_and_size(s3_env, monkeypatch):
    store = Storage.from_settings()
    client = s3_env.client()
    client.put_object(Bucket=s3_env.bucket, Key="raw/data.npz", Body=b"first version")
    downloads = count_s3_downloads(monkeypatch)

    path = Path(store.resolve(f"s3://{s3_env.bucket}/raw/data.npz"))
    assert path == s3_env.home / "cache" / "s3" / s3_env.bucket / "raw" / "data.npz"
    assert path.read_bytes() == b"first version" and downloads == ["raw/data.npz"]
    assert store.resolve(f"s3://{s3_env.bucket}/raw/data.npz") == str(path)
    assert downloads == ["raw/data.npz"]

    client.put_object(Bucket=s3_env.bucket, Key="raw/data.npz", Body=b"second version!")
    assert Path(store.resolve(f"s3://{s3_env.bucket}/raw/data.npz")).read_bytes() == b"second version!"
    assert len(downloads) == 2

    path.write_bytes(b"second versioX!")  # damaged in the cache: same size, new mtime
    assert Path(store.resolve(f"s3://{s3_env.bucket}/raw/data.npz")).read_bytes() == b"second version!"
    assert len(downloads) == 3


def test_s3_object_source_checks_the_sha256_metadata(s3_env):
    store = Storage.from_settings()
    client = s3_env.client()
    client.put_object(Bucket=s3_env.bucket, Key="raw/bad.npz", Body=b"content", Metadata={"sha256": sha(b"other")})
    with pytest.raises(DataError, match="sha256 mismatch"):
        store.resolve(f"s3://{s3_env.bucket}/raw/bad.npz")
    assert not (s3_env.home / "cache" / "s3" / s3_env.bucket / "raw" / "bad.npz").exists()
    # Objects put through storage carry their sha256, so s3:// sources of them are checked.
    store.put_bytes(b"checked", "raw/good.bin")
    head = client.head_object(Bucket=s3_env.bucket, Key="aeforge/raw/good.bin")
    assert head["Metadata"]["sha256"] == sha(b"checked")
    assert Path(store.resolve(f"s3://{s3_env.bucket}/aeforge/raw/good.bin")).read_bytes() == b"checked"


def test_s3_prefix_source_is_a_folder(s3_env, monkeypatch):
    store = Storage.from_settings()
    client = s3_env.client()
    for key, body in (("imgs/a.png", b"a"), ("imgs/sub/b.png", b"bb"), ("imgs-other/c.png", b"c")):
        client.put_object(Bucket=s3_env.bucket, Key=key, Body=body)
    downloads = count_s3_downloads(monkeypatch)
    folder = Path(store.resolve(f"s3://{s3_env.bucket}/imgs/"))
    assert folder == s3_env.home / "cache" / "s3" / s3_env.bucket / "imgs"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["a.png", "sub/b.png"] and len(downloads) == 2
    assert store.resolve(f"s3://{s3_env.bucket}/imgs/") == str(folder) and len(downloads) == 2

    client.delete_object(Bucket=s3_env.bucket, Key="imgs/sub/b.png")
    client.put_object(Bucket=s3_env.bucket, Key="imgs/d.png", Body=b"d")
    store.resolve(f"s3://{s3_env.bucket}/imgs/")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["a.png", "d.png"] and len(downloads) == 3


def test_s3_source_errors_name_the_source(s3_env):
    store = Storage.from_settings()
    with pytest.raises(DataError, match=f"s3://{s3_env.bucket}/raw/none.npz: not found"):
        store.resolve(f"s3://{s3_env.bucket}/raw/none.npz")
    with pytest.raises(DataError, match="no objects under this prefix"):
        store.resolve(f"s3://{s3_env.bucket}/empty/")
    with pytest.raises(DataError, match="s3://bucket/key"):
        store.resolve("s3://only-bucket")
    with pytest.raises(DataError, match="invalid S3 key"):
        store.resolve(f"s3://{s3_env.bucket}/a/../../etc/passwd")


def test_s3_sources_resolve_with_local_storage_too(s3_bucket, local_env, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", endpoint)
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    s3_client(endpoint).put_object(Bucket=bucket, Key="x.npz", Body=b"remote")
    store = Storage.from_settings()
    assert isinstance(store, Storage)
    assert Path(store.resolve(f"s3://{bucket}/x.npz")).read_bytes() == b"remote"


# --- preflight -------------------------------------------------------------------------------------------------
def test_preflight_passes_on_working_storage(storage):
    storage.preflight()
    assert storage.list_prefix("") == []  # the probe object is gone


def test_local_preflight_reports_an_unusable_folder(local_env, tmp_path, monkeypatch):
    blocker = write(tmp_path / "a-file", b"x")
    monkeypatch.setenv("AEFORGE_STORAGE", (blocker / "storage").as_uri())
    with pytest.raises(StorageError, match="cannot create or write the folder"):
        Storage.from_settings().preflight()


def _preflight_error(monkeypatch, endpoint: str, bucket: str, key_id: str, secret: str) -> str:
    monkeypatch.setenv("AEFORGE_STORAGE", f"s3://{bucket}/aeforge")
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(StorageError) as info:
        Storage.from_settings().preflight()
    message = str(info.value)
    assert endpoint in message and bucket in message
    assert secret not in message
    return message


def test_preflight_closed_port(s3_env, monkeypatch):
    from tests.fixtures.s3 import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    message = _preflight_error(monkeypatch, endpoint, s3_env.bucket, "testing", SECRET)
    assert "cannot connect" in message


def test_preflight_missing_bucket(s3_env, monkeypatch):
    message = _preflight_error(monkeypatch, s3_env.endpoint_url, "no-such-bucket-here", "testing", SECRET)
    assert "does not exist" in message


def test_preflight_wrong_keys(s3_auth_server, s3_env, monkeypatch):
    s3_auth_server.client().create_bucket(Bucket="auth-bucket")
    monkeypatch.setenv("AEFORGE_STORAGE", "s3://auth-bucket/aeforge")
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", s3_auth_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_auth_server.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_auth_server.secret_access_key)
    Storage.from_settings().preflight()  # the right keys pass

    unknown = _preflight_error(monkeypatch, s3_auth_server.endpoint_url, "auth-bucket", "AKIAUNKNOWNKEY123", SECRET)
    assert "access denied" in unknown and "AKIAUNKNOWNKEY123" in unknown
    wrong_secret = _preflight_error(
        monkeypatch, s3_auth_server.endpoint_url, "auth-bucket", s3_auth_server.access_key_id, SECRET
    )
    assert "access denied" in wrong_secret and s3_auth_server.access_key_id in wrong_secret


# --- S3 keys from a mounted secret file (AEFORGE_S3_CREDENTIALS_FILE) -------------------------------------------
def _keys_in_a_file(monkeypatch, path: Path, text: str) -> Path:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    monkeypatch.setenv("AEFORGE_S3_CREDENTIALS_FILE", str(path))
    return path


@pytest.mark.parametrize(
    "name,text",
    [
        (
            "keys.yaml",
            f"aws_access_key_id: AKIAFROMFILE\naws_secret_access_key: '{SECRET}'\naws_session_token: tok-1\n",
        ),
        (
            "keys.json",
            json.dumps(
                {"AWS_ACCESS_KEY_ID": "AKIAFROMFILE", "AWS_SECRET_ACCESS_KEY": SECRET, "aws_session_token": "tok-1"}
            ),
        ),
        (
            "credentials",
            f"# mounted\n[default]\naws_access_key_id = AKIAFROMFILE\naws_secret_access_key = {SECRET}\n"
            f"aws_session_token = tok-1\nregion = eu-west-1\n",
        ),
    ],
)
def test_keys_come_from_the_credentials_file_when_the_variables_are_not_set(
    local_env, tmp_path, monkeypatch, name, text
):
    from workers.storage import S3Connection

    _keys_in_a_file(monkeypatch, tmp_path / "secret" / name, text)
    conn = S3Connection.from_settings()
    assert (conn.access_key_id, conn.secret_access_key, conn.session_token) == ("AKIAFROMFILE", SECRET, "tok-1")
    assert conn.pyarrow_keys() == {"access_key": "AKIAFROMFILE", "secret_key": SECRET, "session_token": "tok-1"}
    assert SECRET not in repr(conn)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMENV")  # the variables win when set
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    conn = S3Connection.from_settings()
    assert (conn.access_key_id, conn.secret_access_key, conn.session_token) == ("AKIAFROMENV", "secret-from-env", None)


def test_no_keys_anywhere_leaves_the_default_credential_chain(local_env, monkeypatch):
    from workers.storage import S3Connection

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AEFORGE_S3_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    conn = S3Connection.from_settings()
    assert conn.access_key_id is None and conn.secret_access_key is None and conn.pyarrow_keys() == {}


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("missing.yaml", None, "no such file"),
        ("a-folder", "", "cannot read the file"),
        (
            "bad.yaml",
            f"aws_access_key_id: AKIA\naws_secret_access_key: [{SECRET}\n",
            "not a YAML/JSON mapping nor an AWS credentials file (line 3",
        ),
        ("list.yaml", f"- {SECRET}\n", "expected a mapping with aws_access_key_id"),
        ("typo.yaml", f"aws_access_key_id: AKIA\nsecret_key: {SECRET}\n", "unknown key(s) secret_key"),
        ("half.yaml", "aws_access_key_id: AKIA\n", "no aws_secret_access_key in the file"),
        (
            "number.yaml",
            "aws_access_key_id: AKIA\naws_secret_access_key: 12345678\n",
            "aws_secret_access_key must be a string",
        ),
        (
            "bad.ini",
            f"[default]\naws_access_key_id = AKIA\n{SECRET}\n",
            "not a valid AWS credentials (INI) file (line 3)",
        ),
        (
            "profile.ini",
            f"[other]\naws_access_key_id = AKIA\naws_secret_access_key = {SECRET}\n",
            "no [default] profile",
        ),
    ],
)
def test_an_unusable_credentials_file_names_the_file_never_the_secret(
    local_env, tmp_path, monkeypatch, name, text, message
):
    from workers.storage import S3Connection

    path = tmp_path / "secret" / name
    _keys_in_a_file(monkeypatch, tmp_path / "secret" / "placeholder", "")
    monkeypatch.setenv("AEFORGE_S3_CREDENTIALS_FILE", str(path))
    if name == "a-folder":
        path.mkdir(parents=True)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(StorageError) as info:
        S3Connection.from_settings()
    shown = str(info.value)
    assert f"AEFORGE_S3_CREDENTIALS_FILE='{path}'" in shown and message in shown, shown
    assert SECRET not in shown and "12345678" not in shown


def test_preflight_signs_with_the_keys_of_the_credentials_file(s3_auth_server, s3_env, tmp_path, monkeypatch):
    s3_auth_server.client().create_bucket(Bucket="file-keys-bucket")
    monkeypatch.setenv("AEFORGE_STORAGE", "s3://file-keys-bucket/aeforge")
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", s3_auth_server.endpoint_url)
    path = _keys_in_a_file(
        monkeypatch,
        tmp_path / "secret" / "credentials",
        f"[default]\naws_access_key_id = {s3_auth_server.access_key_id}\n"
        f"aws_secret_access_key = {s3_auth_server.secret_access_key}\n",
    )
    store = Storage.from_settings()
    store.preflight()
    store.put_bytes(b"signed with the file's keys", "probe/a.bin")
    assert store.get_bytes("probe/a.bin") == b"signed with the file's keys"

    path.write_text(f"aws_access_key_id: {s3_auth_server.access_key_id}\naws_secret_access_key: {SECRET}\n")
    with pytest.raises(StorageError) as info:
        Storage.from_settings().preflight()  # read again: a rotated (here: wrong) secret is picked up
    message = str(info.value)
    assert "access denied" in message and f"the keys in {path}" in message and SECRET not in message


# --- the filesystem Ray Train writes checkpoints through -------------------------------------------------------
def test_pyarrow_filesystem_writes_where_storage_reads(storage):
    fs, base = storage.pyarrow_filesystem()
    assert not base.startswith("s3://")
    fs.create_dir(f"{base}/ray/job-1/checkpoint_000000")
    with fs.open_output_stream(f"{base}/ray/job-1/checkpoint_000000/model.pt") as out:
        out.write(b"weights")
    assert storage.list_prefix("ray") == ["ray/job-1/checkpoint_000000/model.pt"]
    assert storage.get_bytes("ray/job-1/checkpoint_000000/model.pt") == b"weights"


def test_pyarrow_s3_filesystem_reaches_the_endpoint(s3_env):
    fs, base = Storage.from_settings().pyarrow_filesystem()
    assert base == f"{s3_env.bucket}/aeforge"
    with fs.open_output_stream(f"{base}/ray/run/file.txt") as out:
        out.write(b"via pyarrow")
    body = s3_env.client().get_object(Bucket=s3_env.bucket, Key="aeforge/ray/run/file.txt")["Body"].read()
    assert body == b"via pyarrow"


def test_resolver_from_settings_uses_the_configured_storage(s3_env, tmp_path):
    Storage.from_settings().push([write(tmp_path / "d.npz", b"dd")], "ds", format="npz")
    resolve = storage_module.resolver_from_settings()
    assert Path(resolve("ds")).read_bytes() == b"dd"


# --- the contract with workers.data ----------------------------------------------------------------------------
def write_idx_pair(folder: Path, n: int = 6) -> tuple[Path, Path]:
    import struct

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    images_path = write(folder / "train-images-idx3-ubyte", struct.pack(">iiii", 2051, n, 8, 8) + images.tobytes())
    labels_path = write(folder / "train-labels-idx1-ubyte", struct.pack(">ii", 2049, n) + labels.tobytes())
    return images_path, labels_path


def test_open_dataset_reads_a_pushed_idx_pair(storage, tmp_path):
    from workers.config import DataConfig
    from workers.data import check_source, open_dataset

    images_path, labels_path = write_idx_pair(tmp_path / "src")
    assert storage.push([images_path, labels_path], "mnist-tiny")["format"] == "idx"
    config = DataConfig(source="mnist-tiny", val_fraction=0.0)
    assert check_source(config, resolve=storage.resolve)[:2] == (6, (1, 8, 8))
    dataset = open_dataset(config, resolve=storage.resolve)
    assert len(dataset) == 6 and dataset.labels is not None  # the labels file came along with the images
    with pytest.raises(DataError, match="no dataset of that name"):
        check_source(DataConfig(source="never-pushed"), resolve=storage.resolve)


def test_s3_source_keys_are_taken_literally(s3_env):
    s3_env.client().put_object(Bucket=s3_env.bucket, Key="raw/a%20b#1.npz", Body=b"literal")
    path = Path(Storage.from_settings().resolve(f"s3://{s3_env.bucket}/raw/a%20b#1.npz"))
    assert path.name == "a%20b#1.npz" and path.read_bytes() == b"literal"


# --- an endpoint that is down for a while when a job starts ---------------------------------------------------------


def test_the_preflight_waits_out_an_outage_of_the_endpoint(s3_bucket, tmp_path, monkeypatch):
    """The endpoint refuses connections for ~4 s, then answers: a job's preflight keeps trying with back-off and
    succeeds; with no window it fails at once, naming the endpoint."""
    import threading

    from tests.fixtures.proxy import OutageProxy
    from tests.fixtures.s3 import point_aeforge_at_s3
    from workers.storage import StorageUnreachable

    endpoint, bucket = s3_bucket
    proxy = OutageProxy(endpoint)
    point_aeforge_at_s3(monkeypatch, proxy.url, bucket, tmp_path / "home")
    storage = Storage.from_settings()
    with pytest.raises(StorageUnreachable, match=f"cannot connect to S3 endpoint {proxy.url}"):
        storage.preflight()

    recovery = threading.Timer(4.0, proxy.up)
    recovery.start()
    try:
        started = time.monotonic()
        storage.preflight(wait_s=60)
        assert 3.5 < time.monotonic() - started < 30
    finally:
        recovery.cancel()
        proxy.down()


def test_the_preflight_gives_up_after_its_window_and_says_so(s3_bucket, tmp_path, monkeypatch):
    from tests.fixtures.proxy import OutageProxy
    from tests.fixtures.s3 import point_aeforge_at_s3
    from workers.storage import StorageUnreachable

    endpoint, bucket = s3_bucket
    proxy = OutageProxy(endpoint)  # never up
    point_aeforge_at_s3(monkeypatch, proxy.url, bucket, tmp_path / "home")
    started = time.monotonic()
    with pytest.raises(StorageUnreachable, match=r"still unreachable after 3 s of retries; AEFORGE_STORAGE_WAIT_S"):
        Storage.from_settings().preflight(wait_s=3)
    assert time.monotonic() - started < 15


def test_a_missing_bucket_is_not_waited_for(s3_server, tmp_path, monkeypatch):
    from tests.fixtures.s3 import point_aeforge_at_s3
    from workers.storage import StorageUnreachable

    point_aeforge_at_s3(monkeypatch, s3_server, f"missing-{uuid.uuid4().hex[:8]}", tmp_path / "home")
    started = time.monotonic()
    with pytest.raises(StorageError, match="does not exist") as caught:
        Storage.from_settings().preflight(wait_s=60)
    assert not isinstance(caught.value, StorageUnreachable) and time.monotonic() - started < 5
