"""The training loop on one CUDA GPU: the data set placed on the device, a bf16 autocast step, compiled and eager
training that agree, and checkpoints written on the GPU that load and resume.

Skipped with the reason "no CUDA" where there is no GPU; run on the device machine by benchmarks/device_suite.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from tests.gpu.common import GPU, NO_EVAL, ROWS, dsprites_rows, losses, protocol_model, short_train, weights
from workers.data.dsprites import DSprites
from workers.loop import RunContext, load_model_from_checkpoint, place_data, train
from workers.models import build_model

pytestmark = GPU

CUDA = torch.device("cuda")


@dataclass
class Watch(RunContext):
    """A RunContext that keeps the loss module the loop builds, the devices of the batches it is given and, at
    every log point, the number of frames TorchDynamo has compiled so far (a recompilation per step would show as
    a growing count)."""

    loss_module: torch.nn.Module | None = None
    batch_devices: set[torch.device] = field(default_factory=set)
    frames_at_step: dict[int, int] = field(default_factory=dict)

    def __post_init__(self):
        self.wrap = self._keep

    def _keep(self, module: torch.nn.Module) -> torch.nn.Module:
        self.loss_module = module
        module.register_forward_pre_hook(lambda _, args: self.batch_devices.add(args[0].device))
        return module

    def log_progress(self, step, total, *, metrics=None, images_per_second=None, eta_s=None) -> None:
        from torch._dynamo.utils import counters

        self.frames_at_step[step] = int(counters["frames"]["total"])


def test_the_data_set_is_placed_on_the_gpu_and_batches_are_rendered_there():
    host = dsprites_rows()
    on_device = place_data(dsprites_rows(), CUDA)
    assert on_device.device.type == "cuda"
    rows = torch.randint(ROWS, (256,), generator=torch.Generator().manual_seed(0))
    batch = on_device.images(rows.to(CUDA))
    assert batch.device.type == "cuda"
    # Rendering on the GPU is the same scatter as on the host: the same pixels exactly.
    assert torch.equal(batch.cpu(), host.images(rows))

    # The loop, given the data on the host, moves it to the GPU once: every batch is rendered there.
    class WhereRendered(DSprites):
        rendered_on: set[str] = set()

        def images(self, index):
            self.rendered_on.add(self.device.type)
            return super().images(index)

    ctx = Watch(device=CUDA)
    result = train(
        protocol_model(),
        short_train(steps=3),
        NO_EVAL,
        WhereRendered(limit=ROWS),
        host,
        ctx,
        evaluate_at_end=False,
        pictures=False,
    )
    assert WhereRendered.rendered_on == {"cuda"}
    assert {d.type for d in ctx.batch_devices} == {"cuda"}
    assert all(p.is_cuda for p in result.model.parameters())
    assert all(math.isfinite(v) for v in losses(result))


def test_a_bf16_step_runs_the_convolutions_in_bf16_and_stays_close_to_fp32():
    data = dsprites_rows()
    conv_dtypes: list[torch.dtype] = []

    class Bf16Watch(Watch):
        def _keep(self, module):
            module.model.encoder[0].register_forward_hook(lambda mod, args, out: conv_dtypes.append(out.dtype))
            return super()._keep(module)

    bf16 = train(
        protocol_model(),
        short_train(steps=5, precision="bf16"),
        NO_EVAL,
        data,
        data,
        Bf16Watch(device=CUDA),
        evaluate_at_end=False,
        pictures=False,
    )
    fp32 = train(
        protocol_model(),
        short_train(steps=5),
        NO_EVAL,
        data,
        data,
        Watch(device=CUDA),
        evaluate_at_end=False,
        pictures=False,
    )
    assert conv_dtypes and set(conv_dtypes) == {torch.bfloat16}
    # The weights stay fp32 (autocast casts per operation), so the optimiser state is full precision.
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}
    assert all(math.isfinite(v) for v in losses(bf16))
    # From the same weights and batch, bf16's first loss is fp32's within bf16's rounding (~3 significant digits).
    assert losses(bf16)[0] == pytest.approx(losses(fp32)[0], rel=1e-2)


def _eager_and_compiled(steps: int) -> dict[str, tuple[list[float], torch.Tensor, dict[int, int]]]:
    """The loop's losses, final weights and compiled-frame counts, eager and with ``train.compile`` (on one GPU
    its default mode: CUDA graphs), from the same seed on the same batches."""
    data = dsprites_rows()
    out = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        ctx = Watch(device=CUDA)
        result = train(
            protocol_model(),
            short_train(steps=steps, compile=compiled),
            NO_EVAL,
            data,
            data,
            ctx,
            evaluate_at_end=False,
            pictures=False,
        )
        out[name] = (losses(result), weights(result.model), ctx.frames_at_step)
    return out


def test_compiled_and_eager_training_agree_on_cuda_without_recompiling():
    import torch._inductor.config
    from torch._dynamo.utils import counters

    steps = 20
    torch._dynamo.reset()
    counters.clear()
    # fallback_random: compiled code draws its noise (the reparameterisation) from PyTorch's generator, as eager
    # code does, instead of Inductor's own; without it the two runs would see different samples.
    with torch._inductor.config.patch(fallback_random=True):
        runs = _eager_and_compiled(steps)
    eager_losses, eager_weights, _ = runs["eager"]
    compiled_losses, compiled_weights, frames = runs["compiled"]

    # Stated tolerance: every step's loss within 0.1% (fused kernels sum in another order; TF32 convolutions).
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3)
    # Both runs moved the weights the same way: their difference is small next to how far training moved them.
    torch.manual_seed(0)
    initial = weights(build_model(protocol_model(), (1, 64, 64), ROWS))
    moved = (eager_weights - initial).abs().mean()
    apart = (compiled_weights - eager_weights).abs().mean()
    assert moved > 0 and apart < 0.1 * moved, f"compiled and eager weights differ by {apart:.3g}, moved {moved:.3g}"
    # Compiled, once: whatever TorchDynamo compiled by the second step is all it ever does (no recompilation per step).
    assert frames[steps] > 0 and frames[steps] == frames[2], f"TorchDynamo compiled more frames after step 2: {frames}"


def test_a_checkpoint_written_on_the_gpu_loads_on_gpu_and_cpu_and_resumes(tmp_path, deterministic_cudnn):
    data = dsprites_rows()
    straight = train(
        protocol_model(),
        short_train(steps=12),
        NO_EVAL,
        data,
        data,
        RunContext(device=CUDA, run_dir=tmp_path / "straight"),
        evaluate_at_end=False,
        pictures=False,
    )
    run_dir = tmp_path / "interrupted"
    first = train(
        protocol_model(),
        short_train(steps=6),
        NO_EVAL,
        data,
        data,
        RunContext(device=CUDA, run_dir=run_dir),
        evaluate_at_end=False,
        pictures=False,
    )
    checkpoint = RunContext(run_dir=run_dir).latest_checkpoint()
    assert checkpoint is not None and checkpoint.name == "step_000000006"

    on_gpu = load_model_from_checkpoint(checkpoint, map_location="cuda")
    on_cpu = load_model_from_checkpoint(checkpoint, map_location="cpu")
    assert all(p.is_cuda for p in on_gpu.parameters()) and not any(p.is_cuda for p in on_cpu.parameters())
    assert torch.equal(weights(on_gpu), weights(first.model)) and torch.equal(weights(on_cpu), weights(first.model))

    resumed = train(
        protocol_model(),
        short_train(steps=12),
        NO_EVAL,
        data,
        data,
        RunContext(device=CUDA, run_dir=run_dir),
        evaluate_at_end=False,
        pictures=False,
    )
    assert resumed.resumed_from_step == 6
    # The resumed steps see the same batches and the same noise (the CUDA generator's state is checkpointed).
    assert losses(resumed)[6:] == pytest.approx(losses(straight)[6:], rel=1e-5)
    assert torch.allclose(weights(resumed.model), weights(straight.model), atol=1e-6)
