"""Pictures: valid PNGs of the size the grid layout implies, each image in its cell, and each picture only for
the models it means something for (samples need a prior, the manifold two latents, templates an mlp).

Small real models (mlp, 8x8 images) keep every test well under a second on a CPU; the pixel checks compare
against the model's own decoder, so they hold for untrained weights too.
"""

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.workers.models.common import blobs, make
from workers.data.base import ImageDataset
from workers.plots import (
    PAD_VALUE,
    embedding_scatter,
    first_layer_templates,
    latent_manifold,
    latent_traversal,
    loss_curves,
    make_grid,
    make_run_pictures,
    prior_samples,
    reconstructions,
    save_grid,
    templates_comparison,
)

H = W = 8
PAD = round(PAD_VALUE * 255)


def grid_size(n_cols: int, n_rows: int, h: int = H, w: int = W, padding: int = 2) -> tuple[int, int]:
    """(width, height) in pixels of a grid, as Pillow reports it."""
    return n_cols * (w + padding) + padding, n_rows * (h + padding) + padding


def cell(picture: Image.Image, row: int, col: int, h: int = H, w: int = W, padding: int = 2) -> torch.Tensor:
    """The pixels of one cell, (C, h, w) as integers 0..255."""
    y, x = row * (h + padding) + padding, col * (w + padding) + padding
    array = torch.tensor(np.array(picture), dtype=torch.int64)
    array = array.view(picture.height, picture.width, -1).permute(2, 0, 1)
    return array[:, y : y + h, x : x + w]


def as_bytes(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.int64)


def open_png(path) -> Image.Image:
    picture = Image.open(path)
    assert picture.format == "PNG"
    picture.load()
    return picture


# --- grids ---------------------------------------------------------------------------------------------------
def test_a_grid_puts_each_image_in_its_cell_and_pads_the_rest(tmp_path):
    images = torch.rand(5, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    path = save_grid(images, tmp_path / "deep" / "folder" / "grid.png", nrow=3)  # parent folders are created

    picture = open_png(path)
    assert picture.mode == "L"
    assert picture.size == grid_size(3, 2, h=3, w=4)  # 3 columns, ceil(5 / 3) = 2 rows
    for i in range(5):
        r, c = divmod(i, 3)
        assert torch.equal(cell(picture, r, c, h=3, w=4), as_bytes(images[i]))
    # The unused sixth cell and the borders are padding.
    assert (cell(picture, 1, 2, h=3, w=4) == PAD).all()
    assert picture.getpixel((0, 0)) == PAD and picture.getpixel((picture.width - 1, picture.height - 1)) == PAD


def test_colour_images_give_an_rgb_grid_and_fewer_images_than_nrow_one_row(tmp_path):
    images = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    picture = open_png(save_grid(images, tmp_path / "rgb.png", nrow=8, padding=1))
    assert picture.mode == "RGB"
    assert picture.size == grid_size(2, 1, h=5, w=5, padding=1)  # columns = min(nrow, N)
    assert torch.equal(cell(picture, 0, 1, h=5, w=5, padding=1), as_bytes(images[1]))


def test_scale_enlarges_pixels_and_bad_input_is_refused(tmp_path):
    images = torch.ones(1, 1, 2, 2)
    picture = open_png(save_grid(images, tmp_path / "big.png", nrow=1, padding=0, scale=4))
    assert picture.size == (8, 8) and (np.asarray(picture) == 255).all()
    # Out-of-range values and NaN (a diverged decoder) are drawn, not crashed on.
    odd = torch.tensor([[[[-1.0, 2.0], [float("nan"), 0.5]]]])
    assert make_grid(odd, nrow=1, padding=0).flatten().tolist() == [0.0, 1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="channels"):
        save_grid(torch.zeros(1, 5, 2, 2), tmp_path / "x.png", nrow=1)
    with pytest.raises(ValueError, match="no images"):
        save_grid(torch.zeros(0, 1, 2, 2), tmp_path / "x.png", nrow=1)


# --- traversal, samples, manifold ----------------------------------------------------------------------------
def test_a_traversal_has_one_row_per_latent_dimension_sweeping_that_dimension(tmp_path):
    model = make("vae", latent_dim=3, hidden_dims=[32])
    image = blobs(1)[0]
    picture = open_png(latent_traversal(model, image, tmp_path / "traversal.png", limit=2.0, steps=5))
    assert picture.size == grid_size(5, 3)

    # Row d, column k: the posterior mean with z_d set to linspace(-2, 2, 5)[k], decoded.
    with torch.no_grad():
        z = model.encode(image[None]).mean[0]
        for d, k in [(0, 0), (1, 4), (2, 2)]:
            code = z.clone()
            code[d] = torch.linspace(-2.0, 2.0, 5)[k]
            expected = as_bytes(model.decode(code[None])[0])
            assert (cell(picture, d, k) - expected).abs().max() <= 1  # float rounding on either side


def test_a_traversal_of_a_deterministic_autoencoder_follows_the_given_ranges(tmp_path):
    model = make("ae", latent_dim=2, hidden_dims=[32])
    image = blobs(1)[0]
    ranges = torch.tensor([[10.0, 20.0], [-5.0, 5.0]])
    picture = open_png(latent_traversal(model, image, tmp_path / "t.png", steps=3, ranges=ranges))
    assert picture.size == grid_size(3, 2)
    with torch.no_grad():
        code = model.encode(image[None]).mean[0].clone()
        code[0] = 15.0  # the middle of [10, 20]
        assert (cell(picture, 0, 1) - as_bytes(model.decode(code[None])[0])).abs().max() <= 1


def test_prior_samples_only_for_the_vae_family_and_the_same_for_the_same_seed(tmp_path):
    assert prior_samples(make("ae"), tmp_path / "ae.png") is None
    assert prior_samples(make("dae"), tmp_path / "dae.png") is None
    assert not (tmp_path / "ae.png").exists()

    model = make("beta_tcvae", beta=4.0)
    first = prior_samples(model, tmp_path / "a.png", n=10, seed=3)
    again = prior_samples(model, tmp_path / "b.png", n=10, seed=3)
    other = prior_samples(model, tmp_path / "c.png", n=10, seed=4)
    assert open_png(first).size == grid_size(4, 3)  # ceil(sqrt(10)) = 4 per row
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()


def test_the_manifold_is_drawn_only_for_two_latent_dimensions(tmp_path):
    assert latent_manifold(make("vae", latent_dim=3), tmp_path / "m3.png") is None

    vae = make("vae", latent_dim=2, hidden_dims=[32])
    picture = open_png(latent_manifold(vae, tmp_path / "m.png", n=5))
    assert picture.size == grid_size(5, 5)
    # Kingma & Welling's grid: Gaussian quantiles; z_1 grows to the right, z_2 upwards.
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 5, dtype=torch.float64)).float()
    with torch.no_grad():
        top_left = as_bytes(vae.decode(torch.tensor([[q[0], q[4]]]))[0])
    assert (cell(picture, 0, 0) - top_left).abs().max() <= 1

    ae = make("ae", latent_dim=2, hidden_dims=[32])
    with pytest.raises(ValueError, match="needs encoded codes"):
        latent_manifold(ae, tmp_path / "ae.png")
    codes = torch.randn(100, 2, generator=torch.Generator().manual_seed(0)) * 7 + 30
    assert open_png(latent_manifold(ae, tmp_path / "ae.png", n=4, codes=codes)).size == grid_size(4, 4)


# --- reconstructions -----------------------------------------------------------------------------------------
def test_reconstructions_put_each_input_above_its_reconstruction(tmp_path):
    model = make("vae", hidden_dims=[32])
    x = blobs(10)
    picture = open_png(reconstructions(model, x, tmp_path / "r.png", per_row=4))
    # 3 blocks of 4 columns (10 = 4 + 4 + 2), each block an input row and a reconstruction row.
    assert picture.size == grid_size(4, 6)
    with torch.no_grad():
        recon = model(x)  # g(posterior mean)
    for i in (0, 5, 9):
        block, col = divmod(i, 4)
        assert torch.equal(cell(picture, 2 * block, col), as_bytes(x[i]))
        assert (cell(picture, 2 * block + 1, col) - as_bytes(recon[i])).abs().max() <= 1
    assert (cell(picture, 4, 3) == PAD).all() and (cell(picture, 5, 3) == PAD).all()  # the short last block


def test_a_denoiser_shows_its_own_corruption_between_input_and_reconstruction(tmp_path):
    model = make("dae", hidden_dims=[32], corruption={"kind": "mask", "level": 0.5})
    x = torch.ones(3, 1, H, W)
    noise = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    picture = open_png(reconstructions(model, x, tmp_path / "d.png", generator=noise()))
    assert picture.size == grid_size(3, 3)  # input, corrupted input, reconstruction
    for i in range(3):
        assert (cell(picture, 0, i) == 255).all()
        assert int((cell(picture, 1, i) == 0).sum()) == H * W // 2  # the mask zeroes exactly half the pixels
    with torch.no_grad():
        denoised = model(model.corrupt(x, generator=noise()))  # the same draws: the picture is reproducible
    assert (cell(picture, 2, 1) - as_bytes(denoised[1])).abs().max() <= 1


# --- templates, embeddings, curves ---------------------------------------------------------------------------
def test_templates_are_the_first_layer_rows_of_an_mlp_and_nothing_for_conv(tmp_path):
    model = make("ae", hidden_dims=[32])
    picture = open_png(first_layer_templates(model, tmp_path / "t.png", n=16))
    assert picture.size == grid_size(4, 4)
    # Template 5 is weight row 5 as an 8x8 image, 0 at mid-grey, its largest |weight| at black or white.
    w = model.encoder[1].weight.detach()[5]
    expected = as_bytes((0.5 + 0.5 * w / w.abs().max()).view(1, H, W))
    assert (cell(picture, 1, 1) - expected).abs().max() <= 1

    conv = make("ae", shape=(1, 28, 28), architecture="conv28")
    assert first_layer_templates(conv, tmp_path / "conv.png") is None
    assert not (tmp_path / "conv.png").exists()


def test_templates_of_several_models_side_by_side(tmp_path):
    clean = make("ae", hidden_dims=[32], seed=0)
    destroyed = make("dae", hidden_dims=[32], corruption={"kind": "mask", "level": 0.5}, seed=1)
    path = templates_comparison({"0% destroyed": clean, "50% destroyed": destroyed}, tmp_path / "cmp.png", n=16)
    assert open_png(path).size == (800, 440)  # one 4 x 4.4 inch panel each at 100 dpi
    conv = make("ae", shape=(1, 28, 28), architecture="conv28")
    with pytest.raises(ValueError, match="model 'conv'.*architecture 'mlp'"):
        templates_comparison({"mlp": clean, "conv": conv}, tmp_path / "no.png")


@pytest.mark.parametrize("dims", [1, 2, 6])
def test_embedding_scatter_takes_any_code_size(tmp_path, dims):
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(200, dims, generator=g)
    labels = torch.randint(0, 4, (200,), generator=g)
    picture = open_png(embedding_scatter(codes, labels, tmp_path / "e.png", "codes", "label"))
    assert picture.size == (500, 500)


def test_embedding_scatter_with_many_values_and_numpy_input(tmp_path):
    codes = torch.randn(100, 3).numpy()
    values = torch.arange(100) % 32  # e.g. dSprites' posX: a colour bar rather than 32 legend entries
    assert open_png(embedding_scatter(codes, values.numpy(), tmp_path / "e.png", "codes", "posX")).size == (500, 500)
    with pytest.raises(ValueError, match="100 codes but 99 colours"):
        embedding_scatter(codes, values[:99], tmp_path / "bad.png", "codes", "posX")


def test_loss_curves_draw_the_train_curves_only(tmp_path):
    history = {"train/loss": [(10, 5.0), (20, 3.0)], "train/kl": [(10, 1.0), (20, 1.5)], "eval/mig": [(20, 0.1)]}
    assert open_png(loss_curves(history, tmp_path / "c.png")).size == (800, 300)  # two 4 x 3 inch panels
    assert loss_curves({"eval/mig": [(20, 0.1)]}, tmp_path / "none.png") is None


# --- the end-of-run set --------------------------------------------------------------------------------------
def labelled(n=40) -> ImageDataset:
    return ImageDataset("blobs", (blobs(n) * 255).to(torch.uint8), labels=torch.arange(n) % 3)


def with_factors(n=40) -> ImageDataset:
    factors = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n) % 3, torch.arange(n) % 5], 1)
    return ImageDataset("shapes", (blobs(n) * 255).to(torch.uint8), factors=factors,
                        factor_names=["color", "shape", "pos x"], factor_sizes=[1, 3, 5])


HISTORY = {"train/loss": [(5, 40.0), (10, 30.0)], "train/recon": [(5, 38.0), (10, 29.0)]}


@pytest.mark.parametrize("latent_dim, extra", [(3, set()), (2, {"manifold"})])
def test_run_pictures_of_a_vae_on_labelled_data(tmp_path, caplog, latent_dim, extra):
    model = make("vae", latent_dim=latent_dim, hidden_dims=[32])
    model.train()
    with caplog.at_level(logging.WARNING, logger="workers.plots"):
        pictures = make_run_pictures(model, labelled(), labelled(16), tmp_path / "pictures", seed=0, history=HISTORY)
    assert not caplog.records  # no picture failed quietly
    assert set(pictures) == {"reconstructions", "samples", "traversal", "embedding_label", "templates",
                             "loss_curves"} | extra
    for name, path in pictures.items():
        assert path == tmp_path / "pictures" / f"{name}.png"
        open_png(path)
    assert open_png(pictures["traversal"]).size == grid_size(9, latent_dim)
    assert open_png(pictures["reconstructions"]).size == grid_size(8, 2)
    assert open_png(pictures["samples"]).size == grid_size(8, 8)
    assert model.training  # the caller's mode is given back


def test_run_pictures_of_a_dae_on_factor_data_are_reproducible(tmp_path, caplog):
    model = make("dae", hidden_dims=[32], corruption={"kind": "mask", "level": 0.5})
    rng_before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="workers.plots"):
        first = make_run_pictures(model, with_factors(), with_factors(12), tmp_path / "a", seed=5)
    assert not caplog.records
    # No prior, no history; coloured by the first factor that varies ("color" is constant, as in dSprites).
    assert set(first) == {"reconstructions", "traversal", "embedding_shape", "templates"}
    assert open_png(first["reconstructions"]).size == grid_size(8, 3)  # input, corrupted, reconstruction
    assert open_png(first["traversal"]).size == grid_size(9, 3)
    # The same seed gives the same pictures, and drawing them leaves the global random stream alone.
    assert torch.equal(torch.get_rng_state(), rng_before)
    again = make_run_pictures(model, with_factors(), with_factors(12), tmp_path / "b", seed=5)
    assert all(first[k].read_bytes() == again[k].read_bytes() for k in ("reconstructions", "traversal"))


def test_run_pictures_use_training_images_when_there_is_no_validation_split(tmp_path):
    model = make("ae", hidden_dims=[32], architecture="mlp")
    empty = labelled().subset(torch.arange(0))
    pictures = make_run_pictures(model, labelled(), empty, tmp_path, seed=0)
    assert set(pictures) == {"reconstructions", "traversal", "embedding_label", "templates"}
    assert math.isclose(open_png(pictures["reconstructions"]).width, grid_size(8, 2)[0])
