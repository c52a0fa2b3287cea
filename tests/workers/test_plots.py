"""Pictures: valid PNGs a person can read (enlarged to at least 256 px a side, a title strip, labelled rows), each
image in its cell, and each picture only for the models it means something for (samples need a prior, the
manifold two latents, templates an mlp). Traversals: rows by KL (VAE family) or by spread (autoencoders, swept
over their codes' mean +- 2 sd). Loss curves: no two panels the same. Sweep summaries: one file per quantity.

Small real models (mlp, 8x8 images) keep every test well under a second on a CPU; the pixel checks compare
against the model's own decoder, so they hold for untrained weights too. Where a labelled picture puts its grid
is read from the PNG text chunk GRID_INFO_KEY, and each cell is sampled back at the grid's own resolution.
"""

import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.workers.models.common import blobs, fit, make
from workers.data.base import ImageDataset
from workers.plots import (
    GRID_INFO_KEY,
    MIN_SIDE,
    PAD_VALUE,
    embedding_scatter,
    first_layer_templates,
    latent_manifold,
    latent_traversal,
    loss_curves,
    loss_panels,
    make_grid,
    make_run_pictures,
    prior_samples,
    reconstructions,
    save_grid,
    save_labelled_grid,
    templates_comparison,
    upscale_factor,
)
from workers.plots.sweep import heatmap_table, metric_heatmap, short_name, sweep_summary_pictures

H = W = 8
PAD = round(PAD_VALUE * 255)


def grid_size(n_cols: int, n_rows: int, h: int = H, w: int = W, padding: int = 2) -> tuple[int, int]:
    """(width, height) in pixels of an unscaled grid, as Pillow reports it."""
    return n_cols * (w + padding) + padding, n_rows * (h + padding) + padding


def raw_cell(picture: Image.Image, row: int, col: int, h: int = H, w: int = W, padding: int = 2) -> torch.Tensor:
    """The pixels of one cell of an unscaled grid (save_grid), (C, h, w) as integers 0..255."""
    y, x = row * (h + padding) + padding, col * (w + padding) + padding
    array = torch.tensor(np.array(picture), dtype=torch.int64)
    array = array.view(picture.height, picture.width, -1).permute(2, 0, 1)
    return array[:, y : y + h, x : x + w]


def info(picture: Image.Image) -> dict:
    return json.loads(picture.text[GRID_INFO_KEY])


def cell(picture: Image.Image, row: int, col: int) -> torch.Tensor:
    """The pixels of one cell of a labelled picture, sampled back to the image's own size: (C, h, w), 0..255."""
    grid = info(picture)
    s, p, (h, w) = grid["scale"], grid["padding"], grid["cell"]
    y = grid["y"] + s * (p + row * (h + p))
    x = grid["x"] + s * (p + col * (w + p))
    array = torch.tensor(np.array(picture), dtype=torch.int64)
    array = array.view(picture.height, picture.width, -1).permute(2, 0, 1)
    block = array[:, y : y + s * h, x : x + s * w]
    # Nearest-neighbour enlargement: every s x s block is one source pixel.
    assert torch.equal(block, block[:, ::s, ::s].repeat_interleave(s, 1).repeat_interleave(s, 2))
    return block[:, ::s, ::s]


def as_bytes(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.int64)


def open_png(path) -> Image.Image:
    picture = Image.open(path)
    assert picture.format == "PNG"
    picture.load()
    return picture


def assert_readable(picture: Image.Image, rows: int, cols: int, labelled_rows: bool = True) -> None:
    """At least MIN_SIDE a side; the grid (rows x cols cells) enlarged below a title strip that has text in it,
    and (labelled_rows) a left strip with text in it."""
    assert min(picture.size) >= MIN_SIDE, picture.size
    grid = info(picture)
    assert (grid["rows"], grid["cols"]) == (rows, cols)
    s, p, (h, w) = grid["scale"], grid["padding"], grid["cell"]
    grid_w, grid_h = grid_size(cols, rows, h, w, p)
    assert picture.size == (grid["x"] + s * grid_w, grid["y"] + s * grid_h)
    grey = np.array(picture.convert("L"))
    assert grid["y"] > 0 and grey[: grid["y"]].min() < 100  # a title strip, and text on it
    if labelled_rows:
        assert grid["x"] > 0 and grey[grid["y"] :, : grid["x"]].min() < 100
        assert grey[grid["y"] :, : grid["x"]].max() == 255  # dark text on a white strip, not a filled block


# --- grids ---------------------------------------------------------------------------------------------------
def test_a_grid_puts_each_image_in_its_cell_and_pads_the_rest(tmp_path):
    images = torch.rand(5, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    path = save_grid(images, tmp_path / "deep" / "folder" / "grid.png", nrow=3)  # parent folders are created

    picture = open_png(path)
    assert picture.mode == "L"
    assert picture.size == grid_size(3, 2, h=3, w=4)  # 3 columns, ceil(5 / 3) = 2 rows
    for i in range(5):
        r, c = divmod(i, 3)
        assert torch.equal(raw_cell(picture, r, c, h=3, w=4), as_bytes(images[i]))
    # The unused sixth cell and the borders are padding.
    assert (raw_cell(picture, 1, 2, h=3, w=4) == PAD).all()
    assert picture.getpixel((0, 0)) == PAD and picture.getpixel((picture.width - 1, picture.height - 1)) == PAD


def test_colour_images_give_an_rgb_grid_and_fewer_images_than_nrow_one_row(tmp_path):
    images = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    picture = open_png(save_grid(images, tmp_path / "rgb.png", nrow=8, padding=1))
    assert picture.mode == "RGB"
    assert picture.size == grid_size(2, 1, h=5, w=5, padding=1)  # columns = min(nrow, N)
    assert torch.equal(raw_cell(picture, 0, 1, h=5, w=5, padding=1), as_bytes(images[1]))


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


def test_the_upscale_factor_reaches_the_minimum_side_within_the_maximum():
    assert upscale_factor(236, 60) == 5  # today's MNIST reconstructions: 60 px high -> 300
    assert upscale_factor(242, 242) == 2
    assert upscale_factor(530, 530) == 1  # 8 x 8 dSprites samples are large enough already
    assert upscale_factor(596, 68) == 4  # one long row: 272 px high, 2384 px wide (within 2400)
    assert upscale_factor(1200, 20) == 2  # held back by the longer side
    assert upscale_factor(5000, 3000) == 1


def test_a_labelled_grid_is_enlarged_titled_and_has_its_rows_labelled(tmp_path):
    images = torch.rand(6, 1, 7, 5, generator=torch.Generator().manual_seed(2))
    path = save_labelled_grid(
        images, tmp_path / "lab.png", nrow=3, title="a title that says what this is", row_labels=["first row", "second"]
    )
    picture = open_png(path)
    assert picture.mode == "L"
    assert_readable(picture, rows=2, cols=3)
    grid = info(picture)
    assert grid["scale"] == upscale_factor(*grid_size(3, 2, h=7, w=5))
    for i in range(6):
        assert torch.equal(cell(picture, *divmod(i, 3)), as_bytes(images[i]))
    # Colour stays colour; alpha is composed over white; without labels there is no left strip.
    rgba = torch.rand(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    picture = open_png(save_labelled_grid(rgba, tmp_path / "rgba.png", nrow=2, title="colour"))
    assert picture.mode == "RGB" and info(picture)["x"] == 0
    assert_readable(picture, rows=1, cols=2, labelled_rows=False)
    with pytest.raises(ValueError, match="3 row labels for a grid of 2 rows"):
        save_labelled_grid(images, tmp_path / "bad.png", nrow=3, row_labels=["a", "b", "c"])


def test_a_long_title_wraps_instead_of_running_off_the_picture(tmp_path):
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    short = open_png(save_labelled_grid(images, tmp_path / "s.png", nrow=4, title="short"))
    long = open_png(save_labelled_grid(images, tmp_path / "l.png", nrow=4, title=" ".join(["word"] * 80)))
    assert long.width == short.width and info(long)["y"] >= 3 * info(short)["y"] - 2 * 6


# --- traversal, samples, manifold ----------------------------------------------------------------------------
def test_a_traversal_has_one_row_per_latent_dimension_sweeping_that_dimension(tmp_path):
    model = make("vae", latent_dim=3, hidden_dims=[32])
    image = blobs(1)[0]
    picture = open_png(latent_traversal(model, image, tmp_path / "traversal.png", limit=2.0, steps=5))
    assert_readable(picture, rows=3, cols=5)

    # Row d, column k: the posterior mean with z_d set to linspace(-2, 2, 5)[k], decoded.
    with torch.no_grad():
        z = model.encode(image[None]).mean[0]
        for d, k in [(0, 0), (1, 4), (2, 2)]:
            code = z.clone()
            code[d] = torch.linspace(-2.0, 2.0, 5)[k]
            expected = as_bytes(model.decode(code[None])[0])
            assert (cell(picture, d, k) - expected).abs().max() <= 1  # float rounding on either side


def test_a_traversal_orders_its_rows_by_score_largest_first(tmp_path):
    model = make("vae", latent_dim=4, hidden_dims=[32])
    image = blobs(1)[0]
    scores = torch.tensor([0.5, 3.0, float("nan"), 1.0])  # a NaN score (unknown) goes last
    picture = open_png(latent_traversal(model, image, tmp_path / "t.png", steps=3, order_by=("KL", scores)))
    with torch.no_grad():
        z = model.encode(image[None]).mean[0]
        for row, latent in enumerate([1, 3, 0, 2]):
            code = z.clone()
            code[latent] = -2.0
            assert (cell(picture, row, 0) - as_bytes(model.decode(code[None])[0])).abs().max() <= 1


def test_a_traversal_of_a_deterministic_autoencoder_follows_the_given_ranges(tmp_path):
    model = make("ae", latent_dim=2, hidden_dims=[32])
    image = blobs(1)[0]
    ranges = torch.tensor([[10.0, 20.0], [-5.0, 5.0]])
    picture = open_png(latent_traversal(model, image, tmp_path / "t.png", steps=3, ranges=ranges))
    assert_readable(picture, rows=2, cols=3)
    with torch.no_grad():
        code = model.encode(image[None]).mean[0].clone()
        code[0] = 15.0  # the middle of [10, 20]
        assert (cell(picture, 0, 1) - as_bytes(model.decode(code[None])[0])).abs().max() <= 1
    # A starting code instead of an image: the others stay at that code.
    start = torch.tensor([1.0, -1.0])
    picture = open_png(latent_traversal(model, None, tmp_path / "s.png", steps=3, ranges=ranges, start=start))
    with torch.no_grad():
        assert (cell(picture, 1, 2) - as_bytes(model.decode(torch.tensor([[1.0, 5.0]]))[0])).abs().max() <= 1
    with pytest.raises(ValueError, match="not both"):
        latent_traversal(model, image, tmp_path / "x.png", start=start)


def test_prior_samples_only_for_the_vae_family_and_the_same_for_the_same_seed(tmp_path):
    assert prior_samples(make("ae"), tmp_path / "ae.png") is None
    assert prior_samples(make("dae"), tmp_path / "dae.png") is None
    assert not (tmp_path / "ae.png").exists()

    model = make("beta_tcvae", beta=4.0)
    first = prior_samples(model, tmp_path / "a.png", n=10, seed=3)
    again = prior_samples(model, tmp_path / "b.png", n=10, seed=3)
    other = prior_samples(model, tmp_path / "c.png", n=10, seed=4)
    assert_readable(open_png(first), rows=3, cols=4, labelled_rows=False)  # ceil(sqrt(10)) = 4 per row
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()


def test_the_manifold_is_drawn_only_for_two_latent_dimensions(tmp_path):
    assert latent_manifold(make("vae", latent_dim=3), tmp_path / "m3.png") is None

    vae = make("vae", latent_dim=2, hidden_dims=[32])
    picture = open_png(latent_manifold(vae, tmp_path / "m.png", n=5))
    assert_readable(picture, rows=5, cols=5)
    # Kingma & Welling's grid: Gaussian quantiles; z_1 grows to the right, z_2 upwards.
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 5, dtype=torch.float64)).float()
    with torch.no_grad():
        top_left = as_bytes(vae.decode(torch.tensor([[q[0], q[4]]]))[0])
    assert (cell(picture, 0, 0) - top_left).abs().max() <= 1

    ae = make("ae", latent_dim=2, hidden_dims=[32])
    with pytest.raises(ValueError, match="needs encoded codes"):
        latent_manifold(ae, tmp_path / "ae.png")
    codes = torch.randn(100, 2, generator=torch.Generator().manual_seed(0)) * 7 + 30
    assert_readable(open_png(latent_manifold(ae, tmp_path / "ae.png", n=4, codes=codes)), rows=4, cols=4)


# --- reconstructions -----------------------------------------------------------------------------------------
def test_reconstructions_put_each_input_above_its_reconstruction(tmp_path):
    model = make("vae", hidden_dims=[32])
    x = blobs(10)
    picture = open_png(reconstructions(model, x, tmp_path / "r.png", per_row=4))
    # 3 blocks of 4 columns (10 = 4 + 4 + 2), each block an input row and a reconstruction row.
    assert_readable(picture, rows=6, cols=4)
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
    noise = lambda: torch.Generator().manual_seed(7)
    picture = open_png(reconstructions(model, x, tmp_path / "d.png", generator=noise()))
    assert_readable(picture, rows=3, cols=3)  # input, corrupted input, reconstruction
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
    assert_readable(picture, rows=4, cols=4, labelled_rows=False)
    # Template 5 is weight row 5 as an 8x8 image, 0 at mid-grey, its largest |weight| at black or white.
    w = model.encoder[1].weight.detach()[5]
    expected = as_bytes((0.5 + 0.5 * w / w.abs().max()).view(1, H, W))
    assert (cell(picture, 1, 1) - expected).abs().max() <= 1

    conv = make("ae", shape=(1, 28, 28), architecture="conv28")
    assert first_layer_templates(conv, tmp_path / "conv.png") is None
    assert not (tmp_path / "conv.png").exists()


def test_templates_are_titled_with_the_corruption_level(tmp_path):
    """The title strip differs between a 50% and a 10% masking denoiser and a plain autoencoder, whose pixels
    below the title are drawn the same way."""
    titles = []
    for model in (
        make("dae", hidden_dims=[32], corruption={"kind": "mask", "level": 0.5}),
        make("dae", hidden_dims=[32], corruption={"kind": "mask", "level": 0.1}),
        make("ae", hidden_dims=[32]),
    ):
        picture = open_png(first_layer_templates(model, tmp_path / f"{len(titles)}.png", n=16))
        titles.append(np.array(picture)[: info(picture)["y"]])
    assert all(t.shape == titles[0].shape for t in titles)
    assert not np.array_equal(titles[0], titles[1]) and not np.array_equal(titles[0], titles[2])
    from workers.plots import corruption_level

    assert corruption_level(make("dae", corruption={"kind": "mask", "level": 0.5})) == "mask noise 50% of pixels"
    assert corruption_level(make("dae", corruption={"kind": "gaussian", "level": 0.3})) == "gaussian noise sd 0.3"
    assert corruption_level(make("ae")) == "no corruption (0% destroyed)"


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


PANEL_W, PANEL_H = 440, 340  # one 4.4 x 3.4 inch panel at 100 dpi


def test_loss_curves_draw_one_panel_per_distinct_train_curve(tmp_path):
    history = {"train/loss": [(10, 5.0), (20, 3.0)], "train/kl": [(10, 1.0), (20, 1.5)], "eval/mig": [(20, 0.1)]}
    assert loss_panels(history) == [["train/loss"], ["train/kl"]]
    assert open_png(loss_curves(history, tmp_path / "c.png")).size == (2 * PANEL_W, PANEL_H)
    assert loss_curves({"eval/mig": [(20, 0.1)]}, tmp_path / "none.png") is None
    titled = open_png(loss_curves(history, tmp_path / "t.png", title="training curves"))
    assert titled.size == (2 * PANEL_W, PANEL_H + 40)


def test_a_denoisers_loss_and_reconstruction_share_one_panel(tmp_path):
    """A DAE's objective is its reconstruction error, so train/loss and train/recon are the same numbers: one
    panel "loss = recon", not two identical ones. A VAE's differ (recon + beta KL): a panel each."""
    from tests.workers.test_loop import EVAL, dataset, model_config, train_config
    from workers.loop import RunContext, train

    data = dataset()
    evaluation = EVAL.model_copy(update={"probe": False})  # only the numbers this picture draws
    dae = train(model_config("dae"), train_config(), evaluation, data, data, RunContext(run_dir=tmp_path / "dae"))
    assert dae.history["train/loss"] == dae.history["train/recon"]
    assert loss_panels(dae.history) == [["train/loss", "train/recon"]]
    assert [s for s, _ in dae.history["eval/recon"]] == [12]  # the validation point lands on the same panel
    assert open_png(loss_curves(dae.history, tmp_path / "dae.png")).size == (PANEL_W, PANEL_H)

    vae = train(model_config("beta_vae"), train_config(), evaluation, data, data, RunContext(run_dir=tmp_path / "vae"))
    assert loss_panels(vae.history) == [["train/loss"], ["train/recon"], ["train/kl"]]
    assert open_png(loss_curves(vae.history, tmp_path / "vae.png")).size == (3 * PANEL_W, PANEL_H)


# --- the end-of-run set --------------------------------------------------------------------------------------
def labelled(n=40) -> ImageDataset:
    return ImageDataset("blobs", (blobs(n) * 255).to(torch.uint8), labels=torch.arange(n) % 3)


def with_factors(n=40) -> ImageDataset:
    factors = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n) % 3, torch.arange(n) % 5], 1)
    return ImageDataset(
        "shapes",
        (blobs(n) * 255).to(torch.uint8),
        factors=factors,
        factor_names=["color", "shape", "pos x"],
        factor_sizes=[1, 3, 5],
    )


HISTORY = {"train/loss": [(5, 40.0), (10, 30.0)], "train/recon": [(5, 38.0), (10, 29.0)]}


def first_shown(data: ImageDataset, seed: int) -> torch.Tensor:
    """The validation image make_run_pictures starts its traversal from (its seed's first choice)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.images(order[:1])[0]


@pytest.mark.parametrize("latent_dim, extra", [(3, set()), (2, {"manifold"})])
def test_run_pictures_of_a_vae_on_labelled_data(tmp_path, caplog, latent_dim, extra):
    model = make("vae", latent_dim=latent_dim, hidden_dims=[32])
    model.train()
    with caplog.at_level(logging.WARNING, logger="workers.plots"):
        pictures = make_run_pictures(model, labelled(), labelled(16), tmp_path / "pictures", seed=0, history=HISTORY)
    assert not caplog.records  # no picture failed quietly
    assert (
        set(pictures)
        == {"reconstructions", "samples", "traversal", "embedding_label", "templates", "loss_curves"} | extra
    )
    for name, path in pictures.items():
        assert path == tmp_path / "pictures" / f"{name}.png"
        assert min(open_png(path).size) >= MIN_SIDE
    assert_readable(open_png(pictures["traversal"]), rows=latent_dim, cols=9)
    assert_readable(open_png(pictures["reconstructions"]), rows=2, cols=8)
    assert_readable(open_png(pictures["samples"]), rows=8, cols=8, labelled_rows=False)
    assert model.training  # the caller's mode is given back


def test_run_pictures_order_a_vaes_traversal_by_the_kl_of_each_latent(tmp_path):
    """Latent means scaled 0.1, 3 and 1 times one shared direction, unit variances: KL_d = s_d^2 E[m^2] / 2, so
    the rows must be z2, z3, z1 (largest KL first), each sweeping its own latent from -2 to +2."""
    model = make("vae", latent_dim=3, hidden_dims=[32])
    head = model.encoder[-1]  # Linear(32, 6): means, then log-variances
    with torch.no_grad():
        direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
        head.weight[:3] = torch.tensor([0.1, 3.0, 1.0])[:, None] * direction
        head.weight[3:] = 0.0
        head.bias.zero_()
    data = labelled(30)
    pictures = make_run_pictures(model, data, data, tmp_path, seed=2)
    picture = open_png(pictures["traversal"])
    assert_readable(picture, rows=3, cols=9)
    with torch.no_grad():
        z = model.encode(first_shown(data, 2)[None]).mean[0]
        for row, latent in enumerate([1, 2, 0]):
            for col, value in ((0, -2.0), (8, 2.0)):
                code = z.clone()
                code[latent] = value
                assert (cell(picture, row, col) - as_bytes(model.decode(code[None])[0])).abs().max() <= 1


def test_run_pictures_sweep_an_autoencoders_codes_over_their_mean_plus_minus_two_sd(tmp_path):
    model = make("ae", latent_dim=3, hidden_dims=[32])
    fit(model, blobs(64), steps=150)
    data = labelled(40)
    pictures = make_run_pictures(model, data, data, tmp_path, seed=1)
    picture = open_png(pictures["traversal"])
    assert_readable(picture, rows=3, cols=9)
    with torch.no_grad():
        codes = model.encode(data.images(torch.arange(len(data)))).mean
        mean, std = codes.mean(0), codes.std(0, unbiased=False)
        start = model.encode(first_shown(data, 1)[None]).mean[0]
        for row, latent in enumerate(torch.argsort(std, descending=True).tolist()):  # rows by spread
            ends = []
            for col, value in ((0, mean[latent] - 2 * std[latent]), (8, mean[latent] + 2 * std[latent])):
                code = start.clone()
                code[latent] = value
                expected = as_bytes(model.decode(code[None])[0])
                assert (cell(picture, row, col) - expected).abs().max() <= 1
                ends.append(cell(picture, row, col).float())
            # The data's range moves the picture: the two ends of each row differ materially.
            assert (ends[0] - ends[1]).abs().mean() > 10, (latent, (ends[0] - ends[1]).abs().mean())


def test_run_pictures_of_a_dae_on_factor_data_are_reproducible(tmp_path, caplog):
    model = make("dae", hidden_dims=[32], corruption={"kind": "mask", "level": 0.5})
    rng_before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="workers.plots"):
        first = make_run_pictures(model, with_factors(), with_factors(12), tmp_path / "a", seed=5)
    assert not caplog.records
    # No prior, no history; coloured by the first factor that varies ("color" is constant, as in dSprites); the
    # latent x factor mutual information of data with factors.
    assert set(first) == {"reconstructions", "traversal", "embedding_shape", "templates", "mutual_information"}
    assert open_png(first["mutual_information"]).size[0] > 100
    assert_readable(open_png(first["reconstructions"]), rows=3, cols=8)  # input, corrupted, reconstruction
    assert_readable(open_png(first["traversal"]), rows=3, cols=9)
    # The same seed gives the same pictures, and drawing them leaves the global random stream alone.
    assert torch.equal(torch.get_rng_state(), rng_before)
    again = make_run_pictures(model, with_factors(), with_factors(12), tmp_path / "b", seed=5)
    assert all(first[k].read_bytes() == again[k].read_bytes() for k in ("reconstructions", "traversal"))


def test_run_pictures_use_training_images_when_there_is_no_validation_split(tmp_path):
    model = make("ae", hidden_dims=[32], architecture="mlp")
    empty = labelled().subset(torch.arange(0))
    pictures = make_run_pictures(model, labelled(), empty, tmp_path, seed=0)
    assert set(pictures) == {"reconstructions", "traversal", "embedding_label", "templates"}
    assert info(open_png(pictures["reconstructions"]))["cols"] == 8


# --- sweep summaries -----------------------------------------------------------------------------------------
def sweep_rows() -> list[dict]:
    rows = []
    for beta in (1.0, 4.0, 16.0):
        for latent in (2, 5):
            for seed in (0, 1):
                rows.append(
                    {
                        "variant": "beta_vae",
                        "beta": beta,
                        "latent_dim": latent,
                        "seed": seed,
                        "status": "finished",
                        "run_name": f"t-{beta}-{latent}-{seed}",
                        "eval/recon": 30 + beta + seed,
                        "eval/mig": 0.01 * beta + 0.1 * latent + 0.01 * seed,
                        "eval/elbo": -40 - beta,
                    }
                )
    rows.append(
        {"variant": "beta_vae", "beta": 2.0, "latent_dim": 2, "seed": 0, "status": "error", "run_name": "broken"}
    )
    return rows


def test_the_heat_map_table_is_latent_sizes_by_betas_with_means_over_seeds():
    rows = sweep_rows()
    rows = [r for r in rows if not (r.get("beta") == 16.0 and r.get("latent_dim") == 5)]  # a missing pair
    betas, latents, means = heatmap_table(rows, "eval/mig")
    assert betas == [1.0, 4.0, 16.0] and latents == [2, 5]  # the errored trial's beta 2 is not a column
    assert means.shape == (2, 3)
    assert means[0, 1] == pytest.approx(0.01 * 4 + 0.2 + 0.005)  # mean over seeds 0 and 1
    assert np.isnan(means[1, 2])


def test_sweep_summary_pictures_one_file_per_distinct_quantity(tmp_path):
    rows = sweep_rows()
    tile = open_png(latent_traversal(make("vae", hidden_dims=[32]), blobs(1)[0], tmp_path / "tile.png"))
    made = sweep_summary_pictures(
        rows,
        "eval/mig",
        tmp_path / "pics",
        mode="max",
        traversal_for=lambda row: tmp_path / "tile.png" if row["seed"] == 0 else None,
    )
    # MIG ranks the trials: it is drawn once, not as both metric_vs_beta and mig_vs_beta.
    assert set(made) == {"mig_vs_beta", "recon_vs_beta", "mig_heatmap", "recon_vs_mig", "traversals", "mig_vs_elbo"}
    assert {p.name for p in made.values()} == {f"{name}.png" for name in made}
    contents = [p.read_bytes() for p in made.values()]
    assert len(set(contents)) == len(contents)
    for path in made.values():
        assert min(open_png(path).size) >= MIN_SIDE
    # The traversal sheet keeps each trial's picture at its own resolution: 6 trials with seed 0, 3 a row.
    sheet = open_png(made["traversals"])
    assert sheet.width >= 3 * tile.width and sheet.height >= 2 * tile.height

    # Another ranking metric gets its own curve and heat map; without factors there is no MIG or trade-off.
    for row in rows:
        row.pop("eval/mig", None)
    made = sweep_summary_pictures(rows, "eval/elbo", tmp_path / "pics2", traversal_for=lambda row: None)
    assert set(made) == {"elbo_vs_beta", "recon_vs_beta", "elbo_heatmap"}
    assert short_name("eval/dci_disentanglement") == "dci_disentanglement"


def test_the_heat_map_is_larger_for_more_betas_and_latent_sizes(tmp_path):
    rows = sweep_rows()
    small = open_png(metric_heatmap([r for r in rows if r.get("beta") == 1.0], "eval/mig", tmp_path / "a.png"))
    large = open_png(metric_heatmap(rows, "eval/mig", tmp_path / "b.png", mode="max"))
    assert large.width > small.width and min(small.size) >= 256
    assert math.isclose(large.height, small.height)


def test_the_mutual_information_matrix_shows_which_latent_holds_which_factor(tmp_path):
    from workers.metrics.mig import mutual_info_matrix
    from workers.plots import mutual_info_picture

    rng = np.random.default_rng(0)
    factors = np.stack([rng.integers(4, size=2000), rng.integers(5, size=2000), np.zeros(2000, dtype=int)], 1)
    # z1 holds factor 1, z2 factor 0, z3 nothing.
    codes = np.stack([factors[:, 1] + 0.01 * rng.normal(size=2000), factors[:, 0], rng.normal(size=2000)], 1)
    mutual_info, entropy = mutual_info_matrix(codes, factors)
    assert mutual_info.shape == (3, 3) and entropy[2] == 0
    share = mutual_info[:, :2] / entropy[:2]
    assert share[0, 1] > 0.95 and share[1, 0] > 0.95 and share[2].max() < 0.05 and share[0, 0] < 0.05
    path = mutual_info_picture(codes, factors, ["a", "b", "constant"], tmp_path / "mi.png", "mutual information")
    assert open_png(path).size[0] > 100
    with pytest.raises(ValueError, match="single value"):
        mutual_info_picture(codes, factors[:, 2:], ["constant"], tmp_path / "none.png", "nothing")
