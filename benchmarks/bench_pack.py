"""Benchmark (not a test) behind issue 12's choice: K models of one architecture trained together in one process.

    python -m benchmarks.bench_pack [--packs 1,4,16] [--batch 64] [--steps 10] [--variant beta_tcvae]

Each row trains K conv64 models (each its own weights, batch and Adam state) for ``--steps`` timed steps after
``--warmup``, on images made up front (no data pipeline in the timing), and reports the aggregate images/s (K x batch
x steps / seconds) and its ratio to one model's rate:

- **vmap**: workers.pack.Pack(how="vmap"): the K models' parameters stacked, the loss of all K computed by one
  ``torch.func.vmap`` of ``functional_call`` over the stack, one fused Adam over the stacked tensors;
- **loop**: Pack(how="loop"): the K models' losses one after the other, one fused Adam over all their parameters.

Either way each model draws its noise from its own generator (Adam is element-wise: one optimizer over the K
models' tensors is K optimizers).

Prints a Markdown table, or JSON with ``--output json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from workers.config import ModelConfig
from workers.models import Autoencoder, build_model
from workers.pack import PACK_WAYS, Pack

IMAGE_SHAPE = (1, 64, 64)
DATASET_SIZE = 737_280  # dSprites' N, for the beta-TCVAE estimators


def _models(variant: str, k: int, device: torch.device) -> list[Autoencoder]:
    config = ModelConfig(variant=variant, architecture="conv64", latent_dim=10)
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model(config, IMAGE_SHAPE, DATASET_SIZE).to(device))
    return models


def _images(n: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.rand((n, *IMAGE_SHAPE), generator=generator) > 0.7).float().to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pack(how: str, variant: str, k: int, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """Aggregate images/s of a pack of ``k`` models computed ``how`` (workers.pack.PACK_WAYS)."""
    pack = Pack(_models(variant, k, device), how)
    optimizer = torch.optim.Adam(pack.parameters(), lr=1e-4, fused=True)
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(k)]
    pool = _images(batch * 8, device)
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            started = time.perf_counter()
        x = torch.stack([pool[((step + i) % 8) * batch : ((step + i) % 8 + 1) * batch] for i in range(k)])
        optimizer.zero_grad(set_to_none=True)
        losses, _ = pack.losses(x, pack.draw_noise(x, generators))
        losses.sum().backward()
        optimizer.step()
    _sync(device)
    return k * batch * steps / (time.perf_counter() - started)


def run(variant: str, packs: list[int], batch: int, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    single: dict[str, float] = {}
    for k in packs:
        for way in PACK_WAYS:
            ips = time_pack(way, variant, k, batch, steps, warmup, device)
            if k == 1:
                single[way] = ips
            rows.append({"way": way, "k": k, "images_per_second": ips})
    base = single.get("loop") or rows[0]["images_per_second"]
    for row in rows:
        row["x_one_model"] = row["images_per_second"] / base
    return {
        "device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "variant": variant,
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['variant']}/conv64, batch {report['batch']} per model, {report['steps']} timed steps after "
        f"{report['warmup']}, on {report['device']} (torch threads {report['torch_threads']})",
        "",
        "| way | K | images/s (all K) | × one model (loop, K = 1) |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['way']} | {row['k']} | {row['images_per_second']:,.0f} | {row['x_one_model']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packs", default="1,4,16", help="pack sizes K, comma-separated")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variant", default="beta_tcvae")
    parser.add_argument("--output", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    packs = [int(k) for k in args.packs.split(",")]
    report = run(args.variant, packs, args.batch, args.steps, args.warmup, device)
    print(json.dumps(report, indent=2) if args.output == "json" else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
