"""`aeforge models ...` through Typer's CliRunner: against a sqlite store, and once against the mlflow server."""

from __future__ import annotations

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from jobs.registry import log_and_register
from services.cli_models import register
from tests.jobs.test_registry import IMAGE_SHAPE, METRICS, make_model, make_spec
from workers.tracking import MlflowRun, ensure_experiment, start_or_resume_run

WIDE = {"COLUMNS": "200"}  # rich tables wrap cells at 80 columns


@pytest.fixture
def cli():
    app = typer.Typer()
    register(app)

    @app.callback()
    def main():  # a callback keeps `models` a sub-command when it is the only one
        pass

    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), env=WIDE)


def register_model(spec, job_id, pictures_dir=None):
    run_id = start_or_resume_run(ensure_experiment(spec.name), job_id)
    if pictures_dir is not None:
        MlflowRun(run_id).log_artifacts(pictures_dir, "pictures")
    return log_and_register(make_model(spec), spec, job_id, run_id, METRICS)


@pytest.fixture
def registered(mlflow_sqlite, tmp_path):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "samples.png").write_bytes(b"png")
    (pictures / "traversal.png").write_bytes(b"png")
    register_model(make_spec(name="cli-faces"), "job-vae", pictures)
    register_model(make_spec(variant="ae", name="cli-ae", alias="best"), "job-ae")
    return mlflow_sqlite


def test_list_shows_each_model_with_its_latest_version(cli, registered):
    result = cli("models", "list")
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 2}
    assert "@candidate→1" in lines["cli-faces"] and "beta_vae" in lines["cli-faces"] and "4.0" in lines["cli-faces"]
    assert "file:///data/faces.npz" in lines["cli-faces"]
    assert "@best→1" in lines["cli-ae"] and " ae " in lines["cli-ae"]


def test_list_on_an_empty_registry(cli, mlflow_sqlite):
    result = cli("models", "list")
    assert result.exit_code == 0 and "no registered models" in result.output


def test_show_prints_tags_metrics_and_pictures(cli, registered):
    result = cli("models", "show", "cli-faces@candidate")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "cli-faces version 1  @candidate" in out
    assert "eval/elbo" in out and "-41.5000" in out
    assert "job-vae" in out and "latent_dim" in out
    assert "pictures/samples.png" in out and "pictures/traversal.png" in out

    as_json = cli("models", "show", "cli-ae/1", "--json")
    assert as_json.exit_code == 0
    assert '"variant": "ae"' in as_json.output and '"pictures": []' in as_json.output


@pytest.mark.parametrize(
    "args, message",
    [
        (("show", "missing@candidate"), "no registered model named 'missing'"),
        (("show", "cli-faces@prod"), "no alias 'prod'"),
        (("show", "cli-faces/9"), "no version 9"),
        (("sample", "cli-ae@best", "-n", "4", "-o", "x.png"), "no prior"),
        (("sample", "cli-faces@candidate", "-o", "x.jpg"), "ending in .png"),
    ],
)
def test_errors_are_plain_messages_with_exit_code_2(cli, registered, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("models", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_sample_writes_a_png_grid(cli, registered, tmp_path):
    target = tmp_path / "out" / "grid.png"
    result = cli("models", "sample", "cli-faces@candidate", "-n", "6", "-o", str(target), "--seed", "3")
    assert result.exit_code == 0, result.output
    with Image.open(target) as picture:
        assert picture.format == "PNG" and picture.width > IMAGE_SHAPE[2] and picture.height > IMAGE_SHAPE[1]
    again = tmp_path / "again.png"
    assert cli("models", "sample", "cli-faces@candidate", "-n", "6", "-o", str(again), "--seed", "3").exit_code == 0
    assert again.read_bytes() == target.read_bytes()  # the seed fixes the prior draws


@pytest.mark.parametrize("ref", ["cli-faces@candidate", "cli-ae@best"])
def test_traverse_writes_a_png(cli, registered, tmp_path, ref):
    target = tmp_path / "traversal.png"
    result = cli("models", "traverse", ref, "-o", str(target), "--dim-limit", "1.5", "--steps", "5")
    assert result.exit_code == 0, result.output
    with Image.open(target) as picture:
        assert picture.format == "PNG" and picture.width > IMAGE_SHAPE[2]


def test_commands_against_the_mlflow_server(cli, mlflow_server, monkeypatch, tmp_path):
    for key in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(mlflow_server))
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "samples.png").write_bytes(b"png")
    registered = register_model(make_spec(name="cli-server-faces", alias="champion"), "cli-server-job", pictures)

    listed = cli("models", "list")
    assert listed.exit_code == 0, listed.output
    assert "cli-server-faces" in listed.output and f"@champion→{registered['version']}" in listed.output
    shown = cli("models", "show", "cli-server-faces@champion")
    assert shown.exit_code == 0, shown.output
    assert "mlflow-artifacts:" in shown.output and "pictures/samples.png" in shown.output
    target = tmp_path / "server-grid.png"
    sampled = cli("models", "sample", "cli-server-faces@champion", "-n", "4", "-o", str(target))
    assert sampled.exit_code == 0, sampled.output
    with Image.open(target) as picture:
        assert picture.format == "PNG"
