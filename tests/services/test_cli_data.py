"""`aeforge data push / ls / rm` (services.cli_data) on a local folder and on moto S3: output and exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from services import cli_data
from tests.fixtures.s3 import free_port
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
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    images.write_bytes(b"i" * 2048)
    labels.write_bytes(b"l" * 16)
    return images, labels


def assert_plain_error(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    assert text in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_push_ls_rm(app, local_home, tmp_path):
    images, labels = files(tmp_path)
    pushed = run(app, "data", "push", images, labels, "--name", "mnist")
    assert pushed.exit_code == 0, pushed.output
    assert "pushed mnist: 2 file(s), 2.0 KiB, format idx" in pushed.output

    listing = run(app, "data", "ls")
    assert listing.exit_code == 0, listing.output
    row = next(line for line in listing.output.splitlines() if "mnist" in line)
    assert "2.0 KiB" in row and " 2 " in row and "idx" in row

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
    odd.write_bytes(b"x")
    assert_plain_error(run(app, "data", "push", odd, "--name", "x"), "give it with --format")
    assert run(app, "data", "push", odd, "--name", "x", "--format", "npz").exit_code == 0
    assert_plain_error(run(app, "data", "push", odd, "--name", "y", "--format", "zip"), "unknown format 'zip'")


def test_push_and_ls_on_s3(app, s3_env, tmp_path):
    images, labels = files(tmp_path)
    pushed = run(app, "data", "push", images, labels, "--name", "mnist")
    assert pushed.exit_code == 0, pushed.output
    assert f"s3://{s3_env.bucket}/aeforge/datasets/mnist" in pushed.output
    keys = sorted(o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket)["Contents"])
    assert keys == ["aeforge/datasets/mnist/files/train-images-idx3-ubyte",
                    "aeforge/datasets/mnist/files/train-labels-idx1-ubyte", "aeforge/datasets/mnist/manifest.json"]
    listing = run(app, "data", "ls")
    assert listing.exit_code == 0 and "mnist" in listing.output


def test_unreachable_endpoint_is_a_plain_error(app, s3_env, tmp_path, monkeypatch):
    images, _ = files(tmp_path)
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AEFORGE_S3_ENDPOINT_URL", endpoint)
    result = run(app, "data", "push", images, "--name", "mnist")
    assert_plain_error(result, "cannot connect")
    assert endpoint in result.output and s3_env.bucket in result.output
