"""`aeforge data push / ls / rm` (services.cli_data) on a local folder and on moto S3: output and exit codes."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from services import cli_data
from tests.fixtures.s3 import free_port
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
from tests.workers.data.test_readers import write_idx
from workers.data import mpi3d
from workers.data.idx import IMAGES_MAGIC, LABELS_MAGIC
from workers.storage import Storage


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Mounting point (a Typer app with one sub-app needs a callback to keep sub-command names)."""

    cli_data.register(app)
    return app


@pytest.fixture
def local_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("AEFORGE_HOME", str(home))
    monkeypatch.delenv("AEFORGE_STORAGE", raising=False)
    return home


def run(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def files(tmp_path: Path) -> tuple[Path, Path]:
    """An MNIST-style IDX pair: 2 images of 32x32 (2,064 bytes with the header) and their labels (10 bytes)."""
    images = write_idx(tmp_path / "train-images-idx3-ubyte", np.full((2, 32, 32), 7, np.uint8), IMAGES_MAGIC)
    labels = write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1], np.uint8), LABELS_MAGIC)
    return images, labels


def assert_plain_error(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    assert text in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_push_ls_rm(app, local_home, tmp_path):
    images, labels = files(tmp_path)
    pushed = run(app, "data", "push", images, labels, "--name", "mnist")
    assert pushed.exit_code == 0, pushed.output
    assert (
        "pushed mnist: 2 examples of 1x32x32, labels 2 classes, factors none; 2 file(s), 2.0 KiB, format idx"
        in pushed.output
    )

    listing = run(app, "data", "ls")
    assert listing.exit_code == 0, listing.output
    assert row_of(listing.output, "mnist")[:6] == ["mnist", "2", "1x32x32", "2 classes", "none", "2.0 KiB"]

    assert_plain_error(run(app, "data", "push", images, "--name", "mnist"), "already exists")
    assert run(app, "data", "push", images, "--name", "mnist", "--overwrite").exit_code == 0
    assert [len(m["files"]) for m in Storage.from_settings().ls()] == [1]

    removed = run(app, "data", "rm", "mnist")
    assert removed.exit_code == 0 and "removed mnist" in removed.output
    assert "no datasets" in run(app, "data", "ls").output
    assert_plain_error(run(app, "data", "rm", "mnist"), "no dataset named 'mnist'")


def test_errors_are_one_plain_message(app, local_home, tmp_path):
    images, _ = files(tmp_path)
    assert_plain_error(run(app, "data", "push", tmp_path / "missing.npz", "--name", "x"), "no such file or folder")
    assert_plain_error(run(app, "data", "push", images, "--name", "bad/name"), "invalid dataset name")
    odd = tmp_path / "data.bin"
    np.savez(open(odd, "wb"), images=np.zeros((3, 8, 8), np.uint8))
    assert_plain_error(run(app, "data", "push", odd, "--name", "x"), "give it with --format")
    assert run(app, "data", "push", odd, "--name", "x", "--format", "npz").exit_code == 0
    assert_plain_error(run(app, "data", "push", odd, "--name", "y", "--format", "zip"), "unknown format 'zip'")


def test_push_and_ls_on_s3(app, s3_env, tmp_path):
    images, labels = files(tmp_path)
    pushed = run(app, "data", "push", images, labels, "--name", "mnist")
    assert pushed.exit_code == 0, pushed.output
    assert f"s3://{s3_env.bucket}/aeforge/datasets/mnist" in pushed.output
    keys = sorted(o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket)["Contents"])
    assert keys == [
        "aeforge/datasets/mnist/files/train-images-idx3-ubyte",
        "aeforge/datasets/mnist/files/train-labels-idx1-ubyte",
        "aeforge/datasets/mnist/manifest.json",
    ]
    listing = run(app, "data", "ls")
    assert listing.exit_code == 0 and "mnist" in listing.output


def test_unreachable_endpoint_is_a_plain_error(app, s3_env, tmp_path, monkeypatch):
    images, _ = files(tmp_path)
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", endpoint)
    result = run(app, "data", "push", images, "--name", "mnist")
    assert_plain_error(result, "cannot connect")
    assert endpoint in result.output and s3_env.bucket in result.output


# --- owners -------------------------------------------------------------------------------------------------------

TOKENS = {"alice": "alice-token-123", "bob": "bob-token-4567", "root": "root-token-890"}


@pytest.fixture
def users(local_home, monkeypatch):
    """Three users of a service whose tokens this machine knows (AEFORGE_TOKENS); ``as_user(name)`` picks whose
    AEFORGE_API_TOKEN the next command runs with."""
    monkeypatch.setenv(
        "AEFORGE_TOKENS", ",".join(f"{t}:{o}:{'admin' if o == 'root' else 'user'}" for o, t in TOKENS.items())
    )
    return lambda who: monkeypatch.setenv("AEFORGE_API_TOKEN", TOKENS[who])


def row_of(output: str, name: str) -> list[str]:
    """The cells of the table row of dataset ``name``: name, examples, image, labels, factors, size, owner (with
    ", shared" when it is)."""
    line = next(line for line in output.splitlines() if f" {name} " in line)
    return [cell.strip() for cell in line.split("│") if cell.strip()]


def test_datasets_are_owned_listed_with_their_owner_and_shared_only_by_it(app, users, tmp_path):
    images, labels = files(tmp_path)
    users("alice")
    assert run(app, "data", "push", images, labels, "--name", "mnist").exit_code == 0
    row = row_of(run(app, "data", "ls").output, "mnist")
    assert row[0] == "mnist" and row[-1] == "alice"

    users("bob")
    assert_plain_error(run(app, "data", "share", "mnist"), "dataset 'mnist' belongs to alice: only its owner")
    assert_plain_error(run(app, "data", "push", images, "--name", "mnist", "--overwrite"), "belongs to alice")
    assert_plain_error(run(app, "data", "rm", "mnist"), "belongs to alice")
    assert [len(m["files"]) for m in Storage.from_settings().ls()] == [2]  # alice's, untouched

    users("alice")
    shared = run(app, "data", "share", "mnist")
    assert shared.exit_code == 0 and "mnist is shared" in shared.output
    assert row_of(run(app, "data", "ls").output, "mnist")[-1] == "alice, shared"
    users("root")
    assert run(app, "data", "share", "mnist", "--unshare").exit_code == 0  # an admin may
    assert Storage.from_settings().manifest("mnist")["shared"] is False
    users("bob")
    assert run(app, "data", "push", images, "--name", "bobs").exit_code == 0
    assert {m["name"]: m["owner"] for m in Storage.from_settings().ls()} == {"bobs": "bob", "mnist": "alice"}


def test_without_a_service_the_owner_is_the_local_user(app, local_home, tmp_path, monkeypatch):
    import getpass

    monkeypatch.delenv("AEFORGE_API_TOKEN", raising=False)
    monkeypatch.delenv("AEFORGE_TOKENS", raising=False)
    images, _ = files(tmp_path)
    assert run(app, "data", "push", images, "--name", "mine").exit_code == 0
    assert Storage.from_settings().manifest("mine")["owner"] == getpass.getuser()
    assert row_of(run(app, "data", "ls").output, "mine")[-1] == getpass.getuser()


def test_without_a_token_share_and_rm_say_who_they_act_as_and_spare_another_owners_dataset(
    app, local_home, tmp_path, monkeypatch
):
    import getpass

    monkeypatch.delenv("AEFORGE_API_TOKEN", raising=False)
    monkeypatch.delenv("AEFORGE_TOKENS", raising=False)
    images, _ = files(tmp_path)
    me = getpass.getuser()
    Storage.from_settings().push([images], "alices", owner="alice" if me != "alice" else "alice2")
    for command in (["share", "alices"], ["share", "alices", "--unshare"], ["rm", "alices"]):
        refused = run(app, "data", *command)
        assert_plain_error(refused, "give --as-owner to act as its owner")
        assert f"no API token: acting as {me}" in refused.output
    assert Storage.from_settings().manifest("alices")["shared"] is False  # untouched
    shared = run(app, "data", "share", "alices", "--as-owner")
    assert shared.exit_code == 0 and "--as-owner: acting as" in shared.output and "alices is shared" in shared.output
    assert run(app, "data", "push", images, "--name", "mine").exit_code == 0
    removed = run(app, "data", "rm", "mine")
    assert removed.exit_code == 0 and f"acting as {me}" in removed.output and "removed mine" in removed.output
    assert run(app, "data", "rm", "alices", "--as-owner").exit_code == 0
    assert Storage.from_settings().ls() == []


def test_a_token_this_machine_does_not_know_is_asked_of_the_service(app, local_home, tmp_path, monkeypatch):
    """AEFORGE_API_URL/AEFORGE_API_TOKEN of a remote service: the owner is what its /whoami says."""
    from fastapi.testclient import TestClient

    from services import client as client_module
    from services.api import create_app
    from services.settings import Principal, ServiceSettings
    from services.store import Store

    store = Store(f"sqlite:///{tmp_path / 'api.db'}")
    service = create_app(
        store, ServiceSettings(home=tmp_path, db_url="unused", tokens=(Principal("carol", "user", "carol-token-42"),))
    )
    original = client_module.AeforgeClient

    class ThroughTestClient(original):
        def __init__(self, url, token, **kwargs):
            super().__init__(url, token, http=TestClient(service))

    monkeypatch.setattr(client_module, "AeforgeClient", ThroughTestClient)
    monkeypatch.setenv("AEFORGE_API_URL", "https://aeforge.example.com")
    monkeypatch.setenv("AEFORGE_API_TOKEN", "carol-token-42")
    monkeypatch.delenv("AEFORGE_TOKENS", raising=False)
    images, _ = files(tmp_path)
    try:
        assert run(app, "data", "push", images, "--name", "carols").exit_code == 0
        assert Storage.from_settings().manifest("carols")["owner"] == "carol"
        monkeypatch.setenv("AEFORGE_API_TOKEN", "not-a-known-token")
        assert_plain_error(run(app, "data", "push", images, "--name", "other"), "unknown token")
    finally:
        store.close()


# --- push reads the data with its reader first; ls shows what each dataset holds ----------------------------------

DSPRITES_FACTORS = [("shape", 3), ("scale", 6), ("orientation", 40), ("pos_x", 32), ("pos_y", 32)]
SHAPES3D_FACTORS = [
    ("floor_hue", 10),
    ("wall_hue", 10),
    ("object_hue", 10),
    ("scale", 8),
    ("shape", 4),
    ("orientation", 15),
]


@pytest.fixture(params=["file", "s3"])
def storage_env(request, tmp_path, monkeypatch) -> str:
    """Storage in a local folder (AEFORGE_HOME/storage) or on the moto S3 server; the owner is the local user."""
    monkeypatch.delenv("AEFORGE_API_TOKEN", raising=False)
    monkeypatch.delenv("AEFORGE_TOKENS", raising=False)
    if request.param == "s3":
        request.getfixturevalue("s3_env")
    else:
        monkeypatch.setenv("AEFORGE_HOME", str(tmp_path / "home"))
        monkeypatch.delenv("AEFORGE_STORAGE", raising=False)
    return request.param


@pytest.fixture
def known_files(tmp_path, monkeypatch) -> dict[str, tuple[list[Path], dict]]:
    """name -> (what to push, the manifest fields its reader should find): small files with the real keys, dtypes
    and layouts of dSprites, 3D Shapes, MPI3D (its grid cut to 72 cells), a CelebA folder and an MNIST pair."""

    def fields(examples, shape, classes, factors):
        return {
            "examples": examples,
            "image_shape": shape,
            "classes": classes,
            "factors": None if factors is None else [{"name": n, "size": s} for n, s in factors],
        }

    found = {}
    folder = tmp_path / "files"
    folder.mkdir()
    dsprites = folder / DSPRITES_NAME
    write_dsprites(dsprites, np.array(list(itertools.product(range(3), [0, 5], [0, 39], [0, 31], [1, 30]))))
    found["dsprites"] = ([dsprites], fields(48, [1, 64, 64], None, DSPRITES_FACTORS))
    factors = every_value(30)
    shapes = write_h5(folder / "3dshapes.h5", shapes3d_images(factors), labels_of(factors))
    found["shapes3d"] = ([shapes], fields(30, [3, 64, 64], None, SHAPES3D_FACTORS))
    monkeypatch.setattr(mpi3d, "GRID", SMALL_GRID)  # the CLI runs in this process: its reader sees the small grid
    mpi = folder / "mpi3d_toy.npz"
    np.savez(mpi, images=shapes3d_images(grid([s for _, s in SMALL_GRID])))
    found["mpi3d-toy"] = ([mpi], fields(72, [3, 64, 64], None, SMALL_GRID))
    celeba = tmp_path / "img_align_celeba"
    celeba.mkdir()
    for i in range(3):
        Image.fromarray(np.full((218, 178, 3), 60 * i, np.uint8)).save(celeba / f"{i + 1:06d}.jpg")
    found["celeba"] = ([celeba], fields(3, [3, 218, 178], None, None))
    found["mnist"] = (list(files(folder)), fields(2, [1, 32, 32], 2, None))
    return found


def ls_json(app) -> dict[str, dict]:
    listing = run(app, "data", "ls", "--output", "json")
    assert listing.exit_code == 0, listing.output
    return {m["name"]: m for m in json.loads(listing.output)}


def test_push_reads_each_known_format_and_ls_shows_what_it_holds(app, storage_env, known_files):
    for name, (paths, expected) in known_files.items():
        pushed = run(app, "data", "push", *paths, "--name", name)
        assert pushed.exit_code == 0, pushed.output
        assert (
            f"pushed {name}: {expected['examples']} examples of {'x'.join(map(str, expected['image_shape']))}"
            in pushed.output
        )
        assert {k: Storage.from_settings().manifest(name)[k] for k in expected} == expected

    table = run(app, "data", "ls").output
    assert row_of(table, "dsprites")[:5] == [
        "dsprites",
        "48",
        "1x64x64",
        "none",
        "shape 3, scale 6, orientation 40, pos_x 32, pos_y 32",
    ]
    assert row_of(table, "shapes3d")[1:5] == [
        "30",
        "3x64x64",
        "none",
        ", ".join(f"{n} {s}" for n, s in SHAPES3D_FACTORS),
    ]
    assert row_of(table, "mpi3d-toy")[1:5] == ["72", "3x64x64", "none", ", ".join(f"{n} {s}" for n, s in SMALL_GRID)]
    assert row_of(table, "celeba")[1:5] == ["3", "3x218x178", "none", "none"]
    assert row_of(table, "mnist")[1:5] == ["2", "1x32x32", "2 classes", "none"]

    listed = ls_json(app)
    assert sorted(listed) == sorted(known_files)
    for name, (paths, expected) in known_files.items():
        assert {k: listed[name][k] for k in expected} == expected and listed[name]["contents_known"] is True
    assert listed["shapes3d"]["format"] == "hdf5" and listed["celeba"]["format"] == "folder"
    assert [f["path"] for f in listed["mnist"]["files"]] == ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


@pytest.mark.parametrize("garbage", ["train-images.idx", "faces.npz", "3dshapes.h5", "photos/000001.jpg"])
def test_a_file_its_reader_refuses_is_named_and_nothing_is_uploaded(app, storage_env, tmp_path, garbage):
    images, labels = files(tmp_path)
    assert run(app, "data", "push", images, labels, "--name", "digits").exit_code == 0
    storage = Storage.from_settings()
    before = (storage.manifest("digits"), storage.list_prefix("datasets"))

    bad = tmp_path / garbage
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(np.random.default_rng(7).bytes(3000))
    pushed = bad.parent if "/" in garbage else bad
    replaced = run(app, "data", "push", pushed, "--name", "digits", "--overwrite")
    assert_plain_error(replaced, f"cannot push dataset 'digits': {bad}: ")
    new = run(app, "data", "push", pushed, "--name", "junk")
    assert_plain_error(new, f"cannot push dataset 'junk': {bad}: ")
    assert (storage.manifest("digits"), storage.list_prefix("datasets")) == before  # untouched, nothing added
    assert sorted(ls_json(app)) == ["digits"]


def test_ls_shows_a_dash_for_datasets_pushed_before_pushes_were_read(app, storage_env, tmp_path):
    images, labels = files(tmp_path)
    Storage.from_settings().push([images, labels], "old-digits")  # no reader: as pushes were before
    assert run(app, "data", "push", images, labels, "--name", "new-digits").exit_code == 0
    table = run(app, "data", "ls").output
    assert row_of(table, "old-digits")[:5] == ["old-digits", "-", "-", "-", "-"]
    assert row_of(table, "new-digits")[:5] == ["new-digits", "2", "1x32x32", "2 classes", "none"]
    old = ls_json(app)["old-digits"]
    assert old["contents_known"] is False
    assert [old[k] for k in ("examples", "image_shape", "classes", "factors")] == [None] * 4


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_ls_never_cuts_a_name_folded_on_a_terminal_whole_when_piped(app, storage_env, tmp_path, known_files):
    long_name = "dsprites-full-grid-pushed-by-the-disentanglement-study-2026"
    paths, _ = known_files["dsprites"]
    assert run(app, "data", "push", *paths, "--name", long_name).exit_code == 0

    piped = CliRunner().invoke(app, ["data", "ls"], env={"COLUMNS": None, "TTY_COMPATIBLE": None, "FORCE_COLOR": None})
    assert piped.exit_code == 0 and "…" not in piped.output and "\x1b" not in piped.output
    row = row_of(piped.output, long_name)  # one line: the name and the whole factor list
    assert row[0] == long_name and row[4] == "shape 3, scale 6, orientation 40, pos_x 32, pos_y 32"

    terminal = CliRunner().invoke(app, ["data", "ls"], env={"COLUMNS": "80", "TTY_COMPATIBLE": "1", "NO_COLOR": "1"})
    assert terminal.exit_code == 0, terminal.output
    lines = ANSI.sub("", terminal.output).splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in terminal.output
    body = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    assert "".join(cells[0] for cells in body) == long_name  # folded over several lines, every character kept
    assert " ".join(cells[4] for cells in body if cells[4]) == "shape 3, scale 6, orientation 40, pos_x 32, pos_y 32"
    assert body[0][1:3] == ["48", "1x64x64"]  # short values keep their width


def test_the_installed_command_refuses_garbage_and_lists_piped_at_full_width(tmp_path, known_files):
    """The `aeforge` executable itself, its output going to a pipe, with file storage."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AEFORGE_", "COLUMNS", "TTY_", "FORCE_COLOR"))}
    env["AEFORGE_HOME"] = str(tmp_path / "home")
    aeforge = [sys.executable, "-c", "from services.cli import app; app(prog_name='aeforge')"]
    garbage = tmp_path / "train-images.idx"
    garbage.write_bytes(np.random.default_rng(5).bytes(3000))

    def aeforge_run(*args):
        return subprocess.run([*aeforge, *map(str, args)], env=env, capture_output=True, text=True, timeout=120)

    refused = aeforge_run("data", "push", garbage, "--name", "digits")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith(f"error: cannot push dataset 'digits': {garbage}: magic number ")
    long_name = "celeba-aligned-faces-cropped-to-64-pixels-for-the-beta-vae-study"
    assert aeforge_run("data", "push", *known_files["celeba"][0], "--name", long_name).returncode == 0
    listing = aeforge_run("data", "ls")
    assert listing.returncode == 0 and "…" not in listing.stdout
    assert row_of(listing.stdout, long_name)[:5] == [long_name, "3", "3x218x178", "none", "none"]
