"""A pack under DDP (issue 12): two CPU processes in a gloo group, as two Ray Train workers are. Each member of a
pack trains as the same model does in its own 2-worker DDP run: beta-TCVAE with the global-batch estimator
(gathering the posterior across ranks; one model after another), and beta-VAE with stacked weights (vmap, its
gradients averaged over the ranks as DDP averages a model's)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.workers.models.common import blobs
from workers.config import EvalConfig, ModelConfig, TrainConfig
from workers.data import shard
from workers.data.base import ImageDataset
from workers.loop import RunContext, train
from workers.pack import PackMember, train_pack
from workers.ray_worker import _all_gather_cat

STEPS, SEEDS, BETAS = 20, [1, 2, 3], [1.0, 4.0, 8.0]
NO_EVAL = EvalConfig(iwae_samples=2, max_examples=32, disentanglement=False, pictures=False)
CURVE_RTOL, CURVE_ATOL, WEIGHTS_RTOL = 1e-5, 1e-6, 1e-4


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _rank(rank: int, rendezvous: str, variant: str, how: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        data = ImageDataset("blobs", (blobs(128) * 255).to(torch.uint8))
        local = shard(data, rank, 2, 0)
        gather = _all_gather_cat if variant == "beta_tcvae" else None

        def ctx():
            return RunContext(
                rank=rank,
                world_size=2,
                device=torch.device("cpu"),
                gather=gather,
                wrap=lambda module: torch.nn.parallel.DistributedDataParallel(module),
            )

        configs = [
            ModelConfig(variant=variant, architecture="mlp", hidden_dims=[32], latent_dim=3, beta=b) for b in BETAS
        ]
        train_config = TrainConfig(
            steps=STEPS, batch_size=16, log_every=5, checkpoint_every=STEPS, optimizer={"lr": 1e-3}
        )
        packed = train_pack(
            [PackMember(c, s) for c, s in zip(configs, SEEDS)],
            train_config,
            NO_EVAL,
            local,
            data,
            ctx(),
            dataset_size=len(data),
            evaluate_at_end=False,
            how=how,
        )
        alone = [
            train(
                c,
                train_config.model_copy(update={"seed": s}),
                NO_EVAL,
                local,
                data,
                ctx(),
                dataset_size=len(data),
                evaluate_at_end=False,
            )
            for c, s in zip(configs, SEEDS)
        ]
        if rank == 0:
            torch.save(
                {
                    "packed": [(_weights(r.model), r.history) for r in packed],
                    "alone": [(_weights(r.model), r.history) for r in alone],
                },
                out,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("variant", "how"), [("beta_tcvae", "loop"), ("beta_vae", "vmap")])
def test_each_member_of_a_pack_under_two_worker_ddp_trains_as_its_own_ddp_run(tmp_path, variant, how):
    out = tmp_path / "result.pt"
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"), variant, how, str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)
    for (packed_w, packed_h), (alone_w, alone_h) in zip(result["packed"], result["alone"]):
        for name, curve in alone_h.items():
            assert [v for _, v in packed_h[name]] == pytest.approx(
                [v for _, v in curve], rel=CURVE_RTOL, abs=CURVE_ATOL
            ), name
        assert ((packed_w - alone_w).norm() / alone_w.norm()).item() < WEIGHTS_RTOL
    # The members differ from each other (each its own beta and seed).
    assert len({round(h["train/loss"][-1][1], 4) for _, h in result["packed"]}) == len(SEEDS)
