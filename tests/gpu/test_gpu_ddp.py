"""The data-parallel path on CUDA: the loop under DistributedDataParallel with NCCL, in a process group of one
(through torch.distributed, not Ray, which the device machine lacks), with beta-TCVAE's global-batch estimator
gathering across the group, trains as the same loop does without DDP.

Skipped with the reason "no CUDA" where there is no GPU; run on the device machine by benchmarks/device_suite.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.gpu.common import GPU, NO_EVAL, dsprites_rows, losses, protocol_model, short_train, weights
from workers.loop import RunContext, train
from workers.ray_worker import _all_gather_cat  # what Ray Train's workers gather with (imports no Ray)

pytestmark = [*GPU, pytest.mark.skipif(not dist.is_nccl_available(), reason="this PyTorch has no NCCL")]

CUDA = torch.device("cuda", 0)


@pytest.fixture
def nccl_group_of_one(tmp_path):
    """A one-process NCCL group whose rendezvous is a file (no port to pick, nothing left behind)."""
    torch.cuda.set_device(CUDA)
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1, device_id=CUDA
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_with_nccl_and_the_gathered_tc_estimator_trains_as_one_process_does(nccl_group_of_one, deterministic_cudnn):
    assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
    data = dsprites_rows()
    wrapped: list[torch.nn.Module] = []

    def wrap(module):
        ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=[CUDA])
        wrapped.append(ddp)
        return ddp

    # What RayTrainContext builds on a GPU worker, without Ray: DDP around the loss module, and the all-gather of
    # the posterior parameters for the TC estimator.
    ddp_ctx = RunContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), device=CUDA, wrap=wrap, gather=_all_gather_cat
    )
    with_ddp = train(
        protocol_model(), short_train(steps=10), NO_EVAL, data, data, ddp_ctx, evaluate_at_end=False, pictures=False
    )
    alone = train(
        protocol_model(),
        short_train(steps=10),
        NO_EVAL,
        data,
        data,
        RunContext(device=CUDA),
        evaluate_at_end=False,
        pictures=False,
    )

    assert wrapped and isinstance(wrapped[0], torch.nn.parallel.DistributedDataParallel)
    # In a group of one, the all-reduce of the gradients and the gather change no value: the same training, up to
    # the order in which DDP's buckets add (a few ulps).
    assert losses(with_ddp) == pytest.approx(losses(alone), rel=1e-4)
    assert torch.allclose(weights(with_ddp.model), weights(alone.model), atol=1e-5)
