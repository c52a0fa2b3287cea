"""Service settings: environment over settings file, token lists, and errors that name the variable or file."""

from __future__ import annotations

import pytest

from services.settings import ServiceSettings, SettingsError, hash_token, parse_tokens, write_local_admin_token


def test_defaults_live_under_aeforge_home(tmp_path):
    s = ServiceSettings.load({"AEFORGE_HOME": str(tmp_path)})
    assert s.home == tmp_path and s.db_url == f"sqlite:///{tmp_path / 'aeforge.db'}"
    assert s.api_url == "http://127.0.0.1:8000" and s.tokens == () and s.ray_address is None
    assert s.max_concurrent_jobs is None and s.max_request_bytes == 1 << 20 and s.job_module == "jobs.run"


def test_environment_wins_over_the_settings_file(tmp_path):
    (tmp_path / "settings.yaml").write_text(
        "AEFORGE_DB_URL: postgresql+psycopg://db/aeforge\nAEFORGE_MAX_CONCURRENT_JOBS: 3\nRAY_ADDRESS: head:6379\n"
    )
    s = ServiceSettings.load({"AEFORGE_HOME": str(tmp_path), "RAY_ADDRESS": "other:6379"})
    assert (
        s.db_url == "postgresql+psycopg://db/aeforge" and s.max_concurrent_jobs == 3 and s.ray_address == "other:6379"
    )
    explicit = tmp_path / "elsewhere.yaml"
    explicit.write_text("AEFORGE_API_URL: https://queue.example.org/\n")
    assert ServiceSettings.load({"AEFORGE_SETTINGS_FILE": str(explicit)}).api_url == "https://queue.example.org"


@pytest.mark.parametrize(
    "env,message",
    [
        ({"AEFORGE_MAX_CONCURRENT_JOBS": "many"}, "AEFORGE_MAX_CONCURRENT_JOBS must be a positive integer"),
        ({"AEFORGE_MAX_REQUEST_BYTES": "0"}, "AEFORGE_MAX_REQUEST_BYTES must be a positive integer"),
        ({"AEFORGE_DISPATCH_INTERVAL": "-1"}, "AEFORGE_DISPATCH_INTERVAL must be a positive number"),
        ({"AEFORGE_API_URL": "ftp://x"}, "AEFORGE_API_URL must be an http"),
        ({"AEFORGE_JOB_MODULE": "jobs.run; rm -rf /"}, "AEFORGE_JOB_MODULE must be a dotted Python module name"),
        ({"AEFORGE_SETTINGS_FILE": "/nonexistent/settings.yaml"}, "AEFORGE_SETTINGS_FILE: no such file"),
        ({"AEFORGE_TOKENS_FILE": "/nonexistent/tokens.yaml"}, "AEFORGE_TOKENS_FILE: no such file"),
    ],
)
def test_bad_values_name_the_variable(tmp_path, env, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        ServiceSettings.load({"AEFORGE_HOME": str(tmp_path)} | env)


def test_unknown_keys_in_the_settings_file_are_named(tmp_path):
    (tmp_path / "settings.yaml").write_text("AEFORGE_DB_URI: x\n")
    with pytest.raises(SettingsError, match="unknown setting\\(s\\) AEFORGE_DB_URI"):
        ServiceSettings.load({"AEFORGE_HOME": str(tmp_path)})


def test_tokens_from_a_file_a_variable_or_the_compact_form(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(
        '[{"token": "tok-alice-1", "owner": "alice", "role": "user"}, {"token": "tok-root-1", "owner": "root", "role": "admin"}]'
    )
    s = ServiceSettings.load({"AEFORGE_HOME": str(tmp_path), "AEFORGE_TOKENS_FILE": str(path)})
    assert [(p.owner, p.role) for p in s.tokens] == [("alice", "user"), ("root", "admin")]
    assert s.principal_for("tok-root-1").owner == "root" and s.principal_for("tok-root-") is None
    compact = ServiceSettings.load(
        {"AEFORGE_HOME": str(tmp_path), "AEFORGE_TOKENS": "tok-bob-12:bob, tok-eve-12:eve:admin"}
    )
    assert [(p.owner, p.role) for p in compact.tokens] == [("bob", "user"), ("eve", "admin")]
    assert "tok-bob" not in repr(compact) and "tok-bob" not in repr(compact.tokens[0])


@pytest.mark.parametrize(
    "text,message",
    [
        ('[{"token": "short", "owner": "a"}]', "entry 0: token must be at least 8"),
        ('[{"token": "long-enough", "owner": "a", "role": "root"}]', "entry 0: role must be 'user' or 'admin'"),
        ('[{"token": "long-enough", "role": "user"}]', "entry 0: owner must be"),
        ('[{"token": "long-enough", "owner": "a"}, {"token": "long-enough", "owner": "b"}]', "entry 1: the same token"),
        ('[{"token": "long-enough", "owner": "a", "colour": 1}]', "entry 0: unknown key"),
        ("{token: x}", "expected a list"),
        ("tok:a:b:c:d", "entry 0: expected token:owner"),
        ('[{"token_hash": "sha256:abc", "owner": "a"}]', "entry 0: token_hash must be 'sha256:' and 64 hex digits"),
        ('[{"token_hash": "md5:0", "token": "long-enough", "owner": "a"}]', "entry 0: give token_hash .* not both"),
        ('[{"owner": "a"}]', "entry 0: give token_hash .* not neither"),
        (
            f'[{{"token": "long-enough", "owner": "a"}}, {{"token_hash": "{hash_token("long-enough")}", "owner": "b"}}]',
            "entry 1: the same token",
        ),
    ],
)
def test_bad_token_lists_name_the_entry(text, message):
    with pytest.raises(SettingsError, match=message):
        parse_tokens(text, "tokens.yaml")


def test_token_files_hold_hashes_and_plain_tokens_are_still_read(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(
        f"- {{token_hash: '{hash_token('tok-carol-1')}', owner: carol, role: admin}}\n"
        f"- {{token: tok-dave-12, owner: dave}}\n"
    )
    s = ServiceSettings.load({"AEFORGE_HOME": str(tmp_path)})
    assert s.principal_for("tok-carol-1").owner == "carol" and s.principal_for("tok-dave-12").owner == "dave"
    assert s.principal_for("tok-carol-") is None and s.principal_for(hash_token("tok-carol-1")) is None
    assert s.tokens[0].token is None and "sha256" not in repr(s)


def test_a_token_file_is_read_again_when_it_changes_and_a_broken_one_keeps_the_last_tokens(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(f"- {{token_hash: '{hash_token('tok-first-1')}', owner: first}}\n")
    s = ServiceSettings.load({"AEFORGE_HOME": str(tmp_path)})
    assert s.principal_for("tok-first-1").owner == "first"
    path.write_text(f"- {{token_hash: '{hash_token('tok-second-1')}', owner: second, role: admin}}\n")
    assert s.principal_for("tok-second-1").owner == "second" and s.principal_for("tok-first-1") is None
    path.write_text("- {token_hash: broken, owner: x}\n# an edit in progress\n")
    assert s.principal_for("tok-second-1").owner == "second"


def test_the_local_admin_token_is_private_and_used_by_a_local_client(tmp_path):
    principal = write_local_admin_token(tmp_path)
    tokens_file, client_file = tmp_path / "tokens.yaml", tmp_path / "client-token"
    assert tokens_file.stat().st_mode & 0o777 == 0o600 and client_file.stat().st_mode & 0o777 == 0o600
    # The service's file has the hash only; the CLI's own file has the token.
    assert principal.token not in tokens_file.read_text() and principal.token_hash in tokens_file.read_text()
    assert client_file.read_text().strip() == principal.token
    s = ServiceSettings.load({"AEFORGE_HOME": str(tmp_path)})
    assert s.principal_for(principal.token) == principal and s.client_token() == principal.token
    assert s.principal_for(principal.token).is_admin and s.principal_for("not-the-token") is None
    remote = ServiceSettings.load({"AEFORGE_HOME": str(tmp_path), "AEFORGE_API_URL": "https://queue.example.org"})
    assert remote.client_token() is None
    assert (
        ServiceSettings.load({"AEFORGE_HOME": str(tmp_path), "AEFORGE_API_TOKEN": "mine-123"}).client_token()
        == "mine-123"
    )
    with pytest.raises(FileExistsError):
        write_local_admin_token(tmp_path)
