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


# --- owners -------------------------------------------------------------------------------------------------------

TOKENS = {"alice": "alice-token-123", "bob": "bob-token-4567", "root": "root-token-890"}


@pytest.fixture
def users(local_home, monkeypatch):
    """Three users of a service whose tokens this machine knows (AEFORGE_TOKENS); ``as_user(name)`` picks whose
    AEFORGE_API_TOKEN the next command runs with."""
    monkeypatch.setenv("AEFORGE_TOKENS", ",".join(f"{t}:{o}:{'admin' if o == 'root' else 'user'}"
                                                  for o, t in TOKENS.items()))
    return lambda who: monkeypatch.setenv("AEFORGE_API_TOKEN", TOKENS[who])


def row_of(output: str, name: str) -> list[str]:
    """The cells of the table row of dataset ``name``: name, files, size, format, owner, shared, created."""
    line = next(line for line in output.splitlines() if f" {name} " in line)
    return [cell.strip() for cell in line.split("│") if cell.strip()]


def test_datasets_are_owned_listed_with_their_owner_and_shared_only_by_it(app, users, tmp_path):
    images, labels = files(tmp_path)
    users("alice")
    assert run(app, "data", "push", images, labels, "--name", "mnist").exit_code == 0
    row = row_of(run(app, "data", "ls").output, "mnist")
    assert row[0] == "mnist" and row[-3:-1] == ["alice", "no"]

    users("bob")
    assert_plain_error(run(app, "data", "share", "mnist"), "dataset 'mnist' belongs to alice: only its owner")
    assert_plain_error(run(app, "data", "push", images, "--name", "mnist", "--overwrite"), "belongs to alice")
    assert_plain_error(run(app, "data", "rm", "mnist"), "belongs to alice")
    assert [len(m["files"]) for m in Storage.from_settings().ls()] == [2]  # alice's, untouched

    users("alice")
    shared = run(app, "data", "share", "mnist")
    assert shared.exit_code == 0 and "mnist is shared" in shared.output
    assert row_of(run(app, "data", "ls").output, "mnist")[-3:-1] == ["alice", "yes"]
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
    assert row_of(run(app, "data", "ls").output, "mine")[-3:-1] == [getpass.getuser(), "no"]


def test_a_token_this_machine_does_not_know_is_asked_of_the_service(app, local_home, tmp_path, monkeypatch):
    """AEFORGE_API_URL/AEFORGE_API_TOKEN of a remote service: the owner is what its /whoami says."""
    from fastapi.testclient import TestClient

    from services import client as client_module
    from services.api import create_app
    from services.settings import Principal, ServiceSettings
    from services.store import Store

    store = Store(f"sqlite:///{tmp_path / 'api.db'}")
    service = create_app(store, ServiceSettings(home=tmp_path, db_url="unused",
                                                tokens=(Principal("carol", "user", "carol-token-42"),)))
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
