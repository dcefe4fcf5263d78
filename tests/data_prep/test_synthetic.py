"""The synthetic LAION-style source: deterministic, varied, rated by its degradations, served for real."""

from __future__ import annotations

import io
import struct
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from data_prep.sources import EXPECTED_OUTCOME, serve_synthetic, synthetic_rows
from ldm.config import SyntheticSource
from ldm.synthetic import (
    CLEAN_WORDS,
    COLOURS,
    DEGRADATION_WEIGHTS,
    QUALITY_WORDS,
    RELATIONS,
    SHAPES,
    STRONG_SEVERITY,
    describe,
    render,
)


def test_samples_are_deterministic_for_a_seed():
    a, b = describe(3, 17, 64), describe(3, 17, 64)
    assert a == b and render(a, 3) == render(b, 3)
    assert describe(4, 17, 64) != a


def test_scenes_and_captions_are_varied():
    specs = [describe(0, i, 64) for i in range(600)]
    shapes = Counter(o[1] for s in specs for o in s.objects)
    colours = Counter(o[0] for s in specs for o in s.objects)
    pairs = [s for s in specs if len(s.objects) == 2]
    assert set(shapes) == set(SHAPES) and len(SHAPES) >= 5
    assert set(colours) == set(COLOURS) and len(COLOURS) >= 8
    assert len({s.background for s in specs}) >= 5
    assert 0.2 < len(pairs) / len(specs) < 0.5
    assert all(any(rel in s.caption for rel in RELATIONS) for s in pairs)
    assert len({s.caption for s in specs}) > 300
    assert len({(s.width, s.height) for s in specs}) >= 3  # several aspect ratios: center-crop matters


def test_some_captions_describe_the_image_quality():
    specs = [describe(0, i, 64) for i in range(1000)]
    described = 0
    for s in specs:
        words = s.caption.split(", ")[1:]  # scene templates have at most one comma, before "the {s1} is ..."
        words = [w for w in words if not w.startswith("the ")]
        if not words:
            continue
        described += 1
        if not s.degradations:
            assert words[0] in CLEAN_WORDS, s
        else:  # one word per degradation, "very" for the strong ones, in a fixed order
            expected = [("very " if v >= STRONG_SEVERITY else "") + QUALITY_WORDS[k] for k, v in s.degradations.items()]
            assert words == expected, s
    assert 0.5 < described / len(specs) < 0.7  # like alt text: often, not always


def test_rating_follows_the_degradations():
    specs = [describe(0, i, 64) for i in range(1000)]
    ratings = np.array([s.rating for s in specs])
    assert ratings.min() >= 1 and ratings.max() <= 10
    clean = [s.rating for s in specs if not s.degradations]
    heavy = [s.rating for s in specs if sum(s.degradations.values()) > 1.5]
    assert np.mean(clean) > 8 and np.mean(heavy) < 5
    assert {k for s in specs for k in s.degradations} == set(DEGRADATION_WEIGHTS)
    s = next(s for s in specs if len(s.degradations) >= 2)
    assert replace(s, degradations={}).rating > s.rating


@pytest.mark.parametrize("kind", sorted(DEGRADATION_WEIGHTS))
def test_each_degradation_changes_the_pixels(kind):
    spec = replace(describe(0, 5, 96), degradations={})
    clean = np.asarray(Image.open(io.BytesIO(render(spec, 0))), dtype=np.float32)
    bad = np.asarray(Image.open(io.BytesIO(render(replace(spec, degradations={kind: 1.0}), 0))), dtype=np.float32)
    assert np.abs(clean - bad).mean() > 2.0


def test_rows_carry_every_broken_kind_and_the_good_count():
    cfg = SyntheticSource(num_samples=50, seed=2, image_size=32)
    table, manifest = synthetic_rows(cfg, "http://127.0.0.1:1", refused_port=9)
    assert table.column_names[:2] == ["URL", "TEXT"]
    assert table.num_rows == manifest["rows"] == 50 + sum(cfg.broken.model_dump().values())
    assert manifest["good_rows"] == 50
    assert set(manifest["broken"]) == set(EXPECTED_OUTCOME)
    assert manifest["expected_outcomes"]["success"] == 50


def test_metadata_for_100k_samples():
    """The source scales: 100k rows of metadata without rendering (pytest-timeout catches a quadratic blow-up)."""
    table, manifest = synthetic_rows(SyntheticSource(num_samples=100_000), "http://127.0.0.1:1", refused_port=9)
    assert manifest["good_rows"] == 100_000 and table.num_rows == manifest["rows"] > 100_000
    urls = table.column("URL").to_pylist()
    assert len(set(urls)) == len(urls) - manifest["broken"]["duplicate_url"]  # only the planted duplicates repeat


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, b"", ""


def test_server_serves_good_and_broken_responses():
    cfg = SyntheticSource(num_samples=10, seed=1, image_size=40)
    with serve_synthetic(cfg, slow_s=0.5) as base:
        status, body, ctype = _get(f"{base}/img/3.jpg")
        img = Image.open(io.BytesIO(body))
        spec = describe(1, 3, 40)
        assert status == 200 and ctype == "image/jpeg" and img.size == (spec.width, spec.height)
        assert _get(f"{base}/missing/0.jpg")[0] == 404
        assert _get(f"{base}/img/999.jpg")[0] == 404  # beyond the source
        assert _get(f"{base}/empty/0.jpg")[:2] == (200, b"")
        assert _get(f"{base}/html/0.html")[2] == "text/html"
        truncated = _get(f"{base}/truncated/3.jpg")[1]
        assert body.startswith(truncated) and len(truncated) < len(body)
        with pytest.raises(OSError):
            Image.open(io.BytesIO(truncated)).load()
        bomb = _get(f"{base}/bomb/0.png")[1]
        width, height = struct.unpack(">II", bomb[16:24])  # the PNG's IHDR
        assert width * height > 2**31 and len(bomb) < 1_000_000
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(bomb))
        t0 = time.perf_counter()
        assert _get(f"{base}/slow/3.jpg")[0] == 200
        assert time.perf_counter() - t0 >= 0.5
