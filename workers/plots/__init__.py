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
- ``loss_curves``: one panel per distinct logged ``train/*`` quantity, validation points on the same panel;
- ``mutual_information``: data with factors: the latent x factor mutual-information matrix (normalised by each
  factor's entropy), the table behind MIG, where a collapsed model shows as an empty picture.

Grids are drawn here with Pillow (no torchvision: it is not a dependency of the workers), in the layout
torchvision's ``make_grid`` uses, so the pictures look like the papers'. A picture for people
(:func:`save_labelled_grid`) is that grid enlarged with nearest-neighbour sampling until it is at least
``MIN_SIDE`` pixels on its shorter side (a 28 px MNIST digit stays crisp pixels, not a blur), with a title strip
above it and a strip of row labels on its left, drawn with Pillow's default font. Where the grid sits in the
picture is written into the PNG as a text chunk (``GRID_INFO_KEY``), so tools and tests can find each cell.
Plots with axes use matplotlib's Agg backend (no display on Ray workers).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torch import nn

if TYPE_CHECKING:
    from workers.models.base import Autoencoder

logger = logging.getLogger(__name__)

# Mid-grey between cells: visible against black-background data (MNIST, dSprites) and white-background data.
PAD_VALUE = 0.5
# Pillow modes by channel count; 2 and 4 channels (allowed by the npz reader) keep their last channel as alpha.
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
# How many validation images each run picture uses; small, so that pictures take seconds, not minutes.
RECONSTRUCTIONS = 8
EMBEDDING_POINTS = 2000
ENCODE_BATCH = 500
# Pictures for people: small grids are enlarged (by a whole factor) until their shorter side has MIN_SIDE pixels,
# but never past MAX_SIDE on the longer side.
MIN_SIDE = 256
MAX_SIDE = 2400
LABEL_FONT_SIZE = 14
TITLE_FONT_SIZE = 16
MARGIN = 6
# PNG text chunk holding where the grid lies in a labelled picture: {"x", "y", "scale", "padding", "cell": [h, w],
# "rows", "cols"}; cell (row, col) of the unscaled grid starts at x + scale * (padding + col * (w + padding)).
GRID_INFO_KEY = "aeforge-grid"
# How far (in standard deviations) a traversal goes on each side of the mean: the papers' +-2 for a N(0, 1) prior.
TRAVERSAL_SDS = 2.0


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


def save_grid(
    images: torch.Tensor, path: str | Path, nrow: int, padding: int = 2, *, scale: int = 1, pad_value: float = PAD_VALUE
) -> Path:
    """Write images (N, C, H, W) in [0, 1] as one PNG grid with ``nrow`` images per row; returns the path.

    Greyscale for C = 1, RGB for C = 3. ``scale`` enlarges the whole picture by that integer factor with
    nearest-neighbour sampling, so tiny images stay crisp pixels instead of a blur. Parent folders are created.
    """
    if scale < 1:
        raise ValueError(f"scale must be at least 1, not {scale}")
    picture = _to_pil(make_grid(images, nrow, padding, pad_value))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def upscale_factor(width: int, height: int, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE) -> int:
    """The whole factor that brings a width x height picture's shorter side to at least ``min_side`` pixels,
    held back so that its longer side stays within ``max_side``; 1 for pictures already that large."""
    wanted = math.ceil(min_side / max(1, min(width, height)))
    allowed = max(1, max_side // max(1, width, height))
    return max(1, min(wanted, allowed))


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's own font: the same on every machine, nothing to install (it has no Greek: write "beta", "sd").
    return ImageFont.load_default(size)


def _line_height(font) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + 2


def _wrap(text: str, font, width: int) -> list[str]:
    """Lines of ``text`` no wider than ``width`` pixels in ``font``, broken between words (a word longer than
    the width gets a line of its own)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _flatten_alpha(picture: Image.Image) -> Image.Image:
    """Alpha (LA, RGBA grids) composed over white, so the strips and the grid share one opaque mode."""
    if picture.mode not in ("LA", "RGBA"):
        return picture
    white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(white, picture.convert("RGBA"))
    return flat.convert("L" if picture.mode == "LA" else "RGB")


def save_labelled_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int,
    *,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    padding: int = 2,
    min_side: int = MIN_SIDE,
) -> Path:
    """Write images (N, C, H, W) in [0, 1] as a grid a person can read: enlarged by :func:`upscale_factor`
    (nearest neighbour), a title strip above it, and ``row_labels`` (one per grid row) right-aligned in a strip
    on its left, level with their rows, and ``column_labels`` (one per grid column) centred above their columns.
    Black text on white strips; the grid keeps its grey padding.
    The grid's place in the picture is saved in the PNG text chunk ``GRID_INFO_KEY``. Returns the path."""
    n, _, h, w = images.shape if images.dim() == 4 else (0, 0, 0, 0)
    grid = _flatten_alpha(_to_pil(make_grid(images, nrow, padding)))
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for a grid of {rows} rows")
    if column_labels is not None and len(column_labels) != cols:
        raise ValueError(f"{len(column_labels)} column labels for a grid of {cols} columns")
    scale = upscale_factor(grid.width, grid.height, min_side=min_side)
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)

    # Labels no taller than their rows, so that neighbouring labels never overlap.
    label_font = _font(max(8, min(LABEL_FONT_SIZE, (h + padding) * scale - 2)))
    left = 0
    if row_labels:
        left = math.ceil(max(label_font.getlength(label) for label in row_labels)) + 2 * MARGIN
    width = left + grid.width
    title_font = _font(TITLE_FONT_SIZE)
    title_lines = _wrap(title, title_font, width - 2 * MARGIN) if title else []
    top = len(title_lines) * _line_height(title_font) + 2 * MARGIN if title_lines else 0
    title_bottom = top
    if column_labels:
        top += _line_height(label_font) + MARGIN

    white = 255 if grid.mode == "L" else (255, 255, 255)
    black = 0 if grid.mode == "L" else (0, 0, 0)
    picture = Image.new(grid.mode, (width, top + grid.height), white)
    picture.paste(grid, (left, top))
    draw = ImageDraw.Draw(picture)
    for k, line in enumerate(title_lines):
        draw.text((MARGIN, MARGIN + k * _line_height(title_font)), line, font=title_font, fill=black)
    for r, label in enumerate(row_labels or []):
        centre = top + scale * (padding + r * (h + padding) + h / 2)
        draw.text((left - MARGIN, centre), label, font=label_font, fill=black, anchor="rm")
    for c, label in enumerate(column_labels or []):
        centre = left + scale * (padding + c * (w + padding) + w / 2)
        draw.text((centre, (title_bottom + top) / 2), label, font=label_font, fill=black, anchor="mm")

    info = PngInfo()
    info.add_text(
        GRID_INFO_KEY,
        json.dumps(
            {"x": left, "y": top, "scale": scale, "padding": padding, "cell": [h, w], "rows": rows, "cols": cols}
        ),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG", pnginfo=info)
    return path


def describe_model(model: Autoencoder) -> str:
    """A few words naming the model for titles: "dae, mask noise 50% of pixels", "beta_vae, beta 4", "ae"."""
    config = getattr(model, "config", None)
    variant = getattr(model, "variant", "") or getattr(config, "variant", "model")
    if config is None:
        return variant
    if variant == "dae":
        return f"{variant}, {corruption_level(model)}"
    if variant in ("beta_vae", "beta_tcvae"):
        return f"{variant}, beta {config.effective_beta:g}"
    return variant


def corruption_level(model: Autoencoder) -> str:
    """The input corruption a model trained with, in words: "mask noise 50% of pixels", "gaussian noise sd
    0.3", or "no corruption (0% destroyed)" for every model that is not a denoiser."""
    config = getattr(model, "config", None)
    if getattr(model, "variant", None) != "dae" or config is None:
        return "no corruption (0% destroyed)"
    c = config.effective_corruption
    if c.kind == "gaussian":
        return f"gaussian noise sd {c.level:g}"
    return f"{c.kind.replace('_', ' ')} noise {c.level:.0%} of pixels"


def _device(model: Autoencoder) -> torch.device:
    return next(model.parameters()).device


def _blank_like(images: torch.Tensor) -> torch.Tensor:
    """A placeholder cell that reads as padding, for incomplete rows inside a grid."""
    return torch.full_like(images[:1], PAD_VALUE)


# --- what the model does to images ------------------------------------------------------------------------
def traversal_order(scores: torch.Tensor) -> torch.Tensor:
    """Latent indices by score, largest first; equal scores keep index order (a stable sort)."""
    scores = torch.nan_to_num(torch.as_tensor(scores, dtype=torch.float32).cpu(), nan=-math.inf)
    return torch.sort(scores, descending=True, stable=True).indices


@torch.no_grad()
def latent_traversal(
    model: Autoencoder,
    image: torch.Tensor | None,
    path: str | Path,
    limit: float = TRAVERSAL_SDS,
    steps: int = 9,
    *,
    ranges: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
    order_by: tuple[str, torch.Tensor] | None = None,
    title: str | None = None,
) -> Path:
    """One row per latent dimension d: a starting code with z_d set to each of ``steps`` values, decoded.

    The starting code is ``image``'s posterior mean, or ``start`` (D,) when no image is given. The values are
    ``linspace(-limit, limit, steps)``, the convention of the beta-VAE / beta-TCVAE papers and
    disentanglement_lib: for the VAE family the prior N(0, 1) gives every dimension that scale, and a
    dimension that holds a factor shows that factor changing along its row while the rest of the image stays.
    Deterministic autoencoders have no prior, so their codes may live at any scale: ``ranges`` (D, 2) gives
    each dimension its own (low, high) instead, e.g. the encoded data's mean +- 2 standard deviations.

    ``order_by`` = (name, scores (D,)) puts the rows in order of score, largest first, and labels each row with
    it ("z3  KL 2.31"), as the beta-TCVAE paper orders its rows by KL; without it the rows are z1, z2, ... in
    order. Latents are numbered from 1, as on the embedding and manifold axes.
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2, not {steps}")
    if (image is None) == (start is None):
        raise ValueError("give either the image whose code the traversal starts from or the code, not both")
    device = _device(model)
    if image is not None:  # and start is None (checked above)
        z = model.encode(image.reshape(1, *image.shape[-3:]).to(device).float()).mean[0].float()
    else:
        z = torch.as_tensor(start, dtype=torch.float32, device=device).reshape(-1)
    d = z.shape[0]
    if ranges is None:
        values = torch.linspace(-limit, limit, steps, device=device).expand(d, steps)
        spans = None
    else:
        ranges = torch.as_tensor(ranges, dtype=torch.float32, device=device).reshape(d, 2)
        t = torch.linspace(0.0, 1.0, steps, device=device)
        values = ranges[:, :1] + (ranges[:, 1:] - ranges[:, :1]) * t
        spans = ranges.cpu()
    codes = z.expand(d, steps, d).clone()  # codes[row, step] = z with z_row replaced
    rows = torch.arange(d, device=device)
    codes[rows, :, rows] = values
    if order_by is not None:
        score_name, scores = order_by[0], torch.as_tensor(order_by[1], dtype=torch.float32).cpu().reshape(d)
        order = traversal_order(scores)
    else:
        score_name, scores, order = None, None, torch.arange(d)
    decoded = model.decode(codes[order.to(device)].reshape(d * steps, d))
    # The columns' values: the latent's own value (prior sd units), or for per-latent ranges the offset from the
    # range's middle in the same units the range was made with.
    offsets = torch.linspace(-limit, limit, steps).tolist()
    column_labels = [signed(v) if spans is None else f"{signed(v)} sd" for v in offsets]

    labels = []
    for k in order.tolist():
        label = f"z{k + 1}"
        if scores is not None:
            label += f"  {score_name} {float(scores[k]):.2f}"
        if spans is not None:
            label += f"  [{float(spans[k, 0]):.2g}, {float(spans[k, 1]):.2g}]"
        labels.append(label)
    if title is None:
        sweep = f"from -{limit:g} to +{limit:g}" if spans is None else "over its own range [low, high]"
        title = f"latent traversal: each row varies one latent {sweep}, left to right"
        if score_name is not None:
            title += f"; rows by {score_name}, largest first"
    return save_labelled_grid(
        decoded.float().cpu(), path, nrow=steps, title=title, row_labels=labels, column_labels=column_labels
    )


def signed(value: float) -> str:
    """``-2``, ``-0.5``, ``0``, ``+1.5``: a traversal value as a column label (never ``-0``)."""
    value = round(float(value), 2)
    if value == 0:
        return "0"
    return f"{value:+g}"


@torch.no_grad()
def reconstructions(
    model: Autoencoder,
    images: torch.Tensor,
    path: str | Path,
    per_row: int = 8,
    generator: torch.Generator | None = None,
    title: str | None = None,
) -> Path:
    """Inputs with their reconstructions below them, in blocks of ``per_row`` columns, each row labelled.

    Each block is the row of inputs x, then (denoising autoencoders, which have ``corrupt``) the corrupted
    inputs x~ the model would train on, then the reconstructions: g(f(x)) from the posterior mean, or
    g(f(x~)) for a denoiser, since removing the corruption is what it learned. ``generator`` (on the model's
    device) fixes the corruption's randomness, so the picture is the same on every call with the same seed.
    """
    device = _device(model)
    x = images.to(device).float()
    shown = [x]
    names = ["input x"]
    if hasattr(model, "corrupt"):
        x_in = _corrupt(model, x, generator)
        shown.append(x_in)
        names += ["corrupted x~", "reconstruction g(f(x~))"]
    else:
        x_in = x
        names += ["reconstruction g(f(x))"]
    shown.append(model.decode(model.encode(x_in).mean).float())
    shown = [s.cpu() for s in shown]
    cells = []
    labels = []
    for start in range(0, len(x), per_row):
        for name, row in zip(names, shown):
            block = row[start : start + per_row]
            missing = min(per_row, len(x)) - len(block)
            cells += [block, *([_blank_like(block)] * missing)]
            labels.append(name)
    if title is None:
        title = f"reconstructions ({describe_model(model)})"
        if hasattr(model, "corrupt"):
            title += f": the input corrupted with {corruption_level(model)}, then denoised"
    return save_labelled_grid(torch.cat(cells), path, nrow=min(per_row, len(x)), title=title, row_labels=labels)


def _corrupt(model: Any, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The model's own corruption of x (a model with ``corrupt(x[, generator])``: a dae), drawn from ``generator`` where the model takes one, else from a forked
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
def prior_samples(
    model: Autoencoder, path: str | Path, n: int = 64, seed: int = 0, title: str | None = None, nrow: int | None = None
) -> Path | None:
    """A square-ish grid (or ``nrow`` per row) of n decodings of z ~ N(0, I) drawn with ``seed``; None for
    deterministic autoencoders, which have no prior (their decoder fed N(0, I) draws shows nothing meaningful)."""
    if not model.stochastic:
        return None
    device = _device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    images = model.sample(n, generator=generator)
    if title is None:
        title = f"samples ({describe_model(model)}): decodings of z ~ N(0, I), seed {seed}"
    return save_labelled_grid(images.float().cpu(), path, nrow=nrow or math.ceil(math.sqrt(n)), title=title)


@torch.no_grad()
def latent_manifold(
    model: Autoencoder, path: str | Path, n: int = 15, codes: torch.Tensor | None = None, title: str | None = None
) -> Path | None:
    """For a 2-D latent space, an n x n grid of decoded codes; None for other latent sizes.

    VAE family: as Kingma & Welling (2014, fig. 4), the grid is mapped through the inverse CDF of N(0, 1)
    (quantiles 0.05 ... 0.95), so equal areas of the picture hold equal prior mass. Deterministic autoencoders
    have no prior, so the grid spans where the encoded ``codes`` (N, 2) lie (their 1st to 99th percentile,
    so that one outlier does not leave the picture mostly empty); they must be given.
    z1 grows to the right and z2 upwards, as on a plot; each row is labelled with its z2.
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
    if title is None:
        title = (
            f"latent manifold ({describe_model(model)}): z1 from {float(z1[0]):.2g} (left) "
            f"to {float(z1[-1]):.2g} (right), z2 labelled per row"
        )
    labels = [f"z2 {float(v):.2g}" for v in z2]
    return save_labelled_grid(images.float().cpu(), path, nrow=n, title=title, row_labels=labels)


# --- what the model learned -------------------------------------------------------------------------------
def _first_linear(model: Autoencoder) -> nn.Linear | None:
    """The encoder's first fully connected layer when it reads the pixels directly (architecture mlp)."""
    if getattr(getattr(model, "config", None), "architecture", None) != "mlp":
        return None
    layer = next((m for m in model.encoder.modules() if isinstance(m, nn.Linear)), None)
    if layer is None or layer.weight.shape[1] != math.prod(model.image_shape):
        return None
    return layer


def _templates(model: Autoencoder, n: int) -> torch.Tensor | None:
    """The first n weight rows as (n, C, H, W) images in [0, 1], each scaled by its own largest |weight| so
    that 0 is mid-grey, positive weights lighter and negative darker: the sign is what makes a template an
    edge or a stroke detector, and per-row scaling keeps weak units visible."""
    layer = _first_linear(model)
    if layer is None:
        return None
    w = layer.weight.detach().float().cpu()[:n]
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    return (0.5 + 0.5 * w / scale).reshape(len(w), *model.image_shape)


def first_layer_templates(model: Autoencoder, path: str | Path, n: int = 64, title: str | None = None) -> Path | None:
    """The first-layer "templates" of an ``mlp`` encoder (the lecture's picture), titled with the corruption
    the model was trained with (Vincent et al. compare 0% and 50% destroyed); None for convolutional encoders,
    whose first layer is a set of small kernels, not image-sized rows."""
    templates = _templates(model, n)
    if templates is None:
        return None
    if title is None:
        title = (
            f"first-layer templates ({getattr(model, 'variant', '') or 'model'}, trained with "
            f"{corruption_level(model)}): weight rows, mid-grey 0, light positive, dark negative"
        )
    return save_labelled_grid(templates, path, nrow=math.ceil(math.sqrt(len(templates))), title=title)


def templates_comparison(models_by_label: Mapping[str, Autoencoder], path: str | Path, n: int = 64) -> Path:
    """The first-layer templates of several ``mlp`` autoencoders side by side, one titled panel each, e.g.
    {"0% destroyed": ae, "50% destroyed": dae}: Vincent et al.'s argument that corrupting the input turns
    noisy, identity-like templates into stroke and blob detectors. Raises ValueError for a non-mlp model."""
    if not models_by_label:
        raise ValueError("no models to compare")
    panels = []
    for label, model in models_by_label.items():
        templates = _templates(model, n)
        if templates is None:
            raise ValueError(
                f"model '{label}' has no image-sized first layer (architecture "
                f"'{getattr(model.config, 'architecture', '?')}'); templates need architecture 'mlp'"
            )
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


def mutual_info_picture(
    codes: Any, factors: Any, factor_names: Sequence[str], path: str | Path, title: str, num_bins: int = 20
) -> Path:
    """The latent x factor mutual-information matrix as an annotated heat map: cell (j, k) is I(z_j; v_k) / H(v_k),
    the share of factor k's information that latent j holds (binned posterior means, as disentanglement_lib's MIG
    bins them), latents in rows, factors in columns. A disentangled model has one bright cell per column, each in
    a different row; a collapsed one is dark everywhere. Factors that do not vary in the sample are left out."""
    from workers.metrics.mig import mutual_info_matrix  # sklearn: only where this picture is drawn

    mutual_info, entropy = mutual_info_matrix(_to_numpy(codes), _to_numpy(factors), num_bins)
    kept = np.flatnonzero(entropy > 0)
    if len(kept) == 0:
        raise ValueError("every factor takes a single value in the sample: there is no information to show")
    share = mutual_info[:, kept] / entropy[kept]
    names = [str(factor_names[int(k)]) for k in kept]
    rows, cols = share.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * cols, 1.2 + 0.45 * rows), dpi=100)
    image = ax.imshow(share, cmap="viridis", vmin=0.0, vmax=max(1e-6, float(share.max()), 0.5), aspect="auto")
    for j in range(rows):
        for k in range(cols):
            value = share[j, k]
            ax.text(
                k, j, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.3 else "black"
            )
    ax.set_xticks(range(cols), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(rows), [f"z{j + 1}" for j in range(rows)], fontsize=8)
    ax.set_xlabel("ground-truth factor")
    ax.set_ylabel("latent")
    fig.colorbar(image, ax=ax, label="I(z_j; v_k) / H(v_k)")
    ax.set_title(title, fontsize=9, wrap=True)
    fig.tight_layout()
    return _save_figure(fig, path)


# What each logged loss part is, for panel titles.
LOSS_PARTS = {
    "loss": "objective (total loss)",
    "recon": "reconstruction error",
    "kl": "KL(q(z|x) || p(z))",
    "mi": "index-code mutual information",
    "tc": "total correlation",
    "dwkl": "dimension-wise KL",
}


def _same_curve(a: Sequence[tuple[int, float]], b: Sequence[tuple[int, float]]) -> bool:
    if len(a) != len(b):
        return False
    steps_a, values_a = zip(*a)
    steps_b, values_b = zip(*b)
    return steps_a == steps_b and bool(np.allclose(values_a, values_b, rtol=1e-6, atol=1e-9, equal_nan=True))


def loss_panels(history: Mapping[str, Sequence[tuple[int, float]]]) -> list[list[str]]:
    """The ``train/*`` curves grouped into panels: curves with the same points share one panel (a plain or
    denoising autoencoder's objective *is* its reconstruction error, so ``train/loss`` and ``train/recon`` are
    the same numbers and would be two identical panels), every distinct quantity gets its own."""
    panels: list[list[str]] = []
    for name, points in history.items():
        if not name.startswith("train/") or not len(points):
            continue
        twin = next((panel for panel in panels if _same_curve(history[panel[0]], points)), None)
        if twin is None:
            panels.append([name])
        else:
            twin.append(name)
    return panels


def loss_curves(
    history: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, title: str | None = None
) -> Path | None:
    """One panel per distinct ``train/*`` quantity (loss, recon, kl, tc, ...) against the step; None when there
    are none. Identical curves share a panel titled with both names ("loss = recon", see :func:`loss_panels`).
    A validation curve ``eval/<part>`` in the history is drawn on its training part's panel as markers.

    Separate panels rather than one axes: the total is often hundreds of nats while TC or KL are a few, and on
    a shared axis the small parts would be flat lines.
    """
    panels = loss_panels(history)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.4 * cols, 3.4 * rows + (0.4 if title else 0.0)), dpi=100, squeeze=False
    )
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, names in zip(axes.flat, panels):
        parts = [name.split("/", 1)[1] for name in names]
        points = history[names[0]]
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None, label="training (mean per log window)")
        validation = [f"eval/{part}" for part in parts if len(history.get(f"eval/{part}", ()))]
        for name in validation[:1]:
            v_steps, v_values = zip(*history[name])
            ax.plot(v_steps, v_values, "o", color="tab:orange", label=f"validation ({name})")
        if validation:
            ax.legend(fontsize=7)
        meanings = " = ".join(LOSS_PARTS.get(part, part) for part in parts)
        ax.set_title(" = ".join(parts) + f": {meanings}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(" = ".join(names) + " (per image)", fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


# --- the end-of-run set -----------------------------------------------------------------------------------
def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "factor"


@torch.no_grad()
def _encode(model: Autoencoder, data: Any, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The codes (posterior means) of ``data`` rows ``index``, (N, D), and for the VAE family the mean KL of
    each latent dimension to the prior over those rows, (D,); None for deterministic codes."""
    device = _device(model)
    means, kl_sum = [], None
    for i in range(0, len(index), ENCODE_BATCH):
        posterior = model.encode(data.images(index[i : i + ENCODE_BATCH]).to(device).float())
        means.append(posterior.mean.float().cpu())
        kl = posterior.kl_per_dimension()
        if kl is not None:
            kl_sum = kl.sum(0).cpu() if kl_sum is None else kl_sum + kl.sum(0).cpu()
    return torch.cat(means), None if kl_sum is None else kl_sum / len(index)


def traversal_settings(
    model: Autoencoder, codes: torch.Tensor, kl: torch.Tensor | None, sds: float = TRAVERSAL_SDS
) -> dict[str, Any]:
    """How to traverse ``model`` given its data's ``codes`` (N, D) and per-latent ``kl`` (D,): keyword arguments
    for :func:`latent_traversal`. VAE family: the prior's -2..+2, rows by KL. Deterministic autoencoders: each
    latent over the codes' mean +- ``sds`` standard deviations, rows by standard deviation (a latent the data
    does not move has nothing to show)."""
    if model.stochastic and kl is not None:
        return {"limit": sds, "order_by": ("KL", kl)}
    mean = codes.mean(0)
    std = codes.std(0, unbiased=False)
    return {"ranges": torch.stack([mean - sds * std, mean + sds * std], dim=1), "order_by": ("sd", std)}


def _first_varying_factor(data: Any, index: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """(name, values) of the first factor that takes more than one value on ``index`` (dSprites' colour never
    varies, so colouring by it would say nothing)."""
    factors = data.factors(index).cpu()
    names = data.factor_names or [f"factor{k}" for k in range(factors.shape[1])]
    for k in range(factors.shape[1]):
        if len(torch.unique(factors[:, k])) > 1:
            return names[k], factors[:, k]
    return None


def make_run_pictures(
    model: Autoencoder,
    train_data: Any,
    val_data: Any,
    out_dir: Path,
    seed: int = 0,
    history: Mapping[str, Sequence[tuple[int, float]]] | None = None,
) -> dict[str, Path]:
    """Write the pictures that apply to this model and data into ``out_dir``; returns {name: file}.

    Names (file = name + ".png"): ``reconstructions``, ``traversal`` (the sweep summary collects this file
    from every trial), ``samples`` (VAE family), ``manifold`` (latent_dim 2), ``embedding_label`` (data with
    labels) and ``embedding_<factor>`` and ``mutual_information`` (data with factors; the embedding is coloured by
    the first factor that varies), ``templates``
    (architecture mlp) and ``loss_curves`` (a history with train/* curves). Grids are enlarged to at least
    ``MIN_SIDE`` pixels a side, titled with the model and data, and their rows labelled; the traversal's rows
    go by KL (VAE family) or by the codes' spread (autoencoders, swept over their mean +- 2 sd).

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
        except Exception:
            logger.warning("could not draw the '%s' picture", name, exc_info=True)

    try:
        with torch.no_grad():
            chooser = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(data), generator=chooser)
            shown = order[:RECONSTRUCTIONS]
            points = order[:EMBEDDING_POINTS]
            codes, kl = _encode(model, data, points)
            x = data.images(shown).float()
            about = f"{describe_model(model)}, data {data.name}"

            noise = torch.Generator(device=device).manual_seed(seed)
            attempt(
                "reconstructions",
                lambda: reconstructions(
                    model,
                    x,
                    out_dir / "reconstructions.png",
                    generator=noise,
                    title=f"reconstructions of validation images ({about})",
                ),
            )
            attempt(
                "samples",
                lambda: prior_samples(
                    model,
                    out_dir / "samples.png",
                    n=64,
                    seed=seed,
                    title=f"samples ({about}): decodings of z ~ N(0, I)",
                ),
            )
            # Rows by KL (VAE family) or by spread; deterministic codes have no prior scale, so each latent is
            # swept over where the validation codes lie.
            settings = traversal_settings(model, codes, kl)
            what = (
                "from -2 to +2 (the prior's sd)"
                if "ranges" not in settings
                else "over the validation codes' mean +- 2 sd [range shown]"
            )
            attempt(
                "traversal",
                lambda: latent_traversal(
                    model,
                    x[0],
                    out_dir / "traversal.png",
                    **settings,
                    title=f"latent traversal ({about}): each row varies one latent {what}, the others stay at one "
                    f"image's code; rows by {settings['order_by'][0]}, largest first",
                ),
            )
            attempt("manifold", lambda: latent_manifold(model, out_dir / "manifold.png", codes=codes))

            if data.labels is not None:
                labels = data.labels[points.to(data.labels.device)].cpu()
                attempt(
                    "embedding_label",
                    lambda: embedding_scatter(
                        codes,
                        labels,
                        out_dir / "embedding_label.png",
                        f"{data.name}: validation codes by label",
                        "label",
                    ),
                )
            if data.has_factors:
                values = data.factors(points).cpu()
                attempt(
                    "mutual_information",
                    lambda: mutual_info_picture(
                        codes,
                        values,
                        data.factor_names or [f"factor{k}" for k in range(values.shape[1])],
                        out_dir / "mutual_information.png",
                        f"latent x factor mutual information ({about}), {len(points)} validation images",
                    ),
                )
                factor = _first_varying_factor(data, points)
                if factor is not None:
                    name = f"embedding_{_safe_name(factor[0])}"
                    attempt(
                        name,
                        lambda: embedding_scatter(
                            codes,
                            factor[1],
                            out_dir / f"{name}.png",
                            f"{data.name}: validation codes by {factor[0]}",
                            factor[0],
                        ),
                    )

            attempt("templates", lambda: first_layer_templates(model, out_dir / "templates.png"))
            if history:
                attempt(
                    "loss_curves",
                    lambda: loss_curves(history, out_dir / "loss_curves.png", title=f"training curves ({about})"),
                )
    finally:
        model.train(was_training)
        plt.close("all")
    return {name: path for name, path in pictures.items() if path is not None}
