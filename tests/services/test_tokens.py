"""API tokens at rest: `aeforge tokens add` and `aeforge serve`'s first token write hashes only; the token they give
out authenticates (at once, with a service already running), and any other is a 401."""

from __future__ import annotations

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from services.api import create_app
from services.cli import app
from services.client import AeforgeClient
from services.settings import ServiceSettings, hash_token, write_local_admin_token
from services.store import Store
from tests.services.fakes import FakeLauncher

SPEC = "name: tok-test\nmodel: {variant: ae, architecture: mlp, latent_dim: 2}\ntrain: {steps: 3, batch_size: 4}\n"


def tokens_add(env: dict[str, str], *args: str):
    result = CliRunner().invoke(app, ["tokens", "add", *args], env={"COLUMNS": "200", **env})
    return result


@pytest.fixture
def service(tmp_path):
    """The API in-process over a store; ``make(settings)`` gives a TestClient for those settings."""
    store = Store(f"sqlite:///{tmp_path / 'tokens.db'}")
    clients = []

    def make(settings: ServiceSettings) -> TestClient:
        client = TestClient(create_app(store, settings, launcher=FakeLauncher()))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    store.close()


def whoami(http: TestClient, token: str) -> int:
    return http.get("/jobs", headers={"Authorization": f"Bearer {token}"}).status_code


def test_tokens_add_prints_a_token_that_authenticates_and_the_file_holds_only_its_hash(tmp_path, service):
    env = {"AEFORGE_HOME": str(tmp_path / "home")}
    first = tokens_add(env, "alice")
    assert first.exit_code == 0, first.output
    token = first.stdout.strip()
    assert len(token) >= 40 and "\n" not in token
    path = tmp_path / "home" / "tokens.yaml"
    assert path.stat().st_mode & 0o777 == 0o600
    assert token not in path.read_text()
    assert yaml.safe_load(path.read_text()) == [{"token_hash": hash_token(token), "owner": "alice", "role": "user"}]

    http = service(ServiceSettings.load(env))
    assert whoami(http, token) == 200
    assert whoami(http, token + "x") == 401 and whoami(http, "wrong-token-123") == 401
    assert whoami(http, hash_token(token)) == 401  # the hash in the file is not a token

    # A second token, added while the service runs, works at once; the first still does.
    second = tokens_add(env, "root", "--role", "admin")
    assert second.exit_code == 0, second.output
    admin = second.stdout.strip()
    assert admin != token and admin not in path.read_text() and len(yaml.safe_load(path.read_text())) == 2
    assert whoami(http, admin) == 200 and whoami(http, token) == 200
    listed = http.get("/jobs", headers={"Authorization": f"Bearer {admin}"})
    assert listed.status_code == 200


def test_tokens_add_writes_aeforge_tokens_file_and_rewrites_plain_entries_as_hashes(tmp_path):
    path = tmp_path / "secrets" / "tokens.yml"
    path.parent.mkdir()
    path.write_text("- {token: old-plain-token-1, owner: bob, role: user}\n")
    result = tokens_add({"AEFORGE_HOME": str(tmp_path / "home"), "AEFORGE_TOKENS_FILE": str(path)}, "carol")
    assert result.exit_code == 0, result.output
    text = path.read_text()
    assert "old-plain-token-1" not in text and result.stdout.strip() not in text
    settings = ServiceSettings.load({"AEFORGE_HOME": str(tmp_path / "home"), "AEFORGE_TOKENS_FILE": str(path)})
    assert settings.principal_for("old-plain-token-1").owner == "bob"
    assert settings.principal_for(result.stdout.strip()).owner == "carol"
    assert not (tmp_path / "home" / "tokens.yaml").exists()


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["dave", "--role", "root"], {}, "role must be 'user' or 'admin'"),
        (["x" * 101], {}, "use 1-100 letters, digits"),
        (["bob\nroot"], {}, "use 1-100 letters, digits"),
        (["bob smith"], {}, "use 1-100 letters, digits"),
        ([" "], {}, "use 1-100 letters, digits"),
        (["../alice"], {}, "use 1-100 letters, digits"),
        (["admin"], {}, "owner 'admin' is kept for admin tokens"),
        (["Admin", "--role", "user"], {}, "owner 'admin' is kept for admin tokens"),
        (["dave"], {"AEFORGE_TOKENS": "tok-inline-1:eve"}, "AEFORGE_TOKENS is set"),
    ],
)
def test_tokens_add_refuses_with_one_message(tmp_path, args, env, message):
    result = tokens_add({"AEFORGE_HOME": str(tmp_path)} | env, *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "tokens.yaml").exists()


def test_a_local_serve_token_reaches_the_local_cli_without_exporting_anything(tmp_path, service):
    """What `aeforge serve` does on first start (write_local_admin_token), then what `aeforge submit` on the same
    machine does (AeforgeClient.from_settings): the CLI's token comes from AEFORGE_HOME/client-token."""
    principal = write_local_admin_token(tmp_path)
    assert principal.token not in (tmp_path / "tokens.yaml").read_text()
    env = {"AEFORGE_HOME": str(tmp_path)}
    http = service(ServiceSettings.load(env))
    client = AeforgeClient.from_settings(ServiceSettings.load(env))
    cli = AeforgeClient("http://testserver", ServiceSettings.load(env).client_token(), http=http)
    assert client.headers == cli.headers
    job = cli.submit(SPEC)
    assert job["owner"] == principal.owner
    assert whoami(http, "not-the-local-token") == 401
