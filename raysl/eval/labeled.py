"""A small labeled shard set for evaluation, read whole: eval-resized uint8 images and
their labels. `check_labeled` reads only the label column, so a wrong set is refused
before any Ray work starts."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from raysl.data.decode import DecodeError
from raysl.data.schema import filesystem_and_path, read_shard, shard_files
from raysl.data.view_plans import view_spec
from raysl.data.views import make_views
from raysl.errors import UserError


def _columns(directory: str, what: str, columns: list[str]) -> list:
    """The given columns of the set's rows, one table per shard (a selection: only the rows it
    keeps), refusing a set without labels."""
    tables = []
    for path, mask in shard_files(directory):
        fs, local = filesystem_and_path(path)
        names = pq.read_schema(local, filesystem=fs).names
        if "label" not in names:
            raise UserError(
                f"{what} {directory}: shard {path} has no 'label' column; evaluation needs a labeled "
                "shard set (raysl shards build ... --metadata FILE with a label column)"
            )
        tables.append(read_shard(path, mask, columns))
    return tables


def check_labeled(directory: str, what: str = "--train") -> int:
    """Number of images of a labeled shard set; a UserError naming `what` (the flag or
    config key) and the directory when it has no rows or unlabeled rows."""
    columns = [t.column("label") for t in _columns(directory, what, ["label"])]
    rows = sum(len(c) for c in columns)
    if rows == 0:
        raise UserError(f"{what} {directory}: the shard set has no images; evaluation needs at least one labeled image")
    missing = sum(c.null_count for c in columns)
    if missing:
        raise UserError(
            f"{what} {directory}: {missing} of {rows} rows have no value in the 'label' column; "
            "label every image of an evaluation set"
        )
    labels = np.concatenate([c.to_numpy() for c in columns])
    if labels.min() < 0:
        raise UserError(f"{what} {directory}: the 'label' column has negative values; labels must be 0..C-1")
    return rows


def load_labeled(directory: str, image_size: int, what: str = "--train") -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 3, image_size, image_size), int64 labels (N,)) in manifest order:
    each image decoded, its short side resized to image_size / 0.875 and centre-cropped
    (the "eval" views preset). Images that do not decode are left out."""
    check_labeled(directory, what)
    spec = view_spec("eval", global_size=image_size)
    images, labels = [], []
    for table in _columns(directory, what, ["image", "label"]):
        for data, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist()):
            try:
                images.append(make_views(data, 0, spec)[0])
            except DecodeError:
                continue
            labels.append(label)
    if not images:
        raise UserError(f"{what} {directory}: none of its images decode")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)
