"""Histograms of positive/negative cosine scores (Feature Transformation, Zhu et al. 2021),
from the "hist_pos"/"hist_neg" (and optional "hist_pos_raw"/"hist_neg_raw") tensors that
simclr and mocov2 return every `method.ft_every` steps."""

from __future__ import annotations

import os

import numpy as np


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def plot_score_histograms(pos, neg, step: int, out_png: str, *, pos_raw=None, neg_raw=None) -> str:
    """Write a PNG with the distributions of positive and negative cosine scores at `step`
    (density-normalised, shared bins over [-1, 1]); with `pos_raw`/`neg_raw` (scores
    before the transformation) those are drawn as outlines on top. Returns `out_png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos, neg = _np(pos), _np(neg)
    pos_raw = _np(pos_raw) if pos_raw is not None else None
    neg_raw = _np(neg_raw) if neg_raw is not None else None
    bins = np.linspace(-1.0, 1.0, 81).tolist()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(
        np.clip(neg, -1, 1), bins=bins, density=True, alpha=0.55, color="tab:red", label=f"negatives (n={neg.size})"
    )
    ax.hist(
        np.clip(pos, -1, 1), bins=bins, density=True, alpha=0.55, color="tab:blue", label=f"positives (n={pos.size})"
    )
    if neg_raw is not None:
        ax.hist(
            np.clip(neg_raw, -1, 1),
            bins=bins,
            density=True,
            histtype="step",
            color="darkred",
            label="negatives before FT",
        )
    if pos_raw is not None:
        ax.hist(
            np.clip(pos_raw, -1, 1), bins=bins, density=True, histtype="step", color="navy", label="positives before FT"
        )
    ax.set_xlabel("cosine score")
    ax.set_ylabel("density")
    ax.set_title(f"positive / negative scores, step {step}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def draw_score_histograms(out: dict, step: int, folder: str) -> str | None:
    """`Method.draw` of simclr and mocov2: the step's score histograms, when `out` carries
    them, as `folder/score_histograms/step_NNNNNNN.png`."""
    if "hist_pos" not in out or "hist_neg" not in out:
        return None
    path = os.path.join(folder, "score_histograms", f"step_{step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return plot_score_histograms(
        out["hist_pos"], out["hist_neg"], step, path, pos_raw=out.get("hist_pos_raw"), neg_raw=out.get("hist_neg_raw")
    )
