"""`aeforge models traverse` and `sample` on registered models: pictures enlarged and titled, traversal rows by
the KL (VAE family) or code spread (autoencoders) recorded with the model, autoencoders swept over their recorded
code range (mean +- limit sd), and a model registered without that record traversed with a note saying so."""

from __future__ import annotations

import torch
from PIL import Image

from jobs.registry import log_and_register
from tests.jobs.test_registry import IMAGE_SHAPE, METRICS, make_spec
from tests.services.test_cli_models import cli  # noqa: F401  (fixture)
from tests.workers.models.common import blobs
from tests.workers.test_plots import as_bytes, assert_readable, cell
from workers.models import build_model
from workers.tracking import ensure_experiment, start_or_resume_run


def register(model, spec, job_id: str) -> None:
    run_id = start_or_resume_run(ensure_experiment(spec.name), job_id)
    log_and_register(model, spec, job_id, run_id, METRICS)


def real_model(spec, scales=None, record=True):
    torch.manual_seed(0)
    model = build_model(spec.model.model_copy(update={"hidden_dims": [32]}), IMAGE_SHAPE, 100)
    if scales is not None:  # latent d's codes scaled by scales[d]: known spreads (autoencoder) or KLs (VAE)
        head = model.encoder[-1]
        with torch.no_grad():
            head.weight[: len(scales)] *= torch.tensor(scales)[:, None]
            head.bias[: len(scales)] *= torch.tensor(scales)
    if record:
        model.record_code_statistics([blobs(64)])
    return model.eval()


def open_picture(path) -> Image.Image:
    picture = Image.open(path)
    picture.load()
    return picture


def test_an_autoencoder_is_traversed_over_its_recorded_code_range(cli, mlflow_sqlite, tmp_path):
    spec = make_spec(variant="ae", name="cli-ae-range")
    model = real_model(spec, scales=[1.0, 20.0, 5.0])
    register(model, spec, "job-ae-range")
    target = tmp_path / "t.png"
    result = cli("models", "traverse", "cli-ae-range", "-o", str(target), "--steps", "5", "--dim-limit", "2")
    assert result.exit_code == 0, result.output
    assert "note:" not in result.output
    picture = open_picture(target)
    assert_readable(picture, rows=3, cols=5)
    stats = model.code_statistics()
    with torch.no_grad():
        for row, latent in enumerate(torch.argsort(stats.std, descending=True).tolist()):  # rows by spread
            for col, sds in ((0, -2.0), (2, 0.0), (4, 2.0)):
                code = stats.mean.clone()  # the others stay at the training codes' mean
                code[latent] = stats.mean[latent] + sds * stats.std[latent]
                assert (cell(picture, row, col) - as_bytes(model.decode(code[None])[0])).abs().max() <= 1


def test_a_vae_is_traversed_with_rows_by_its_recorded_kl(cli, mlflow_sqlite, tmp_path):
    spec = make_spec(variant="beta_vae", name="cli-vae-kl")
    model = real_model(spec, scales=[0.1, 4.0, 1.0])
    register(model, spec, "job-vae-kl")
    target = tmp_path / "t.png"
    assert cli("models", "traverse", "cli-vae-kl", "-o", str(target), "--steps", "3", "--seed", "5").exit_code == 0
    picture = open_picture(target)
    kl = model.code_statistics().kl
    order = torch.argsort(kl, descending=True).tolist()
    assert order[0] == 1  # the latent scaled 4 times carries the most KL
    with torch.no_grad():
        image = model.sample(1, generator=torch.Generator().manual_seed(5))[0]
        z = model.encode(image[None]).mean[0]
        for row, latent in enumerate(order):
            code = z.clone()
            code[latent] = 2.0
            assert (cell(picture, row, 2) - as_bytes(model.decode(code[None])[0])).abs().max() <= 1


def test_a_model_registered_without_the_record_is_traversed_with_a_note(cli, mlflow_sqlite, tmp_path):
    spec = make_spec(variant="ae", name="cli-ae-old")
    register(real_model(spec, record=False), spec, "job-ae-old")
    target = tmp_path / "t.png"
    result = cli("models", "traverse", "cli-ae-old", "-o", str(target), "--steps", "3")
    assert result.exit_code == 0, result.output
    assert "note: cli-ae-old was saved without the statistics of its training codes" in " ".join(result.output.split())
    assert_readable(open_picture(target), rows=3, cols=3)


def test_samples_are_enlarged_and_titled(cli, mlflow_sqlite, tmp_path):
    spec = make_spec(variant="beta_vae", name="cli-vae-samples")
    register(real_model(spec), spec, "job-vae-samples")
    target = tmp_path / "s.png"
    assert cli("models", "sample", "cli-vae-samples", "-n", "6", "-o", str(target)).exit_code == 0
    assert_readable(open_picture(target), rows=2, cols=3, labelled_rows=False)


def test_a_traversal_starts_from_a_real_image_and_labels_its_columns(cli, mlflow_sqlite, tmp_path):
    import numpy as np

    spec = make_spec(variant="beta_vae", name="cli-vae-real")
    model = real_model(spec, scales=[0.1, 4.0, 1.0])
    register(model, spec, "job-vae-real")
    # A picture twice the model's size, in colour: made grey and resized to the model's 8 x 8, as a user's file is.
    pixels = (np.indices((16, 16)).sum(0) * 8 % 256).astype(np.uint8)
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(tmp_path / "x.png")
    target = tmp_path / "t.png"
    result = cli(
        "models", "traverse", "cli-vae-real", "-o", str(target), "--steps", "3", "--image", str(tmp_path / "x.png")
    )
    assert result.exit_code == 0, result.output
    picture = open_picture(target)
    grey = Image.open(tmp_path / "x.png").convert("L").resize((8, 8), Image.BILINEAR)
    image = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None]
    order = torch.argsort(model.code_statistics().kl, descending=True).tolist()
    with torch.no_grad():
        z = model.encode(image[None]).mean[0]
        for row, latent in enumerate(order):
            for col, value in ((0, -2.0), (1, 0.0), (2, 2.0)):
                code = z.clone()
                code[latent] = value
                assert (cell(picture, row, col) - as_bytes(model.decode(code[None])[0])).abs().max() <= 1

    # --index: example N of a data set (--data; by default the one the model was trained on).
    images = (np.random.default_rng(0).random((5, 8, 8)) * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=images)
    indexed = tmp_path / "i.png"
    args = ("models", "traverse", "cli-vae-real", "-o", str(indexed), "--steps", "3", "--index", "3")
    assert cli(*args, "--data", str(tmp_path / "d.npz")).exit_code == 0
    with torch.no_grad():
        z = model.encode(torch.from_numpy(images[3:4].astype(np.float32) / 255.0)[:, None]).mean[0]
        code = z.clone()
        code[order[0]] = 2.0
        assert (cell(open_picture(indexed), 0, 2) - as_bytes(model.decode(code[None])[0])).abs().max() <= 1
    too_far = cli(*args[:-1], "9", "--data", str(tmp_path / "d.npz"))
    assert too_far.exit_code == 2 and "has 5 examples" in too_far.output
