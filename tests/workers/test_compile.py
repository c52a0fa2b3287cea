"""The compiled training step (``train.compile``) on a CPU: compiled and eager training from the same seed agree
for every variant, nothing recompiles after the first step, checkpoints load across compiled and eager runs both
ways, and the trained model is the plain module (no ``_orig_mod.`` keys, picklable as MLflow logs it).

The models are 8x8 mlps, so that TorchInductor's C++ compile of each variant's step takes seconds on 2 cores.
Compiled code draws its noise (reparameterisation, corruption) from Inductor's own generator unless
``fallback_random`` is set; the agreement tests set it, so both runs see the same samples and any difference is
the compiled arithmetic's.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field

import pytest
import torch
from pydantic import ValidationError
from torch._dynamo.utils import counters

from tests.workers.models.common import blobs
from workers.config import EvalConfig, ModelConfig, TrainConfig
from workers.data.base import ImageDataset
from workers.loop import (
    CHECKPOINT_FILE,
    CompilerMissing,
    RunContext,
    compile_mode,
    compiles,
    load_model_from_checkpoint,
    train,
)
from workers.models.registry import VARIANTS as MODELS


def _cpp_compiler_missing() -> str | None:
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:
        return f"TorchInductor finds no C++ compiler on this machine ({type(exc).__name__}); install g++"
    return None


NO_COMPILER = _cpp_compiler_missing()
needs_compiler = pytest.mark.skipif(NO_COMPILER is not None, reason=NO_COMPILER or "")

NO_EVAL = EvalConfig(disentanglement=False, pictures=False, probe=False)
STEPS = 20
BATCH = 16
# Stated tolerance. Fused kernels sum in another order than eager ones (float32 rounding, ~1e-7 relative per
# operation), and Adam's update, divided by the root of the squared gradients, carries such differences into the
# weights without shrinking them. Over the 20 steps every loss part agrees within 1e-5 relative or 5e-6 absolute
# (for the parts near 0, such as beta-TCVAE's TC at ~1e-4), and every weight within 2e-6. Measured here (2.13,
# x86): at most 1.7e-7 relative on the totals, 1.8e-7 absolute on TC, 6e-8 on the weights, so a margin of 20-50x;
# a wrong gradient or a different noise draw moves them by ~1e-3 (one Adam step at lr 1e-3).
LOSS_RTOL, LOSS_ATOL = 1e-5, 5e-6
WEIGHT_ATOL = 2e-6

# Every variant, and both of beta-TCVAE's estimators.
VARIANTS = {
    "ae": {"variant": "ae"},
    "dae": {"variant": "dae"},  # the default corruption (mask 0.5): its kthvalue threshold and masked_fill
    "vae": {"variant": "vae"},
    "beta_vae": {"variant": "beta_vae", "beta": 4.0},
    "beta_tcvae_mss": {"variant": "beta_tcvae", "beta": 4.0, "tc_estimator": "mss"},
    "beta_tcvae_mws": {"variant": "beta_tcvae", "beta": 4.0, "tc_estimator": "mws"},
}


def test_every_variant_is_covered():
    assert {fields["variant"] for fields in VARIANTS.values()} == set(MODELS)


def dataset(n: int = 160) -> ImageDataset:
    # 10 batches per epoch: the 20 steps cross an epoch boundary (a new permutation) on the way.
    return ImageDataset("blobs", (blobs(n) * 255).to(torch.uint8))


def model_config(name: str) -> ModelConfig:
    return ModelConfig(architecture="mlp", hidden_dims=[32], latent_dim=3, **VARIANTS[name])


def train_config(**fields) -> TrainConfig:
    base = {
        "steps": STEPS,
        "batch_size": BATCH,
        "log_every": 1,
        "checkpoint_every": 10**6,
        "seed": 3,
        "optimizer": {"lr": 1e-3},
    }
    return TrainConfig(**{**base, **fields})


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@dataclass
class CompileWatch(RunContext):
    """Records, at every log point (here every step), how many frames TorchDynamo has compiled and how many
    graphs it has made so far: a recompilation after the first step would show as a growing count."""

    frames: dict[int, int] = field(default_factory=dict)
    graphs: dict[int, int] = field(default_factory=dict)

    def log_progress(self, step, total, *, metrics=None, images_per_second=None, eta_s=None) -> None:
        self.frames[step] = int(counters["frames"]["total"])
        self.graphs[step] = int(counters["stats"]["unique_graphs"])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from nothing: no graphs of an earlier test, and a fresh recompile budget."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def run(name: str, compiled: bool, ctx: RunContext | None = None, **fields):
    with torch._inductor.config.patch(fallback_random=True):
        return train(
            model_config(name),
            train_config(compile=compiled, **fields),
            NO_EVAL,
            dataset(),
            dataset(),
            ctx or CompileWatch(),
            evaluate_at_end=False,
            pictures=False,
        )


def parts(result) -> dict[str, list[float]]:
    return {k: [v for _, v in points] for k, points in result.history.items()}


@needs_compiler
@pytest.mark.slow  # the first variant compiled in a process pays Inductor's start-up: ~30 s on 2 cores
@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiled_and_eager_training_agree_and_nothing_recompiles(name):
    eager = run(name, compiled=False)
    assert counters["frames"]["total"] == 0, "an eager run compiled something"

    watch = CompileWatch()
    compiled = run(name, compiled=True, ctx=watch)

    # The same loss parts (recon, kl, mi, tc, dwkl as the variant has them) at every one of the 20 steps.
    assert parts(compiled).keys() == parts(eager).keys()
    for key, values in parts(eager).items():
        assert len(values) == STEPS
        assert parts(compiled)[key] == pytest.approx(values, rel=LOSS_RTOL, abs=LOSS_ATOL), key
    # Training moved the weights, and both runs moved them to the same place.
    assert not torch.allclose(weights(eager.model), weights(_initial(name)))
    assert torch.allclose(weights(compiled.model), weights(eager.model), atol=WEIGHT_ATOL, rtol=0)

    # Something was compiled, in one piece (no graph break), all of it at the first step.
    assert watch.graphs[1] >= 1 and compiled.compile_seconds > 0
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert watch.frames[STEPS] == watch.frames[1], f"frames compiled per step: {watch.frames}"
    assert watch.graphs[STEPS] == watch.graphs[1], f"graphs per step: {watch.graphs}"
    assert eager.compile_seconds == 0


def _initial(name: str) -> torch.nn.Module:
    """The weights both runs start from (the loop seeds with train.seed before building the model)."""
    from workers.models import build_model

    torch.manual_seed(train_config().seed)
    return build_model(model_config(name), (1, 8, 8), 160)


@needs_compiler
def test_a_compiled_run_trains_the_plain_module():
    result = run("beta_tcvae_mss", compiled=True, steps=4)
    model = result.model
    # The model is the variant's class, not torch.compile's wrapper, and nothing in it was replaced.
    assert type(model) is MODELS["beta_tcvae"]
    assert not any("_orig_mod" in key for key in model.state_dict())
    assert model.state_dict().keys() == _initial("beta_tcvae_mss").state_dict().keys()
    # The registry logs a deep copy of it, pickled (mlflow.pytorch's serialization_format="pickle").
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(model).cpu().eval(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = dataset().images(torch.arange(8))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


@needs_compiler
@pytest.mark.parametrize(
    "first, then", [(True, False), (False, True)], ids=["compiled-then-eager", "eager-then-compiled"]
)
def test_checkpoints_load_across_compiled_and_eager_runs(tmp_path, first, then):
    name = "beta_tcvae_mss"
    straight = run(name, compiled=False, steps=12)

    run_dir = tmp_path / "run"
    half = run(name, compiled=first, ctx=CompileWatch(run_dir=run_dir), steps=6, checkpoint_every=6)
    checkpoint = RunContext(run_dir=run_dir).latest_checkpoint()
    assert checkpoint is not None and checkpoint.name == "step_000000006"
    saved = torch.load(checkpoint / CHECKPOINT_FILE, weights_only=False)["model"]
    assert saved.keys() == _initial(name).state_dict().keys()  # plain keys whichever way it was written
    assert torch.equal(weights(load_model_from_checkpoint(checkpoint)), weights(half.model))

    resumed = run(name, compiled=then, ctx=CompileWatch(run_dir=run_dir), steps=12, checkpoint_every=6)
    assert resumed.resumed_from_step == 6
    # The resumed half continues where the first stopped (same weights, optimiser state and noise), so the run
    # ends where the uninterrupted eager one does, within the compiled arithmetic's tolerance.
    assert parts(resumed)["train/loss"] == pytest.approx(parts(straight)["train/loss"], rel=LOSS_RTOL, abs=LOSS_ATOL)
    assert torch.allclose(weights(resumed.model), weights(straight.model), atol=WEIGHT_ATOL, rtol=0)
    assert (resumed.compile_seconds > 0) == then


def test_the_default_compiles_on_cuda_only_and_a_cpu_run_stays_eager():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compiles(TrainConfig(), cpu) and compiles(TrainConfig(), cuda)
    assert compiles(TrainConfig(compile=True), cpu) and not compiles(TrainConfig(compile=False), cuda)
    # CUDA graphs on one GPU; plain Inductor code under DDP and on a CPU; an explicit mode wins.
    assert compile_mode(TrainConfig(), cuda, world_size=1) == "reduce-overhead"
    assert compile_mode(TrainConfig(), cuda, world_size=2) == "default"
    assert compile_mode(TrainConfig(), cpu, world_size=1) == "default"
    assert compile_mode(TrainConfig(compile_mode="max-autotune-no-cudagraphs"), cuda, 1) == "max-autotune-no-cudagraphs"

    result = train(
        model_config("vae"),
        train_config(steps=2),
        NO_EVAL,
        dataset(),
        dataset(),
        CompileWatch(),
        evaluate_at_end=False,
        pictures=False,
    )
    assert counters["frames"]["total"] == 0 and result.compile_seconds == 0


def test_the_spec_documents_compile_and_rejects_a_mode_without_it():
    schema = TrainConfig.model_json_schema()["properties"]
    assert "null: on for CUDA, off on CPU" in schema["compile"]["description"]
    assert "reduce-overhead" in schema["compile_mode"]["description"]
    with pytest.raises(ValidationError, match="compile_mode.* is set .*but 'compile' is false"):
        TrainConfig(compile=False, compile_mode="reduce-overhead")
    with pytest.raises(ValidationError, match="compile_mode"):
        TrainConfig(compile_mode="fastest")


def test_compiling_on_a_cpu_without_a_cpp_compiler_is_a_clear_error(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler():
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(CompilerMissing, match="needs a C\\+\\+ compiler .* set train.compile: false"):
        run("ae", compiled=True, steps=2)
