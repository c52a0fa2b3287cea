"""The device suite: what aeforge does on one NVIDIA GPU, in one run of at most 9 minutes.

    python3 benchmarks/device_suite.py --out DIR [--tiny] [--protocol-steps N] [--budget-s S]

It runs, in this order, and writes ``DIR/device_suite.json`` and ``DIR/device_suite.md`` (the same figures as
tables), plus the GPU tests' own report (``gpu_tests.xml``, ``gpu_tests.log``):

1. ``pytest -m gpu tests/gpu``: the data set on the device, a bf16 step, compiled against eager, DDP over NCCL in a
   group of one, checkpoints on the GPU. Without CUDA they are skipped, each with the reason "no CUDA".
2. The training bench (benchmarks/bench_train.py) on disentanglement_lib's model: aeforge's loop next to a plain
   PyTorch loop at batch 64, and aeforge's loop at a large batch in bf16 (a GPU-only row).
3. disentanglement_lib's protocol: beta-TCVAE on dSprites (jobs/examples/beta_tcvae_dsprites.yaml: conv64, z = 10,
   batch 64, Adam 1e-4, 300,000 steps), timed end to end (data, training, evaluation), with its MIG in both of the
   repository's conventions (eval/mig, eval/mig_exact), its ELBO and the evaluation's own time. The training stops
   at the suite's time budget if it would run past it; the report then gives the steps done and the time the
   whole run would take, projected from the steady pace.

4. Chen et al. 2018's study (jobs/examples/study_chen2018.yaml: beta-VAE and beta-TCVAE x 6 betas x 3 seeds, their
   dSprites MLP at batch 2048), each variant's 18 models trained as one pack (workers/pack.py). Its share of the
   budget fixes the steps (the full 18,000 when they fit; else as many as fit, from the pace of a short probe),
   then every model is scored by MIG in Chen et al.'s convention over all 737,280 rows (eval/mig_chen) and by its
   ELBO. The report gives the variant x beta table (mean and spread over seeds), the wall time, and the time the
   full-length study would take at the measured pace.

The goals of issues 11 and 13 are printed next to the figures; they are measured against, never asserted.

The device machine has PyTorch, numpy, scipy, scikit-learn, matplotlib, pyyaml and pytest, but no Ray, MLflow,
boto3 or pydantic. Nothing here imports the first three; pydantic travels as wheels (benchmarks/fetch_device_wheels.sh
puts them in ``.whl/``), which this script installs into a temporary folder when pydantic is missing, before it
imports anything of aeforge. ``--tiny`` runs everything at toy sizes, on a CPU in about a minute: the suite's own
test (tests/test_device_suite.py) runs it that way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

SUITE_STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
PROTOCOL_SPEC = REPO / "jobs" / "examples" / "beta_tcvae_dsprites.yaml"
PROTOCOL_STEPS = 300_000  # disentanglement_lib's
STUDY_SPEC = REPO / "jobs" / "examples" / "study_chen2018.yaml"
DEFAULT_WHEELS = REPO / ".whl"
NO_CUDA = "no CUDA"
JSON_NAME, MARKDOWN_NAME = "device_suite.json", "device_suite.md"
JUNIT_NAME, PYTEST_LOG_NAME = "gpu_tests.xml", "gpu_tests.log"
# What pydantic needs besides itself (all in the wheels folder; typing-extensions is on the device already, in a
# version that may be older than pydantic's floor).
PYDANTIC_MODULES = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions")


@dataclass(frozen=True)
class Sizes:
    """How big each part of the suite is: the device run's sizes, or ``--tiny``'s."""

    budget_s: float  # the whole suite, start to files written
    pytest_cap_s: float  # the GPU tests at most
    eval_reserve_s: float  # kept back from the protocol's training for its evaluation and the report
    protocol_min_s: float  # left to the protocol's training at least (compiling included) by the parts before it
    protocol_steps: int
    protocol_log_every: int  # how often the protocol run's loss is read back (and the budget checked)
    bench: tuple[BenchCase, ...]
    tiny_eval: bool
    packs: tuple[int, ...] = (1, 4, 16, 32)  # pack sizes K of the packs section (workers/pack.py)
    pack_steps: int = 20
    pack_warmup: int = 5
    pack_needs_s: float = 60.0  # skipped with less than this left before the protocol's share
    study_s: float = 150.0  # the study's share: probe, training and scoring
    study_needs_s: float = 60.0  # skipped with less than this left before the protocol's share
    study_probe_steps: int = 20  # steps timed to size the study's training to its share
    study_grid: dict[str, list] | None = None  # None: the spec's sweep (--tiny: a smaller grid)
    study_eval: dict[str, Any] | None = None  # overrides of the study's eval settings (--tiny: fewer rows)
    study_data_limit: int | None = None
    study_batch_size: int | None = None  # None: the spec's (2048)


@dataclass(frozen=True)
class BenchCase:
    """One call of bench_train.run_benchmark: the plain loop and aeforge's rows (eager and/or compiled, fp32 and
    bf16) at one batch size."""

    label: str
    batch_size: int
    steps: int
    warmup: int
    compile_options: tuple[bool, ...]
    gpu_only: bool  # a large batch is for the GPU: on a CPU the case is listed as skipped
    # Skipped rather than started with less than this many seconds left in the budget (compiling included).
    needs_s: float


DEVICE_SIZES = Sizes(
    budget_s=540.0,  # 60 s under a device call's 10 minutes, for Python's start and writing the files
    pytest_cap_s=150.0,
    # The default evaluation (jobs/examples' eval: ELBO, IWAE k=50, the disentanglement scores on 2,000 + 1,000
    # codes) is GPU work but for DCI's boosting, which takes 10-25 s on one CPU core.
    eval_reserve_s=75.0,
    # Enough for the protocol's compile (~30-40 s) and a steady pace to project from.
    protocol_min_s=60.0,
    protocol_steps=PROTOCOL_STEPS,
    protocol_log_every=500,
    # Each case compiles twice (fp32 and bf16, TorchInductor with CUDA graphs): 20-40 s each when not cached.
    bench=(
        BenchCase("batch 64", 64, steps=300, warmup=30, compile_options=(False, True), gpu_only=False, needs_s=75.0),
        BenchCase("large batch", 2048, steps=60, warmup=10, compile_options=(False, True), gpu_only=True, needs_s=75.0),
    ),
    tiny_eval=False,
)
TINY_SIZES = Sizes(
    budget_s=200.0,  # about 60 s on 2 idle cores; the rest is room for a busy machine
    pytest_cap_s=60.0,
    eval_reserve_s=25.0,
    protocol_min_s=10.0,
    protocol_steps=6,
    protocol_log_every=2,
    # Eager only: compiling on a CPU costs tens of seconds of C++ (the CPU bench, `aeforge bench`, measures it).
    bench=(
        BenchCase("batch 64", 64, steps=3, warmup=1, compile_options=(False,), gpu_only=False, needs_s=10.0),
        BenchCase("large batch", 256, steps=3, warmup=1, compile_options=(False, True), gpu_only=True, needs_s=10.0),
    ),
    tiny_eval=True,
    packs=(1, 2),
    pack_steps=2,
    pack_warmup=1,
    pack_needs_s=5.0,
    study_s=40.0,
    study_needs_s=10.0,
    study_probe_steps=2,
    study_grid={"variant": ["beta_vae", "beta_tcvae"], "beta": [1.0, 4.0], "seed": [0]},
    study_eval={"mig_chen_rows": 400, "mig_chen_samples": 200, "max_examples": 100},
    study_data_limit=4096,
    study_batch_size=128,
)
# disentanglement_lib's study: about 12,800 models of 300,000 steps at batch 64 (quoted at 2.5 P100 GPU-years).
STUDY_MODELS = 12_800

# Issue 11's goals on one H200: (key, what, target, better, unit) -- measured against, not asserted.
GOALS = (
    ("protocol_train_s", "protocol run (300,000 steps): training time", 60.0, "lower", "s"),
    ("ratio_batch_64", "aeforge / plain loop at batch 64", 10.0, "higher", "×"),
    ("large_batch_bf16_images_per_s", "images/s at large batch, bf16", 500_000.0, "higher", "images/s"),
    ("eval_fraction", "evaluation's share of the protocol run", 0.10, "lower", "%"),
    # Issue 12's: a pack of 32 conv64 models at batch 64 against one model's images/s.
    ("pack_32_x_one", "pack of 32: aggregate images/s over one model's", 16.0, "higher", "×"),
    # Issue 13's: Chen et al.'s 36-model study at full length, and what it should find.
    ("study_s", "Chen et al.'s 36-model study at full length: wall time", 3600.0, "lower", "s"),
    ("study_best_tcvae_mig", "beta-TCVAE's best mean MIG (Chen et al.'s convention)", 0.35, "higher", ""),
    ("study_tcvae_above", "beta-TCVAE above beta-VAE in mean MIG at every beta >= 2 (1: yes)", 1.0, "higher", ""),
)


def seconds_left(budget_s: float) -> float:
    return budget_s - (time.perf_counter() - SUITE_STARTED)


def say(text: str) -> None:
    print(f"[{time.perf_counter() - SUITE_STARTED:6.1f} s] {text}", flush=True)


# --- pydantic from wheels --------------------------------------------------------------------------------------


def ensure_pydantic(wheels: Path) -> str:
    """Make pydantic importable, here and in the processes this one starts; says where it came from. Must run
    before torch is imported (torch imports typing_extensions, which the wheels may replace)."""
    try:
        import pydantic

        return f"pydantic {pydantic.VERSION} (installed)"
    except ImportError:
        pass
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        raise SystemExit(
            f"device_suite: pydantic is not installed and {wheels} holds no wheels; run "
            f"benchmarks/fetch_device_wheels.sh on a machine with network and carry {wheels.name}"
        )
    site = Path(tempfile.mkdtemp(prefix="aeforge-site-"))
    # --no-index: the device machine has no network; --no-deps: the folder holds every wheel pydantic needs.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--target",
            str(site),
            *map(str, found),
        ],
        check=True,
    )
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    for name in PYDANTIC_MODULES:  # an older typing_extensions imported by pip's own start-up must not stay
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    import pydantic

    return f"pydantic {pydantic.VERSION} (from {len(found)} wheels in {wheels})"


# --- 1. the GPU tests ------------------------------------------------------------------------------------------


def run_gpu_tests(out: Path, cap_s: float) -> dict[str, Any]:
    """``pytest -m gpu tests/gpu`` in a child process (its own CUDA context, its own crash), at most ``cap_s``."""
    xml, log = out / JUNIT_NAME, out / PYTEST_LOG_NAME
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests/gpu",
        "-q",
        "-rA",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
    ]
    say(f"pytest -m gpu tests/gpu (at most {cap_s:.0f} s)")
    started = time.perf_counter()
    with open(log, "w") as sink:
        try:
            process = subprocess.run(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, timeout=cap_s)
            returncode: int | None = process.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    section: dict[str, Any] = {
        "command": " ".join(command[1:]),
        "seconds": time.perf_counter() - started,
        "exit_code": returncode,
        "tests": read_junit(xml) if xml.exists() else [],
    }
    if returncode is None:
        section["error"] = f"stopped after {cap_s:.0f} s (the suite's time budget); see {PYTEST_LOG_NAME}"
    elif returncode not in (0, 1) or not section["tests"]:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        section["error"] = f"pytest exited with {returncode}: " + " | ".join(tail)
    return section


def read_junit(path: Path) -> list[dict[str, Any]]:
    """One row per test case of a JUnit XML report: name, status (passed, failed, error, skipped), seconds, and
    the reason of a skip or the message of a failure."""
    rows = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        row: dict[str, Any] = {
            "name": f"{module}::{case.get('name')}",
            "status": "passed",
            "seconds": float(case.get("time") or 0),
            "reason": "",
        }
        for status in ("failure", "error", "skipped"):
            found = case.find(status)
            if found is not None:
                row["status"] = {"failure": "failed"}.get(status, status)
                message = found.get("message") or (found.text or "")
                # pytest writes a skip's reason as "reason" or "file:line: reason".
                row["reason"] = message.strip().splitlines()[0] if message.strip() else ""
                if status == "skipped" and row["reason"].startswith(("Skipped: ", "skipped: ")):
                    row["reason"] = row["reason"].split(": ", 1)[1]
                break
        rows.append(row)
    return rows


# --- 2. the bench rows -----------------------------------------------------------------------------------------


def protocol_spec():
    from jobs.spec import load_spec

    return load_spec(PROTOCOL_SPEC)


def run_bench(sizes: Sizes, device, budget_s: float) -> list[dict[str, Any]]:
    """benchmarks/bench_train.py's run_benchmark for each case, on the protocol's model and data: the plain loop,
    and aeforge's loop eager and compiled, in fp32 and bf16. A case is skipped (with the reason) when it needs CUDA
    and there is none, or when too little of the budget is left for it and the protocol run after it."""
    from benchmarks.bench_train import run_benchmark

    spec = protocol_spec()
    cases = []
    for case in sizes.bench:
        entry: dict[str, Any] = {
            "case": case.label,
            "batch_size": case.batch_size,
            "steps": case.steps,
            "warmup": case.warmup,
            "compile_options": list(case.compile_options),
        }
        if case.gpu_only and device.type != "cuda":
            entry.update(status="skipped", reason=NO_CUDA)
        elif seconds_left(budget_s) < case.needs_s + sizes.protocol_min_s + sizes.eval_reserve_s:
            entry.update(status="skipped", reason=f"time budget ({seconds_left(budget_s):.0f} s left)")
        else:
            say(f"bench: {case.label} ({case.batch_size})")
            case_spec = spec.model_copy(update={"train": spec.train.model_copy(update={"batch_size": case.batch_size})})
            started = time.perf_counter()
            try:
                report = run_benchmark(
                    case_spec,
                    steps=case.steps,
                    warmup=case.warmup,
                    device=device,
                    compile_options=case.compile_options,
                    precisions=("fp32", "bf16"),
                )
            except Exception as exc:  # one case's failure is a row of the report, not the end of the suite
                entry.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            else:
                entry.update(status="ran", seconds=time.perf_counter() - started, **summarise_bench(report))
        cases.append(entry)
        _free_device_memory(device)
    return cases


def run_packs(sizes: Sizes, device, budget_s: float) -> dict[str, Any]:
    """benchmarks/bench_pack.py on the protocol's model (beta-TCVAE, conv64, z = 10) at batch 64: aggregate images/s
    of packs of K models, both ways (vmap, loop), and the GPU-hours disentanglement_lib's 12,800-model study would
    take at the best rate measured."""
    from benchmarks.bench_pack import run as run_pack_bench

    if seconds_left(budget_s) < sizes.pack_needs_s + sizes.protocol_min_s + sizes.eval_reserve_s:
        return {"status": "skipped", "reason": f"time budget ({seconds_left(budget_s):.0f} s left)"}
    say(f"packs: K = {', '.join(map(str, sizes.packs))}")
    started = time.perf_counter()
    try:
        report = run_pack_bench("beta_tcvae", list(sizes.packs), 64, sizes.pack_steps, sizes.pack_warmup, device)
    except Exception as exc:  # a row of the report, not the end of the suite
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        _free_device_memory(device)
    rows = report["rows"]
    best = max(rows, key=lambda r: r["images_per_second"])
    one = next(r for r in rows if r["k"] == 1 and r["way"] == "loop")["images_per_second"]
    at_32 = [r for r in rows if r["k"] == 32]
    study_images = STUDY_MODELS * PROTOCOL_STEPS * 64
    return {
        "status": "ran",
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "one_model_images_per_second": one,
        "best": best,
        "pack_32_x_one": max(r["images_per_second"] for r in at_32) / one if at_32 else None,
        "study_gpu_hours": study_images / best["images_per_second"] / 3600,
    }


def summarise_bench(report: dict[str, Any]) -> dict[str, Any]:
    """The bench's rows and skipped rows as they came, and what the goals read: the plain row, the fastest aeforge
    row (its ratio to the plain loop), and the fastest bf16 one."""
    rows = [dict(row) for row in report["rows"]]
    plain = next((row for row in rows if row["loop"].startswith("plain")), None)
    ours = [row for row in rows if row["loop"].startswith("aeforge (")]  # not the Ray Train row
    for row in rows:
        if row.get("ratio") is None and plain:
            row["ratio"] = row["images_per_second"] / plain["images_per_second"]
    best = max(ours, key=lambda row: row["images_per_second"], default=None)
    best_bf16 = max(
        (row for row in ours if row.get("precision") == "bf16"), key=lambda row: row["images_per_second"], default=None
    )
    return {
        "device": report.get("device"),
        "data": report.get("data_description"),
        "rows": rows,
        "skipped_rows": report.get("skipped", []),
        "plain_images_per_second": plain["images_per_second"] if plain else None,
        "best_aeforge": best["loop"] if best else None,
        "best_images_per_second": best["images_per_second"] if best else None,
        "ratio": best["ratio"] if best else None,
        "best_bf16_images_per_second": best_bf16["images_per_second"] if best_bf16 else None,
        "best_bf16": best_bf16["loop"] if best_bf16 else None,
    }


# --- 3. the protocol run -----------------------------------------------------------------------------------------


class BudgetReached(Exception):
    """The protocol run's training reached the suite's deadline (raised at a log point, the steps so far done)."""


def timed_context_class():
    from workers.loop import RunContext

    @dataclass
    class TimedContext(RunContext):
        """One local process that keeps the loss module (so a run stopped early can still be evaluated), the time
        of every log point, and stops the training at ``deadline``."""

        deadline: float = math.inf
        marks: list[tuple[int, float]] = field(default_factory=list)
        loss_module: Any = None
        last_said: float = field(default_factory=time.perf_counter)

        def __post_init__(self):
            self.wrap = self._keep

        def _keep(self, module):
            self.loss_module = module
            return module

        def log_progress(self, step, total, *, metrics=None, images_per_second=None, trial=None, eta_s=None) -> None:
            now = time.perf_counter()  # the loop has just read the window's losses back: its steps are done
            self.marks.append((step, now))
            if now - self.last_said >= 15.0:
                say(
                    f"protocol: step {step:,}/{total:,}"
                    + (f", {images_per_second:,.0f} images/s" if images_per_second else "")
                )
                self.last_said = now
            if now >= self.deadline and step < total:
                raise BudgetReached(step)

    return TimedContext


def steady_projection(marks: list[tuple[int, float]], started: float, total_steps: int) -> dict[str, Any]:
    """The pace after the start-up (up to the first log point, or the first tenth of them: compiling and warming up)
    and the training time ``total_steps`` would take at it, start-up included. None without two log points."""
    if len(marks) < 2:
        return {"steps_per_second": None, "startup_s": None, "projected_train_s": None}
    first = min(max(1, len(marks) // 10), len(marks) - 2)
    (s0, t0), (s1, t1) = marks[first], marks[-1]
    rate = (s1 - s0) / (t1 - t0) if t1 > t0 else math.inf
    startup = (t0 - started) - s0 / rate  # the time of the steps before s0 beyond their steady pace
    return {
        "steps_per_second": rate,
        "startup_s": max(0.0, startup),
        "projected_train_s": (t0 - started) + (total_steps - s0) / rate,
    }


def run_protocol(sizes: Sizes, device, budget_s: float, steps: int) -> dict[str, Any]:
    from workers.config import EvalConfig
    from workers.data import prepare
    from workers.loop import compiles, train
    from workers.metrics import evaluate

    spec = protocol_spec()
    cfg = spec.train.model_copy(
        update={
            "steps": steps,
            "epochs": None,
            "log_every": sizes.protocol_log_every,
            # one evaluation, at the end, timed on its own
            "eval_every": None,
        }
    )
    eval_cfg = spec.eval
    if sizes.tiny_eval:
        eval_cfg = EvalConfig(iwae_samples=2, max_examples=100, num_train=100, num_test=50, pictures=False, probe=False)
    section: dict[str, Any] = {
        "spec": str(PROTOCOL_SPEC.relative_to(REPO)),
        "variant": spec.model.variant,
        "architecture": spec.model.architecture,
        "latent_dim": spec.model.latent_dim,
        "beta": spec.model.beta,
        "batch_size": cfg.batch_size,
        "lr": cfg.optimizer.lr,
        "optimizer": cfg.optimizer.name,
        "precision": "fp32 (bf16 is for CUDA)" if cfg.precision == "bf16" and device.type != "cuda" else cfg.precision,
        "compiled": compiles(cfg, device),
        "steps_asked": steps,
        "checkpoint_every": cfg.checkpoint_every,
        "log_every": cfg.log_every,
        "eval": eval_cfg.model_dump(mode="json"),
    }
    deadline = SUITE_STARTED + budget_s - sizes.eval_reserve_s
    say(
        f"protocol: {steps:,} steps of {spec.model.variant}/{spec.model.architecture} at batch {cfg.batch_size}, "
        f"training until {max(0.0, deadline - time.perf_counter()):.0f} s from now at most"
    )
    run_started = time.perf_counter()
    data = prepare(spec.data, cfg.seed)
    section["setup_s"] = time.perf_counter() - run_started

    ctx = timed_context_class()(device=device, deadline=deadline)
    train_started = time.perf_counter()
    try:
        result = train(
            spec.model,
            cfg,
            eval_cfg,
            data.train,
            data.val,
            ctx,
            dataset_size=len(data.train),
            full_data=data.full,
            evaluate_at_end=False,
            pictures=False,
        )
        model, steps_done, stopped = result.model, result.steps, False
        section["loop_images_per_second"] = result.images_per_second
        section["compile_s"] = result.compile_seconds
    except BudgetReached as reached:
        model, steps_done, stopped = ctx.loss_module.model, int(reached.args[0]), True
    _synchronize(device)
    train_s = time.perf_counter() - train_started
    section.update(
        steps_done=steps_done,
        stopped_at_budget=stopped,
        train_s=train_s,
        images_per_second=steps_done * cfg.batch_size / train_s if train_s > 0 else None,
    )
    projection = steady_projection(ctx.marks, train_started, PROTOCOL_STEPS)
    if projection["projected_train_s"] is None and steps_done:  # one log point: the average pace, start-up and all
        projection["projected_train_s"] = train_s * PROTOCOL_STEPS / steps_done
    section.update(projection)
    section["projected_train_s_300k"] = section.pop("projected_train_s")
    say(f"protocol: {steps_done:,} steps in {train_s:.1f} s" + (" (stopped at the time budget)" if stopped else ""))

    eval_started = time.perf_counter()
    metrics = evaluate(model, data.val, eval_cfg, seed=cfg.seed, full=data.full, train=data.train)
    _synchronize(device)
    section["eval_s"] = time.perf_counter() - eval_started
    section["end_to_end_s"] = time.perf_counter() - run_started
    section["metrics"] = metrics
    section.update(mig=metrics.get("eval/mig"), mig_exact=metrics.get("eval/mig_exact"), elbo=metrics.get("eval/elbo"))
    if section["projected_train_s_300k"] is not None:
        whole = section["setup_s"] + section["projected_train_s_300k"] + section["eval_s"]
        section["projected_end_to_end_s_300k"] = whole
        section["eval_fraction"] = section["eval_s"] / whole
    say(
        f"protocol: evaluated in {section['eval_s']:.1f} s: MIG {section['mig']}, MIG (exact) "
        f"{section['mig_exact']}, ELBO {section['elbo']}"
    )
    del model, ctx
    _free_device_memory(device)
    return section


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_device_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- 4. Chen et al.'s study ---------------------------------------------------------------------------------


def study_spec(sizes: Sizes):
    from jobs.spec import load_spec

    spec = load_spec(STUDY_SPEC)
    if sizes.study_grid is not None:
        assert spec.sweep is not None, f"{STUDY_SPEC} is a sweep"
        spec = spec.model_copy(update={"sweep": spec.sweep.model_copy(update=sizes.study_grid)})
    if sizes.study_eval is not None:
        spec = spec.model_copy(update={"eval": spec.eval.model_copy(update=sizes.study_eval)})
    if sizes.study_batch_size is not None:
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"batch_size": sizes.study_batch_size})})
    if sizes.study_data_limit is not None:
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"limit": sizes.study_data_limit})})
    return spec


def study_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, beta): mean, standard deviation (over seeds), lowest and highest of MIG (Chen et al.'s
    convention) and of the ELBO, and how many seeds."""
    import numpy as np

    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["variant"], row["beta"]), []).append(row)
    table = []
    for (variant, beta), members in sorted(cells.items()):
        entry: dict[str, Any] = {"variant": variant, "beta": beta, "seeds": len(members)}
        for key in ("mig_chen", "elbo"):
            values = np.array([m[key] for m in members], dtype=float)
            entry.update(
                {
                    f"{key}_mean": float(values.mean()),
                    f"{key}_sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    f"{key}_min": float(values.min()),
                    f"{key}_max": float(values.max()),
                }
            )
        table.append(entry)
    return table


def study_findings(table: list[dict[str, Any]]) -> dict[str, Any]:
    """What the paper found, read off the table: beta-TCVAE's best mean MIG, and whether its mean is above
    beta-VAE's at every beta >= 2 both ran (None when no such beta ran for both)."""
    mean = {(r["variant"], r["beta"]): r["mig_chen_mean"] for r in table}
    tcvae = [v for (variant, _), v in mean.items() if variant == "beta_tcvae"]
    shared = [b for (variant, b) in mean if variant == "beta_tcvae" and b >= 2 and ("beta_vae", b) in mean]
    above = all(mean[("beta_tcvae", b)] > mean[("beta_vae", b)] for b in shared) if shared else None
    return {
        "best_tcvae_mig": max(tcvae) if tcvae else None,
        "tcvae_above_at_every_beta_2_up": above,
        "compared_betas": sorted(shared),
    }


def run_study(sizes: Sizes, device, budget_s: float, steps: int | None = None) -> dict[str, Any]:
    """Chen et al.'s study on this device (see the module doc, part 4): each variant's models as one pack."""
    import torch

    from workers.data import prepare
    from workers.loop import total_steps
    from workers.metrics.elbo import elbo
    from workers.metrics.mig import mig_chen
    from workers.pack import PackMember, train_pack

    share_end = time.perf_counter() + min(
        sizes.study_s, seconds_left(budget_s) - sizes.protocol_min_s - sizes.eval_reserve_s
    )
    if share_end - time.perf_counter() < sizes.study_needs_s:
        return {"status": "skipped", "reason": f"time budget ({seconds_left(budget_s):.0f} s left)"}
    started = time.perf_counter()
    spec = study_spec(sizes)
    data = prepare(spec.data, spec.train.seed)
    full_steps = total_steps(spec.train, len(data.train))
    packs = spec.trial_packs(spec.num_trials())  # one pack per variant: 18 models each
    section: dict[str, Any] = {
        "status": "ran",
        "spec": str(STUDY_SPEC.relative_to(REPO)),
        "models": spec.num_trials(),
        "packs": len(packs),
        "pack_sizes": [len(p) for p in packs],
        "architecture": spec.model.architecture,
        "batch_size": spec.train.batch_size,
        "lr": spec.train.optimizer.lr,
        "full_steps": full_steps,
        "mig_chen_rows": spec.eval.mig_chen_rows if spec.eval.mig_chen_rows is not None else len(data.full),
        "mig_chen_samples": spec.eval.mig_chen_samples,
        "setup_s": time.perf_counter() - started,
    }

    def members_of(pack):
        return [
            PackMember(
                spec.with_trial({k: row[k] for k in ("variant", "beta", "seed") if k in row}).model,
                int(row.get("seed", spec.train.seed)),
                f"t{row['index']:02d}",
            )
            for row in pack
        ]

    def train_for(pack, n):
        cfg = spec.train.model_copy(
            update={"steps": n, "epochs": None, "log_every": max(1, min(500, n)), "checkpoint_every": 10**9}
        )
        ctx = timed_context_class()(device=device)
        t0 = time.perf_counter()
        results = train_pack(
            members_of(pack),
            cfg,
            spec.eval,
            data.train,
            data.val,
            ctx,
            dataset_size=len(data.train),
            evaluate_at_end=False,
            pictures=False,
        )
        _synchronize(device)
        return results, time.perf_counter() - t0

    # The pace, from a short probe of the first pack (its first steps hold the start-up, so it overstates a step).
    probe_steps = min(sizes.study_probe_steps, full_steps)
    _, probe_s = train_for(packs[0], probe_steps)
    step_s = probe_s / probe_steps
    scoring_guess = 0.25 * (share_end - time.perf_counter())
    fit = int((share_end - time.perf_counter() - scoring_guess) / (step_s * len(packs)))
    n = steps or max(1, min(full_steps, fit))
    section.update(probe_steps=probe_steps, probe_s=probe_s, steps=n, stopped_short=n < full_steps)
    say(
        f"study: {spec.num_trials()} models in {len(packs)} packs, {n:,} of {full_steps:,} steps each "
        f"(probe: {probe_s / probe_steps * 1000:.0f} ms a pack step)"
    )

    rows, train_s, score_s = [], 0.0, 0.0
    for pack in packs:
        results, seconds = train_for(pack, n)
        train_s += seconds
        t0 = time.perf_counter()
        for row, result in zip(pack, results):
            model = result.model.eval()
            seed = int(row.get("seed", spec.train.seed))
            generator = torch.Generator().manual_seed(seed)
            rows.append(
                {
                    "variant": row.get("variant", spec.model.variant),
                    "beta": float(row["beta"]),
                    "seed": seed,
                    "failed": result.failed,
                    "mig_chen": mig_chen(
                        model,
                        data.full,
                        spec.eval.factors,
                        spec.eval.mig_chen_rows,
                        spec.eval.mig_chen_samples,
                        batch_size=4096,
                        generator=generator,
                    ),
                    "elbo": elbo(model, data.val, spec.eval.max_examples, 2048, generator)["elbo"],
                }
            )
        _synchronize(device)
        score_s += time.perf_counter() - t0
        del results
        _free_device_memory(device)
    section.update(train_s=train_s, score_s=score_s, wall_s=time.perf_counter() - started, rows=rows)
    section["pack_step_s"] = train_s / (n * len(packs))
    section["projected_full_s"] = section["setup_s"] + section["pack_step_s"] * full_steps * len(packs) + score_s
    section["table"] = study_table(rows)
    section.update(study_findings(section["table"]))
    say(
        f"study: trained in {train_s:.0f} s, scored in {score_s:.0f} s; full length projected "
        f"{section['projected_full_s']:.0f} s; beta-TCVAE's best mean MIG {section['best_tcvae_mig']}"
    )
    return section


# --- the report ----------------------------------------------------------------------------------------------


def goal_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    protocol = report.get("protocol") or {}
    cases = report.get("bench") or []
    small: dict[str, Any] = next((c for c in cases if c["batch_size"] == 64), {})
    large: dict[str, Any] = next((c for c in cases if c["batch_size"] > 64), {})
    finished = protocol.get("steps_done") == PROTOCOL_STEPS
    study = report.get("study") or {}
    study_full = study.get("status") == "ran" and not study.get("stopped_short")
    measured = {
        "protocol_train_s": protocol.get("train_s") if finished else protocol.get("projected_train_s_300k"),
        "ratio_batch_64": small.get("ratio"),
        "large_batch_bf16_images_per_s": large.get("best_bf16_images_per_second"),
        "eval_fraction": protocol.get("eval_fraction"),
        "pack_32_x_one": (report.get("packs") or {}).get("pack_32_x_one"),
        "study_s": study.get("wall_s") if study_full else study.get("projected_full_s"),
        "study_best_tcvae_mig": study.get("best_tcvae_mig") if study_full else None,
        "study_tcvae_above": (
            None
            if not study_full or study.get("tcvae_above_at_every_beta_2_up") is None
            else float(study["tcvae_above_at_every_beta_2_up"])
        ),
    }
    # Where each figure comes from: the row it is read off, or whether it is projected.
    steps_done = protocol.get("steps_done")
    source = {
        "protocol_train_s": (
            "measured" if finished else f"projected from {steps_done:,} steps" if steps_done else None
        ),
        "ratio_batch_64": small.get("best_aeforge"),
        "large_batch_bf16_images_per_s": large.get("best_bf16"),
        "eval_fraction": None if finished or not steps_done else "of the projected run",
        "pack_32_x_one": "packs section" if (report.get("packs") or {}).get("pack_32_x_one") else None,
        "study_s": (
            None
            if study.get("status") != "ran"
            else "measured"
            if study_full
            else f"projected from {study.get('steps'):,} steps"
        ),
        "study_best_tcvae_mig": "study section" if study_full else None,
        "study_tcvae_above": "study section" if study_full else None,
    }
    rows = []
    for key, what, target, better, unit in GOALS:
        value = measured[key]
        met = None if value is None else (value <= target if better == "lower" else value >= target)
        rows.append(
            {
                "goal": key,
                "what": what,
                "target": target,
                "better": better,
                "unit": unit,
                "measured": value,
                "from": source[key],
                "met": met,
            }
        )
    return rows


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "NaN"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def _with_unit(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "%":
        return f"{100 * value:.3g} %"
    return f"{_number(value)} {unit}" if unit != "×" else f"{_number(value)}×"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_number(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# aeforge device suite{' (--tiny)' if report['tiny'] else ''}",
        "",
        f"{env['device']} · torch {env['torch']} (CUDA {env['cuda'] or 'none'}) · Python {env['python']} · "
        f"{env['pydantic']} · {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget",
        "",
    ]

    tests = report.get("gpu_tests") or {}
    lines += [f"## GPU tests (`pytest -m gpu tests/gpu`, {tests.get('seconds', 0):.0f} s)", ""]
    if tests.get("error"):
        lines += [f"**{tests['error']}**", ""]
    lines += _table(
        ["test", "status", "s", "reason"],
        [[t["name"], t["status"], t["seconds"], t["reason"]] for t in tests.get("tests", [])],
    )

    lines += ["## Training bench (benchmarks/bench_train.py, the protocol's model and data)", ""]
    bench_rows = []
    for case in report.get("bench") or []:
        if case["status"] != "ran":
            bench_rows.append(
                [case["case"], case["batch_size"], case["status"], None, None, None, case.get("reason", "")]
            )
            continue
        for row in case["rows"]:
            compiling = row.get("compile_seconds")
            bench_rows.append(
                [
                    case["case"],
                    row.get("batch_size", case["batch_size"]),
                    row["loop"],
                    row["images_per_second"],
                    row["ms_per_step"],
                    row.get("ratio"),
                    f"compiled in {compiling:.1f} s" if compiling else "",
                ]
            )
        for row in case["skipped_rows"]:
            bench_rows.append(
                [
                    case["case"],
                    row.get("batch_size", case["batch_size"]),
                    row["loop"],
                    None,
                    None,
                    None,
                    f"skipped: {row['reason']}",
                ]
            )
    lines += _table(["case", "batch", "loop", "images/s", "ms/step", "× plain", "note"], bench_rows)

    packs = report.get("packs")
    if packs is not None:
        lines += ["## Packs (benchmarks/bench_pack.py: beta-TCVAE/conv64 models at batch 64 trained as one)", ""]
        if packs["status"] != "ran":
            lines += [f"{packs['status']}: {packs.get('reason', '')}", ""]
        else:
            lines += _table(
                ["way", "K", "images/s (all K)", "× one model"],
                [[r["way"], r["k"], r["images_per_second"], r["x_one_model"]] for r in packs["rows"]],
            )
            lines += [
                f"disentanglement_lib's study ({STUDY_MODELS:,} models x {PROTOCOL_STEPS:,} steps x 64 images) "
                f"at the best rate ({packs['best']['way']}, K = {packs['best']['k']}): "
                f"{packs['study_gpu_hours']:,.1f} hours of training on this device",
                "",
            ]

    study = report.get("study")
    if study is not None:
        lines += ["## Chen et al. 2018's study (jobs/examples/study_chen2018.yaml, one pack per variant)", ""]
        if study["status"] != "ran":
            lines += [f"{study['status']}: {study.get('reason', '')}", ""]
        else:
            lines += [
                f"{study['models']} models in {study['packs']} packs, {study['steps']:,} of {study['full_steps']:,} "
                f"steps each at batch {study['batch_size']}"
                + (" (stopped short: the suite's budget)" if study["stopped_short"] else "")
                + f"; trained in {study['train_s']:.0f} s, scored in {study['score_s']:.0f} s "
                f"(MIG over {study['mig_chen_rows']:,} rows, {study['mig_chen_samples']:,} samples); "
                f"the full-length study: {study['projected_full_s']:,.0f} s at this pace",
                "",
            ]
            lines += _table(
                ["variant", "beta", "seeds", "MIG (Chen) mean", "± sd", "ELBO mean", "± sd"],
                [
                    [
                        r["variant"],
                        r["beta"],
                        r["seeds"],
                        r["mig_chen_mean"],
                        r["mig_chen_sd"],
                        r["elbo_mean"],
                        r["elbo_sd"],
                    ]
                    for r in study["table"]
                ],
            )

    protocol = report.get("protocol")
    lines += _protocol_lines(protocol) if protocol is not None else []

    lines += ["## Goals (one H200; measured against, not asserted)", ""]
    lines += _table(
        ["goal", "target", "measured", "from", "met"],
        [
            [
                g["what"],
                ("≤ " if g["better"] == "lower" else "≥ ") + _with_unit(g["target"], g["unit"]),
                _with_unit(g["measured"], g["unit"]),
                g["from"] or "",
                g["met"],
            ]
            for g in report["goals"]
        ],
    )
    return "\n".join(lines)


def _protocol_lines(protocol: dict[str, Any]) -> list[str]:
    lines = ["## Protocol run (beta-TCVAE, dSprites, disentanglement_lib's protocol)", ""]
    if protocol.get("error"):
        lines += [f"**{protocol['error']}**", ""]
    shown = [
        ("steps done / asked", f"{_number(protocol.get('steps_done'))} / {_number(protocol.get('steps_asked'))}"),
        ("stopped at the time budget", protocol.get("stopped_at_budget")),
        ("precision, compiled", f"{protocol.get('precision')}, {_number(protocol.get('compiled'))}"),
        ("data set-up (s)", protocol.get("setup_s")),
        ("training (s)", protocol.get("train_s")),
        ("images/s (training, start-up included)", protocol.get("images_per_second")),
        ("steps/s (steady)", protocol.get("steps_per_second")),
        ("start-up beyond the steady pace (s)", protocol.get("startup_s")),
        ("of it compiling, first step (s)", protocol.get("compile_s")),
        ("training, projected for 300,000 steps (s)", protocol.get("projected_train_s_300k")),
        ("evaluation (s)", protocol.get("eval_s")),
        ("end to end, as run (s)", protocol.get("end_to_end_s")),
        ("end to end, projected for 300,000 steps (s)", protocol.get("projected_end_to_end_s_300k")),
        ("MIG (eval/mig, disentanglement_lib)", protocol.get("mig")),
        ("MIG (eval/mig_exact, Chen et al.)", protocol.get("mig_exact")),
        ("ELBO (eval/elbo)", protocol.get("elbo")),
    ]
    return lines + _table(["figure", "value"], [[name, value] for name, value in shown])


def environment(pydantic_source: str, device) -> dict[str, Any]:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    memory = (torch.cuda.get_device_properties(device).total_memory / 2**30) if device.type == "cuda" else None
    return {
        "device": name,
        "device_memory_gib": memory,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "pydantic": pydantic_source,
    }


# --- main --------------------------------------------------------------------------------------------------------

SECTIONS = ("gpu_tests", "bench", "packs", "study", "protocol")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for device_suite.json and device_suite.md")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: the whole suite in about a minute on a CPU")
    parser.add_argument(
        "--protocol-steps",
        type=int,
        default=None,
        help=f"steps of the protocol run (default {PROTOCOL_STEPS:,}; --tiny: {TINY_SIZES.protocol_steps})",
    )
    parser.add_argument(
        "--study-steps",
        type=int,
        default=None,
        help="steps of each model of the study (default: the full length where the study's share "
        "of the budget fits it, else what fits)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"seconds for the whole suite (default {DEVICE_SIZES.budget_s:.0f}; --tiny: "
        f"{TINY_SIZES.budget_s:.0f}); the protocol's training stops where it would run past it",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"which parts to run, comma-separated (default: all of {', '.join(SECTIONS)})",
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        default=DEFAULT_WHEELS,
        help="folder of pydantic's wheels, installed when pydantic is missing (default .whl)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    if args.protocol_steps is not None and args.protocol_steps < 1:
        parser.error("--protocol-steps must be at least 1")
    if args.study_steps is not None and args.study_steps < 1:
        parser.error("--study-steps must be at least 1")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = TINY_SIZES if args.tiny else DEVICE_SIZES
    budget_s = args.budget_s if args.budget_s is not None else sizes.budget_s
    sections = args.sections.split(",")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    pydantic_source = ensure_pydantic(args.wheels)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {
        "tiny": args.tiny,
        "budget_s": budget_s,
        "sections": sections,
        "environment": environment(pydantic_source, device),
    }
    say(f"device suite on {report['environment']['device']}, budget {budget_s:.0f} s")
    failed = False
    if "gpu_tests" in sections:
        cap = min(sizes.pytest_cap_s, max(1.0, seconds_left(budget_s) - sizes.protocol_min_s - sizes.eval_reserve_s))
        report["gpu_tests"] = run_gpu_tests(out, cap)
        failed |= bool(report["gpu_tests"].get("error")) or any(
            t["status"] in ("failed", "error") for t in report["gpu_tests"]["tests"]
        )
    if "bench" in sections:
        report["bench"] = run_bench(sizes, device, budget_s)
        failed |= any(case["status"] == "error" for case in report["bench"])
    if "packs" in sections:
        report["packs"] = run_packs(sizes, device, budget_s)
        failed |= report["packs"]["status"] == "error"
    if "study" in sections:
        try:
            report["study"] = run_study(sizes, device, budget_s, args.study_steps)
        except Exception as exc:  # a section of the report, not the end of the suite
            import traceback

            traceback.print_exc()
            report["study"] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            failed = True
    if "protocol" in sections:
        steps = args.protocol_steps or sizes.protocol_steps
        try:
            report["protocol"] = run_protocol(sizes, device, budget_s, steps)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            report["protocol"] = {"error": f"{type(exc).__name__}: {exc}"}
            failed = True
    report["seconds"] = time.perf_counter() - SUITE_STARTED
    report["goals"] = goal_rows(report)
    (out / JSON_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (out / MARKDOWN_NAME).write_text(text + "\n")
    print(text, flush=True)
    say(f"wrote {out / JSON_NAME} and {out / MARKDOWN_NAME}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
