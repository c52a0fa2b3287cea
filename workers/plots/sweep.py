"""Summary pictures of a sweep, as the beta-VAE / beta-TCVAE papers draw them (PNG files).

- ``metric_vs_beta.png``: the ranking metric against beta, one curve per latent size (mean over seeds);
- ``recon_vs_beta.png``: reconstruction error (``eval/recon``) against beta, one curve per latent size;
- ``mig_vs_beta.png``: MIG against beta, when the data has factors;
- ``traversals.png``: one latent traversal per trial, labelled with the trial's values.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def _curves(rows: list[dict[str, Any]], y: str) -> dict[str, list[tuple[float, float]]]:
    """{curve label: [(beta, mean y)]} over finished trials that report y; one curve per (variant, latent_dim)."""
    groups: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        value = row.get(y)
        if row.get("status") != "finished" or not isinstance(value, (int, float)):
            continue
        label = tuple(x for x in (row.get("variant"), f"z={row['latent_dim']}" if row.get("latent_dim") else None) if x)
        groups[label][float(row.get("beta", 1.0) if row.get("beta") is not None else 1.0)].append(float(value))
    return {
        " ".join(label) or "all trials": sorted((b, sum(v) / len(v)) for b, v in points.items())
        for label, points in sorted(groups.items())
    }


def plot_against_beta(rows: list[dict[str, Any]], y: str, path: Path, title: str) -> Path | None:
    curves = _curves(rows, y)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    betas = sorted({b for pts in curves.values() for b, _ in pts})
    if betas and min(betas) > 0 and max(betas) / min(betas) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("beta")
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def traversal_grid(rows: list[dict[str, Any]], traversal_for: Callable[[dict], Path | None], path: Path) -> Path | None:
    panels = [(row, traversal_for(row)) for row in rows if row.get("status") == "finished"]
    panels = [(row, p) for row, p in panels if p is not None and Path(p).exists()]
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.6 * nrows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (row, picture) in zip(axes.flat, panels):
        ax.imshow(Image.open(picture).convert("RGB"))
        label = ", ".join(f"{k}={row[k]}" for k in ("variant", "beta", "latent_dim", "seed") if row.get(k) is not None)
        ax.set_title(label, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def sweep_summary_pictures(rows: list[dict[str, Any]], metric: str, out_dir: Path,
                           traversal_for: Callable[[dict], Path | None]) -> dict[str, Path]:
    out_dir = Path(out_dir)
    made = {
        "metric_vs_beta": plot_against_beta(rows, metric, out_dir / "metric_vs_beta.png", f"{metric} against beta"),
        "recon_vs_beta": plot_against_beta(rows, "eval/recon", out_dir / "recon_vs_beta.png", "reconstruction error against beta"),
        "mig_vs_beta": plot_against_beta(rows, "eval/mig", out_dir / "mig_vs_beta.png", "MIG against beta"),
        "traversals": traversal_grid(rows, traversal_for, out_dir / "traversals.png"),
    }
    return {k: v for k, v in made.items() if v is not None}
