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


def test_random_crop_is_a_square_of_the_resized_image_fixed_by_its_seed():
    """precompute.crop=random. Bugs: the offset drawn along the short side (a band of black or a crash), a
    crop that is not the resized image's (resized after cropping), a draw that changes between calls."""
    import io

    import numpy as np
    from PIL import Image

    from ldm.io.shards import decode_rgb

    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, :, 0] = np.arange(120, dtype=np.uint8)[None, :] * 2  # red rises left to right
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    data = buf.getvalue()
    resized = np.asarray(Image.fromarray(wide).resize((60, 20), Image.Resampling.BICUBIC))
    crops = {s: decode_rgb(data, 20, crop_seed=s) for s in range(8)}
    offsets = set()
    for s, crop in crops.items():
        assert crop.shape == (20, 20, 3)
        x = next(x for x in range(41) if np.array_equal(resized[:, x : x + 20], crop))
        offsets.add(x)
        assert np.array_equal(decode_rgb(data, 20, crop_seed=s), crop)
    assert len(offsets) > 1  # seeds move the square along the long side
