"""What runs on each Ray Train worker: the training loop of workers/loop.py, unchanged, in a Ray Train context.

Rank 0 (the chief) sends curves and evaluation results to MLflow itself (Train V2 keeps metrics only with
checkpoints), writes the pictures, and puts the final model files in the last checkpoint. Every rank reads its own
shard of the training set; the beta-TCVAE estimator gathers the posterior parameters of the global batch.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from workers.loop import CHECKPOINT_FILE, RunContext, train

T = TypeVar("T")


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


class RayTrainContext(RunContext):
    """RunContext on a Ray Train worker: checkpoints through ray.train.report, metrics to MLflow from rank 0."""

    def __init__(self, *, storage_fs, experiment_path: str, mlflow_run=None, run_dir: Path, gather_tc: bool):
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
        self._fs = storage_fs
        self._experiment_path = experiment_path
        self._mlflow = mlflow_run
        self._restored: tempfile.TemporaryDirectory | None = None

    def latest_checkpoint(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="aeforge-restore-")
        checkpoint.to_directory(self._restored.name)
        return Path(self._restored.name) if (Path(self._restored.name) / CHECKPOINT_FILE).exists() else None

    def save_checkpoint(self, directory: Path, metrics: dict[str, float], step: int, keep: int) -> None:
        import pyarrow.fs
        import ray.train

        def upload(checkpoint: "ray.train.Checkpoint", dir_name: str) -> "ray.train.Checkpoint":
            destination = f"{self._experiment_path}/{dir_name}"

            def copy() -> None:
                self._fs.create_dir(destination)
                pyarrow.fs.copy_files(checkpoint.path, destination, source_filesystem=checkpoint.filesystem,
                                      destination_filesystem=self._fs)

            with_retries(copy, f"checkpoint upload to {destination}")
            return ray.train.Checkpoint(path=destination, filesystem=self._fs)

        reported = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
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
            self._mlflow.log_metrics(metrics, step)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train entry. ``config``: the worker-side spec sections (model, data, train, eval) as dicts, the job
    spec as JSON (stored in checkpoints), the job id, the experiment path on storage and the MLflow run."""
    from workers.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
    from workers.data import open_dataset, shard, train_val_split
    from workers.storage import Storage
    from workers.tracking import MlflowRun

    model_cfg = ModelConfig.model_validate(config["model"])
    data_cfg = DataConfig.model_validate(config["data"])
    train_cfg = TrainConfig.model_validate(config["train"])
    eval_cfg = EvalConfig.model_validate(config["eval"])

    storage = Storage.from_settings()
    fs, _ = storage.pyarrow_filesystem()
    mlflow_run = MlflowRun(config["mlflow_run_id"], config["mlflow_tracking_uri"]) if config.get("mlflow_run_id") else None
    run_dir = Path(tempfile.mkdtemp(prefix=f"aeforge-{config['job_id']}-"))
    ctx = RayTrainContext(storage_fs=fs, experiment_path=config["experiment_path"], mlflow_run=mlflow_run,
                          run_dir=run_dir, gather_tc=model_cfg.gather_global_batch)

    full = open_dataset(data_cfg, resolve=storage.resolve)
    train_part, val_part = train_val_split(full, data_cfg.val_fraction, train_cfg.seed)
    if len(val_part) == 0:
        val_part = train_part
    local_shard = shard(train_part, ctx.rank, ctx.world_size, train_cfg.seed)

    result = train(model_cfg, train_cfg, eval_cfg, local_shard, val_part, ctx, dataset_size=len(train_part),
                   full_data=full if full.has_factors else None, spec_json=config.get("spec_json"))

    if ctx.is_chief:
        pictures_dir = run_dir / "pictures"
        if mlflow_run is not None and pictures_dir.exists():
            mlflow_run.log_artifacts(pictures_dir, "pictures")
        if pictures_dir.exists():
            for path in sorted(pictures_dir.iterdir()):
                with_retries(lambda p=path: storage.put_file(p, f"runs/{config['job_id']}/pictures/{p.name}"),
                             f"upload of {path.name}")
        final = {k: v for k, v in result.final_metrics.items() if isinstance(v, (int, float))}
        storage.put_bytes(json.dumps(final, indent=2, sort_keys=True).encode(), f"runs/{config['job_id']}/metrics.json")
