"""Webdataset shard reading: the order consumers see."""

from __future__ import annotations

from ldm.io.shards import read_shard, write_shard


def test_a_shard_reads_in_key_order_whatever_order_it_was_written_in(tmp_path):
    """Two shards holding the same samples in different tar order read identically, in key order.

    Bug caught: consumers seeing img2dataset's write order, which follows download completion, so two
    ingests of one source gave differently ordered shards and, with the same seed, different models.
    """
    samples = [{"key": f"{i:08d}", "txt": f"caption {i}", "jpg": bytes([i]) * 8} for i in range(6)]
    shuffled = [samples[i] for i in (4, 0, 5, 2, 1, 3)]
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write_shard(str(a), shuffled)
    write_shard(str(b), samples[::-1])
    read_a, read_b = read_shard(str(a)), read_shard(str(b))
    assert [s["key"] for s in read_a] == [s["key"] for s in samples]
    assert [(s["key"], s["txt"], s["jpg"]) for s in read_a] == [(s["key"], s["txt"], s["jpg"]) for s in read_b]
