"""The metadata prefilter: thresholds on the URL list's own columns drop rows before any request is made.

The lists here use LAION's real column names and types (URL, TEXT, WIDTH/HEIGHT int32, similarity float64,
punsafe/pwatermark/AESTHETIC_SCORE float32, LANGUAGE string), with rows at each threshold's edge. Every
expected outcome is written by hand beside its row, and the counts are recounted from those labels.
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.ingest import summary
from flows.registry import run as run_stage
from ldm.config import ConfigError, load_config
from ldm.io.manifest import StageError
from tests.helpers import make_config, raw_samples

THRESHOLDS = [
    "ingest.prefilter.min_size=64",
    "ingest.prefilter.punsafe_max=0.5",
    "ingest.prefilter.pwatermark_max=0.8",
    "ingest.prefilter.similarity_min=0.28",
    "ingest.prefilter.aesthetic_min=5.0",
    "ingest.prefilter.languages=[en]",
    "ingest.prefilter.caption_min_chars=3",
    "ingest.prefilter.caption_max_chars=40",
    # A knob: the test profile's 1 s fails loopback downloads when the suite loads both cores (a kept row
    # counted as a timeout instead of a success); these tests count outcomes exactly.
    "ingest.timeout_s=30",
]
F32 = np.float32


def up(x: float, dtype=np.float64) -> float:
    """The next representable value above x in the column's type: 'just past' a _max threshold."""
    return float(np.nextafter(dtype(x), dtype(np.inf)))


def down(x: float, dtype=np.float64) -> float:
    """The next representable value below x: 'just past' a _min threshold."""
    return float(np.nextafter(dtype(x), dtype(-np.inf)))


BASE = {"WIDTH": 100, "HEIGHT": 100, "punsafe": 0.1, "pwatermark": 0.1, "similarity": 0.3,
        "AESTHETIC_SCORE": 6.0, "LANGUAGE": "en", "TEXT": "a fine caption"}  # fmt: skip
# (changes to BASE, expected outcome, threshold a null passed unjudged). "keep" rows must be downloaded.
ROWS: list[tuple[dict, str, str | None]] = [
    ({}, "keep", None),
    ({"WIDTH": 64, "HEIGHT": 64}, "keep", None),  # == min_size: kept
    ({"WIDTH": 63}, "too_small", None),  # just past, either side
    ({"HEIGHT": 63}, "too_small", None),
    ({"WIDTH": 0, "HEIGHT": 10}, "keep", "min_size"),  # 0 is laion2B-multi's "unknown"
    ({"HEIGHT": None}, "keep", "min_size"),
    ({"punsafe": 0.5}, "keep", None),  # float32 0.5 == threshold: kept
    ({"punsafe": up(0.5, F32)}, "unsafe", None),
    ({"punsafe": None}, "keep", "punsafe_max"),
    ({"pwatermark": 0.8}, "keep", None),  # float32(0.8) > 0.8 as float64: kept only if compared as float32
    ({"pwatermark": up(0.8, F32)}, "watermark", None),
    ({"pwatermark": float("nan")}, "keep", "pwatermark_max"),
    ({"similarity": 0.28}, "keep", None),
    ({"similarity": down(0.28)}, "low_similarity", None),
    ({"AESTHETIC_SCORE": 5.0}, "keep", None),
    ({"AESTHETIC_SCORE": down(5.0, F32)}, "low_aesthetic", None),
    ({"LANGUAGE": "de"}, "other_language", None),
    ({"LANGUAGE": None}, "keep", "languages"),
    ({"TEXT": "abc"}, "keep", None),  # == caption_min_chars
    ({"TEXT": "  ab  "}, "caption_too_short", None),  # counted after stripping
    ({"TEXT": "x" * 40}, "keep", None),  # == caption_max_chars
    ({"TEXT": "x" * 41}, "caption_too_long", None),
    ({"WIDTH": 10, "punsafe": 0.9, "LANGUAGE": "fr"}, "too_small", None),  # several: counted once, the first
    ({"punsafe": 0.9, "TEXT": ""}, "unsafe", None),  # the metadata is judged before the caption
]


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 80), (200, 40, 40)).save(buf, "JPEG")
    return buf.getvalue()


class _Recorder(BaseHTTPRequestHandler):
    body = _jpeg()
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass


@pytest.fixture
def recorder():
    """An image server on 127.0.0.1 that records every path requested: (base URL, the list of paths)."""
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    finally:
        server.shutdown()
        server.server_close()


def laion_table(base: str, rows: list[dict], drop: tuple[str, ...] = ()) -> pa.Table:
    """A URL list with LAION's column names and types."""
    types = {"WIDTH": pa.int32(), "HEIGHT": pa.int32(), "similarity": pa.float64(), "punsafe": pa.float32(),
             "pwatermark": pa.float32(), "AESTHETIC_SCORE": pa.float32(), "LANGUAGE": pa.string()}  # fmt: skip
    cols = {"URL": pa.array([f"{base}/r{i}.jpg" for i in range(len(rows))]), "TEXT": [r["TEXT"] for r in rows]}
    cols |= {name: pa.array([r[name] for r in rows], t, from_pandas=True) for name, t in types.items()}
    return pa.table({k: v for k, v in cols.items() if k not in drop})


def test_each_threshold_drops_past_its_edge_before_any_request(tmp_path, recorder):
    """Bugs caught: a threshold compared with >= / <= (the row at the edge dropped) or not at all (the row just
    past it kept); float32 columns compared against the float64 threshold (float32(0.8) > 0.8 drops the edge row);
    a null or NaN dropped, or crashing the check; a row failing several thresholds counted under each, or under
    the wrong reason; caption length measured before stripping; the prefilter applied after the download (the
    server would see the dropped rows' requests) or its drops missing from the manifest's counts."""
    base, seen = recorder
    rows = [{**BASE, **change} for change, _, _ in ROWS]
    src = tmp_path / "part-00000.parquet"
    pq.write_table(laion_table(base, rows), src)
    cfg = make_config(tmp_path / "w", "source.kind=parquet", f"source.paths=[{src}]", *THRESHOLDS)
    manifest = run_stage("ingest", cfg)

    labels = [outcome for _, outcome, _ in ROWS]
    expected = Counter(o for o in labels if o != "keep") + Counter(success=labels.count("keep"))
    assert manifest["counts"] == dict(expected)
    assert manifest["prefilter_unknown"] == dict(Counter(t for _, _, t in ROWS if t))
    assert "passed unjudged (null): languages 1, min_size 2" in summary(manifest)
    kept = {f"/r{i}.jpg" for i, o in enumerate(labels) if o == "keep"}
    assert set(seen) == kept  # not one request for a dropped row
    assert {s["json"]["url"].removeprefix(base) for s in raw_samples(str(tmp_path / "w"))} == kept
    assert manifest["rows_in"] == len(ROWS) and manifest["rows_downloaded"] == len(kept)


def test_thresholds_read_the_columns_ingest_columns_names(tmp_path, recorder):
    """Bug caught: a check reading LAION's default name instead of the `ingest.columns` mapping (a list that
    calls its aesthetic score `aesthetic` and its unsafe probability `p_unsafe`, as some LAION subsets do)."""
    base, seen = recorder
    table = pa.table({
        "URL": [f"{base}/r{i}.jpg" for i in range(3)], "TEXT": ["one", "two", "three"],
        "aesthetic": pa.array([4.0, 7.0, 7.0], pa.float32()), "p_unsafe": pa.array([0.1, 0.1, 0.7], pa.float32()),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "list.parquet")
    cfg = make_config(
        tmp_path / "w", "source.kind=parquet", f"source.paths=[{tmp_path / 'list.parquet'}]",
        "ingest.columns.aesthetic=aesthetic", "ingest.columns.punsafe=p_unsafe",
        "ingest.prefilter.aesthetic_min=5", "ingest.prefilter.punsafe_max=0.5", "ingest.timeout_s=30",
    )  # fmt: skip
    assert run_stage("ingest", cfg)["counts"] == {"low_aesthetic": 1, "unsafe": 1, "success": 1}
    assert seen == ["/r1.jpg"]


@pytest.mark.parametrize(
    ("threshold", "missing"),
    [
        ("min_size=256", "HEIGHT"),
        ("punsafe_max=0.5", "punsafe"),
        ("pwatermark_max=0.8", "pwatermark"),
        ("similarity_min=0.28", "similarity"),
        ("aesthetic_min=5", "AESTHETIC_SCORE"),  # relaion2B-en has no aesthetic score
        ("languages=[en]", "LANGUAGE"),  # nor a language column (laion2B-multi has)
    ],
)
def test_a_threshold_on_a_column_the_list_lacks_is_refused_naming_column_and_file(tmp_path, threshold, missing):
    """Bug caught: a threshold whose column is absent passing every row silently (a list without punsafe
    would train on unsafe images while the config says punsafe_max=0.5); only the first file checked (the
    column is missing from the second); the error not saying which column, which file, or what to set."""
    base = "http://127.0.0.1:9"
    good, bad = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(laion_table(base, [BASE]), good)
    pq.write_table(laion_table(base, [BASE], drop=(missing,)), bad)
    cfg = make_config(tmp_path / "w", "source.kind=parquet", f"source.paths=[{good},{bad}]",
                      f"ingest.prefilter.{threshold}")  # fmt: skip
    with pytest.raises(StageError) as e:
        run_stage("ingest", cfg)
    message = str(e.value)
    assert f"{bad}" in message and f"'{missing}'" in message and str(good) not in message
    assert f"ingest.prefilter.{threshold.split('=')[0]}" in message and "ingest.columns." in message
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_a_threshold_column_of_the_wrong_type_is_refused(tmp_path):
    """Bug caught: punsafe stored as text compared as strings ("0.9" > 0.5 raising deep in pyarrow, or
    comparing lexically), instead of a one-line refusal naming the column and its type."""
    src = tmp_path / "list.parquet"
    pq.write_table(pa.table({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a cat"], "punsafe": ["0.9"]}), src)
    cfg = make_config(
        tmp_path / "w", "source.kind=parquet", f"source.paths=[{src}]", "ingest.prefilter.punsafe_max=0.5"
    )
    with pytest.raises(StageError, match=r"'punsafe' for ingest.prefilter.punsafe_max holds string, not numbers"):
        run_stage("ingest", cfg)


def test_unset_thresholds_need_no_columns_and_the_profiles_set_none():
    """Bug caught: a default threshold requiring LAION columns, so the synthetic source (no punsafe) or any
    plain url+caption list is refused; and local/test diverging from the rows the filter kept before."""
    for profile in ("local", "test"):
        prefilter = load_config(profile, []).ingest.prefilter
        assert all(v is None for v in prefilter.model_dump().values()), profile


def test_caption_bounds_that_drop_everything_are_a_config_error():
    """Bug caught: caption_min_chars > caption_max_chars accepted, a run that downloads nothing."""
    with pytest.raises(ConfigError, match="caption_min_chars"):
        make_config("w", "ingest.prefilter.caption_min_chars=50", "ingest.prefilter.caption_max_chars=10")
