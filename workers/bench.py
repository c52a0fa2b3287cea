"""Training throughput: aeforge's loop next to a plain PyTorch loop for the same model, in the same run.

The plain loop is what a user would write first: a DataLoader over a TensorDataset on the host, fp32, a
``.to(device)`` per batch and ``loss.item()`` every step. Both loops train the same architecture from the same
initial weights for the same number of steps; only the steps after the warm-up are timed.
"""

from __future__ import annotations

import time
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


def run_benchmark(spec, steps: int = 200, warmup: int = 20, resolve: Callable | None = None,
                  device: torch.device | None = None) -> dict[str, Any]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = open_dataset(spec.data, resolve=resolve)
    train_part, val_part = train_val_split(data, spec.data.val_fraction, spec.train.seed)
    batch = spec.train.batch_size
    # Enough examples for the timed steps without materialising a huge data set on the host.
    n = min(len(train_part), batch * (steps + warmup))
    subset = train_part.subset(torch.arange(n))
    rows = []

    train_cfg = spec.train.model_copy(update={"steps": warmup + steps, "epochs": None, "checkpoint_every": 10**9,
                                              "log_every": warmup + steps, "eval_every": None})
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
    return {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
            "rows": rows, "ratio": rows[0]["images_per_second"] / plain_ips}
