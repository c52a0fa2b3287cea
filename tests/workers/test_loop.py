"""The one-process training loop: resume gives the same result as an uninterrupted run, a NaN stops the run
with a message naming the step and the part, budgets in steps or epochs, and the run folder's contents."""

import json

import pytest
import torch

from tests.workers.models.common import blobs
from workers.config import EvalConfig, ModelConfig, TrainConfig
from workers.data.base import ImageDataset
from workers.loop import CHECKPOINT_FILE, RunContext, TrainingDiverged, load_model_from_checkpoint, total_steps, train

EVAL = EvalConfig(iwae_samples=2, max_examples=32, disentanglement=False, pictures=False)


def dataset(n=96) -> ImageDataset:
    return ImageDataset("blobs", (blobs(n) * 255).to(torch.uint8), labels=torch.arange(n) % 3)


def model_config(variant="beta_tcvae") -> ModelConfig:
    extra = {"beta": 4.0} if variant in ("beta_vae", "beta_tcvae") else {}
    return ModelConfig(variant=variant, architecture="mlp", hidden_dims=[32], latent_dim=3, **extra)


def train_config(**fields) -> TrainConfig:
    base = {"steps": 12, "batch_size": 16, "checkpoint_every": 6, "log_every": 3, "seed": 1, "optimizer": {"lr": 1e-3}}
    return TrainConfig(**{**base, **fields})


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("variant", ["dae", "beta_tcvae"])
def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, variant):
    data = dataset()
    straight = train(
        model_config(variant),
        train_config(),
        EVAL,
        data,
        data,
        RunContext(run_dir=tmp_path / "a"),
        evaluate_at_end=False,
    )

    run_dir = tmp_path / "b"
    first = train(
        model_config(variant),
        train_config(steps=6),
        EVAL,
        data,
        data,
        RunContext(run_dir=run_dir),
        evaluate_at_end=False,
    )
    assert first.steps == 6 and (run_dir / "checkpoints" / "step_000000006" / CHECKPOINT_FILE).exists()
    resumed = train(
        model_config(variant), train_config(), EVAL, data, data, RunContext(run_dir=run_dir), evaluate_at_end=False
    )
    assert resumed.resumed_from_step == 6 and resumed.steps == 12
    assert torch.equal(weights(straight.model), weights(resumed.model))
    # The curves of the resumed run continue those of the first part.
    assert [s for s, _ in resumed.history["train/loss"]] == [3, 6, 9, 12]
    assert resumed.history["train/loss"] == straight.history["train/loss"]


class StopAfter(RunContext):
    """Asked to stop once ``after`` steps have passed (as a preemption asks a Ray Train worker)."""

    def __init__(self, after: int, **kwargs):
        super().__init__(**kwargs)
        self.after = after
        self.calls: list[int] = []

    def stop_requested(self) -> bool:
        self.calls.append(1)
        return len(self.calls) * 3 >= self.after  # called at each log window's end (log_every = 3)


def test_a_stop_request_checkpoints_at_the_current_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data = dataset()
    straight = train(
        model_config(), train_config(), EVAL, data, data, RunContext(run_dir=tmp_path / "a"), evaluate_at_end=False
    )
    run_dir = tmp_path / "b"
    stopped = train(model_config(), train_config(), EVAL, data, data, StopAfter(9, run_dir=run_dir))
    # Stopped at step 9, between the periodic checkpoints (every 6): a checkpoint at step 9 itself.
    assert stopped.stopped_at_step == 9 and stopped.steps == 9
    assert (run_dir / "checkpoints" / "step_000000009" / CHECKPOINT_FILE).exists()
    resumed = train(
        model_config(), train_config(), EVAL, data, data, RunContext(run_dir=run_dir), evaluate_at_end=False
    )
    assert resumed.resumed_from_step == 9 and resumed.stopped_at_step is None
    assert torch.equal(weights(straight.model), weights(resumed.model))
    assert resumed.history["train/loss"] == straight.history["train/loss"]


def test_checkpoints_keep_only_the_newest_and_load_back(tmp_path):
    data = dataset()
    result = train(
        model_config(),
        train_config(steps=18, checkpoint_every=3, num_to_keep=2),
        EVAL,
        data,
        data,
        RunContext(run_dir=tmp_path),
        evaluate_at_end=False,
    )
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_000000015", "step_000000018"]
    loaded = load_model_from_checkpoint(tmp_path / "checkpoints" / "step_000000018")
    assert torch.equal(weights(loaded), weights(result.model))
    assert loaded.config == result.model.config and loaded.dataset_size == len(data)


class NaNAfter(ImageDataset):
    """Images turn to NaN from the given batch on, as corrupt data would."""

    def __init__(self, base: ImageDataset, bad_from_call: int):
        super().__init__(base.name, base._images, base.labels)
        self.calls, self.bad_from_call = 0, bad_from_call

    def images(self, index):
        self.calls += 1
        x = super().images(index)
        return torch.full_like(x, float("nan")) if self.calls >= self.bad_from_call else x


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_part(tmp_path):
    data = dataset()
    with pytest.raises(TrainingDiverged, match=r"diverged at step 5: the 'recon' part of the loss is not finite"):
        train(
            model_config("vae"),
            train_config(),
            EVAL,
            NaNAfter(data, 5),
            data,
            RunContext(run_dir=tmp_path),
            evaluate_at_end=False,
        )
    # Nothing after the bad step was checkpointed as if it were good.
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("step_*"))


def test_an_epoch_budget_is_converted_to_full_batches_per_shard():
    assert total_steps(train_config(steps=None, epochs=3), shard_size=100) == 3 * (100 // 16)
    assert total_steps(train_config(steps=7), shard_size=100) == 7


def test_the_run_folder_has_curves_and_final_evaluation(tmp_path):
    data = dataset()
    result = train(model_config("beta_tcvae"), train_config(), EVAL, data, data, RunContext(run_dir=tmp_path))
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    curves = [l for l in lines if "train/loss" in l]
    assert [l["step"] for l in curves] == [3, 6, 9, 12]
    assert {"train/recon", "train/kl", "train/mi", "train/tc", "train/dwkl"} <= set(curves[0])
    for key in ("eval/elbo", "eval/iwae_ll", "eval/tc", "perf/images_per_second"):
        assert key in result.final_metrics
    assert result.final_metrics["eval/iwae_ll"] >= result.final_metrics["eval/elbo"] - 1.0
    progress_total = result.steps
    assert progress_total == 12


def test_a_checkpoint_keeps_the_noise_generator_and_one_from_before_it_still_resumes(tmp_path):
    data = dataset()
    run_dir = tmp_path / "run"
    train(model_config(), train_config(steps=6), EVAL, data, data, RunContext(run_dir=run_dir), evaluate_at_end=False)
    path = run_dir / "checkpoints" / "step_000000006" / CHECKPOINT_FILE
    state = torch.load(path, weights_only=False)
    assert isinstance(state["noise_rng"], torch.Tensor)
    del state["noise_rng"]  # as checkpoints were written before the loop had its own noise generator
    torch.save(state, path)
    resumed = train(
        model_config(), train_config(), EVAL, data, data, RunContext(run_dir=run_dir), evaluate_at_end=False
    )
    assert resumed.resumed_from_step == 6 and resumed.steps == 12
    assert torch.isfinite(weights(resumed.model)).all()
