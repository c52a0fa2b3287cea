"""Training throughput: aeforge's loop next to a plain PyTorch loop for the same model, in the same run.

The plain loop is what a user would write first: a DataLoader over a TensorDataset on the host, fp32, a
``.to(device)`` per batch and ``loss.item()`` every step. Both loops train the same architecture from the same
initial weights for the same number of steps; only the steps after the warm-up are timed.

With ``ray_workers``, a third row runs the same loop on Ray Train as DDP over that many workers (gloo on CPUs,
NCCL on GPUs), each on its own shard, without checkpoints or MLflow: its images/s is global (batch x workers) and
timed inside the loop like the others, so the difference in ms/step is Ray's and DDP's overhead per step. The
fit's wall time (worker start-up included) is reported apart.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from typing import Any, Callable

import torch

from workers.config import EvalConfig
from workers.data import open_dataset, train_val_split
from workers.loop import RunContext, train
from workers.models import build_model


def _plain_loop(model, loader, device, steps: int, warmup: int, lr: float) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    done, t0 = 0, None
    while done < warmup + steps:
        for (x,) in loader:
            if done == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            x = x.to(device)
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


def _bench_train_config(spec, steps: int, warmup: int):
    return spec.train.model_copy(update={"steps": warmup + steps, "epochs": None, "checkpoint_every": 10**9,
                                         "log_every": warmup + steps, "eval_every": None})


def _ray_bench_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker of the benchmark: aeforge's loop on this rank's shard, no checkpoints, no MLflow."""
    from workers.config import DataConfig, ModelConfig, TrainConfig
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
    n = min(len(local), train_cfg.batch_size * train_cfg.steps)
    local = local.subset(torch.arange(n))
    result = train(model_cfg, train_cfg, EvalConfig(), local, val_part, ctx, dataset_size=len(train_part),
                   evaluate_at_end=False, pictures=False, warmup_steps=config["warmup"])
    return {"images_per_second": result.images_per_second, "seconds": result.seconds}


def run_ray_benchmark(spec, workers: int, steps: int = 200, warmup: int = 20) -> dict[str, Any]:
    """The Ray Train row: aeforge's loop as DDP over ``workers`` Ray Train workers (Ray must be initialised).
    Returns the row, with ``fit_seconds`` (the whole TorchTrainer.fit, worker start-up included)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = spec.resources
    config = {
        "model": spec.model.model_dump(mode="json"),
        "data": spec.data.model_dump(mode="json"),
        "train": _bench_train_config(spec, steps, warmup).model_dump(mode="json"),
        "warmup": warmup,
    }
    with tempfile.TemporaryDirectory(prefix="aeforge-bench-") as storage_path:
        trainer = TorchTrainer(
            _ray_bench_loop_per_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=r.gpus_per_worker > 0,
                                         resources_per_worker=r.per_worker()),
            run_config=RunConfig(name=f"aeforge-bench-{uuid.uuid4().hex[:8]}", storage_path=storage_path),
        )
        started = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - started
    ips = result.return_value["images_per_second"]
    backend = "nccl" if r.gpus_per_worker else "gloo"
    return {"loop": f"aeforge on Ray Train ({workers} workers, DDP {backend}, {r.cpus_per_worker:g} CPU each)",
            "images_per_second": ips,
            "ms_per_step": 1000 * spec.train.batch_size * workers / ips,
            "fit_seconds": fit_seconds}


def run_benchmark(spec, steps: int = 200, warmup: int = 20, resolve: Callable | None = None,
                  device: torch.device | None = None, ray_workers: int = 0) -> dict[str, Any]:
    """Rows of images/s and ms/step: aeforge's loop, a plain PyTorch loop, and (``ray_workers`` > 0, Ray
    initialised by the caller) aeforge's loop on Ray Train. ``ratio`` is aeforge / plain, both in one process."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = open_dataset(spec.data, resolve=resolve)
    train_part, val_part = train_val_split(data, spec.data.val_fraction, spec.train.seed)
    batch = spec.train.batch_size
    # Enough examples for the timed steps without materialising a huge data set on the host.
    n = min(len(train_part), batch * (steps + warmup))
    subset = train_part.subset(torch.arange(n))
    rows = []

    train_cfg = _bench_train_config(spec, steps, warmup)
    result = train(spec.model, train_cfg, EvalConfig(), subset, val_part, RunContext(device=device),
                   dataset_size=len(train_part), evaluate_at_end=False, pictures=False, warmup_steps=warmup)
    rows.append({"loop": f"aeforge ({spec.train.precision}, data on {'device' if device.type == 'cuda' else 'host'})",
                 "images_per_second": result.images_per_second,
                 "ms_per_step": 1000 * batch / result.images_per_second})

    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model, train_part.image_shape, len(train_part)).to(device)
    host_images = subset.images(torch.arange(n)).cpu()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(host_images), batch_size=batch,
                                         shuffle=True, drop_last=True)
    seconds = _plain_loop(model, loader, device, steps, warmup, spec.train.optimizer.lr)
    plain_ips = steps * batch / seconds
    rows.append({"loop": "plain PyTorch (DataLoader, fp32)", "images_per_second": plain_ips,
                 "ms_per_step": 1000 * seconds / steps})
    if ray_workers:
        rows.append(run_ray_benchmark(spec, ray_workers, steps=steps, warmup=warmup))
    return {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
            "rows": rows, "ratio": rows[0]["images_per_second"] / plain_ips}
