"""What the CLI prints: tables that never cut a name (folded on a narrow terminal, whole when piped), ``--output
json`` on `models list`, `models show` and `sweep results`, `aeforge --version`, shell completion, and `validate`'s
warning about GPUs that are not there.

Typer's CliRunner is not a terminal, so these runs are "piped" unless COLUMNS says otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from io import StringIO
from pathlib import Path

import mlflow
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from services import cli
from services.cli_output import PIPE_WIDTH, CliConsole, jsonable
from tests.jobs.test_registry import METRICS, make_model, make_spec
from workers.tracking import JOB_ID_TAG, PARENT_RUN_TAG, ensure_experiment, start_or_resume_run

PIPED = {"COLUMNS": None}  # unset: a terminal's width must not leak in from the shell that runs the tests
NARROW = {"COLUMNS": "60"}
ELLIPSIS = "…"

# 60-character names, as long as people make them.
LONG_MODELS = ["dae-digits-" + "x" * 37 + "-corrupt-0.5", "betavae-dsprites-" + "y" * 32 + "-beta-4-z10"]
LONG_METRIC = "eval/reconstruction_" + "m" * 30 + "_per_pixel"
assert all(len(n) == 60 for n in LONG_MODELS) and len(LONG_METRIC) == 60


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli.app, list(args), env=env or PIPED)


def first_column(output: str) -> list[str]:
    """The first cell of every body line of a rich table (the lines between ┡━…┩ and └─…┘), stripped."""
    cells, in_body = [], False
    for line in output.splitlines():
        if line.startswith("┡"):
            in_body = True
        elif line.startswith("└"):
            in_body = False
        elif in_body and line.startswith("│"):
            cells.append(line.split("│")[1].strip())
    return cells


def assert_folded_not_cut(output: str, names: list[str], width: int = 60) -> None:
    """Every line of a table fits ``width`` (free text, such as a URI, is the terminal's to wrap); nothing is cut
    with "…"; each name is in the first column, spread over its lines."""
    assert ELLIPSIS not in output, output
    assert max(len(line) for line in output.splitlines() if line[:1] in "┏┃┡│└") <= width, output
    column = "".join(first_column(output))
    for name in names:
        assert name in column, (name, output)


# --- the console --------------------------------------------------------------------------------------------------


def test_console_is_as_wide_as_its_lines_when_piped(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert CliConsole(file=StringIO()).width == PIPE_WIDTH
    monkeypatch.setenv("COLUMNS", "60")
    assert CliConsole(file=StringIO()).width == 60  # COLUMNS is the width everywhere
    monkeypatch.delenv("COLUMNS")
    on_terminal = CliConsole(file=StringIO(), force_terminal=True)
    assert on_terminal.width == Console(file=StringIO(), force_terminal=True).width < PIPE_WIDTH


def test_jsonable_makes_strict_json():
    data = {"nan": float("nan"), "inf": float("inf"), "path": Path("/a/b"), "t": (1, 2), 3: {"x"}}
    assert json.loads(json.dumps(jsonable(data), allow_nan=False)) == {
        "nan": None,
        "inf": None,
        "path": "/a/b",
        "t": [1, 2],
        "3": ["x"],
    }


def test_metrics_table_keeps_long_names_whole_when_piped_and_folds_them_on_a_narrow_terminal(monkeypatch):
    metrics = {LONG_METRIC: 0.5, "loss/" + "k" * 55: 1.25}
    for columns, check in ((None, "whole"), ("60", "folded")):
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", columns)
        out = StringIO()
        monkeypatch.setattr(cli, "console", CliConsole(file=out))
        cli._print_metrics(metrics, "final metrics")
        text = out.getvalue()
        if check == "whole":
            assert all(any(name in line for line in text.splitlines()) for name in metrics), text
            assert "0.5000" in text and "1.2500" in text
        else:
            assert_folded_not_cut(text, sorted(metrics))


# --- models list / show -----------------------------------------------------------------------------------------


@pytest.fixture
def long_named_models(mlflow_sqlite):
    from jobs.registry import log_and_register

    for i, name in enumerate(LONG_MODELS):
        spec = make_spec(name=name, alias="candidate")
        run_id = start_or_resume_run(ensure_experiment(spec.name), f"job-long-{i}")
        log_and_register(make_model(spec), spec, f"job-long-{i}", run_id, {**METRICS, LONG_METRIC: 0.25 + i})
    return mlflow_sqlite


def test_models_list_never_cuts_names(long_named_models):
    piped = invoke("models", "list")
    assert piped.exit_code == 0, piped.output
    for name in LONG_MODELS:
        assert any(line.startswith(f"│ {name} ") for line in piped.output.splitlines()), piped.output
    assert ELLIPSIS not in piped.output

    narrow = invoke("models", "list", env=NARROW)
    assert narrow.exit_code == 0, narrow.output
    assert_folded_not_cut(narrow.output, sorted(LONG_MODELS))


def test_models_list_and_show_as_json(long_named_models):
    listed = invoke("models", "list", "--output", "json", env=NARROW)  # a narrow terminal changes nothing
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.output)
    assert data["tracking_uri"] == long_named_models
    assert sorted(m["name"] for m in data["models"]) == sorted(LONG_MODELS)
    for model in data["models"]:
        assert set(model) == {
            "name",
            "versions",
            "latest_version",
            "aliases",
            "description",
            "latest_tags",
            "latest_metrics",
        }
        assert model["versions"] == 1 and model["aliases"] == {"candidate": "1"}
        assert model["latest_tags"]["variant"] == "beta_vae" and LONG_METRIC in model["latest_metrics"]

    shown = invoke("models", "show", f"{LONG_MODELS[1]}@candidate", "-o", "json")
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    assert {"name", "version", "aliases", "model_uri", "run_id", "tags", "metrics", "pictures"} <= set(info)
    assert info["name"] == LONG_MODELS[1] and info["model_uri"] == f"models:/{LONG_MODELS[1]}/1"
    assert info["metrics"][LONG_METRIC] == 1.25 and info["aliases"] == ["candidate"]
    # --json, the older spelling, says the same.
    assert json.loads(invoke("models", "show", f"{LONG_MODELS[1]}@candidate", "--json").output) == info

    empty_registry_is_not_an_error = invoke("models", "list", "-o", "JSON")  # choices are case-insensitive
    assert empty_registry_is_not_an_error.exit_code == 0

    bad = invoke("models", "list", "--output", "yaml")
    assert bad.exit_code == 2 and "yaml" in bad.output


def test_models_show_folds_long_metric_names(long_named_models):
    shown = invoke("models", "show", f"{LONG_MODELS[0]}@candidate")
    assert shown.exit_code == 0, shown.output
    assert any(line.startswith(f"│ {LONG_METRIC} ") for line in shown.output.splitlines()), shown.output

    narrow = invoke("models", "show", f"{LONG_MODELS[0]}@candidate", env=NARROW)
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "metrics")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("└"))
    assert_folded_not_cut("\n".join(lines[start : end + 1]), [LONG_METRIC])
    assert_folded_not_cut(narrow.output, [])  # the tags table too


def test_models_list_json_on_an_empty_registry(mlflow_sqlite):
    result = invoke("models", "list", "-o", "json")
    assert result.exit_code == 0 and json.loads(result.output) == {"tracking_uri": mlflow_sqlite, "models": []}


# --- sweep results ----------------------------------------------------------------------------------------------

SWEEP_JOB = "sweep-long-names-job"
TRIAL_RUNS = {
    f"{SWEEP_JOB}-t{i:02d}-beta{beta:g}-" + "z" * 29: (beta, value)
    for i, (beta, value) in enumerate([(1.0, 0.25), (4.0, 0.75), (8.0, float("nan"))])
}
BEST_FIRST = [list(TRIAL_RUNS)[i] for i in (1, 0, 2)]  # by the metric, max first; NaN last


@pytest.fixture
def long_named_sweep(mlflow_sqlite):
    """A sweep as its driver leaves it in MLflow: a parent run, and one child run per trial with its values
    (trial.* params) and metrics. Run names of 60 characters, a metric name of 60."""
    from jobs.sweep import TRIAL_ID_TAG

    client = mlflow.MlflowClient(mlflow_sqlite)
    experiment_id = ensure_experiment("sweep-long-names")
    parent = client.create_run(experiment_id, run_name=SWEEP_JOB, tags={JOB_ID_TAG: SWEEP_JOB, "aeforge.kind": "sweep"})
    for key, value in {"kind": "sweep", "sweep.metric.name": LONG_METRIC, "sweep.metric.mode": "max"}.items():
        client.log_param(parent.info.run_id, key, value)
    for i, (run_name, (beta, value)) in enumerate(TRIAL_RUNS.items()):
        assert len(run_name) == 60
        child = client.create_run(
            experiment_id, run_name=run_name, tags={PARENT_RUN_TAG: parent.info.run_id, TRIAL_ID_TAG: f"t{i}"}
        )
        client.log_param(child.info.run_id, "trial.beta", beta)
        client.log_param(child.info.run_id, "trial.latent_dim", 10)
        client.log_metric(child.info.run_id, LONG_METRIC, value)
        client.log_metric(child.info.run_id, "eval/recon", 30.0 + i)
        client.set_terminated(child.info.run_id)
    client.set_terminated(parent.info.run_id)
    return parent.info.run_id


def test_sweep_results_never_cut_run_or_metric_names(long_named_sweep):
    piped = invoke("sweep", "results", SWEEP_JOB)
    assert piped.exit_code == 0, piped.output
    assert ELLIPSIS not in piped.output
    lines = piped.output.splitlines()
    header = next(line for line in lines if line.startswith("┃"))
    assert f" {LONG_METRIC} " in header
    body = [line for line in lines if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in body] == BEST_FIRST

    narrow = invoke("sweep", "results", SWEEP_JOB, env=NARROW)
    assert narrow.exit_code == 0, narrow.output
    assert_folded_not_cut(narrow.output, BEST_FIRST)


def test_sweep_results_as_json(long_named_sweep, tmp_path):
    out_csv = tmp_path / "results.csv"
    result = invoke("sweep", "results", SWEEP_JOB, "--output", "json", "--csv", str(out_csv))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)  # nothing but the document on stdout: no "wrote" line, no markup
    assert set(data) == {"job_id", "mlflow_run_id", "status", "tracking_uri", "metric", "mode", "trials"}
    assert data["job_id"] == SWEEP_JOB and data["mlflow_run_id"] == long_named_sweep
    assert data["metric"] == LONG_METRIC and data["mode"] == "max" and data["status"] == "finished"
    trials = data["trials"]
    assert [t["run_name"] for t in trials] == BEST_FIRST
    assert [t["rank"] for t in trials] == [1, 2, None]  # the trial whose metric is NaN is not ranked
    assert trials[0][LONG_METRIC] == 0.75 and trials[0]["beta"] == 4.0 and trials[0]["latent_dim"] == 10
    assert trials[2][LONG_METRIC] is None  # NaN as null: strict JSON
    assert out_csv.is_file()

    by_min = json.loads(
        invoke("sweep", "results", SWEEP_JOB, "-o", "json", "--metric", "eval/recon", "--mode", "min").output
    )
    assert by_min["metric"] == "eval/recon" and [t["eval/recon"] for t in by_min["trials"]] == [30.0, 31.0, 32.0]


# --- --version and shell completion -----------------------------------------------------------------------------


def test_version_names_aeforge_and_its_main_packages():
    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"aeforge {metadata.version('aeforge')} (")
    for label, package in (("torch", "torch"), ("Ray", "ray"), ("MLflow", "mlflow")):
        assert f"{label} {metadata.version(package)}" in result.output


def test_shell_completion_script_and_completions(monkeypatch):
    # Typer's own switch for tests: `--show-completion SHELL` takes the shell named, instead of detecting the shell
    # this process runs under (none when pytest's ancestors hold no shell, e.g. `make` exec'd from a script).
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    runner = CliRunner()
    script = runner.invoke(cli.app, ["--show-completion", "bash"], prog_name="aeforge")
    assert script.exit_code == 0, script.output
    assert (
        "_AEFORGE_COMPLETE=complete_bash" in script.output
        and "complete -o default -F _aeforge_completion aeforge" in script.output
    )
    for shell in ("zsh", "fish"):
        assert runner.invoke(cli.app, ["--show-completion", shell], prog_name="aeforge").exit_code == 0

    def complete(words: str, cword: int) -> list[str]:
        result = runner.invoke(
            cli.app,
            [],
            prog_name="aeforge",
            env={"_AEFORGE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)},
        )
        assert result.exit_code == 0, result.output
        return result.output.split()

    assert complete("aeforge mod", 1) == ["models"]
    assert "doctor" in complete("aeforge do", 1)
    assert complete("aeforge models list --output ", 4) == ["table", "json"]


def test_completion_through_the_installed_command():
    command = shutil.which("aeforge", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.skip("the aeforge console script is not installed next to this Python (pip install -e .)")
    env = {**os.environ, "_AEFORGE_COMPLETE": "complete_bash", "COMP_WORDS": "aeforge sweep res", "COMP_CWORD": "2"}
    done = subprocess.run([command], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["results"]


# --- validate warns about GPUs that are not there ---------------------------------------------------------------


def write_spec(tmp_path: Path, gpus_per_worker: float, workers: int = 2) -> Path:
    path = tmp_path / "gpu.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "gpu-spec",
                "model": {"variant": "vae", "architecture": "mlp", "latent_dim": 4},
                "data": {"source": "builtin:dsprites"},
                "train": {"steps": 10},
                "resources": {"workers": workers, "gpus_per_worker": gpus_per_worker, "cpus_per_worker": 1},
            }
        )
    )
    return path


def test_validate_warns_when_this_machine_has_no_gpu(tmp_path, monkeypatch):
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("validate", "--no-data", str(write_spec(tmp_path, 1)))
    assert result.exit_code == 0, result.output
    assert "OK  gpu-spec" in result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, result.output
    assert "asks for 2 GPUs" in warning[0] and "this machine" in warning[0] and "has none" in warning[0]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    one_short = invoke("validate", "--no-data", str(write_spec(tmp_path, 1)))
    assert one_short.exit_code == 0 and "has 1: the job could not start there" in one_short.output

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    enough = invoke("validate", "--no-data", str(write_spec(tmp_path, 1)))
    assert enough.exit_code == 0 and "warning" not in enough.output


def test_validate_says_nothing_about_gpus_for_a_cpu_spec(tmp_path, monkeypatch):
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("validate", "--no-data", str(write_spec(tmp_path, 0)))
    assert result.exit_code == 0 and "warning" not in result.output, result.output


def test_validate_warns_when_the_cluster_cannot_be_asked(tmp_path, monkeypatch):
    from tests.fixtures.s3 import free_port

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    result = invoke("validate", "--no-data", str(write_spec(tmp_path, 0.5)))
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "could not be asked how many it has" in result.output
    assert "nothing answers" in result.output


def test_models_show_prints_the_description_prose_not_the_page_table_and_picture_links():
    from services.cli_models import description_prose

    description = (
        "Squares model.\n\nbeta_tcvae (mlp, latent_dim=3) trained on shapes16.\n\n"
        "| metric | final value |\n| --- | ---: |\n| eval/mig | 0.1 |\n\n"
        "**Pictures** of run [abc](http://x): a.png\n\n![a](http://x/a.png)"
    )
    assert description_prose(description) == "Squares model.\n\nbeta_tcvae (mlp, latent_dim=3) trained on shapes16."
    assert description_prose(None) == ""
