"""Pictures of one trained autoencoder (PNG files), written at the end of a run and by ``aeforge models``.

What each picture is for:

- ``reconstructions``: inputs above their reconstructions g(f(x)); for a denoising autoencoder the corrupted
  input x~ sits in between and the bottom row is g(f(x~)), the "projection back onto the image manifold";
- ``samples``: decodings of z ~ N(0, I), the generative model (VAE family only: plain autoencoders have no
  prior to draw from);
- ``traversal``: one row per latent dimension, that dimension swept while the others stay at the posterior
  mean of one image (the beta-VAE / beta-TCVAE papers' figure for judging disentanglement by eye);
- ``manifold``: for 2-D latent spaces, decodings over a regular grid of codes (Kingma & Welling 2014, fig. 4);
- ``embedding_*``: validation codes in 2-D (PCA when there are more dimensions) coloured by label or factor;
- ``templates``: the first layer's weight rows of an ``mlp`` encoder shown as images, the lecture's
  "rows are templates" picture; :func:`templates_comparison` puts several models' templates side by side
  (Vincent et al.: "0% vs 50% input pixels destroyed");
- ``loss_curves``: the logged ``train/*`` curves.

Grids are drawn here with Pillow (no torchvision: it is not a dependency of the workers), in the layout
torchvision's ``make_grid`` uses, so the pictures look like the papers' and the tests can compute where each
image lands. Plots with axes use matplotlib's Agg backend (no display on Ray workers).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

logger = logging.getLogger(__name__)

# Mid-grey between cells: visible against black-background data (MNIST, dSprites) and white-background data.
PAD_VALUE = 0.5
# Pillow modes by channel count; 2 and 4 channels (allowed by the npz reader) keep their last channel as alpha.
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
# How many validation images each run picture uses; small, so that pictures take seconds, not minutes.
RECONSTRUCTIONS = 8
EMBEDDING_POINTS = 2000
ENCODE_BATCH = 500


# --- grids ------------------------------------------------------------------------------------------------
def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = PAD_VALUE) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (C, H', W') image with ``nrow`` images per row, as torchvision lays it out.

    ``ncol = min(nrow, N)`` columns and ``ceil(N / ncol)`` rows; every cell is surrounded by ``padding`` pixels,
    so H' = rows * (H + padding) + padding and image i's top-left corner is at
    (row * (H + padding) + padding, col * (W + padding) + padding) with row, col = divmod(i, ncol).
    Unused cells of the last row stay padding. Alpha channels (C = 2 or 4) are opaque in the padding.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) batch, not of shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if c not in _MODES:
        raise ValueError(f"images must have 1, 2, 3 or 4 channels, not {c}")
    if n == 0:
        raise ValueError("no images to put in a grid")
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, not {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be 0 or more, not {padding}")
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    fill = torch.full((c,), float(pad_value))
    if c in (2, 4):
        fill[-1] = 1.0
    grid = fill.view(c, 1, 1).repeat(1, rows * (h + padding) + padding, ncol * (w + padding) + padding)
    # NaN (a diverged model) would become an arbitrary byte; draw it black instead.
    images = torch.nan_to_num(images.detach().float().cpu(), nan=0.0).clamp(0.0, 1.0)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = r * (h + padding) + padding, col * (w + padding) + padding
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def _to_pil(grid: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] -> a Pillow image, rounding to the nearest of 256 levels."""
    c = grid.shape[0]
    array = (grid.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if c == 1 else array, mode=_MODES[c])


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, padding: int = 2, *, scale: int = 1,
              pad_value: float = PAD_VALUE) -> Path:
    """Write images (N, C, H, W) in [0, 1] as one PNG grid with ``nrow`` images per row; returns the path.

    Greyscale for C = 1, RGB for C = 3. ``scale`` enlarges the whole picture by that integer factor with
    nearest-neighbour sampling, so tiny images stay crisp pixels instead of a blur. Parent folders are created.
    """
    if scale < 1:
        raise ValueError(f"scale must be at least 1, not {scale}")
    picture = _to_pil(make_grid(images, nrow, padding, pad_value))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _blank_like(images: torch.Tensor) -> torch.Tensor:
    """A placeholder cell that reads as padding, for incomplete rows inside a grid."""
    return torch.full_like(images[:1], PAD_VALUE)


# --- what the model does to images ------------------------------------------------------------------------
@torch.no_grad()
def latent_traversal(model: nn.Module, image: torch.Tensor, path: str | Path, limit: float = 2.0, steps: int = 9,
                     *, ranges: torch.Tensor | None = None) -> Path:
    """One row per latent dimension d: the image's posterior mean with z_d set to each of ``steps`` values.

    The values are ``linspace(-limit, limit, steps)``, the convention of the beta-VAE / beta-TCVAE papers and
    disentanglement_lib: for the VAE family the prior N(0, 1) gives every dimension that scale, and a
    dimension that holds a factor shows that factor changing along its row while the rest of the image stays.
    Deterministic autoencoders have no prior, so their codes may live at any scale: ``ranges`` (D, 2) gives
    each dimension its own (low, high) instead, e.g. the spread of encoded validation images.
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2, not {steps}")
    device = _device(model)
    z = model.encode(image.reshape(1, *image.shape[-3:]).to(device).float()).mean[0]
    d = z.shape[0]
    if ranges is None:
        values = torch.linspace(-limit, limit, steps, device=device).expand(d, steps)
    else:
        ranges = torch.as_tensor(ranges, dtype=torch.float32, device=device).reshape(d, 2)
        t = torch.linspace(0.0, 1.0, steps, device=device)
        values = ranges[:, :1] + (ranges[:, 1:] - ranges[:, :1]) * t
    codes = z.expand(d, steps, d).clone()  # codes[row, step] = z with z_row replaced
    rows = torch.arange(d, device=device)
    codes[rows, :, rows] = values
    decoded = model.decode(codes.reshape(d * steps, d))
    return save_grid(decoded.float().cpu(), path, nrow=steps)


@torch.no_grad()
def reconstructions(model: nn.Module, images: torch.Tensor, path: str | Path, per_row: int = 8,
                    generator: torch.Generator | None = None) -> Path:
    """Inputs with their reconstructions below them, in blocks of ``per_row`` columns.

    Each block is the row of inputs x, then (denoising autoencoders, which have ``corrupt``) the corrupted
    inputs x~ the model would train on, then the reconstructions: g(f(x)) from the posterior mean, or
    g(f(x~)) for a denoiser, since removing the corruption is what it learned. ``generator`` (on the model's
    device) fixes the corruption's randomness, so the picture is the same on every call with the same seed.
    """
    device = _device(model)
    x = images.to(device).float()
    shown = [x]
    if hasattr(model, "corrupt"):
        x_in = _corrupt(model, x, generator)
        shown.append(x_in)
    else:
        x_in = x
    shown.append(model.decode(model.encode(x_in).mean).float())
    shown = [s.cpu() for s in shown]
    cells = []
    for start in range(0, len(x), per_row):
        for row in shown:
            block = row[start : start + per_row]
            missing = min(per_row, len(x)) - len(block)
            cells += [block, *([_blank_like(block)] * missing)]
    return save_grid(torch.cat(cells), path, nrow=min(per_row, len(x)))


def _corrupt(model: nn.Module, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The model's own corruption of x, drawn from ``generator`` where the model takes one, else from a forked
    copy of the global RNG seeded from it, so that drawing a picture never shifts the training's random stream."""
    if generator is None:
        return model.corrupt(x)
    try:
        return model.corrupt(x, generator=generator)
    except TypeError:  # a corrupt(x) without a generator argument
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item())
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return model.corrupt(x)


@torch.no_grad()
def prior_samples(model: nn.Module, path: str | Path, n: int = 64, seed: int = 0) -> Path | None:
    """A square-ish grid of n decodings of z ~ N(0, I) drawn with ``seed``; None for deterministic autoencoders,
    which have no prior (their decoder fed N(0, I) draws shows nothing meaningful)."""
    if not model.stochastic:
        return None
    device = _device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    images = model.sample(n, generator=generator)
    return save_grid(images.float().cpu(), path, nrow=math.ceil(math.sqrt(n)))


@torch.no_grad()
def latent_manifold(model: nn.Module, path: str | Path, n: int = 15, codes: torch.Tensor | None = None) -> Path | None:
    """For a 2-D latent space, an n x n grid of decoded codes; None for other latent sizes.

    VAE family: as Kingma & Welling (2014, fig. 4), the grid is mapped through the inverse CDF of N(0, 1)
    (quantiles 0.05 ... 0.95), so equal areas of the picture hold equal prior mass. Deterministic autoencoders
    have no prior, so the grid spans where the encoded ``codes`` (N, 2) lie (their 1st to 99th percentile,
    so that one outlier does not leave the picture mostly empty); they must be given.
    z_1 grows to the right and z_2 upwards, as on a plot.
    """
    if model.latent_dim != 2:
        return None
    device = _device(model)
    if model.stochastic:
        quantiles = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
        values = torch.distributions.Normal(0.0, 1.0).icdf(quantiles).float()
        axes = [values, values]
    else:
        if codes is None:
            raise ValueError("a deterministic autoencoder's manifold needs encoded codes to tell where to look")
        codes = torch.as_tensor(codes, dtype=torch.float32).cpu().reshape(-1, 2)
        low = torch.quantile(codes, 0.01, dim=0)
        high = torch.quantile(codes, 0.99, dim=0)
        axes = [torch.linspace(float(low[k]), float(high[k]), n) for k in range(2)]
    z1, z2 = axes[0], axes[1].flip(0)  # top row = largest z_2
    grid = torch.stack(torch.meshgrid(z2, z1, indexing="ij"), dim=-1)[..., [1, 0]].reshape(n * n, 2)
    images = model.decode(grid.to(device))
    return save_grid(images.float().cpu(), path, nrow=n)


# --- what the model learned -------------------------------------------------------------------------------
def _first_linear(model: nn.Module) -> nn.Linear | None:
    """The encoder's first fully connected layer when it reads the pixels directly (architecture mlp)."""
    if getattr(getattr(model, "config", None), "architecture", None) != "mlp":
        return None
    layer = next((m for m in model.encoder.modules() if isinstance(m, nn.Linear)), None)
    if layer is None or layer.weight.shape[1] != math.prod(model.image_shape):
        return None
    return layer


def _templates(model: nn.Module, n: int) -> torch.Tensor | None:
    """The first n weight rows as (n, C, H, W) images in [0, 1], each scaled by its own largest |weight| so
    that 0 is mid-grey, positive weights lighter and negative darker: the sign is what makes a template an
    edge or a stroke detector, and per-row scaling keeps weak units visible."""
    layer = _first_linear(model)
    if layer is None:
        return None
    w = layer.weight.detach().float().cpu()[:n]
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    return (0.5 + 0.5 * w / scale).reshape(len(w), *model.image_shape)


def first_layer_templates(model: nn.Module, path: str | Path, n: int = 64) -> Path | None:
    """The first-layer "templates" of an ``mlp`` encoder (the lecture's picture); None for convolutional ones,
    whose first layer is a set of small kernels, not image-sized rows."""
    templates = _templates(model, n)
    if templates is None:
        return None
    return save_grid(templates, path, nrow=math.ceil(math.sqrt(len(templates))))


def templates_comparison(models_by_label: Mapping[str, nn.Module], path: str | Path, n: int = 64) -> Path:
    """The first-layer templates of several ``mlp`` autoencoders side by side, one titled panel each, e.g.
    {"0% destroyed": ae, "50% destroyed": dae}: Vincent et al.'s argument that corrupting the input turns
    noisy, identity-like templates into stroke and blob detectors. Raises ValueError for a non-mlp model."""
    if not models_by_label:
        raise ValueError("no models to compare")
    panels = []
    for label, model in models_by_label.items():
        templates = _templates(model, n)
        if templates is None:
            raise ValueError(f"model '{label}' has no image-sized first layer (architecture "
                             f"'{getattr(model.config, 'architecture', '?')}'); templates need architecture 'mlp'")
        grid = make_grid(templates, nrow=math.ceil(math.sqrt(len(templates))))
        panels.append((label, grid.permute(1, 2, 0).numpy()))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 4.4), dpi=100, squeeze=False)
    for ax, (label, array) in zip(axes[0], panels):
        if array.shape[2] == 1:
            ax.imshow(array[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(array, interpolation="nearest")
        ax.set_title(label)
        ax.axis("off")
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _to_numpy(values: Any) -> np.ndarray:
    """Tensors on any device (and any dtype: labels stay integers, so the legend reads 3, not 3.0) or arrays."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        return (values.float() if values.dtype in (torch.bfloat16, torch.float16) else values).numpy()
    return np.asarray(values)


def embedding_scatter(codes: Any, colours: Any, path: str | Path, title: str, colour_name: str) -> Path:
    """Codes (N, D) as a 2-D scatter, each point coloured by its label or factor value (N,).

    D = 2 is drawn as is; D > 2 is projected on its first two principal components (numpy SVD: no fitting state
    to keep), the axes saying how much variance each holds; D = 1 puts the code on x and the colour value on y
    (with a little jitter), so each class's spread along the one dimension reads as its own strip.
    Few distinct values (<= 10) get a legend, more get a colour bar.
    """
    z = _to_numpy(codes).astype(np.float64)
    z = z.reshape(len(z), -1)
    c = _to_numpy(colours).reshape(-1)
    if len(c) != len(z):
        raise ValueError(f"{len(z)} codes but {len(c)} colours")
    d = z.shape[1]
    if d == 1:
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(z))
        xy = np.stack([z[:, 0], c.astype(np.float64) + jitter], axis=1)
        labels = ("z1", colour_name)
    elif d == 2:
        xy, labels = z, ("z1", "z2")
    else:
        centred = z - z.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        share = s**2 / max(float((s**2).sum()), 1e-12)
        labels = (f"PC1 ({share[0]:.0%} of variance)", f"PC2 ({share[1]:.0%} of variance)")
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    distinct = np.unique(c)
    if len(distinct) <= 10:
        cmap = plt.get_cmap("tab10")
        for k, value in enumerate(distinct):
            mine = c == value
            ax.scatter(xy[mine, 0], xy[mine, 1], s=6, alpha=0.7, color=cmap(k), label=str(value))
        ax.legend(title=colour_name, fontsize=7, title_fontsize=8, markerscale=2, loc="best")
    else:
        points = ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.7, c=c, cmap="viridis")
        fig.colorbar(points, ax=ax, label=colour_name)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def loss_curves(history: Mapping[str, Sequence[tuple[int, float]]], path: str | Path) -> Path | None:
    """One panel per ``train/*`` curve (loss, recon, kl, tc, ...) against the step; None when there are none.

    Separate panels rather than one axes: the total is often hundreds of nats while TC or KL are a few, and on
    a shared axis the small parts would be flat lines.
    """
    curves = {k: v for k, v in history.items() if k.startswith("train/") and len(v)}
    if not curves:
        return None
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    for ax, (name, points) in zip(axes.flat, curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path)


# --- the end-of-run set -----------------------------------------------------------------------------------
def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "factor"


@torch.no_grad()
def _encode_means(model: nn.Module, data: Any, index: torch.Tensor) -> torch.Tensor:
    device = _device(model)
    out = [model.encode(data.images(index[i : i + ENCODE_BATCH]).to(device).float()).mean.float().cpu()
           for i in range(0, len(index), ENCODE_BATCH)]
    return torch.cat(out)


def _first_varying_factor(data: Any, index: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """(name, values) of the first factor that takes more than one value on ``index`` (dSprites' colour never
    varies, so colouring by it would say nothing)."""
    factors = data.factors(index).cpu()
    names = data.factor_names or [f"factor{k}" for k in range(factors.shape[1])]
    for k in range(factors.shape[1]):
        if len(torch.unique(factors[:, k])) > 1:
            return names[k], factors[:, k]
    return None


def make_run_pictures(model: nn.Module, train_data: Any, val_data: Any, out_dir: Path, seed: int = 0,
                      history: Mapping[str, Sequence[tuple[int, float]]] | None = None) -> dict[str, Path]:
    """Write the pictures that apply to this model and data into ``out_dir``; returns {name: file}.

    Names (file = name + ".png"): ``reconstructions``, ``traversal`` (the sweep summary collects this file
    from every trial), ``samples`` (VAE family), ``manifold`` (latent_dim 2), ``embedding_label`` (data with
    labels) and ``embedding_<factor>`` (data with factors: the first factor that varies), ``templates``
    (architecture mlp) and ``loss_curves`` (a history with train/* curves).

    Validation images are used (training images when there are none): they show what the model does on data
    it did not fit. Everything runs in eval mode without gradients on the model's device, and the images are
    chosen and the noise drawn from ``seed`` only, so the same model gives the same pictures. A picture that
    fails is logged and left out: the run's weights and metrics are already saved and matter more.
    """
    out_dir = Path(out_dir)
    data = val_data if val_data is not None and len(val_data) > 0 else train_data
    device = _device(model)
    was_training = model.training
    model.eval()
    pictures: dict[str, Path | None] = {}

    def attempt(name: str, draw: Callable[[], Path | None]) -> None:
        try:
            pictures[name] = draw()
        except Exception:  # noqa: BLE001 - a picture must not fail a finished run
            logger.warning("could not draw the '%s' picture", name, exc_info=True)

    try:
        with torch.no_grad():
            chooser = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(data), generator=chooser)
            shown = order[:RECONSTRUCTIONS]
            points = order[:EMBEDDING_POINTS]
            codes = _encode_means(model, data, points)
            x = data.images(shown).float()

            noise = torch.Generator(device=device).manual_seed(seed)
            attempt("reconstructions", lambda: reconstructions(model, x, out_dir / "reconstructions.png",
                                                               generator=noise))
            attempt("samples", lambda: prior_samples(model, out_dir / "samples.png", n=64, seed=seed))
            # Deterministic codes have no prior scale: sweep each dimension over where validation codes lie.
            ranges = None
            if not model.stochastic and len(codes) > 1:
                ranges = torch.stack([torch.quantile(codes, 0.01, dim=0), torch.quantile(codes, 0.99, dim=0)], 1)
            attempt("traversal", lambda: latent_traversal(model, x[0], out_dir / "traversal.png", ranges=ranges))
            attempt("manifold", lambda: latent_manifold(model, out_dir / "manifold.png", codes=codes))

            if data.labels is not None:
                labels = data.labels[points.to(data.labels.device)].cpu()
                attempt("embedding_label", lambda: embedding_scatter(
                    codes, labels, out_dir / "embedding_label.png",
                    f"{data.name}: validation codes by label", "label"))
            if data.has_factors:
                factor = _first_varying_factor(data, points)
                if factor is not None:
                    name = f"embedding_{_safe_name(factor[0])}"
                    attempt(name, lambda: embedding_scatter(
                        codes, factor[1], out_dir / f"{name}.png",
                        f"{data.name}: validation codes by {factor[0]}", factor[0]))

            attempt("templates", lambda: first_layer_templates(model, out_dir / "templates.png"))
            if history:
                attempt("loss_curves", lambda: loss_curves(history, out_dir / "loss_curves.png"))
    finally:
        model.train(was_training)
        plt.close("all")
    return {name: path for name, path in pictures.items() if path is not None}
