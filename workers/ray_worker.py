"""What runs on each Ray Train worker: the training loop of workers/loop.py, unchanged, in a Ray Train context.

Rank 0 (the chief) sends curves and evaluation results to MLflow itself (Train V2 keeps metrics only with
checkpoints), writes the pictures, and puts the final model files in the last checkpoint. Every rank reads its own
shard of the training set; the beta-TCVAE estimator gathers the posterior parameters of the global batch.

Test hook (tests only): ``AEFORGE_TEST_HOOK_WORKER_EXIT=RANK:STEP:MARKER`` makes the worker of rank RANK exit
abruptly (``os._exit``, as a crashed or killed process would) at its first log point at or after step STEP, once:
it creates the file MARKER first and never fires while MARKER exists, so the restarted attempt runs through.
``jobs.run.job_environment`` passes the variable to the workers when it is set; nothing else reads it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from workers.loop import CHECKPOINT_FILE, RunContext, train

T = TypeVar("T")

TEST_HOOK_WORKER_EXIT = "AEFORGE_TEST_HOOK_WORKER_EXIT"
# Give the controller this long to collect the reports made before the hook fires (it polls workers every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so the checkpoint before the crash is registered as a real crash's would be.
TEST_HOOK_EXIT_DELAY_S = 3.0
CHECKPOINT_DIR = re.compile(r"checkpoint_step_(\d+)$")


def with_retries(fn: Callable[[], T], what: str, attempts: int = 4, base_delay_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Call fn, retrying with exponential back-off and jitter; the last failure is raised with ``what`` named."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # storage errors come in many types (OSError, botocore, pyarrow)
            if attempt == attempts:
                raise RuntimeError(f"{what} failed after {attempts} attempts: {exc}") from exc
            delay = base_delay_s * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
            print(f"aeforge: {what} failed (attempt {attempt}/{attempts}: {exc}); retrying in {delay:.1f} s", flush=True)
            sleep(delay)
    raise AssertionError("unreachable")


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather of equal-sized local batches, concatenated in rank order."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def _test_hook_exit(rank: int, step: int) -> None:
    """The test hook of the module doc: exit this process abruptly, once, if the hook names this rank and step."""
    spec = os.environ.get(TEST_HOOK_WORKER_EXIT)
    if not spec:
        return
    hook_rank, hook_step, marker = spec.split(":", 2)
    if rank != int(hook_rank) or step < int(hook_step) or os.path.exists(marker):
        return
    Path(marker).write_text(f"rank {rank} exited at step {step}\n")
    print(f"aeforge test hook: rank {rank} exits at step {step}", flush=True)
    time.sleep(TEST_HOOK_EXIT_DELAY_S)
    os._exit(1)


class RayTrainContext(RunContext):
    """RunContext on a Ray Train worker: checkpoints through ray.train.report, metrics to MLflow from rank 0."""

    def __init__(self, *, mlflow_run=None, run_dir: Path, gather_tc: bool):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        device = ray.train.torch.get_device()
        world_size = context.get_world_size()
        distributed = world_size > 1 and dist.is_available() and dist.is_initialized()

        def wrap(module):
            if not distributed:
                return module
            ids = [device] if device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

        super().__init__(
            rank=context.get_world_rank(),
            world_size=world_size,
            device=device,
            wrap=wrap,
            gather=_all_gather_cat if (distributed and gather_tc) else None,
            run_dir=run_dir,
        )
        self._mlflow = mlflow_run
        self._restored: tempfile.TemporaryDirectory | None = None
        self.resumed_from_step: int | None = None

    def latest_checkpoint(self) -> Path | None:
        """The run's last checkpoint (Ray Train's, from this attempt or an earlier fit under the same run name),
        downloaded to a local folder; None on a fresh start."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="aeforge-restore-")
        with_retries(lambda: checkpoint.to_directory(self._restored.name), f"download of checkpoint {checkpoint.path}")
        if not (Path(self._restored.name) / CHECKPOINT_FILE).exists():
            return None
        found = CHECKPOINT_DIR.search(checkpoint.path.rstrip("/"))
        if found is not None:
            self.resumed_from_step = int(found.group(1))
            if self.is_chief:
                print(f"aeforge: resuming from {checkpoint.path} (step {self.resumed_from_step})", flush=True)
                if self._mlflow is not None:
                    # A trace on the MLflow run of every resumption: value and step are the step resumed from.
                    self._mlflow.log_metrics({"resume/from_step": self.resumed_from_step}, self.resumed_from_step)
        return Path(self._restored.name)

    def save_checkpoint(self, directory: Path, metrics: dict[str, float], step: int, keep: int) -> None:
        """Every rank reports (a barrier); the chief's report carries the checkpoint, uploaded with retries and
        back-off into the Train run's folder as checkpoint_step_<step>. ``keep`` is CheckpointConfig's business."""
        import pyarrow.fs
        import ray.train

        from workers.tracking import numeric_metrics  # imports MLflow: only where a worker needs it

        def upload(checkpoint: "ray.train.Checkpoint", dir_name: str) -> "ray.train.Checkpoint":
            storage = ray.train.get_context().get_storage()
            fs = storage.storage_filesystem
            destination = f"{storage.experiment_fs_path}/{dir_name}"

            def copy() -> None:
                fs.create_dir(destination)
                pyarrow.fs.copy_files(checkpoint.path, destination, source_filesystem=checkpoint.filesystem,
                                      destination_filesystem=fs)

            with_retries(copy, f"checkpoint upload to {destination}")
            return ray.train.Checkpoint(path=destination, filesystem=fs)

        reported = numeric_metrics(metrics)
        reported["step"] = step
        if self.is_chief:
            checkpoint = ray.train.Checkpoint.from_directory(str(directory))
            ray.train.report(reported, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_step_{step:09d}",
                             checkpoint_upload_fn=upload)
        else:
            ray.train.report(reported, checkpoint=None)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        super().log_metrics(metrics, step)
        if self.is_chief and self._mlflow is not None:
            with_retries(lambda: self._mlflow.log_metrics(metrics, step), "MLflow metrics", attempts=3)

    def log_progress(self, step: int, total: int) -> None:
        super().log_progress(step, total)
        _test_hook_exit(self.rank, step)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train entry. ``config``: the worker-side spec sections (model, data, train, eval) as dicts, the job
    spec as JSON (stored in checkpoints), the job id and the MLflow run.

    Returns (rank 0; Ray Train hands it to the driver as ``Result.return_value``) the steps trained, the step this
    attempt resumed from (0 on a fresh start) and the final metrics.
    """
    from workers.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
    from workers.data import open_dataset, shard, train_val_split
    from workers.storage import Storage
    from workers.tracking import MlflowRun, numeric_metrics

    model_cfg = ModelConfig.model_validate(config["model"])
    data_cfg = DataConfig.model_validate(config["data"])
    train_cfg = TrainConfig.model_validate(config["train"])
    eval_cfg = EvalConfig.model_validate(config["eval"])

    storage = Storage.from_settings()
    mlflow_run = MlflowRun(config["mlflow_run_id"], config["mlflow_tracking_uri"]) if config.get("mlflow_run_id") else None
    run_dir = Path(tempfile.mkdtemp(prefix=f"aeforge-{config['job_id']}-"))
    try:
        ctx = RayTrainContext(mlflow_run=mlflow_run, run_dir=run_dir, gather_tc=model_cfg.gather_global_batch)

        full = open_dataset(data_cfg, resolve=storage.resolve)
        train_part, val_part = train_val_split(full, data_cfg.val_fraction, train_cfg.seed)
        if len(val_part) == 0:
            val_part = train_part
        local_shard = shard(train_part, ctx.rank, ctx.world_size, train_cfg.seed)

        result = train(model_cfg, train_cfg, eval_cfg, local_shard, val_part, ctx, dataset_size=len(train_part),
                       full_data=full if full.has_factors else None, spec_json=config.get("spec_json"))
        if not ctx.is_chief:
            return None

        final = numeric_metrics(result.final_metrics)
        pictures_dir = run_dir / "pictures"
        if pictures_dir.exists():
            if mlflow_run is not None:
                with_retries(lambda: mlflow_run.log_artifacts(pictures_dir, "pictures"), "MLflow upload of the pictures")
            for path in sorted(p for p in pictures_dir.iterdir() if p.is_file()):
                with_retries(lambda p=path: storage.put_file(p, f"runs/{config['job_id']}/pictures/{p.name}"),
                             f"upload of {path.name}")
        with_retries(lambda: storage.put_bytes(json.dumps(final, indent=2, sort_keys=True).encode(),
                                               f"runs/{config['job_id']}/metrics.json"), "upload of metrics.json")
        return {
            "steps": result.steps,
            "resumed_from_step": result.resumed_from_step,
            "images_per_second": result.images_per_second,
            "final_metrics": final,
            "pictures": sorted(result.pictures),
        }
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
