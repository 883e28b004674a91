"""Shard sets for `raysl curate` tests: planted photographs written as shards, and the model that embeds them."""

from raysl.data.schema import write_shard_set

FEATURES = dict(image_size=112, stage=0, input_norm="per-image")  # what raysl bench curate measures
MODEL = "resnet18"
PHOTOS = 6  # photographs, each with 4 planted copies: 30 images in 6 shards of 5


def write_rows(directory, rows, shard_size):
    """Shards of `rows` (key + image, plus any column given) with the other columns filled in."""
    base = dict(width=1, height=1, format="png", source="test", license="cc0-1.0", attribution="", label=None)
    write_shard_set(directory, [base | r for r in rows], shard_size=shard_size, sources=["test"])
    return directory
