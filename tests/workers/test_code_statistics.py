"""Where a model's codes lie, recorded with its weights when training ends: the per-latent mean and standard
deviation of the training data's codes and (VAE family) the per-latent KL. A registered autoencoder is traversed
over that range without the data; checkpoints and pickles from before the record load as "not recorded"."""

import io

import pytest
import torch

from tests.workers.models.common import blobs, make
from tests.workers.test_loop import EVAL, dataset, model_config, train_config
from workers.loop import CHECKPOINT_FILE, RunContext, load_model_from_checkpoint, train
from workers.models.base import CODE_STATISTICS_BUFFERS


def expected_statistics(model, images: torch.Tensor):
    with torch.no_grad():
        posterior = model.eval().encode(images)
    codes = posterior.mean.double()
    kl = posterior.kl_per_dimension()
    return codes.mean(0), codes.std(0, unbiased=False), None if kl is None else kl.double().mean(0)


def test_a_fresh_model_has_no_statistics_and_recording_keeps_its_mode():
    model = make("ae", latent_dim=3, hidden_dims=[32])
    assert model.code_statistics() is None
    model.train()
    x = blobs(50)
    recorded = model.record_code_statistics([x[:20], x[20:]])  # batches are summed, not averaged per batch
    assert model.training
    mean, std, _ = expected_statistics(model, x)
    assert torch.allclose(recorded.mean.double(), mean, atol=1e-5)
    assert torch.allclose(recorded.std.double(), std, atol=1e-5)
    assert recorded.kl is None  # deterministic codes have no KL
    with pytest.raises(ValueError, match="no images"):
        model.record_code_statistics([])


def test_a_vae_records_the_kl_of_each_latent():
    model = make("beta_vae", latent_dim=4, hidden_dims=[32], beta=4.0)
    x = blobs(40)
    recorded = model.record_code_statistics([x])
    _, _, kl = expected_statistics(model, x)
    assert recorded.kl is not None and torch.allclose(recorded.kl.double(), kl, atol=1e-5)


@pytest.mark.parametrize("variant", ["dae", "beta_vae"])
def test_training_records_the_statistics_in_the_final_checkpoint_only(tmp_path, variant):
    data = dataset()
    result = train(
        model_config(variant), train_config(), EVAL, data, data, RunContext(run_dir=tmp_path), evaluate_at_end=False
    )
    checkpoints = tmp_path / "checkpoints"
    middle = load_model_from_checkpoint(checkpoints / "step_000000006")
    assert middle.code_statistics() is None  # recorded when training ends, not before
    final = load_model_from_checkpoint(checkpoints / "step_000000012")
    stats = final.code_statistics()
    assert stats is not None
    mean, std, kl = expected_statistics(final, data.images(torch.arange(len(data))))
    assert torch.allclose(stats.mean.double(), mean, atol=1e-5) and torch.allclose(stats.std.double(), std, atol=1e-5)
    assert (stats.kl is None) == (variant == "dae")
    if kl is not None:
        assert torch.allclose(stats.kl.double(), kl, atol=1e-5)
    assert torch.equal(result.model.code_std.cpu(), final.code_std)


def test_a_checkpoint_from_before_the_statistics_loads_without_them(tmp_path):
    data = dataset()
    train(
        model_config("ae"), train_config(steps=6), EVAL, data, data, RunContext(run_dir=tmp_path), evaluate_at_end=False
    )
    path = tmp_path / "checkpoints" / "step_000000006" / CHECKPOINT_FILE
    state = torch.load(path, weights_only=False)
    for name in CODE_STATISTICS_BUFFERS:
        del state["model"][name]
    torch.save(state, path)
    old = load_model_from_checkpoint(path)
    assert old.code_statistics() is None
    # Only these buffers are forgiven: a checkpoint missing a weight is still refused.
    del state["model"]["decoder.0.weight"]
    with pytest.raises(RuntimeError, match="decoder.0.weight"):
        make("ae", latent_dim=3, hidden_dims=[32]).load_state_dict(state["model"])


def test_the_statistics_survive_pickling_as_mlflow_logs_a_model():
    model = make("ae", latent_dim=3, hidden_dims=[32])
    model.record_code_statistics([blobs(30)])
    buffer = io.BytesIO()
    torch.save(model, buffer)  # what mlflow.pytorch.log_model(serialization_format="pickle") writes
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert torch.equal(loaded.code_statistics().std, model.code_statistics().std)

    # A model pickled before the buffers existed unpickles without them: "not recorded", no error.
    for name in CODE_STATISTICS_BUFFERS:
        del model._buffers[name]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert torch.load(io.BytesIO(buffer.getvalue()), weights_only=False).code_statistics() is None
