"""The on-disk duplicate-URL set: first occurrences kept, later ones flagged, within and across batches."""

from __future__ import annotations

import numpy as np

from data_prep.ingest.dedupe import MAX_VARS, SeenUrls


def test_first_occurrence_wins_within_and_across_batches(tmp_path):
    # Bugs caught: flagging every copy (first included), keeping the last copy instead of the first,
    # forgetting what earlier batches (earlier parquet files) held.
    seen = SeenUrls(str(tmp_path / "seen.sqlite"))
    a = seen.first_seen(["http://x/1", "http://x/2", "http://x/1", "http://x/3"])
    assert a.tolist() == [True, True, False, True]
    b = seen.first_seen(["http://x/3", "http://x/4", "http://x/4", "http://x/2"])
    assert b.tolist() == [False, True, False, False]
    assert seen.first_seen([]).tolist() == []
    seen.close()


def test_batches_larger_than_one_query_are_checked_whole(tmp_path):
    # Bug caught: querying only the first MAX_VARS digests of a batch against earlier ones.
    seen = SeenUrls(str(tmp_path / "seen.sqlite"))
    urls = [f"http://h/{i}" for i in range(MAX_VARS + 500)]
    assert seen.first_seen(urls).all()
    again = seen.first_seen(urls[::-1] + ["http://h/new"])
    assert not again[:-1].any() and again[-1]
    assert np.count_nonzero(seen.first_seen(urls[-10:] * 2)) == 0
    seen.close()
