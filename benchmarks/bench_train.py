"""Training throughput: aeforge's loop next to a plain PyTorch loop for the same model, on the same data, in the
same run.

The plain loop is what a user would write first: a DataLoader on the host, PyTorch's default Adam, fp32, eager,
a ``.to(device)`` per batch and ``loss.item()`` every step. Both loops train the same architecture from the same
initial weights for the same number of steps; only the steps after the warm-up are timed (aeforge's loop times its
training steps only: compiling happens in the warm-up, the end-of-run work comes after the clock stops).

Both loops read the same kind of data (``data``):

- ``"spec"``: the spec's own data set (procedural dSprites for the examples). aeforge's loop takes its batches
  from it as it always does; the plain loop's DataLoader fetches each batch from the same data set object with
  one ``images(rows)`` call (a BatchSampler over a map-style data set), so for dSprites both render every batch
  from the sprite bank.
- ``"npz"``: a file data set. The bench writes the rows it needs (uint8, from the spec's data) to an ``.npz`` in a
  temporary folder; aeforge opens it with its npz reader, the plain loop with ``numpy.load`` into a
  TensorDataset of uint8 images that it converts to float per batch.

Rows, each with its ratio to the plain loop at the same batch size: aeforge eager and compiled (``train.compile``)
in fp32 and bf16 (bf16 trains in bf16 on CUDA only, so on a CPU it is listed as skipped with the reason), at the
spec's batch size and, with ``large_batch``, at a large one. With ``repeats`` > 1 every row is measured that many
times, interleaved (plain, eager, compiled, plain, ...), so a change in the machine's load touches every row
alike; a row's figure is the median.

With ``ray_workers``, one more row runs the eager loop on Ray Train as DDP over that many workers (gloo on CPUs,
NCCL on GPUs), each on its own shard, without checkpoints or MLflow: its images/s is global (batch x workers) and
timed inside the loop like the others, so the difference in ms/step is Ray's and DDP's overhead per step. The
fit's wall time (worker start-up included) is reported apart.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.config import DataConfig, EvalConfig
from workers.data import open_dataset, train_val_split
from workers.data.base import ImageDataset
from workers.errors import AeforgeError
from workers.loop import CompilerMissing, RunContext, compiles, train
from workers.models import build_model

DATA_KINDS = ("spec", "npz")
PRECISIONS = ("fp32", "bf16")
NPZ_NAME = "bench_images.npz"


class BenchError(AeforgeError):
    """A bench asked for something it cannot run (an unknown data kind, a row combination it does not support)."""


# --- the plain loop ---------------------------------------------------------------------------------------------


class _BatchReader(torch.utils.data.Dataset):
    """A map-style data set whose items are whole batches: ``reader[[3, 9, 4]]`` is ``data.images(rows)``. A
    DataLoader with a BatchSampler and ``batch_size=None`` hands each list of rows to it in one call."""

    def __init__(self, data: ImageDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, rows: list[int]) -> torch.Tensor:
        return self.data.images(torch.as_tensor(rows))


def _plain_loader(data: ImageDataset, batch: int, seed: int) -> torch.utils.data.DataLoader:
    reader = _BatchReader(data)
    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(reader, generator=torch.Generator().manual_seed(seed)), batch, drop_last=True
    )
    return torch.utils.data.DataLoader(reader, sampler=sampler, batch_size=None)


def _plain_npz_loader(path: Path, n: int, batch: int, seed: int) -> torch.utils.data.DataLoader:
    with np.load(path) as archive:
        images = torch.from_numpy(archive["images"][:n])
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def _plain_loop(model, loader, device, steps: int, warmup: int, lr: float) -> float:
    """Seconds for ``steps`` steps after ``warmup`` untimed ones. A batch is a tensor, or a 1-tuple of uint8 images
    (a TensorDataset's), which the loop converts to floats in [0, 1] as a user would."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    done, t0 = 0, time.perf_counter()
    while done < warmup + steps:
        for batch in loader:
            if done == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            x = batch[0].to(device).float().div(255.0) if isinstance(batch, (tuple, list)) else batch.to(device)
            loss = model.loss(x).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # what a plain loop does to print or log its loss
            done += 1
            if done == warmup + steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# --- the Ray Train row ------------------------------------------------------------------------------------------


def _bench_train_config(spec, steps: int, warmup: int, **update: Any):
    return spec.train.model_copy(
        update={
            "steps": warmup + steps,
            "epochs": None,
            "checkpoint_every": 10**9,
            "log_every": warmup + steps,
            "eval_every": None,
            **update,
        }
    )


def _ray_bench_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker of the benchmark: aeforge's loop on this rank's shard, no checkpoints, no MLflow."""
    from workers.config import ModelConfig, TrainConfig
    from workers.data import shard
    from workers.ray_worker import RayTrainContext
    from workers.storage import Storage

    class BenchContext(RayTrainContext):
        def latest_checkpoint(self):
            return None

        def save_checkpoint(self, directory, metrics, step, keep) -> None:
            return None

    model_cfg = ModelConfig.model_validate(config["model"])
    data_cfg = DataConfig.model_validate(config["data"])
    train_cfg = TrainConfig.model_validate(config["train"])
    ctx = BenchContext(mlflow_run=None, run_dir=None, gather_tc=model_cfg.gather_global_batch)
    data = open_dataset(data_cfg, resolve=Storage.from_settings().resolve)
    train_part, val_part = train_val_split(data, data_cfg.val_fraction, train_cfg.seed)
    local = shard(train_part, ctx.rank, ctx.world_size, train_cfg.seed)
    assert train_cfg.steps is not None, "_bench_train_config gives steps"
    n = min(len(local), train_cfg.batch_size * train_cfg.steps)
    local = local.subset(torch.arange(n))
    result = train(
        model_cfg,
        train_cfg,
        EvalConfig(),
        local,
        val_part,
        ctx,
        dataset_size=len(train_part),
        evaluate_at_end=False,
        pictures=False,
        warmup_steps=config["warmup"],
    )
    return {"images_per_second": result.images_per_second, "seconds": result.seconds}


def run_ray_benchmark(spec, workers: int, steps: int = 200, warmup: int = 20) -> dict[str, Any]:
    """The Ray Train row: aeforge's eager loop as DDP over ``workers`` Ray Train workers (Ray must be initialised).
    Returns the row, with ``fit_seconds`` (the whole TorchTrainer.fit, worker start-up included)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = spec.resources
    config = {
        "model": spec.model.model_dump(mode="json"),
        "data": spec.data.model_dump(mode="json"),
        "train": _bench_train_config(spec, steps, warmup, compile=False, compile_mode=None).model_dump(mode="json"),
        "warmup": warmup,
    }
    with tempfile.TemporaryDirectory(prefix="aeforge-bench-") as storage_path:
        # Train V2 keeps what the loop returns (Result.return_value); ray.train picks V2 at import, mypy reads V1.
        trainer = TorchTrainer(
            _ray_bench_loop_per_worker,  # type: ignore[arg-type]
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=r.per_worker()
            ),
            run_config=RunConfig(name=f"aeforge-bench-{uuid.uuid4().hex[:8]}", storage_path=storage_path),
        )
        started = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - started
    ips = result.return_value["images_per_second"]  # type: ignore[attr-defined]
    backend = "nccl" if r.gpus_per_worker else "gloo"
    return {
        "loop": f"aeforge on Ray Train ({workers} workers, DDP {backend}, {r.cpus_per_worker:g} CPU each)",
        "batch_size": spec.train.batch_size * workers,
        "precision": spec.train.precision,
        "compiled": False,
        "images_per_second": ips,
        "ms_per_step": 1000 * spec.train.batch_size * workers / ips,
        "fit_seconds": fit_seconds,
    }


# --- the rows ---------------------------------------------------------------------------------------------------


class _QuietContext(RunContext):
    """One local process that prints no progress lines: the bench's output is its table (or its JSON)."""

    def log_progress(self, step, total, *, metrics=None, images_per_second=None, trial=None, eta_s=None) -> None:
        return None

    def log_phase(self, phase, **details) -> None:
        return None


def _aeforge_label(compiled: bool, precision: str) -> str:
    return f"aeforge ({'compiled' if compiled else 'eager'}, {precision})"


def _skip_reason(precision: str, device: torch.device) -> str | None:
    if precision == "bf16" and device.type != "cuda":
        return "bf16 trains in bf16 on CUDA only (on a CPU the loop runs fp32)"
    return None


def _write_npz(data: ImageDataset, n: int, folder: Path) -> Path:
    """The first ``n`` rows of ``data`` as uint8 images in an uncompressed .npz (key ``images``)."""
    chunks = [
        (data.images(torch.arange(i, min(i + 4096, n))) * 255).round().to(torch.uint8).cpu() for i in range(0, n, 4096)
    ]
    path = folder / NPZ_NAME
    np.savez(path, images=torch.cat(chunks).numpy())
    return path


def _data_description(kind: str, spec, n: int) -> str:
    if kind == "spec":
        return (
            f"{spec.data.source}, read per batch by both loops from the same data set (aeforge's loop; the "
            f"plain loop's DataLoader, one images(rows) call per batch)"
        )
    return (
        f"an .npz file of {n:,} uint8 images written by the bench, read by both loops (aeforge's npz reader; "
        f"the plain loop: numpy.load, a TensorDataset, float/255 per batch)"
    )


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    row = dict(runs[0])
    speeds = [r["images_per_second"] for r in runs]
    row["images_per_second"] = statistics.median(speeds)
    row["ms_per_step"] = 1000 * row["batch_size"] / row["images_per_second"]
    if len(runs) > 1:
        row["images_per_second_runs"] = speeds
    return row


def run_benchmark(
    spec,
    steps: int = 200,
    warmup: int = 20,
    resolve: Callable | None = None,
    device: torch.device | None = None,
    ray_workers: int = 0,
    *,
    data: str = "spec",
    compile_options: Sequence[bool | None] = (None,),
    precisions: Sequence[str] | None = None,
    large_batch: int = 0,
    large_steps: int = 20,
    large_warmup: int = 3,
    repeats: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Rows of images/s, ms/step and ratio to the plain loop at the same batch size.

    ``compile_options``: which aeforge rows, by ``train.compile`` (None: the spec's own setting, which by default
    compiles on CUDA only). ``precisions``: fp32 and/or bf16 (None: the spec's). ``large_batch`` > 0 adds the rows
    again at that batch size (``large_steps`` timed steps after ``large_warmup``). ``ray_workers`` > 0 (Ray
    initialised by the caller) adds the Ray Train row, at the spec's batch size, on the spec's data. ``threads``:
    torch's intra-op CPU threads for every in-process row (None: torch's default); on a CPU shared with other
    work, one thread per process gives steadier figures than threads that wait for each other.

    Returns ``device``, ``data`` (what both loops read), ``rows`` (measured, each with ``loop``, ``batch_size``,
    ``precision``, ``compiled``, ``images_per_second``, ``ms_per_step`` and ``ratio``), ``skipped`` (rows not run,
    with ``reason``), ``ratio`` (the first aeforge row over the plain one at the spec's batch size), ``load``
    (the machine's 1-minute load average before and after, and its CPU count) and ``torch_threads``.
    """
    if data not in DATA_KINDS:
        raise BenchError(f"bench data must be one of {', '.join(DATA_KINDS)}, not {data!r}")
    if ray_workers and data != "spec":
        raise BenchError("the Ray Train row reads the spec's data on its workers; run --ray-workers with --data spec")
    precisions = tuple(precisions) if precisions is not None else (spec.train.precision,)
    for precision in precisions:
        if precision not in PRECISIONS:
            raise BenchError(f"bench precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if repeats < 1:
        raise BenchError(f"bench repeats must be at least 1, not {repeats}")
    if threads is not None and threads < 1:
        raise BenchError(f"bench threads must be at least 1, not {threads}")
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_rows(
            spec,
            steps,
            warmup,
            resolve,
            device,
            ray_workers,
            data,
            compile_options,
            precisions,
            large_batch,
            large_steps,
            large_warmup,
            repeats,
        )
    finally:
        torch.set_num_threads(threads_before)


def _run_rows(
    spec,
    steps,
    warmup,
    resolve,
    device,
    ray_workers,
    data,
    compile_options,
    precisions,
    large_batch,
    large_steps,
    large_warmup,
    repeats,
) -> dict[str, Any]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # What aeforge's loop imports when it starts (scikit-learn, SciPy and matplotlib, for its evaluation and
    # pictures), imported before any row: whatever thread pools they bring then run alongside every row alike.
    import workers.metrics
    import workers.plots  # noqa: F401

    load_before = os.getloadavg()[0]

    # (batch size, timed steps, warm-up steps, aeforge rows' compile options) of each group of rows.
    groups = [(spec.train.batch_size, steps, warmup, compile_options)]
    if large_batch:
        groups.append((large_batch, large_steps, large_warmup, compile_options))
    ray_batch = spec.train.batch_size * ray_workers
    if ray_workers > 1 and ray_batch not in (g[0] for g in groups):
        # The Ray row's global batch in one process, eager like the Ray row: what the workers' DDP is set against.
        groups.append((ray_batch, steps, warmup, (False,)))
    full = open_dataset(spec.data, resolve=resolve)
    train_part, val_part = train_val_split(full, spec.data.val_fraction, spec.train.seed)
    # Enough rows for the timed steps of the biggest group, one epoch: without materialising a huge data set.
    n_max = min(len(train_part), max(b * (s + w) for b, s, w, _ in groups))
    for b, *_ in groups:
        if b > n_max:
            raise BenchError(f"batch size {b} is larger than the {n_max} training examples of {spec.data.source}")

    with ExitStack() as stack:
        if data == "npz":
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aeforge-bench-data-")))
            npz_path = _write_npz(train_part, n_max, folder)
            source = open_dataset(DataConfig(source=str(npz_path), val_fraction=0.0))
        else:
            npz_path, source = None, train_part.subset(torch.arange(n_max))

        planned: list[tuple[tuple, Callable[[], dict[str, Any]]]] = []
        skipped: list[dict[str, Any]] = []
        for batch, group_steps, group_warmup, group_compile_options in groups:
            n = min(n_max, batch * (group_steps + group_warmup))
            subset = source.subset(torch.arange(n))

            def plain(batch=batch, group_steps=group_steps, group_warmup=group_warmup, subset=subset):
                torch.manual_seed(spec.train.seed)
                model = build_model(spec.model, subset.image_shape, len(train_part)).to(device)
                loader = (
                    _plain_npz_loader(npz_path, len(subset), batch, spec.train.seed)
                    if npz_path is not None
                    else _plain_loader(subset, batch, spec.train.seed)
                )
                seconds = _plain_loop(model, loader, device, group_steps, group_warmup, spec.train.optimizer.lr)
                return {
                    "loop": "plain PyTorch (DataLoader, eager, fp32)",
                    "batch_size": batch,
                    "precision": "fp32",
                    "compiled": False,
                    "images_per_second": group_steps * batch / seconds,
                }

            planned.append(((batch, "plain"), plain))
            for compile_option in group_compile_options:
                for precision in precisions:
                    cfg = _bench_train_config(
                        spec,
                        group_steps,
                        group_warmup,
                        batch_size=batch,
                        precision=precision,
                        compile=compile_option,
                        compile_mode=spec.train.compile_mode if compile_option is not False else None,
                    )
                    compiled = compiles(cfg, device)
                    reason = _skip_reason(precision, device)
                    if reason is not None:
                        skipped.append(
                            {
                                "loop": _aeforge_label(compiled, precision),
                                "batch_size": batch,
                                "precision": precision,
                                "compiled": compiled,
                                "reason": reason,
                            }
                        )
                        continue

                    def ours(
                        cfg=cfg,
                        compiled=compiled,
                        batch=batch,
                        group_warmup=group_warmup,
                        subset=subset,
                        precision=precision,
                    ):
                        if compiled:
                            torch._dynamo.reset()  # a fresh compile for this row's model, not a cache from another
                        result = train(
                            spec.model,
                            cfg,
                            EvalConfig(),
                            subset,
                            val_part,
                            _QuietContext(device=device),
                            dataset_size=len(train_part),
                            evaluate_at_end=False,
                            pictures=False,
                            warmup_steps=group_warmup,
                        )
                        return {
                            "loop": _aeforge_label(compiled, precision),
                            "batch_size": batch,
                            "precision": precision,
                            "compiled": compiled,
                            "images_per_second": result.images_per_second,
                            "compile_seconds": result.compile_seconds,
                        }

                    planned.append(((batch, compiled, precision), ours))

        runs: dict[tuple, list[dict[str, Any]]] = {}
        for _ in range(repeats):  # interleaved: every row once, then every row again
            for key, measure in list(planned):
                try:
                    runs.setdefault(key, []).append(measure())
                except CompilerMissing as exc:  # no C++ compiler for TorchInductor on this CPU: say so, go on
                    planned.remove((key, measure))
                    batch, compiled, precision = key
                    skipped.append(
                        {
                            "loop": _aeforge_label(compiled, precision),
                            "batch_size": batch,
                            "precision": precision,
                            "compiled": compiled,
                            "reason": str(exc),
                        }
                    )

    rows = [_median_row(measured) for measured in runs.values()]
    plain_by_batch = {row["batch_size"]: row["images_per_second"] for row in rows if row["loop"].startswith("plain")}
    for row in rows:
        row["ratio"] = row["images_per_second"] / plain_by_batch[row["batch_size"]]
    if ray_workers:
        ray_row = run_ray_benchmark(spec, ray_workers, steps=steps, warmup=warmup)
        # Global images/s over the plain loop's at the per-worker batch: what the workers together buy.
        ray_row["ratio"] = ray_row["images_per_second"] / plain_by_batch[spec.train.batch_size]
        # And over aeforge's own eager loop in one process at the same global batch: DDP's cost per image.
        alone = next(
            (
                row
                for row in rows
                if row["loop"] == _aeforge_label(False, spec.train.precision)
                and row["batch_size"] == ray_row["batch_size"]
            ),
            None,
        )
        if alone is not None:
            ray_row["vs_in_process"] = ray_row["images_per_second"] / alone["images_per_second"]
        rows.append(ray_row)
    first_ours = next(
        (row for row in rows if row["loop"].startswith("aeforge (") and row["batch_size"] == spec.train.batch_size),
        None,
    )
    return {
        "device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "data": data,
        "data_description": _data_description(data, spec, n_max),
        "rows": rows,
        "skipped": skipped,
        "ratio": first_ours["ratio"] if first_ours else None,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "load": {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()},
        "torch_threads": torch.get_num_threads(),
    }
