"""Opening a view stream ahead on the local Ray: the same batches, and the stream moves only
as its items are taken."""

from __future__ import annotations


def test_an_opened_view_stream_gives_the_same_batches_and_moves_only_when_taken(ray_local, tmp_path):
    from shardfactory import digit_images, write_shards

    from raysl.data import reader
    from raysl.data.view_plans import view_spec

    d = str(tmp_path / "s")
    write_shards(d, digit_images(20), shard_size=5)
    spec = view_spec("simclr", size=16)

    def batches():
        return reader.ViewBatches(reader.read_views(d, spec, seed=1, epoch=2), batch_size=4)

    plain = [b["key"].tolist() for b in batches()]
    opened = batches()
    opened.open()
    assert opened.position == 0 and opened.skipped == 0
    got = list(opened)
    assert [b["key"].tolist() for b in got] == plain and opened.position == 20
    assert got[0]["view_0"].shape == (4, 3, 16, 16)
