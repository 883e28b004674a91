"""Drop training images whose nearest neighbour in the evaluation sets is too similar:
an exact inner-product search (faiss IndexFlatIP on unit rows = cosine) of every training
embedding against all evaluation embeddings."""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.985  # the dedup default: a training image this close to an eval image is a copy of it


def nearest(train: np.ndarray, evals: np.ndarray, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(cosine similarity, row in `evals`) of each training row's nearest evaluation row."""
    import faiss

    index = faiss.IndexFlatIP(evals.shape[1])
    index.add(np.ascontiguousarray(evals, dtype=np.float32))
    sims, ids = [], []
    for lo in range(0, len(train), batch):
        s, i = index.search(np.ascontiguousarray(train[lo : lo + batch], dtype=np.float32), 1)
        sims.append(s[:, 0])
        ids.append(i[:, 0])
    return np.concatenate(sims), np.concatenate(ids)


def decontaminate_part(
    emb_uri: str, model: str, prior_uri: str | None, shard: int, evals: np.ndarray, threshold: float, out: str
) -> dict:
    """One part's lineage: its candidates whose nearest eval image is above `threshold` dropped."""
    from raysl.curate import selection
    from raysl.curate.assign import candidate_vectors

    rows, x, cols, _ = candidate_vectors(emb_uri, model, prior_uri)
    if len(rows):
        sims, _ = nearest(x, evals)
        hit = sims > threshold
        cols["similarity"][rows[hit]] = sims[hit]
        selection.drop(cols, rows[hit], "contaminated")
    return selection.finish(cols, out, shard)
