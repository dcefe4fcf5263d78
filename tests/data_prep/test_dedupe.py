"""The on-disk duplicate-URL set: first occurrences kept, later ones flagged, within and across batches, and
its partitioned form the cluster runs."""

from __future__ import annotations

import numpy as np

from data_prep.ingest.dedupe import MAX_VARS, SeenUrls, digests, first_across, partition


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


def test_partitioned_dedupe_keeps_the_first_occurrence_in_list_order(tmp_path):
    """The cluster's form: each file's digests split into partitions, each partition deduplicated over the files
    in order. Bugs caught: a partition processed in the wrong file order (a later file's copy kept), positions
    mixed up between partitions (the wrong row dropped), a URL whose copies land in different partitions (the
    split must be by digest), duplicates within one file missed. Checked against a plain one-pass set."""
    rng = np.random.default_rng(0)
    files = [[f"http://h/{u}" for u in rng.integers(0, 300, size=n)] for n in (200, 0, 150, 250)]
    seen: set[str] = set()
    expected = []
    for urls in files:  # the reference: one pass over the whole list, first occurrence wins
        expected.append([i for i, u in enumerate(urls) if u in seen or seen.add(u)])
    for partitions in (1, 3, 7):
        parts = [partition(digests(urls), partitions) for urls in files]
        got: list[list[int]] = [[] for _ in files]
        for p in range(partitions):
            dups = first_across([parts[n][p] for n in range(len(files))], str(tmp_path / f"{partitions}-{p}.sqlite"))
            for n, d in enumerate(dups):
                got[n] += d.tolist()
        assert [sorted(g) for g in got] == expected, partitions
