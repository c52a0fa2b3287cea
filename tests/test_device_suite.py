"""The device suite (benchmarks/device_suite.py) on a CPU: what it imports works without the packages the device
machine lacks, and its --tiny run writes the JSON and Markdown reports with every row, the GPU ones skipped with the
reason "no CUDA".

The device machine has no Ray, MLflow or boto3 (nor the queue service's FastAPI, SQLAlchemy, ...). A
``sitecustomize`` module put first on the child process's PYTHONPATH makes importing any of them raise ImportError,
in that process and in every process it starts (the suite's pytest child), so a module-level import of one of them
anywhere on the suite's path fails these tests here rather than the run there.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.device_suite import (
    GOALS,
    JSON_NAME,
    JUNIT_NAME,
    MARKDOWN_NAME,
    NO_CUDA,
    PROTOCOL_STEPS,
    goal_rows,
    read_junit,
    steady_projection,
    study_findings,
    study_table,
)

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "device_suite.py"
# Installed here for the project, absent on the device machine.
ABSENT_ON_DEVICE = (
    "ray",
    "mlflow",
    "boto3",
    "botocore",
    "s3transfer",
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "psycopg",
    "moto",
)
GPU_TESTS = {
    "test_gpu_ddp::test_ddp_with_nccl_and_the_gathered_tc_estimator_trains_as_one_process_does",
    "test_gpu_training::test_the_data_set_is_placed_on_the_gpu_and_batches_are_rendered_there",
    "test_gpu_training::test_a_bf16_step_runs_the_convolutions_in_bf16_and_stays_close_to_fp32",
    "test_gpu_training::test_compiled_and_eager_training_agree_on_cuda_without_recompiling",
    "test_gpu_training::test_a_checkpoint_written_on_the_gpu_loads_on_gpu_and_cpu_and_resumes",
}

_BLOCKER = """
import importlib.abc
import sys

ABSENT = {absent!r}


class AbsentOnTheDevice(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ImportError(f"{{name}} is not installed on the device machine (blocked by the device-suite test)")
        return None


sys.meta_path.insert(0, AbsentOnTheDevice())
"""


def device_like_env(folder: Path) -> dict[str, str]:
    """The environment of a child process in which the packages absent on the device machine cannot be imported."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_BLOCKER.format(absent=ABSENT_ON_DEVICE))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), str(REPO), env.get("PYTHONPATH")) if p)
    return env


TRAIN_WITHOUT_THEM = """
import importlib
import sys

for name in {absent!r}:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the blocker let {{name}} be imported")

import torch

from workers.config import EvalConfig, ModelConfig, TrainConfig
from workers.data.dsprites import DSprites
from workers.loop import RunContext, train
import workers.metrics
import workers.models

data = DSprites(limit=512)
result = train(ModelConfig(variant="beta_tcvae", architecture="conv64", latent_dim=4, beta=6.0),
               TrainConfig(steps=3, batch_size=16, log_every=1, compile=False),
               EvalConfig(iwae_samples=2, max_examples=32, num_train=40, num_test=20, pictures=False, probe=False),
               data, data, RunContext(device=torch.device("cpu")), pictures=False)
assert result.steps == 3 and len(result.history["train/loss"]) == 3, result.history
assert "eval/mig" in result.final_metrics and "eval/elbo" in result.final_metrics, sorted(result.final_metrics)
loaded = sorted(name for name in sys.modules if name.split(".")[0] in {absent!r})
assert not loaded, loaded
print("trained", result.steps, "steps without", ", ".join({absent!r}))
"""


def test_workers_import_and_train_without_ray_mlflow_or_boto3(tmp_path):
    script = TRAIN_WITHOUT_THEM.format(absent=ABSENT_ON_DEVICE)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=device_like_env(tmp_path / "site"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "trained 3 steps without ray, mlflow, boto3" in done.stdout


def run_suite(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SUITE), "--out", str(tmp_path / "out"), *args],
        cwd=REPO,
        env=device_like_env(tmp_path / "site"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run's rows: the GPU rows skipped for no CUDA")
def test_the_tiny_suite_writes_json_and_markdown_with_every_row(tmp_path):
    # --study-steps 2: the study trains 2 steps a model rather than what fits its 40 s share (the sizing from the
    # probe's pace is the same code either way; the projection below is made from the 2 steps).
    done = run_suite(tmp_path, "--tiny", "--study-steps", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {JSON_NAME, MARKDOWN_NAME, JUNIT_NAME}
    report = json.loads((out / JSON_NAME).read_text())
    assert report["tiny"] is True and report["environment"]["device"] == "cpu"
    assert report["seconds"] > 0 and report["budget_s"] == 200

    # 1. Every GPU test, collected and skipped for want of CUDA.
    tests = report["gpu_tests"]["tests"]
    assert {t["name"] for t in tests} == GPU_TESTS
    assert {(t["status"], t["reason"]) for t in tests} == {("skipped", NO_CUDA)}

    # 2. The bench: at batch 64 the plain loop and aeforge's eager fp32 row ran, its bf16 row is skipped (bf16 is
    # for CUDA); the large batch is skipped altogether.
    small, large = report["bench"]
    assert small["status"] == "ran" and small["batch_size"] == 64
    assert [row["loop"] for row in small["rows"]] == [
        "plain PyTorch (DataLoader, eager, fp32)",
        "aeforge (eager, fp32)",
    ]
    assert all(row["images_per_second"] > 0 for row in small["rows"]) and small["ratio"] > 0
    assert [(row["loop"], "CUDA" in row["reason"]) for row in small["skipped_rows"]] == [
        ("aeforge (eager, bf16)", True)
    ]
    assert (large["status"], large["reason"]) == ("skipped", NO_CUDA)

    # 3. The protocol run: its steps, its own evaluation's time, both MIGs and the ELBO.
    protocol = report["protocol"]
    assert protocol["steps_done"] == protocol["steps_asked"] and not protocol["stopped_at_budget"]
    assert (
        protocol["variant"],
        protocol["architecture"],
        protocol["latent_dim"],
        protocol["batch_size"],
        protocol["lr"],
    ) == ("beta_tcvae", "conv64", 10, 64, 1e-4)
    for key in ("mig", "mig_exact", "elbo", "eval_s", "train_s", "projected_train_s_300k", "eval_fraction"):
        assert isinstance(protocol[key], float) and math.isfinite(protocol[key]), key
    assert protocol["end_to_end_s"] >= protocol["train_s"] + protocol["eval_s"]

    # 4. The packs: K = 1 and 2, both ways, and the study's projected hours at the best rate.
    packs = report["packs"]
    assert packs["status"] == "ran"
    assert {(r["way"], r["k"]) for r in packs["rows"]} == {("vmap", 1), ("loop", 1), ("vmap", 2), ("loop", 2)}
    assert all(r["images_per_second"] > 0 for r in packs["rows"]) and packs["study_gpu_hours"] > 0

    # 5. Chen et al.'s study, cut to 2 variants x 2 betas x 1 seed on 4,096 rows: one pack per variant, every model
    # scored, the variant x beta table, and the full-length time projected from the 2 steps it was given.
    study = report["study"]
    assert study["status"] == "ran" and (study["models"], study["packs"], study["pack_sizes"]) == (4, 2, [2, 2])
    assert study["architecture"] == "chen2018_mlp" and study["steps"] == 2 < study["full_steps"]
    assert study["stopped_short"] is True
    assert {(r["variant"], r["beta"]) for r in study["table"]} == {
        (v, b) for v in ("beta_vae", "beta_tcvae") for b in (1.0, 4.0)
    }
    assert all(math.isfinite(r["mig_chen_mean"]) and math.isfinite(r["elbo_mean"]) for r in study["table"])
    assert study["projected_full_s"] > 0 and study["compared_betas"] == [4.0]

    # The goals, each with a figure except the bf16 one and the pack of 32 (no GPU here, packs of 2 in --tiny).
    goals = {g["goal"]: g for g in report["goals"]}
    assert list(goals) == [key for key, *_ in GOALS]
    assert goals["large_batch_bf16_images_per_s"]["measured"] is None
    assert goals["pack_32_x_one"]["measured"] is None
    assert all(goals[k]["met"] in (True, False) for k in ("protocol_train_s", "ratio_batch_64", "eval_fraction"))

    text = (out / MARKDOWN_NAME).read_text()
    for heading in (
        "## GPU tests",
        "## Training bench",
        "## Packs",
        "## Chen et al. 2018's study",
        "## Protocol run",
        "## Goals",
    ):
        assert heading in text
    assert all(name in text for name in GPU_TESTS)
    assert f"| large batch | 256 | skipped | – | – | – | {NO_CUDA} |" in text
    assert "| batch 64 | 64 | aeforge (eager, bf16) | – | – | – | skipped: bf16 " in text
    assert "| MIG (eval/mig_exact, Chen et al.) |" in text
    assert text in done.stdout  # the tables are printed too, for a device run's log


@pytest.mark.slow
def test_the_protocol_run_stops_at_the_time_budget_and_projects_the_rest(tmp_path):
    # 100,000 steps cannot fit in 30 s on a CPU: training stops 25 s (the evaluation's reserve) before the budget,
    # at the first log point 5 s or more after the suite started (never before the first: at least 2 steps).
    done = run_suite(tmp_path, "--tiny", "--sections", "protocol", "--protocol-steps", "100000", "--budget-s", "30")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / JSON_NAME).read_text())
    assert set(report) >= {"protocol", "goals"} and "bench" not in report and "gpu_tests" not in report
    protocol = report["protocol"]
    assert protocol["stopped_at_budget"] is True and 0 < protocol["steps_done"] < 100_000
    assert protocol["steps_done"] % 2 == 0  # it stops at a log point (every 2 steps in --tiny)
    assert protocol["projected_train_s_300k"] > protocol["train_s"]
    assert isinstance(protocol["mig"], float) and isinstance(protocol["elbo"], float)
    assert "stopped at the time budget" in done.stdout


def test_bad_arguments_are_refused_naming_the_option(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SUITE), "--out", str(tmp_path), "--sections", "bench,gpu"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--sections: unknown gpu" in done.stderr


def test_the_projection_leaves_the_start_up_out_of_the_pace():
    # 2 s of start-up (compiling), then 1,000 steps/s, a log point every 100 steps.
    marks = [(step, 10.0 + 2.0 + step / 1000) for step in range(100, 2001, 100)]
    projection = steady_projection(marks, started=10.0, total_steps=PROTOCOL_STEPS)
    assert projection["steps_per_second"] == pytest.approx(1000)
    assert projection["startup_s"] == pytest.approx(2.0)
    assert projection["projected_train_s"] == pytest.approx(2.0 + PROTOCOL_STEPS / 1000)
    # Two log points: the pace between them.
    assert steady_projection(marks[:2], 10.0, PROTOCOL_STEPS)["steps_per_second"] == pytest.approx(1000)
    assert steady_projection(marks[:1], 10.0, PROTOCOL_STEPS)["projected_train_s"] is None


def test_goals_compare_each_figure_with_its_target_in_its_direction():
    report = {
        "protocol": {"steps_done": 1000, "projected_train_s_300k": 59.0, "eval_fraction": 0.2},
        "bench": [
            {"case": "batch 64", "batch_size": 64, "status": "ran", "ratio": 12.0},
            {"case": "large batch", "batch_size": 2048, "status": "skipped"},
        ],
        "packs": {"status": "ran", "pack_32_x_one": 9.5},
    }
    goals = {g["goal"]: (g["measured"], g["met"], g["from"]) for g in goal_rows(report)}
    assert goals == {
        "protocol_train_s": (59.0, True, "projected from 1,000 steps"),
        "ratio_batch_64": (12.0, True, None),
        "large_batch_bf16_images_per_s": (None, None, None),
        "eval_fraction": (0.2, False, "of the projected run"),
        "pack_32_x_one": (9.5, False, "packs section"),
        "study_s": (None, None, None),
        "study_best_tcvae_mig": (None, None, None),
        "study_tcvae_above": (None, None, None),
    }
    # A study run at full length is measured; one stopped short only projects its time (its MIG is not the paper's).
    table = study_table(
        [
            {"variant": v, "beta": b, "seed": seed, "mig_chen": m + 0.01 * seed, "elbo": -90.0 - seed}
            for v, b, m in (
                ("beta_vae", 1.0, 0.1),
                ("beta_vae", 4.0, 0.2),
                ("beta_tcvae", 1.0, 0.12),
                ("beta_tcvae", 4.0, 0.38),
            )
            for seed in (0, 1, 2)
        ]
    )
    assert table[0] == {
        "variant": "beta_tcvae",
        "beta": 1.0,
        "seeds": 3,
        "mig_chen_mean": pytest.approx(0.13),
        "mig_chen_sd": pytest.approx(0.01),
        "mig_chen_min": 0.12,
        "mig_chen_max": pytest.approx(0.14),
        "elbo_mean": -91.0,
        "elbo_sd": 1.0,
        "elbo_min": -92.0,
        "elbo_max": -90.0,
    }
    findings = study_findings(table)
    assert findings == {
        "best_tcvae_mig": pytest.approx(0.39),
        "tcvae_above_at_every_beta_2_up": True,
        "compared_betas": [4.0],
    }
    full = {"status": "ran", "stopped_short": False, "wall_s": 3000.0, **findings}
    goals = {g["goal"]: (g["measured"], g["met"]) for g in goal_rows({"study": full})}
    assert (goals["study_s"], goals["study_best_tcvae_mig"], goals["study_tcvae_above"]) == (
        (3000.0, True),
        (pytest.approx(0.39), True),
        (1.0, True),
    )
    short = {**full, "stopped_short": True, "steps": 500, "projected_full_s": 4000.0}
    goals = {g["goal"]: (g["measured"], g["met"], g["from"]) for g in goal_rows({"study": short})}
    assert goals["study_s"] == (4000.0, False, "projected from 500 steps")
    assert goals["study_best_tcvae_mig"] == (None, None, None)


def test_junit_rows_carry_the_status_and_the_skip_reason(tmp_path):
    xml = tmp_path / "report.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.gpu.test_a" name="test_ok" time="1.5"/>'
        '<testcase classname="tests.gpu.test_a" name="test_off" time="0.001">'
        '<skipped type="pytest.skip" message="no CUDA">tests/gpu/test_a.py:9: no CUDA</skipped></testcase>'
        '<testcase classname="tests.gpu.test_b" name="test_bad" time="2">'
        '<failure message="assert 1 == 2">trace</failure></testcase>'
        "</testsuite></testsuites>"
    )
    assert read_junit(xml) == [
        {"name": "test_a::test_ok", "status": "passed", "seconds": 1.5, "reason": ""},
        {"name": "test_a::test_off", "status": "skipped", "seconds": 0.001, "reason": "no CUDA"},
        {"name": "test_b::test_bad", "status": "failed", "seconds": 2.0, "reason": "assert 1 == 2"},
    ]
