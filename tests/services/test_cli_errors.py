"""How the CLI ends on an error (services.cli_errors): an AeforgeError is one clean message and exit code 2; any
other exception is a bug, printed with its traceback and a line saying so, exit code 1. Through Typer's CliRunner
on the `aeforge` app (its own commands, a sub-app's, a queue command on an app of its own) and once through the
real entry points in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import jobs.registry
import jobs.spec
from jobs.spec import SpecError
from services import cli_jobs
from services.cli import app
from services.cli_errors import BUG_LINE
from services.settings import SettingsError
from workers.data.base import DataError

REPO = Path(__file__).resolve().parents[2]
BAD_SPEC = "name: typo\nmodel: {variant: vae, latent_dim: 2}\nmodle: {variant: ae}\n"


def invoke(*args: str, cli: typer.Typer = app):
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})


def assert_bug(result, exc_name: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback (most recent call last)" in result.output
    assert exc_name in result.output
    assert result.output.rstrip().endswith(BUG_LINE)


def assert_user_error(result, *texts: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ")
    for text in texts:
        assert text in result.output
    assert "Traceback" not in result.output and BUG_LINE not in result.output


def raising(exc: BaseException):
    def fn(*args, **kwargs):
        raise exc

    return fn


# --- a programming error is a bug ---------------------------------------------------------------------------------


def test_a_programming_error_in_a_command_prints_its_traceback_and_says_it_is_a_bug(monkeypatch):
    monkeypatch.setattr(jobs.spec, "json_schema", lambda: {"n": 1 / 0})
    result = invoke("schema")
    assert_bug(result, "ZeroDivisionError: division by zero")
    assert "json_schema" in result.output  # the traceback reaches the line that failed


def test_a_value_error_or_lookup_error_is_a_bug_too(monkeypatch):
    monkeypatch.setattr(jobs.spec, "json_schema", raising(ValueError("bad internal value")))
    assert_bug(invoke("schema"), "ValueError: bad internal value")
    monkeypatch.setattr(jobs.registry, "list_models", raising(KeyError("latest_tags")))
    assert_bug(invoke("models", "list"), "KeyError: 'latest_tags'")  # a command of a sub-app


def test_a_queue_command_mounted_on_an_app_of_its_own_handles_errors_the_same_way(monkeypatch):
    bare = typer.Typer()
    cli_jobs.register(bare)
    monkeypatch.setattr(cli_jobs, "make_client", raising(KeyError("api_url")))
    assert_bug(invoke("jobs", cli=bare), "KeyError: 'api_url'")
    monkeypatch.setattr(cli_jobs, "make_client", raising(SettingsError("AEFORGE_API_URL must be an http:// URL")))
    assert_user_error(invoke("jobs", cli=bare), "AEFORGE_API_URL must be an http:// URL")


# --- an error the user can act on is one message ------------------------------------------------------------------


def test_a_spec_with_an_unknown_key_is_one_clean_message_listing_the_field(tmp_path):
    spec = tmp_path / "typo.yaml"
    spec.write_text(BAD_SPEC)
    result = invoke("validate", "--no-data", str(spec))
    assert_user_error(result, f"{spec}: 1 error", "modle")
    assert result.output.splitlines()[1].startswith("  modle: ")


@pytest.mark.parametrize(
    "error, texts",
    [
        (DataError("data set 'faces' is empty: there is nothing to evaluate"), ["data set 'faces' is empty"]),
        (
            SpecError(
                [{"loc": "model.beta", "msg": "must be >= 0"}, {"loc": "train.steps", "msg": "too many"}], "s.yaml"
            ),
            ["s.yaml: 2 errors", "  model.beta: must be >= 0", "  train.steps: too many"],
        ),
    ],
    ids=["DataError", "SpecError"],
)
def test_an_aeforge_error_raised_in_a_command_is_one_clean_message(monkeypatch, error, texts):
    monkeypatch.setattr(jobs.spec, "json_schema", raising(error))
    assert_user_error(invoke("schema"), *texts)


def test_typer_exits_usage_errors_and_interrupts_keep_their_own_codes(monkeypatch):
    usage = invoke("validate")  # a missing argument: Typer's usage error
    assert usage.exit_code == 2 and "Missing argument" in usage.output and BUG_LINE not in usage.output
    monkeypatch.setattr(jobs.spec, "json_schema", raising(typer.Exit(3)))
    assert invoke("schema").exit_code == 3
    monkeypatch.setattr(jobs.spec, "json_schema", raising(KeyboardInterrupt()))
    interrupted = invoke("schema")
    assert interrupted.exit_code == 130 and BUG_LINE not in interrupted.output


# --- the real entry points ----------------------------------------------------------------------------------------


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "AEFORGE_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_the_real_entry_points_print_user_errors_and_bugs_the_same_way(tmp_path):
    spec = tmp_path / "typo.yaml"
    spec.write_text(BAD_SPEC)
    user = run_cli([sys.executable, "-m", "services.cli", "validate", "--no-data", str(spec)], tmp_path)
    assert user.returncode == 2, user.stderr
    assert user.stderr.startswith("error: ") and "modle" in user.stderr and "Traceback" not in user.stderr

    # services.cli:main, as `python -m services.cli` runs it, with a bug planted in what `schema` calls.
    planted = (
        "import sys, jobs.spec; jobs.spec.json_schema = lambda: {}['missing']; from services.cli import main; "
        "sys.argv = ['aeforge', 'schema']; main()"
    )
    bug = run_cli([sys.executable, "-c", planted], tmp_path)
    assert bug.returncode == 1, bug.stderr
    assert "Traceback (most recent call last)" in bug.stderr and "KeyError: 'missing'" in bug.stderr
    assert bug.stderr.rstrip().endswith(BUG_LINE)

    script = Path(sys.executable).with_name("aeforge")  # the console script of pyproject.toml, once installed
    if script.exists():
        installed = run_cli([str(script), "validate", "--no-data", str(spec)], tmp_path)
        assert (
            installed.returncode == 2 and installed.stderr.startswith("error: ") and "Traceback" not in installed.stderr
        )
