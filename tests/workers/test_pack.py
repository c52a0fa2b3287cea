"""K models trained as one (workers/pack.py) equal K separate runs: same seeds, same batches, same noise streams,
each with its own beta and its own Adam."""

import pytest
import torch

from tests.workers.models.common import blobs, make
from workers.pack import PACK_WAYS, Pack

STEPS = 30
K = 4
BATCH = 8
SHAPE = (1, 28, 28)
# Tolerances of a pack against separate runs after 30 Adam steps. vmap runs the K convolutions as one batched call,
# whose sums are ordered differently: float32 rounding, which Adam's normalised step then carries into the weights
# (an element whose gradient is near 0 moves by up to lr per step either way). Measured: loss curves within 4e-7
# relative, each weight tensor within 1.8e-5 in relative norm (max element difference 4e-4 after 30 steps at lr 1e-3).
CURVE_RTOL = 1e-5
CURVE_ATOL = 1e-6  # loss parts near 0 (beta-TCVAE's mi, tc): measured differences up to 4e-8
WEIGHTS_RTOL = 1e-4


def models(variant, betas):
    return [
        make(variant, shape=SHAPE, seed=k, architecture="conv28", latent_dim=4, beta=b) for k, b in enumerate(betas)
    ]


def batches():
    data = blobs(BATCH * K * 4, shape=SHAPE)
    # Model k reads its own order of the data: step t takes rows from a permutation seeded by k.
    orders = [torch.randperm(len(data), generator=torch.Generator().manual_seed(100 + k)) for k in range(K)]
    for step in range(STEPS):
        at = (step * BATCH) % (len(data) - BATCH)
        yield torch.stack([data[order[at : at + BATCH]] for order in orders])


def train_separately(variant, betas):
    separate = models(variant, betas)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in separate]
    generators = [torch.Generator().manual_seed(1000 + k) for k in range(K)]
    curves = [[] for _ in range(K)]
    for x in batches():
        for k, (model, optimizer) in enumerate(zip(separate, optimizers)):
            optimizer.zero_grad()
            loss = model.loss(x[k], model.draw_noise(x[k], generators[k])).loss
            loss.backward()
            optimizer.step()
            curves[k].append(loss.item())
    return separate, curves


def train_packed(variant, betas, how):
    pack = Pack(models(variant, betas), how)
    optimizer = torch.optim.Adam(pack.parameters(), lr=1e-3)
    generators = [torch.Generator().manual_seed(1000 + k) for k in range(K)]
    curves = [[] for _ in range(K)]
    for x in batches():
        optimizer.zero_grad()
        losses, _ = pack.losses(x, pack.draw_noise(x, generators))
        losses.sum().backward()
        optimizer.step()
        for k in range(K):
            curves[k].append(losses[k].item())
    return pack.unpack(), curves


@pytest.mark.parametrize("how", PACK_WAYS)
@pytest.mark.parametrize("variant", ["beta_vae", "beta_tcvae"])
def test_a_pack_of_four_trains_as_four_separate_runs(variant, how):
    betas = [1.0, 2.0, 4.0, 8.0]
    separate, separate_curves = train_separately(variant, betas)
    packed, packed_curves = train_packed(variant, betas, how)
    for k in range(K):
        assert packed_curves[k] == pytest.approx(separate_curves[k], rel=CURVE_RTOL)
        for (name, a), (_, b) in zip(separate[k].named_parameters(), packed[k].named_parameters()):
            assert ((b - a).norm() / a.norm()).item() < WEIGHTS_RTOL, f"model {k}: {name}"
    # Each model kept its own beta: the curves differ between models.
    assert len({round(c[-1], 3) for c in packed_curves}) == K


def test_a_pack_refuses_models_that_differ_in_more_than_beta():
    a = make("beta_vae", latent_dim=3, beta=2.0)
    b = make("beta_vae", latent_dim=4, beta=2.0)
    with pytest.raises(ValueError, match="must share"):
        Pack([a, b])


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_one_adam_over_stacked_tensors_is_one_adam_per_slice(optimizer):
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    torch.manual_seed(0)
    stacked = torch.randn(K, 5, 3, requires_grad=True)
    slices = [stacked.detach()[k].clone().requires_grad_(True) for k in range(K)]
    one = cls([stacked], lr=1e-2, weight_decay=0.1)
    many = [cls([s], lr=1e-2, weight_decay=0.1) for s in slices]
    for step in range(20):
        grads = torch.randn(K, 5, 3, generator=torch.Generator().manual_seed(step))
        stacked.grad = grads.clone()
        one.step()
        for k, (s, opt) in enumerate(zip(slices, many)):
            s.grad = grads[k].clone()
            opt.step()
    for k in range(K):
        torch.testing.assert_close(stacked.detach()[k], slices[k].detach(), atol=0, rtol=0)


# --- the loop of a pack --------------------------------------------------------------------------------------

from workers.config import EvalConfig, ModelConfig, TrainConfig  # noqa: E402
from workers.data.base import ImageDataset  # noqa: E402
from workers.loop import RunContext, TrainingDiverged, train  # noqa: E402
from workers.models.beta_vae import BetaVAE  # noqa: E402
from workers.pack import PackMember, train_pack  # noqa: E402

LOOP_STEPS = 30
SEEDS = [1, 2, 3, 4]
NO_EVAL = EvalConfig(iwae_samples=2, max_examples=32, disentanglement=False, pictures=False)


def loop_data(n=128) -> ImageDataset:
    return ImageDataset("blobs", (blobs(n) * 255).to(torch.uint8), labels=torch.arange(n) % 3)


def member_config(variant, beta) -> ModelConfig:
    return ModelConfig(variant=variant, architecture="mlp", hidden_dims=[32], latent_dim=3, beta=beta)


def loop_config(seed=0) -> TrainConfig:
    return TrainConfig(
        steps=LOOP_STEPS, batch_size=16, log_every=5, checkpoint_every=LOOP_STEPS, seed=seed, optimizer={"lr": 1e-3}
    )


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("how", PACK_WAYS)
@pytest.mark.parametrize("variant", ["beta_vae", "beta_tcvae"])
def test_train_pack_trains_each_member_as_the_loop_trains_it_alone(variant, how):
    data = loop_data()
    betas = [1.0, 2.0, 4.0, 8.0]
    members = [PackMember(member_config(variant, b), s) for b, s in zip(betas, SEEDS)]
    packed = train_pack(members, loop_config(), NO_EVAL, data, data, evaluate_at_end=False, how=how)
    for member, result in zip(members, packed):
        alone = train(
            member.model_config, loop_config(member.seed), NO_EVAL, data, data, RunContext(), evaluate_at_end=False
        )
        assert result.failed is None
        steps = [s for s, _ in alone.history["train/loss"]]
        assert [s for s, _ in result.history["train/loss"]] == steps == [5, 10, 15, 20, 25, 30]
        for name, curve in alone.history.items():
            assert [v for _, v in result.history[name]] == pytest.approx(
                [v for _, v in curve], rel=CURVE_RTOL, abs=CURVE_ATOL
            )
        a, b = weights(alone.model), weights(result.model)
        assert ((b - a).norm() / a.norm()).item() < WEIGHTS_RTOL


class RunawayBetaVAE(BetaVAE):
    """A beta-VAE that, for beta above 100, diverges after a few steps: a linear term pushes its last decoder bias
    up at Adam's steady pace (lr per step), and the loss also carries exp(200 x the bias's rise), a value without a
    gradient, which overflows to inf within about seven steps. The others train as beta-VAEs."""

    def __init__(self, config, image_shape, dataset_size):
        super().__init__(config, image_shape, dataset_size)
        self.register_buffer("anchor", self._last_bias().detach().sum().clone(), persistent=False)

    def _last_bias(self):
        return [m for m in self.decoder if isinstance(m, torch.nn.Linear)][-1].bias

    def loss(self, x, noise=None, gather=None):
        out = super().loss(x, noise, gather)
        runaway = self.beta > 100
        rise = self._last_bias().sum() - self.anchor
        blow_up = torch.exp(torch.where(runaway, 200.0 * rise, torch.zeros(()))).detach()
        out.loss = out.loss - runaway * 200.0 * rise + runaway * blow_up
        return out


@pytest.mark.parametrize("how", PACK_WAYS)
def test_a_member_that_diverges_fails_at_its_step_and_the_others_finish_as_alone(monkeypatch, how):
    from workers.models import registry

    monkeypatch.setitem(registry.VARIANTS, "beta_vae", RunawayBetaVAE)
    data = loop_data()
    betas = [1.0, 2.0, 1000.0, 8.0]
    members = [PackMember(member_config("beta_vae", b), s) for b, s in zip(betas, SEEDS)]
    with pytest.raises(TrainingDiverged) as alone_error:
        train(
            members[2].model_config,
            loop_config(members[2].seed),
            NO_EVAL,
            data,
            data,
            RunContext(),
            evaluate_at_end=False,
        )
    packed = train_pack(members, loop_config(), NO_EVAL, data, data, evaluate_at_end=False, how=how)
    step, part = packed[2].failed
    assert f"training diverged at step {step}: the '{part}' part" in str(alone_error.value)
    assert 1 < step < LOOP_STEPS and part == "loss"
    for k in (0, 1, 3):
        alone = train(
            members[k].model_config,
            loop_config(members[k].seed),
            NO_EVAL,
            data,
            data,
            RunContext(),
            evaluate_at_end=False,
        )
        assert packed[k].failed is None
        assert [v for _, v in packed[k].history["train/loss"]] == pytest.approx(
            [v for _, v in alone.history["train/loss"]], rel=CURVE_RTOL, abs=CURVE_ATOL
        )
        a, b = weights(alone.model), weights(packed[k].model)
        assert ((b - a).norm() / a.norm()).item() < WEIGHTS_RTOL


@pytest.mark.parametrize("how", PACK_WAYS)
def test_a_pack_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path, how):
    data = loop_data()
    members = [PackMember(member_config("beta_tcvae", b), s) for b, s in zip([1.0, 6.0], SEEDS)]
    straight = train_pack(
        members, loop_config(), NO_EVAL, data, data, RunContext(run_dir=tmp_path / "a"), evaluate_at_end=False, how=how
    )
    half = loop_config().model_copy(update={"steps": 15, "checkpoint_every": 15})
    first = train_pack(
        members, half, NO_EVAL, data, data, RunContext(run_dir=tmp_path / "b"), evaluate_at_end=False, how=how
    )
    assert (tmp_path / "b" / "checkpoints" / "step_000000015" / "pack.json").exists()
    resumed = train_pack(
        members, loop_config(), NO_EVAL, data, data, RunContext(run_dir=tmp_path / "b"), evaluate_at_end=False, how=how
    )
    for a, b, c in zip(straight, resumed, first):
        assert b.resumed_from_step == 15 and c.resumed_from_step == 0
        assert torch.equal(weights(a.model), weights(b.model))
        assert a.history == b.history


class StopAtWindow(RunContext):
    """Asked to stop at the ``at``-th log window's end (as a preemption asks a pack's Ray Train workers)."""

    def __init__(self, at: int, **kwargs):
        super().__init__(**kwargs)
        self.at, self.asked = at, 0

    def stop_requested(self) -> bool:
        self.asked += 1
        return self.asked >= self.at


def test_a_pack_asked_to_stop_checkpoints_at_that_step_and_resumes_as_if_never_stopped(tmp_path):
    """Stopped at step 10 (the second log window's end; periodic checkpoints only at 30): a checkpoint at step 10
    itself, no member evaluated, and the resumed pack ends as an uninterrupted one."""
    data = loop_data()
    members = [PackMember(member_config("beta_vae", b), s) for b, s in zip([1.0, 6.0], SEEDS)]
    straight = train_pack(
        members, loop_config(), NO_EVAL, data, data, RunContext(run_dir=tmp_path / "a"), evaluate_at_end=False
    )
    stopped = train_pack(members, loop_config(), NO_EVAL, data, data, StopAtWindow(2, run_dir=tmp_path / "b"))
    assert [r.stopped_at_step for r in stopped] == [10, 10]
    assert not any(name.startswith("eval/") for r in stopped for name in r.final_metrics)
    assert [p.name for p in sorted((tmp_path / "b" / "checkpoints").iterdir())] == ["step_000000010"]
    resumed = train_pack(
        members, loop_config(), NO_EVAL, data, data, RunContext(run_dir=tmp_path / "b"), evaluate_at_end=False
    )
    for a, b in zip(straight, resumed):
        assert b.resumed_from_step == 10 and b.stopped_at_step is None
        assert torch.equal(weights(a.model), weights(b.model))
        assert a.history == b.history


@pytest.mark.parametrize("how", PACK_WAYS)
def test_a_member_s_checkpoint_is_an_ordinary_one_that_its_own_run_resumes(tmp_path, how):
    import shutil

    from workers.loop import load_model_from_checkpoint

    data = loop_data()
    members = [PackMember(member_config("beta_vae", b), s) for b, s in zip([2.0, 8.0], SEEDS)]
    half = loop_config().model_copy(update={"steps": 15, "checkpoint_every": 15})
    packed = train_pack(
        members, half, NO_EVAL, data, data, RunContext(run_dir=tmp_path / "pack"), evaluate_at_end=False, how=how
    )
    member = tmp_path / "pack" / "checkpoints" / "step_000000015" / "member_001"
    assert torch.equal(weights(load_model_from_checkpoint(member)), weights(packed[1].model))

    # The member's own run picks its checkpoint up and trains on as if it had run alone from the start.
    own = tmp_path / "own"
    shutil.copytree(member, own / "checkpoints" / "step_000000015")
    resumed = train(
        members[1].model_config,
        loop_config(members[1].seed),
        NO_EVAL,
        data,
        data,
        RunContext(run_dir=own),
        evaluate_at_end=False,
    )
    alone = train(
        members[1].model_config, loop_config(members[1].seed), NO_EVAL, data, data, RunContext(), evaluate_at_end=False
    )
    assert resumed.resumed_from_step == 15
    a, b = weights(alone.model), weights(resumed.model)
    assert ((b - a).norm() / a.norm()).item() < WEIGHTS_RTOL


def test_each_finished_member_gets_its_evaluation_curves_code_statistics_and_pictures(tmp_path):
    from workers.loop import load_model_from_checkpoint

    data = loop_data()
    members = [
        PackMember(member_config("beta_vae", b), s, name=f"sweep-t0{k}-beta{b:g}")
        for k, (b, s) in enumerate(zip([2.0, 8.0], SEEDS))
    ]
    logged: list[tuple[int, set, int]] = []
    evaluation = EvalConfig(iwae_samples=2, max_examples=32, disentanglement=False, probe=False, pictures=True)
    results = train_pack(
        members,
        loop_config(),
        evaluation,
        data,
        data,
        RunContext(run_dir=tmp_path),
        log=lambda k, metrics, step: logged.append((k, set(metrics), step)),
    )
    # Curves at every log point, then the evaluation, each member to its own log.
    for k in (0, 1):
        steps = [step for member, names, step in logged if member == k and "train/loss" in names]
        assert steps == [5, 10, 15, 20, 25, 30]
        assert [(member, step) for member, names, step in logged if "eval/elbo" in names].count((k, LOOP_STEPS)) == 1
        assert "eval/elbo" in results[k].final_metrics
        assert (tmp_path / f"member_{k:03d}" / "pictures" / "traversal.png").exists()
        saved = load_model_from_checkpoint(tmp_path / "checkpoints" / f"step_{LOOP_STEPS:09d}" / f"member_{k:03d}")
        assert torch.isfinite(saved.code_mean).all() and torch.isfinite(saved.code_std).all()
        assert torch.equal(saved.code_mean, results[k].model.code_mean)
