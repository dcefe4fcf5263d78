"""The filter's report: counts per reason, score histograms with thresholds, precision/recall vs ratings.

Everything here is built from per-shard stats, so the report's memory and work grow with the number of
shards, never with the number of rows: each shard's scores go into fine fixed-width bins (kept and
dropped apart), and the ground-truth confusion counts add up across shards.
"""

from __future__ import annotations

import io

import numpy as np

from ldm.config import FilterConfig

GOOD_RATING = 5.0  # ground truth "aesthetic": a rating of 5 or more (LAION-Aesthetics' 5+ subset)
# Fixed fine bins, the same for every shard so their counts add: (low, high, bins). A score outside the
# range lands in the end bin. The plot regroups them over the occupied range.
BINS = {"aesthetic": (0.0, 10.0, 1000), "similarity": (-1.0, 1.0, 1000)}
PLOT_BINS = 40


def truth_counts(scores: np.ndarray, ratings: np.ndarray, threshold: float, good: float = GOOD_RATING) -> dict:
    """The confusion counts of `score >= threshold` against `rating >= good`: they add up across shards."""
    predicted, actual = scores >= threshold, ratings >= good
    return {
        "rated": len(scores),
        "predicted_good": int(predicted.sum()),
        "actually_good": int(actual.sum()),
        "true_positives": int(np.sum(predicted & actual)),
    }


def from_counts(c: dict) -> dict[str, float]:
    """Precision and recall from (summed) confusion counts."""
    return {
        "precision": c["true_positives"] / max(1, c["predicted_good"]),
        "recall": c["true_positives"] / max(1, c["actually_good"]),
        "predicted_good": c["predicted_good"],
        "actually_good": c["actually_good"],
    }


def precision_recall(scores: np.ndarray, ratings: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision and recall of `score >= threshold` against `rating >= GOOD_RATING`."""
    return from_counts(truth_counts(scores, ratings, threshold))


def _bin(values: np.ndarray, column: str) -> np.ndarray:
    low, high, n = BINS[column]
    return np.clip(np.floor((np.asarray(values, dtype=float) - low) / (high - low) * n), 0, n - 1).astype(int)


def shard_histograms(aesthetic: np.ndarray, similarity: np.ndarray, kept: np.ndarray) -> dict:
    """One shard's scores as sparse bin counts: {column: {"kept"|"dropped": {bin: count}}}."""
    out = {}
    for column, values in (("aesthetic", aesthetic), ("similarity", similarity)):
        bins = _bin(values, column)
        out[column] = {
            side: {str(b): int(n) for b, n in zip(*np.unique(bins[mask], return_counts=True), strict=True)}
            for side, mask in (("kept", kept), ("dropped", ~kept))
        }
    return out


def merge_histograms(shards: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    """Sum the shards' sparse histograms into dense counts per column and side."""
    total = {c: {s: np.zeros(BINS[c][2], dtype=np.int64) for s in ("kept", "dropped")} for c in BINS}
    for hist in shards:
        for column, sides in hist.items():
            for side, counts in sides.items():
                for b, n in counts.items():
                    total[column][side][int(b)] += n
    return total


def plot_bins(column: str, *sides: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The fine bins of one column regrouped for a plot: (edges, per side its counts), at most PLOT_BINS bins
    over the range the samples used; where that range reaches the scale's top the last bin is narrower."""
    low, high, n = BINS[column]
    used = np.flatnonzero(sum(sides))
    first, last = (used[0], used[-1] + 1) if len(used) else (0, n)
    group = max(1, -(-(last - first) // PLOT_BINS))  # whole fine bins per plotted bin
    last = min(n, first + -(-(last - first) // group) * group)
    starts = np.arange(first, last, group)
    edges = low + (high - low) / n * np.append(starts, last)
    return edges, [np.add.reduceat(side[first:last], starts - first) for side in sides]


def histogram_png(hist: dict[str, dict[str, np.ndarray]], fcfg: FilterConfig) -> bytes:
    """Histograms of aesthetic score and CLIP similarity, kept vs dropped, thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    kept_n = dropped_n = 0
    for ax, col, thr, label in (
        (axes[0], "aesthetic", fcfg.aesthetic_min, "aesthetic score"),
        (axes[1], "similarity", fcfg.similarity_min, "CLIP image-text cosine similarity"),
    ):
        kept, dropped = hist[col]["kept"], hist[col]["dropped"]
        kept_n, dropped_n = int(kept.sum()), int(dropped.sum())
        edges, sums = plot_bins(col, kept, dropped)
        centers = (edges[:-1] + edges[1:]) / 2
        ax.hist([centers, centers], bins=edges, weights=sums, stacked=True, label=["kept", "dropped"],
                color=["tab:green", "tab:red"])  # fmt: skip
        ax.axvline(thr, color="black", ls="--", lw=1.2, label=f"threshold {thr:g}")
        ax.set_xlabel(label)
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    fig.suptitle(f"filter: {kept_n} of {kept_n + dropped_n} samples kept")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
