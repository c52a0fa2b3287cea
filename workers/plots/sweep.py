"""Summary pictures of a sweep, as the beta-VAE / beta-TCVAE papers draw them (PNG files).

One picture per distinct quantity, named after it (``eval/mig`` -> ``mig``):

- ``<quantity>_vs_beta.png``: the quantity against beta, one curve per (variant, latent size), mean over seeds
  with a band from the lowest to the highest seed and each seed a dot, for the ranking metric, the
  reconstruction error ``eval/recon`` and, when the data has factors, ``eval/mig`` and ``eval/mig_chen`` (a
  ranking metric that is one of these is drawn once, not twice): with ``eval/mig_chen``, Chen et al. 2018's
  Figure "MIG against beta" for beta-VAE and beta-TCVAE;
- ``<mig>_vs_elbo.png``: MIG (the ranking metric when it is a MIG, else ``eval/mig_chen``, else ``eval/mig``)
  against the ELBO, one point per model coloured by variant: Chen et al.'s "MIG against ELBO" picture;
- ``<metric>_heatmap.png``: the ranking metric over beta x latent size, one annotated cell per pair (mean over
  seeds), a colour bar, the best cell framed; one panel per variant;
- ``recon_vs_mig.png``: reconstruction error against MIG, one labelled point per trial: the trade-off between
  reconstruction and disentanglement that beta buys (Higgins et al. 2017, Chen et al. 2018);
- ``traversals.png``: one latent traversal per trial, titled with the trial's values and its ranking metric.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw

from workers.plots import MARGIN, TITLE_FONT_SIZE, _font, _line_height

RECON = "eval/recon"
MIG = "eval/mig"
MIG_CHEN = "eval/mig_chen"
ELBO = "eval/elbo"
# What the quantities are, for axis labels.
MEANINGS = {
    RECON: "reconstruction error (lower is better)",
    MIG: "MIG (higher is more disentangled)",
    MIG_CHEN: "MIG, Chen et al.'s convention",
    "eval/elbo": "ELBO (higher is better)",
    "eval/sap": "SAP score",
    "eval/iwae_ll": "IWAE log-likelihood",
}


def short_name(quantity: str) -> str:
    """The file-name form of a metric: ``eval/mig`` -> ``mig``, ``eval/dci_disentanglement`` -> ``dci_disentanglement``."""
    name = quantity.split("/", 1)[1] if quantity.startswith("eval/") else quantity
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def _label(quantity: str) -> str:
    return f"{quantity}: {MEANINGS[quantity]}" if quantity in MEANINGS else quantity


def _beta(row: dict[str, Any]) -> float:
    # Variants without beta (vae, ae, dae) weigh their KL, if any, by 1.
    return float(row["beta"]) if row.get("beta") is not None else 1.0


def _finished_with(rows: list[dict[str, Any]], *quantities: str) -> list[dict[str, Any]]:
    def numeric(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    return [r for r in rows if r.get("status") == "finished" and all(numeric(r.get(q)) for q in quantities)]


def _curves(rows: list[dict[str, Any]], y: str) -> dict[str, list[tuple[float, list[float]]]]:
    """{curve label: [(beta, [y of each seed])]} over finished trials that report y; one curve per (variant,
    latent_dim)."""
    groups: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in _finished_with(rows, y):
        label = tuple(x for x in (row.get("variant"), f"z={row['latent_dim']}" if row.get("latent_dim") else None) if x)
        groups[label][_beta(row)].append(float(row[y]))
    return {" ".join(label) or "all trials": sorted(points.items()) for label, points in sorted(groups.items())}


def _log_beta_axis(ax, betas: list[float]) -> None:
    if betas and min(betas) > 0 and max(betas) / min(betas) >= 8:
        ax.set_xscale("log", base=2)
        ax.set_xticks(betas, [f"{b:g}" for b in betas])  # the swept values, not powers of two
        ax.minorticks_off()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_against_beta(rows: list[dict[str, Any]], y: str, path: Path, title: str) -> Path | None:
    """``y`` against beta, one curve per (variant, latent size): the mean over seeds, a band from the lowest to the
    highest seed and each seed a dot where there are several; None when no trial reports y."""
    curves = _curves(rows, y)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    several_seeds = False
    for label, points in curves.items():
        xs = [b for b, _ in points]
        (line,) = ax.plot(xs, [float(np.mean(v)) for _, v in points], marker="o", label=label)
        if any(len(v) > 1 for _, v in points):
            several_seeds = True
            ax.fill_between(
                xs,
                [min(v) for _, v in points],
                [max(v) for _, v in points],
                color=line.get_color(),
                alpha=0.15,
                linewidth=0,
            )
            seeds = [(b, value) for b, v in points for value in v]
            ax.scatter([b for b, _ in seeds], [value for _, value in seeds], s=9, color=line.get_color(), alpha=0.6)
    _log_beta_axis(ax, sorted({b for pts in curves.values() for b, _ in pts}))
    ax.set_xlabel("beta")
    ax.set_ylabel(_label(y), fontsize=9)
    ax.set_title(
        title + (": mean, band from lowest to highest seed, dots the seeds" if several_seeds else ""), fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="variant, latent size", title_fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def mig_against_elbo(rows: list[dict[str, Any]], mig: str, path: Path) -> Path | None:
    """``mig`` against the ELBO, one point per finished model, coloured by variant and labelled with its beta: the
    reconstruction cost of disentanglement (Chen et al. 2018). None when no trial reports both."""
    trials = _finished_with(rows, ELBO, mig)
    if not trials:
        return None
    fig, ax = plt.subplots(figsize=(6.8, 4.8), dpi=100)
    variants = sorted({str(r.get("variant") or "") for r in trials})
    # tab10 is a ListedColormap, whose colours are listed; get_cmap's annotation says only Colormap.
    for colour, variant in zip(plt.get_cmap("tab10").colors, variants):  # type: ignore[attr-defined]
        mine = [r for r in trials if str(r.get("variant") or "") == variant]
        ax.scatter(
            [r[ELBO] for r in mine],
            [r[mig] for r in mine],
            s=30,
            color=colour,
            edgecolors="black",
            linewidths=0.4,
            label=variant or "all trials",
            zorder=3,
        )
        for r in mine:
            ax.annotate(
                f"b={_beta(r):g}",
                (r[ELBO], r[mig]),
                textcoords="offset points",
                xytext=(4, 2),
                fontsize=6,
                color=colour,
            )
    ax.set_xlabel(_label(ELBO), fontsize=9)
    ax.set_ylabel(_label(mig), fontsize=9)
    ax.set_title(f"{mig} against the ELBO, one point per model ({len(trials)})", fontsize=10)
    ax.legend(fontsize=8, title="variant", title_fontsize=8)
    ax.margins(x=0.12, y=0.08)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def heatmap_table(
    rows: list[dict[str, Any]], metric: str, variant: str | None = None
) -> tuple[list[float], list[int], np.ndarray]:
    """(betas, latent sizes, means): ``means[i, j]`` is the mean over seeds of ``metric`` for latent size
    ``latents[i]`` and beta ``betas[j]`` (NaN where no finished trial has that pair), over the finished trials
    (of ``variant``, when given). Both axes sorted ascending."""
    cells: dict[tuple[int, float], list[float]] = defaultdict(list)
    for row in _finished_with(rows, metric):
        if variant is not None and row.get("variant") != variant:
            continue
        cells[(int(row.get("latent_dim") or 0), _beta(row))].append(float(row[metric]))
    betas = sorted({b for _, b in cells})
    latents = sorted({z for z, _ in cells})
    means = np.full((len(latents), len(betas)), np.nan)
    for (z, b), values in cells.items():
        means[latents.index(z), betas.index(b)] = sum(values) / len(values)
    return betas, latents, means


def metric_heatmap(rows: list[dict[str, Any]], metric: str, path: Path, mode: str | None = None) -> Path | None:
    """The ranking metric over beta (columns) x latent size (rows), each cell annotated with its mean over seeds,
    a colour bar per panel, one panel per variant, and (given ``mode``, "max" or "min") the best cell framed.
    None when no finished trial reports the metric."""
    variants = sorted({str(r.get("variant")) for r in _finished_with(rows, metric)})
    if not variants:
        return None
    tables = [(v, *heatmap_table(rows, metric, None if v == "None" else v)) for v in variants]
    widths = [max(3.2, 1.0 + 0.9 * len(betas)) for _, betas, _, _ in tables]
    height = max(3.0, 1.4 + 0.6 * max(len(latents) for _, _, latents, _ in tables))
    fig, axes = plt.subplots(1, len(tables), figsize=(sum(widths) + 1.2 * len(tables), height), dpi=100, squeeze=False)
    for ax, (variant, betas, latents, means) in zip(axes[0], tables):
        image = ax.imshow(
            np.ma.masked_invalid(means),
            cmap=plt.get_cmap("viridis").with_extremes(bad="lightgrey"),
            aspect="auto",
            origin="lower",
        )
        fig.colorbar(image, ax=ax, label=metric)
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(latents)), [str(z) for z in latents])
        ax.set_xlabel("beta")
        ax.set_ylabel("latent size")
        finite = means[np.isfinite(means)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(len(latents)):
            for j in range(len(betas)):
                value = means[i, j]
                text = "-" if not np.isfinite(value) else f"{value:.3g}"
                # Dark text on the light (high) end of viridis, light text on the dark end.
                colour = "black" if np.isfinite(value) and value > middle else "white"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
        if mode in ("max", "min") and finite.size:
            best = np.nanargmax(means) if mode == "max" else np.nanargmin(means)
            best_i, best_j = np.unravel_index(best, means.shape)
            ax.add_patch(Rectangle((best_j - 0.5, best_i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        name = "" if variant == "None" else f"{variant}: "
        ax.set_title(f"{name}{metric}, mean over seeds" + (f" (best framed, {mode})" if mode else ""), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def recon_vs_mig(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Reconstruction error against MIG: one labelled point ("b=4 z=10") per (variant, beta, latent size), the
    mean over its seeds, coloured by beta, with each trial as a small faint dot behind it when there are several
    seeds; None when no trial reports both."""
    trials = _finished_with(rows, RECON, MIG)
    if not trials:
        return None
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in trials:
        groups[(str(row.get("variant") or ""), _beta(row), int(row.get("latent_dim") or 0))].append(row)
    keys = sorted(groups)
    mig = np.array([np.mean([r[MIG] for r in groups[k]]) for k in keys])
    recon = np.array([np.mean([r[RECON] for r in groups[k]]) for k in keys])
    betas = np.array([k[1] for k in keys])
    logged = bool(betas.min() > 0)
    fig, ax = plt.subplots(figsize=(6.8, 4.8), dpi=100)
    if len(trials) > len(keys):
        ax.scatter(
            [r[MIG] for r in trials],
            [r[RECON] for r in trials],
            s=10,
            color="grey",
            alpha=0.4,
            label="single trials (seeds)",
        )
        ax.legend(fontsize=7, loc="best")
    dots = ax.scatter(
        mig,
        recon,
        c=np.log2(betas) if logged else betas,
        cmap="plasma",
        s=50,
        edgecolors="black",
        linewidths=0.5,
        zorder=3,
    )
    fig.colorbar(dots, ax=ax, label="log2 beta" if logged else "beta")
    several_variants = len({k[0] for k in keys}) > 1
    for (variant, beta, latent), x, y in zip(keys, mig, recon):
        label = f"b={beta:g}" + (f" z={latent}" if latent else "")
        if several_variants:
            label = f"{variant} {label}"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_xlabel(_label(MIG), fontsize=9)
    ax.set_ylabel(_label(RECON), fontsize=9)
    title = "reconstruction against disentanglement"
    ax.set_title(title + (", mean over seeds" if len(trials) > len(keys) else ", one point per trial"), fontsize=10)
    ax.margins(x=0.15, y=0.08)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def traversal_grid(
    rows: list[dict[str, Any]],
    traversal_for: Callable[[dict], Path | None],
    path: Path,
    metric: str | None = None,
    columns: int = 3,
) -> Path | None:
    """Every finished trial's traversal picture at its own resolution (no resampling, so its labels stay
    legible), ``columns`` to a row, each under a caption with the trial's values and ranking metric."""
    found = [(row, traversal_for(row)) for row in rows if row.get("status") == "finished"]
    panels = [(row, Image.open(p).convert("RGB")) for row, p in found if p is not None and Path(p).exists()]
    if not panels:
        return None
    font = _font(TITLE_FONT_SIZE)
    caption = _line_height(font) + 2 * MARGIN
    cell_w = max(image.width for _, image in panels) + 2 * MARGIN
    cell_h = max(image.height for _, image in panels) + caption + MARGIN
    cols = min(columns, len(panels))
    nrows = math.ceil(len(panels) / cols)
    sheet = Image.new("RGB", (cols * cell_w, nrows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (row, image) in enumerate(panels):
        y, x = divmod(k, cols)
        x, y = x * cell_w + MARGIN, y * cell_h
        label = ", ".join(
            f"{key}={row[key]}" for key in ("variant", "beta", "latent_dim", "seed") if row.get(key) is not None
        )
        if metric and isinstance(row.get(metric), (int, float)):
            label += f"   {metric} {row[metric]:.3g}"
        draw.text((x, y + MARGIN), label, font=font, fill=(0, 0, 160))
        sheet.paste(image, (x, y + caption))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def sweep_summary_pictures(
    rows: list[dict[str, Any]],
    metric: str,
    out_dir: Path,
    traversal_for: Callable[[dict], Path | None] | None = None,
    mode: str | None = None,
) -> dict[str, Path]:
    """Write the summary pictures of a sweep's result ``rows`` into ``out_dir``; returns {name: file}, name =
    file name without ``.png``. ``metric`` is the ranking metric (``mode`` "max" or "min" frames its best cell);
    ``traversal_for(row)`` fetches a trial's traversal picture (None when it has none; no ``traversal_for``, no
    traversals picture)."""
    out_dir = Path(out_dir)
    made: dict[str, Path | None] = {}
    # One picture per distinct quantity: a ranking metric that is eval/recon or a MIG is drawn once.
    for quantity in dict.fromkeys([metric, RECON, MIG, MIG_CHEN]):
        name = f"{short_name(quantity)}_vs_beta"
        made[name] = plot_against_beta(rows, quantity, out_dir / f"{name}.png", f"{quantity} against beta")
    mig = (
        metric
        if metric in (MIG, MIG_CHEN, "eval/mig_exact")
        else next((m for m in (MIG_CHEN, MIG) if _finished_with(rows, m)), MIG)
    )
    made[f"{short_name(mig)}_vs_elbo"] = mig_against_elbo(rows, mig, out_dir / f"{short_name(mig)}_vs_elbo.png")
    heatmap = f"{short_name(metric)}_heatmap"
    made[heatmap] = metric_heatmap(rows, metric, out_dir / f"{heatmap}.png", mode)
    made["recon_vs_mig"] = recon_vs_mig(rows, out_dir / "recon_vs_mig.png")
    if traversal_for is not None:
        made["traversals"] = traversal_grid(rows, traversal_for, out_dir / "traversals.png", metric)
    return {k: v for k, v in made.items() if v is not None}
