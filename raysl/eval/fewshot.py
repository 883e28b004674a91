"""Few-shot classification on frozen features: for each number of shots, `draws` seeded
draws of that many labeled train images per class, an sklearn logistic regression on
their (L2-normalised) features, top-1 on the whole val set; mean and std over draws."""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_SHOTS = (1, 5, 10)


def draw(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` images per class (all of a class that has fewer), seeded."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def fewshot(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    val_y: torch.Tensor,
    *,
    shots=DEFAULT_SHOTS,
    draws: int = 5,
    seed: int = 0,
) -> dict:
    from sklearn.linear_model import LogisticRegression

    x, y, vx, vy = train_f.numpy(), train_y.numpy(), val_f.numpy(), val_y.numpy()
    out = {}
    for n in shots:
        runs = []
        for d in range(draws):
            idx = draw(y, n, seed + d)
            if len(np.unique(y[idx])) < 2:  # one class only: every val image gets it
                runs.append(100.0 * float(np.mean(vy == y[idx][0])))
                continue
            clf = LogisticRegression(max_iter=2000, C=10.0).fit(x[idx], y[idx])
            runs.append(100.0 * float(np.mean(clf.predict(vx) == vy)))
        out[f"{n}shot"] = {"mean": float(np.mean(runs)), "std": float(np.std(runs)), "runs": runs}
    return out
