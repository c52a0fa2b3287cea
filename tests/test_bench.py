"""`aeforge bench` (benchmarks/bench_train.py) runs every row for a few steps and prints it: a correctness test of
the bench, with no assertion on speed (speed figures belong to the bench's own output, not to tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from benchmarks.bench_train import BenchError, _plain_loader, _plain_npz_loader, _write_npz, run_benchmark
from jobs.spec import load_spec
from services.cli import app
from workers.config import DataConfig
from workers.data import open_dataset
from workers.data.dsprites import DSprites

TINY_SPEC = """\
name: bench-tiny
kind: train
model: {variant: vae, architecture: mlp, latent_dim: 2, hidden_dims: [16]}
data: {source: "builtin:dsprites", val_fraction: 0.01}
train: {steps: 10, batch_size: 8, seed: 0}
resources: {workers: 1, cpus_per_worker: 1}
"""
EAGER_FP32, COMPILED_FP32 = "aeforge (eager, fp32)", "aeforge (compiled, fp32)"
PLAIN = "plain PyTorch (DataLoader, eager, fp32)"
ON_GPU = torch.cuda.is_available()


@pytest.fixture
def spec_path(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AEFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AEFORGE_STORAGE", raising=False)
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SPEC)
    return path


def bench(*args: str):
    result = CliRunner().invoke(app, ["bench", *args], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_row_is_printed_with_its_ratio_on_a_file_data_set(spec_path):
    threads = torch.get_num_threads()
    output = bench(
        str(spec_path),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--data",
        "npz",
        "--no-compiled",
        "--large-batch",
        "16",
        "--large-steps",
        "2",
        "--large-warmup",
        "1",
        "--threads",
        "1",
    )
    assert torch.get_num_threads() == threads  # the bench's own setting, given back
    lines = output.splitlines()
    for label in (PLAIN, EAGER_FP32, "aeforge (eager, bf16)"):
        assert sum(label in line for line in lines) == 2, (label, output)  # batch 8 and batch 16
    assert COMPILED_FP32 not in output
    if not ON_GPU:
        assert sum("skipped: bf16 trains in bf16 on CUDA only" in line for line in lines) == 2
    assert "data: an .npz file of 48 uint8 images written by the bench" in output  # 16 x (2 + 1) rows
    assert "torch threads 1; load average" in output and "ratio aeforge / plain at batch 8:" in output


@pytest.mark.slow  # compiles the step (TorchInductor on a CPU: tens of seconds)
def test_eager_and_compiled_rows_in_json(spec_path):
    report = json.loads(bench(str(spec_path), "--steps", "2", "--warmup", "1", "--output", "json"))
    rows = {(row["loop"], row["batch_size"]): row for row in report["rows"]}
    expected = {(PLAIN, 8), (EAGER_FP32, 8), (COMPILED_FP32, 8)}
    if ON_GPU:
        expected |= {("aeforge (eager, bf16)", 8), ("aeforge (compiled, bf16)", 8)}
    assert set(rows) == expected
    for row in rows.values():
        assert row["images_per_second"] > 0 and row["ms_per_step"] > 0 and row["ratio"] > 0
        assert row["ms_per_step"] == pytest.approx(1000 * row["batch_size"] / row["images_per_second"])
    assert rows[(PLAIN, 8)]["ratio"] == 1.0
    assert rows[(COMPILED_FP32, 8)]["compiled"] and rows[(COMPILED_FP32, 8)]["compile_seconds"] > 0
    assert not rows[(EAGER_FP32, 8)]["compiled"] and rows[(EAGER_FP32, 8)]["compile_seconds"] == 0
    assert report["ratio"] == rows[(EAGER_FP32, 8)]["ratio"]
    assert report["data"] == "spec" and report["data_description"].startswith("builtin:dsprites, read per batch")
    skipped = {(row["loop"], row["reason"]) for row in report["skipped"]}
    assert skipped == (
        set()
        if ON_GPU
        else {
            ("aeforge (eager, bf16)", "bf16 trains in bf16 on CUDA only (on a CPU the loop runs fp32)"),
            ("aeforge (compiled, bf16)", "bf16 trains in bf16 on CUDA only (on a CPU the loop runs fp32)"),
        }
    )
    assert set(report["load"]) == {"before", "after", "cpus"}


def test_both_loops_read_the_same_images(tmp_path):
    data = DSprites().subset(torch.arange(0, 3000, 7))
    # The plain loop's batches over the data set are the data set's own images of the rows its sampler draws.
    # (Two loaders with the same seed: iterating one's sampler moves its generator on.)
    rows = next(iter(_plain_loader(data, 16, seed=0).sampler))
    batch = next(iter(_plain_loader(data, 16, seed=0)))
    assert len(rows) == 16 and len(set(rows)) == 16 and torch.equal(batch, data.images(torch.tensor(rows)))
    # The file both loops read holds the data set's images; aeforge's reader and the plain loop's conversion
    # (uint8 / 255 per batch) give back the same floats.
    path = _write_npz(data, 100, tmp_path)
    from_file = open_dataset(DataConfig(source=str(path), val_fraction=0.0))
    assert torch.equal(from_file.images(torch.arange(100)), data.images(torch.arange(100)))
    (plain_batch,) = next(iter(_plain_npz_loader(path, 100, 100, seed=0)))
    assert plain_batch.dtype == torch.uint8
    assert torch.equal(plain_batch.float().div(255.0).sum(dim=0), data.images(torch.arange(100)).sum(dim=0))
    with np.load(path) as archive:
        assert archive["images"].shape == (100, 1, 64, 64)


def test_bad_bench_requests_are_named(spec_path):
    spec = load_spec(spec_path)
    with pytest.raises(BenchError, match="bench data must be one of spec, npz, not 'hdf5'"):
        run_benchmark(spec, steps=1, warmup=1, data="hdf5")
    with pytest.raises(BenchError, match="run --ray-workers with --data spec"):
        run_benchmark(spec, steps=1, warmup=1, data="npz", ray_workers=2)
    with pytest.raises(BenchError, match="bench precision must be one of fp32, bf16, not 'fp16'"):
        run_benchmark(spec, steps=1, warmup=1, precisions=("fp16",))
    with pytest.raises(BenchError, match="batch size 4096 is larger than"):
        run_benchmark(
            spec.model_copy(update={"data": spec.data.model_copy(update={"limit": 100})}),
            steps=1,
            warmup=1,
            large_batch=4096,
        )
