"""One process's training loop, read top to bottom.

The same function runs alone (``aeforge run`` without Ray), and on every Ray Train worker under DDP. What
differs between the two is the :class:`RunContext`: who this process is (rank, world size, device), how a model
is wrapped (DDP or not), where checkpoints go and come back from, and where metrics are sent.

Performance notes (the loop must be fast on an H100): the data set lives on the device when it fits; a batch is
an index slice of a per-epoch permutation drawn on the device; the loss parts are accumulated on the device and
read back only every ``log_every`` steps, so there is no host sync per step. The NaN/inf check also runs on the
device: it records the first bad step and part, and the host reads it at the next log point. With
``train.compile`` (the default on CUDA) the forward pass and loss run as TorchInductor code compiled at the first
step, as CUDA graphs by default on one GPU; the backward pass, the optimiser step and the bookkeeping above stay
as they are, and the model itself is never replaced, so its checkpoints and registered copies are the plain module.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from workers.config import EvalConfig, ModelConfig, TrainConfig
from workers.data.base import ImageDataset
from workers.errors import AeforgeError
from workers.models import build_model
from workers.models.base import Autoencoder, GatherFn, LossModule
from workers.protocol import emit, phase_line, progress_line
from workers.timeline import Timeline

CHECKPOINT_FILE = "checkpoint.pt"
# A pack's checkpoint (workers/pack.py) is a folder of its members' ordinary checkpoints and this file.
PACK_FILE = "pack.json"


def is_checkpoint(folder: Path) -> bool:
    """A checkpoint folder: one model's (checkpoint.pt) or a pack's (pack.json beside its members' folders)."""
    return (folder / CHECKPOINT_FILE).exists() or (folder / PACK_FILE).exists()


# Keep a data set on the GPU when it takes less than this fraction of the free memory.
DEVICE_DATA_FRACTION = 0.4


class TrainingDiverged(AeforgeError):
    """The loss became NaN or infinite. The message names the step and the loss part."""


@dataclass
class RunContext:
    """Where a training process runs and where its results go. The default is one local process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    # Wraps the loss module for data-parallel training (DDP); identity in one process.
    wrap: Callable[[nn.Module], nn.Module] = lambda module: module
    # Differentiable all-gather across ranks (beta-TCVAE's global-batch estimator); None in one process.
    gather: GatherFn | None = None
    # Local folder of this run (rank 0 writes pictures and metrics there).
    run_dir: Path | None = None
    # The sweep trial this process trains (its run name, which its progress lines carry); None for a job's own run.
    trial: str | None = None
    # The ends of this process's parts of the run (set-up, model, steps, evaluation, ...): where a fit's time goes.
    timeline: Timeline = field(default_factory=Timeline)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    # --- checkpoints: local folders by default; Ray Train overrides these ---------------------------------
    def latest_checkpoint(self) -> Path | None:
        ckpt_root = self._checkpoint_root()
        if ckpt_root is None or not ckpt_root.exists():
            return None
        done = sorted(p for p in ckpt_root.iterdir() if is_checkpoint(p) and not p.name.startswith("."))
        return done[-1] if done else None

    def save_checkpoint(self, directory: Path, metrics: dict[str, float], step: int, keep: int) -> None:
        """Called by every rank; ``directory`` holds the checkpoint only on the chief."""
        ckpt_root = self._checkpoint_root()
        if ckpt_root is None or not self.is_chief:
            return
        ckpt_root.mkdir(parents=True, exist_ok=True)
        target = ckpt_root / f"step_{step:09d}"
        # Copy to a hidden folder, then rename: a half-written checkpoint is never taken for a complete one.
        partial = ckpt_root / f".partial_{step:09d}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(directory, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        for old in sorted(p for p in ckpt_root.iterdir() if p.name.startswith("step_"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _checkpoint_root(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoints"

    # --- stopping early -------------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        """Whether this run was asked to stop (checked at the end of each log window, the same steps on every
        rank); a stopped run checkpoints at that step and returns. One local process is never asked."""
        return False

    # --- metrics --------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Per-step curves and evaluation results (chief only). Default: JSON lines in the run folder."""
        if self.run_dir is None or not self.is_chief:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_progress(
        self,
        step: int,
        total: int,
        *,
        metrics: dict[str, float] | None = None,
        images_per_second: float | None = None,
        trial: str | None = None,
        eta_s: float | None = None,
    ) -> None:
        """The line `aeforge run` and the queue service read to show progress: the step, the latest loss parts
        (means over the last log window), the speed over it and the seconds the remaining steps take at the pace
        so far; ``trial``: the sweep trial it is of, when not this context's (a pack's members)."""
        if self.is_chief:
            emit(
                progress_line(
                    step,
                    total,
                    metrics=metrics,
                    images_per_second=images_per_second,
                    trial=trial or self.trial,
                    eta_s=eta_s,
                )
            )

    def log_phase(
        self,
        phase: str,
        *,
        detail: str | None = None,
        done: int | None = None,
        total: int | None = None,
        eta_s: float | None = None,
        trial: str | None = None,
    ) -> None:
        """The line that names the phase the run is in (workers.protocol.PHASES), and its part ``done`` of
        ``total`` (chief only)."""
        if self.is_chief:
            emit(phase_line(phase, detail=detail, done=done, total=total, eta_s=eta_s, trial=trial or self.trial))

    def metric_progress(self, trial: str | None = None) -> Callable[[str, int, int], None]:
        """For :func:`workers.metrics.evaluate`: each metric as it starts becomes an "evaluating" phase line, with
        the ETA of the evaluation at its pace so far."""
        started = time.perf_counter()

        def on_metric(name: str, done: int, total: int) -> None:
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (total - done) if done else None
            self.log_phase("evaluating", detail=name, done=done, total=total, eta_s=eta, trial=trial)

        return on_metric


@dataclass
class TrainResult:
    model: Autoencoder
    steps: int
    final_metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]]
    pictures: dict[str, Path]
    resumed_from_step: int
    seconds: float
    images_per_second: float
    # The first step's wall time when the step was compiled (tracing and code generation included); 0 when eager.
    compile_seconds: float = 0.0
    # The step a stop request (the queue preempting or cancelling the job) ended training at, after a checkpoint
    # at that step; None when it trained to the end.
    stopped_at_step: int | None = None


# --- helpers -----------------------------------------------------------------------------------------------


def build_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """The spec's optimizer over ``params`` (a model's parameters, or a pack's stacked ones)."""
    opt = config.optimizer
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    kwargs: dict[str, Any] = {"lr": opt.lr, "betas": tuple(opt.betas), "weight_decay": opt.weight_decay}
    # One kernel for the whole update, on CUDA and on CPU alike (on 2 CPU cores the fused step takes ~0.9 ms for
    # conv64's 0.76 M parameters against ~2.4 ms for PyTorch's default per-parameter loop).
    kwargs["fused"] = True
    return cls(params, **kwargs)


class CompilerMissing(AeforgeError):
    """train.compile asked for on a CPU without the C++ compiler TorchInductor builds its kernels with."""


def compiles(config: TrainConfig, device: torch.device) -> bool:
    """Whether the training step is compiled: ``train.compile``, or by default on CUDA only (on a CPU compiling
    costs tens of seconds up front and needs a C++ compiler)."""
    return config.compile if config.compile is not None else device.type == "cuda"


def compile_mode(config: TrainConfig, device: torch.device, world_size: int) -> str:
    """``train.compile_mode``, or by default CUDA graphs ('reduce-overhead') on one CUDA process, where a small
    model's step is bound by kernel launches; 'default' under DDP (its gradient all-reduce runs outside the
    captured graphs) and on a CPU (which has no graphs to capture)."""
    if config.compile_mode is not None:
        return config.compile_mode
    return "reduce-overhead" if device.type == "cuda" and world_size == 1 else "default"


def compile_loss(loss_module: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """The loss module (forward pass and loss) compiled by torch.compile, for a fixed batch shape (the loop drops
    the last partial batch, so every step's shape is the same and nothing recompiles). ``loss_module`` and the
    model in it are left as they are: their state dicts keep their plain keys, so checkpoints and registered
    models are the same whether a run was compiled or not."""
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as exc:  # InvalidCxxCompiler, or whatever a future PyTorch raises instead
            raise CompilerMissing(
                "train.compile: true on a CPU needs a C++ compiler (g++, or the one $CXX names) for TorchInductor's "
                "kernels, and none was found; install one or set train.compile: false"
            ) from exc
    # A compiled Module is an OptimizedModule, a Module; torch.compile's annotation says only Callable.
    return cast(nn.Module, torch.compile(loss_module, mode=mode, dynamic=False))


def uses_cuda_graphs(mode: str, device: torch.device) -> bool:
    return device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")


class LossWindow:
    """The loss parts of the steps since the last log point, kept on the device so that a step costs one kernel
    (its parts stacked into a row of a preallocated buffer) and no host sync; the host reads the window back at a
    log point. Every ``ROWS`` steps, and at each read, the rows are folded on the device into running sums and the
    first non-finite step and part, so the memory is fixed however far apart the log points are. (Checking every
    step, as the loop did, took ~13 small kernels per step: ~65 us on a CPU core, against ~13 us now.)"""

    ROWS = 1024

    def __init__(self, part_names: list[str], device: torch.device, first_step: int):
        self.part_names = part_names
        self._rows = torch.zeros(self.ROWS, len(part_names), device=device)
        self._filled = 0  # rows written since the last fold
        self._first_step = first_step  # 0-based step of row 0
        self._sums = torch.zeros(len(part_names), device=device)
        self._steps = 0  # steps since the last read
        # First non-finite step (1-based: the steps done when it happened) and its part (index into part_names);
        # -1 while all is well.
        self._bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_part = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        torch.stack(
            [loss.detach().float(), *(parts[k].detach().float() for k in self.part_names[1:])],
            out=self._rows[self._filled],
        )
        self._filled += 1
        self._steps += 1
        if self._filled == self.ROWS:
            self._fold()

    def _fold(self) -> None:
        if self._filled == 0:
            return
        rows = self._rows[: self._filled]
        self._sums += rows.sum(dim=0)
        finite = torch.isfinite(rows)
        row_finite = finite.all(dim=1)
        first_row = torch.argmin(row_finite.to(torch.uint8))  # the first row with a non-finite part (0 if none)
        # Name the first non-finite part (recon, kl, ...) rather than their sum: that is what a user can act on.
        # The parts come after the total in a row, so look at them first and fall back to the total.
        first = finite[first_row]
        parts_then_total = torch.cat([first[1:], first[:1]]).to(torch.uint8)
        first_part = (torch.argmin(parts_then_total) + 1) % len(self.part_names)
        newly_bad = (~row_finite.all()) & (self._bad_step < 0)
        self._bad_step = torch.where(newly_bad, first_row + (self._first_step + 1), self._bad_step)
        self._bad_part = torch.where(newly_bad, first_part, self._bad_part)
        self._first_step += self._filled
        self._filled = 0

    def read(self) -> tuple[dict[str, float], tuple[int, str] | None]:
        """(mean of each part over the window's steps, (step, part) of the first non-finite value or None), read
        back to the host (the sync of a log point); the next window starts empty."""
        self._fold()
        bad_step, bad_part = (int(v) for v in torch.stack([self._bad_step, self._bad_part]).tolist())
        if bad_step >= 0:
            return {}, (bad_step, self.part_names[bad_part])
        means = (self._sums / max(self._steps, 1)).tolist()
        self._sums.zero_()
        self._steps = 0
        return dict(zip(self.part_names, means)), None


def total_steps(config: TrainConfig, shard_size: int) -> int:
    if config.steps is not None:
        return config.steps
    assert config.epochs is not None, "TrainConfig has steps or epochs (its validator)"
    return int(config.epochs) * steps_per_epoch(shard_size, config.batch_size)


def steps_per_epoch(shard_size: int, batch_size: int) -> int:
    # Drop the last partial batch: every step sees a full batch (the TC estimators and DDP want equal sizes).
    return max(1, shard_size // batch_size)


def epoch_permutation(n: int, seed: int, epoch: int, rank: int, device: torch.device) -> torch.Tensor:
    """The order of an epoch depends only on (seed, epoch, rank): a resumed run sees the same batches."""
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + epoch) * 1009 + rank)
    return torch.randperm(n, generator=gen).to(device)


class BatchOrder:
    """Which rows each step's batch holds: epoch e is epoch_permutation(n, seed, e, rank) cut into full batches
    (the permutation is drawn once per epoch). One order per model: a pack's members each keep their own."""

    def __init__(self, n: int, seed: int, rank: int, batch_size: int, device: torch.device):
        self.n, self.seed, self.rank, self.batch_size, self.device = n, seed, rank, batch_size, device
        self.per_epoch = steps_per_epoch(n, batch_size)
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def rows(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch or self._perm is None:
            self._epoch, self._perm = epoch, epoch_permutation(self.n, self.seed, epoch, self.rank, self.device)
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]


def step_noise_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator a model's training steps draw their noise from (Autoencoder.draw_noise): seeded by the run's
    seed and the rank (ranks draw different noise), the same for a model trained alone or in a pack."""
    return torch.Generator(device=device).manual_seed(seed * 1000 + rank + 1)


def place_data(data: ImageDataset, device: torch.device) -> ImageDataset:
    """Put the data set on the GPU when it fits comfortably; CPU data stays where it is."""
    if device.type != "cuda" or data.device == device:
        return data
    free, _ = torch.cuda.mem_get_info(device)
    if data.nbytes() < DEVICE_DATA_FRACTION * free:
        return data.to(device)
    return data


def _throughput(steps: int, images_per_step: int, seconds: float) -> float:
    return steps * images_per_step / seconds if steps > 0 and seconds > 0 else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def save_checkpoint_file(
    path: Path,
    model: Autoencoder,
    optimizer_state: dict,
    step: int,
    history,
    spec_json: str | None,
    noise_generator: torch.Generator | None = None,
) -> None:
    """One model's checkpoint: weights, optimizer state (``optimizer.state_dict()``), step, curves, random
    states, and what rebuilds the model (load_model_from_checkpoint)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer_state,
        "step": step,
        "history": history,
        "noise_rng": None if noise_generator is None else noise_generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "model_config": model.config.model_dump(mode="json"),
        "image_shape": list(model.image_shape),
        "dataset_size": model.dataset_size,
        "spec": spec_json,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_model_from_checkpoint(path: Path | str, map_location="cpu") -> Autoencoder:
    """A trained model from a checkpoint folder or file (for pictures, MLflow logging and evaluation)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    state = torch.load(path, map_location=map_location, weights_only=False)
    model = build_model(
        ModelConfig.model_validate(state["model_config"]), tuple(state["image_shape"]), state["dataset_size"]
    )
    model.load_state_dict(state["model"])
    return model


# How many training images the recorded code statistics (Autoencoder.record_code_statistics) come from: 2,048 codes
# place each latent's mean and spread to within a few per cent (a std's relative error is about 1/sqrt(2n) = 1.6%);
# 5,000 cost 2.5 s at the end of every fit on 2 CPU cores, 2,048 about 1 s.
CODE_STATISTICS_IMAGES = 2048
CODE_STATISTICS_BATCH = 500


def record_code_statistics(model: Autoencoder, data: ImageDataset, seed: int) -> None:
    """Record in ``model`` where the codes of (up to CODE_STATISTICS_IMAGES of) ``data`` lie, so that a saved or
    registered model can be traversed over its own code range without the data. The images are chosen with a
    generator of its own, so the training's random stream is left as it was."""
    chooser = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=chooser)[:CODE_STATISTICS_IMAGES]
    model.record_code_statistics(
        data.images(index[i : i + CODE_STATISTICS_BATCH]) for i in range(0, len(index), CODE_STATISTICS_BATCH)
    )


# --- the loop ----------------------------------------------------------------------------------------------


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    eval_config: EvalConfig,
    train_data: ImageDataset,
    val_data: ImageDataset,
    ctx: RunContext | None = None,
    *,
    dataset_size: int | None = None,
    full_data: ImageDataset | None = None,
    spec_json: str | None = None,
    pictures: bool = True,
    evaluate_at_end: bool = True,
    warmup_steps: int = 0,
) -> TrainResult:
    """Train one process's share. ``train_data`` is this rank's shard; ``dataset_size`` the whole training set's N.

    ``warmup_steps`` are left out of the reported throughput (benchmarks); ``evaluate_at_end=False`` skips the
    final evaluation and pictures.
    """
    ctx = ctx or RunContext()
    device = ctx.device
    cfg = train_config
    if eval_config.factors is not None:  # a misnamed factor fails now, not after the last step
        from workers.metrics import check_scored_factors

        check_scored_factors(eval_config, full_data if full_data is not None else val_data)
    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    dataset_size = dataset_size or len(train_data) * ctx.world_size

    model = build_model(model_config, train_data.image_shape, dataset_size).to(device)
    optimizer = build_optimizer(model.parameters(), cfg)
    loss_module = ctx.wrap(LossModule(model, gather=ctx.gather))
    compiled = compiles(cfg, device)
    mode = compile_mode(cfg, device, ctx.world_size) if compiled else None
    step_loss = compile_loss(loss_module, mode, device) if mode is not None else loss_module
    cuda_graphs = mode is not None and uses_cuda_graphs(mode, device)
    compile_seconds = 0.0
    train_data = place_data(train_data, device)

    n_steps = total_steps(cfg, len(train_data))
    order = BatchOrder(len(train_data), cfg.seed, ctx.rank, cfg.batch_size, train_data.device)
    history: dict[str, list[tuple[int, float]]] = {}
    start_step = 0

    # The steps' noise (reparameterisation, corruption: Autoencoder.draw_noise) comes from a generator of the
    # loop's own, seeded per rank (ranks draw different noise), and is saved with each checkpoint.
    noise_generator = step_noise_generator(cfg.seed, ctx.rank, device)
    resume = ctx.latest_checkpoint()
    if resume is not None:
        state = torch.load(Path(resume) / CHECKPOINT_FILE, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        history = {k: [tuple(p) for p in v] for k, v in state["history"].items()}
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        if state.get("noise_rng") is not None:  # checkpoints from before the noise generator start it afresh
            noise_generator.set_state(state["noise_rng"].cpu())
    ctx.timeline.mark("model")

    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if cfg.precision == "bf16" and device.type == "cuda"
        else nullcontext()
    )
    losses: LossWindow | None = None  # made at the first step, when the loss's parts are known
    steps_in_window = 0
    final_metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    window_started = t0  # the speed in a progress line is over its log window
    steps_started = t0  # the ETA in a progress line is at the pace since this attempt's first step
    ctx.log_phase("training", done=start_step, total=n_steps)
    seconds = 0.0

    def evaluate_now() -> dict[str, float]:
        """The evaluation of the model as it is now (the chief's), in eval mode; training mode after."""
        from workers.metrics import evaluate  # sklearn and scipy: imported by the one process that evaluates

        model.eval()
        metrics = evaluate(
            model,
            val_data,
            eval_config,
            seed=cfg.seed,
            full=full_data,
            train=train_data,
            on_metric=ctx.metric_progress(),
        )
        model.train()
        return metrics

    model.train()

    for step in range(start_step, n_steps):
        if step == start_step + warmup_steps:
            _sync(device)
            t0 = time.perf_counter()
        x = train_data.images(order.rows(step)).to(device, non_blocking=True)

        if compiled and step == start_step:
            _sync(device)
            compile_started = time.perf_counter()
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's graph outputs may be reused
        # Before the forward pass: no gradient of the last step is alive while the next one's graphs replay.
        optimizer.zero_grad(set_to_none=True)
        noise = model.draw_noise(x, noise_generator)
        with autocast:
            out = step_loss(x, noise)
        out.loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if compiled and step == start_step:
            _sync(device)
            compile_seconds = time.perf_counter() - compile_started
        if step == start_step:
            ctx.timeline.mark("compile and first step" if compiled else "first step")

        # Bookkeeping on the device: no host sync here.
        if losses is None:
            losses = LossWindow(["loss", *out.parts], device, first_step=step)
        losses.add(out.loss, out.parts)
        steps_in_window += 1
        done = step + 1
        if done == n_steps:  # the training's speed: its steps only, not the end-of-run work below
            _sync(device)
            seconds = time.perf_counter() - t0
            final_metrics["perf/images_per_second"] = _throughput(
                n_steps - start_step - warmup_steps, cfg.batch_size * ctx.world_size, seconds
            )
            ctx.timeline.mark("steps")

        at_log = done % cfg.log_every == 0 or done == n_steps
        at_ckpt = done % cfg.checkpoint_every == 0 or done == n_steps
        at_eval = cfg.eval_every is not None and done % cfg.eval_every == 0 and done != n_steps
        # A stop request (preemption, cancel) ends training at a log window's end: the window's curve point is
        # whole, and a checkpoint at this very step loses no work; the resumed run goes on bit for bit.
        stop_now = done % cfg.log_every == 0 and done != n_steps and ctx.stop_requested()
        at_ckpt = at_ckpt or stop_now
        if at_log or at_ckpt:
            means, diverged = losses.read()  # the host sync of a log window: its steps are done
            if diverged is not None:
                raise TrainingDiverged(
                    f"training diverged at step {diverged[0]}: the '{diverged[1]}' part of the loss is not finite "
                    f"(NaN or inf); lower train.optimizer.lr, set train.grad_clip, or check the data"
                )
            now = time.perf_counter()
            window_speed = _throughput(steps_in_window, cfg.batch_size * ctx.world_size, now - window_started)
            window_started = now
            step_metrics = {f"train/{k}": v for k, v in means.items()}
            for k, v in step_metrics.items():
                history.setdefault(k, []).append((done, v))
            ctx.log_metrics(step_metrics, done)
            eta = (now - steps_started) / (done - start_step) * (n_steps - done)
            ctx.log_progress(done, n_steps, metrics=step_metrics, images_per_second=window_speed, eta_s=eta)
            steps_in_window = 0
            final_metrics.update(step_metrics)

        # The final evaluation comes before the final checkpoint, so the last report (Ray Train's result, Tune's
        # ranking metric) carries it.
        at_final_eval = done == n_steps and evaluate_at_end
        if (at_eval or at_final_eval) and ctx.is_chief:
            eval_metrics = evaluate_now()
            ctx.log_metrics(eval_metrics, done)
            final_metrics.update(eval_metrics)
            # In the history too: the loss-curve picture puts validation points next to the training curve.
            for k, v in eval_metrics.items():
                history.setdefault(k, []).append((done, v))
            if at_final_eval:
                ctx.timeline.mark("evaluation")

        if done == n_steps and ctx.is_chief:
            # Before the final checkpoint, which saves them with the weights (only the chief's is saved).
            record_code_statistics(model, train_data, cfg.seed)
            ctx.timeline.mark("code statistics")

        if at_ckpt:
            with tempfile.TemporaryDirectory(prefix="aeforge-ckpt-") as tmp:
                if ctx.is_chief:
                    save_checkpoint_file(
                        Path(tmp) / CHECKPOINT_FILE,
                        model,
                        optimizer.state_dict(),
                        done,
                        history,
                        spec_json,
                        noise_generator,
                    )
                ctx.save_checkpoint(Path(tmp), dict(final_metrics), done, cfg.num_to_keep)
            if done == n_steps:
                ctx.timeline.mark("final checkpoint")
        if stop_now:
            ctx.timeline.mark("stopped")
            return TrainResult(
                model=model,
                steps=done,
                final_metrics=final_metrics,
                history=history,
                pictures={},
                resumed_from_step=start_step,
                seconds=time.perf_counter() - t0,
                images_per_second=0.0,
                compile_seconds=compile_seconds,
                stopped_at_step=done,
            )

    if start_step >= n_steps and ctx.is_chief and evaluate_at_end:  # a finished run resumed: nothing to train
        final_metrics.update(evaluate_now())
    trained = start_step < n_steps
    # A finished run started again trains nothing: it has no throughput to report, and a 0 would hide the real one.
    throughput = final_metrics.get("perf/images_per_second", 0.0)
    pics: dict[str, Path] = {}
    model.eval()
    if ctx.is_chief and evaluate_at_end:
        if trained:
            ctx.log_metrics({"perf/images_per_second": throughput}, n_steps)
        if pictures and eval_config.pictures and ctx.run_dir is not None:
            from workers.plots import make_run_pictures  # matplotlib: only where pictures are drawn

            ctx.log_phase("pictures")

            pics = make_run_pictures(
                model, train_data, val_data, ctx.run_dir / "pictures", seed=cfg.seed, history=history
            )
            ctx.timeline.mark("pictures")
    return TrainResult(
        model=model,
        steps=n_steps,
        final_metrics=final_metrics,
        history=history,
        pictures=pics,
        resumed_from_step=start_step,
        seconds=seconds,
        images_per_second=throughput,
        compile_seconds=compile_seconds,
    )
