"""`aeforge validate` with the data check, and `aeforge run --local`: one process, a run folder under
AEFORGE_HOME with the spec, curves, final metrics, a checkpoint that loads, and the pictures."""

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from services.cli import app
from tests.workers.data.test_readers import write_idx
from workers.data.idx import IMAGES_MAGIC, LABELS_MAGIC
from workers.loop import load_model_from_checkpoint

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AEFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AEFORGE_STORAGE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def mnist_like(tmp_path):
    """A 28x28 IDX pair (120 images, 10 labels) the way MNIST ships."""
    rng = np.random.default_rng(0)
    images = write_idx(
        tmp_path / "train-images-idx3-ubyte.gz",
        rng.integers(0, 256, (120, 28, 28), dtype=np.uint8),
        IMAGES_MAGIC,
        compress=True,
    )
    write_idx(
        tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 120, dtype=np.uint8), LABELS_MAGIC, compress=True
    )
    return images


def write_spec(path, source, **model):
    spec = {
        "name": "cli-run",
        "model": {"variant": "vae", "architecture": "conv28", "latent_dim": 2, **model},
        "data": {"source": str(source), "val_fraction": 0.2},
        "train": {"steps": 8, "batch_size": 16, "checkpoint_every": 4, "log_every": 2},
        "eval": {"iwae_samples": 3, "max_examples": 24},
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_validate_checks_the_spec_against_the_data(tmp_path, home, mnist_like):
    ok = runner.invoke(app, ["validate", str(write_spec(tmp_path / "ok.yaml", mnist_like))])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output and "120 examples of 1x28x28" in ok.output

    too_big = runner.invoke(
        app, ["validate", str(write_spec(tmp_path / "c64.yaml", mnist_like, architecture="conv64"))]
    )
    assert too_big.exit_code == 2
    assert "model.architecture" in too_big.output and "64x64" in too_big.output and "1x28x28" in too_big.output

    missing = runner.invoke(app, ["validate", str(write_spec(tmp_path / "m.yaml", tmp_path / "nope.idx.gz"))])
    assert missing.exit_code == 2 and "data.source" in missing.output and "nope.idx.gz" in missing.output

    unknown = runner.invoke(app, ["validate", str(write_spec(tmp_path / "u.yaml", "builtin:cifar"))])
    assert unknown.exit_code == 2 and "data.source" in unknown.output and "cifar" in unknown.output
    for result in (too_big, missing, unknown):
        assert "Traceback" not in result.output


def test_a_corrupt_data_file_is_named_before_training_starts(tmp_path, home):
    bad = tmp_path / "broken-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x04garbage")
    result = runner.invoke(app, ["run", "--local", str(write_spec(tmp_path / "s.yaml", bad))])
    assert result.exit_code == 2
    assert "broken-images-idx3-ubyte" in result.output and "Traceback" not in result.output
    assert not list((home / "runs").glob("*/checkpoints")) if (home / "runs").exists() else True


def test_run_local_writes_the_run_folder_and_resumes_by_job_id(tmp_path, home, mnist_like):
    spec = write_spec(tmp_path / "s.yaml", mnist_like)
    result = runner.invoke(app, ["run", "--local", "--job-id", "local-1", str(spec)])
    assert result.exit_code == 0, result.output
    run_dir = home / "runs" / "local-1"
    assert yaml.safe_load((run_dir / "spec.yaml").read_text())["name"] == "cli-run"
    final = json.loads((run_dir / "metrics.json").read_text())
    assert {"eval/elbo", "eval/iwae_ll", "eval/recon", "eval/kl", "train/loss", "eval/probe_linear_accuracy"} <= set(
        final
    )
    curves = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curves if "train/loss" in c] == [2, 4, 6, 8]
    model = load_model_from_checkpoint(run_dir / "checkpoints" / "step_000000008")
    assert model.variant == "vae" and model.image_shape == (1, 28, 28)
    pictures = {p.stem for p in (run_dir / "pictures").glob("*.png")}
    assert {"reconstructions", "samples", "traversal", "manifold", "embedding_label", "loss_curves"} <= pictures
    assert str(run_dir) in result.output.replace("\n", "")

    again = runner.invoke(app, ["run", "--local", "--job-id", "local-1", str(spec)])
    assert again.exit_code == 0, again.output
    curves_after = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Nothing was trained again: no new train/* lines, only the re-evaluation of the finished model.
    assert [c["step"] for c in curves_after if "train/loss" in c] == [2, 4, 6, 8]
    # ... and no throughput for the run that trained nothing (a 0 would hide the real figure).
    assert len([c for c in curves_after if "perf/images_per_second" in c]) == 1
