"""The filter's report: counts per reason, score histograms with thresholds, precision/recall vs ratings."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from ldm.config import FilterConfig

GOOD_RATING = 5.0  # ground truth "aesthetic": a rating of 5 or more (LAION-Aesthetics' 5+ subset)


def precision_recall(scores: np.ndarray, ratings: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision and recall of `score >= threshold` against `rating >= GOOD_RATING`."""
    predicted, actual = scores >= threshold, ratings >= GOOD_RATING
    tp = int(np.sum(predicted & actual))
    return {
        "precision": tp / max(1, int(predicted.sum())),
        "recall": tp / max(1, int(actual.sum())),
        "predicted_good": int(predicted.sum()),
        "actually_good": int(actual.sum()),
    }


def histogram_png(table: pa.Table, fcfg: FilterConfig) -> bytes:
    """Histograms of aesthetic score and CLIP similarity, kept vs dropped, thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = np.array([r is None for r in table.column("reason").to_pylist()])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for ax, col, thr, label in (
        (axes[0], "aesthetic", fcfg.aesthetic_min, "aesthetic score"),
        (axes[1], "similarity", fcfg.similarity_min, "CLIP image-text cosine similarity"),
    ):
        values = np.asarray(table.column(col).to_numpy(zero_copy_only=False), dtype=float)
        bins = np.linspace(values.min(), values.max(), 40) if len(values) else 10
        ax.hist(
            [values[kept], values[~kept]],
            bins=bins,
            stacked=True,
            label=["kept", "dropped"],
            color=["tab:green", "tab:red"],
        )
        ax.axvline(thr, color="black", ls="--", lw=1.2, label=f"threshold {thr:g}")
        ax.set_xlabel(label)
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    fig.suptitle(f"filter: {int(kept.sum())} of {len(kept)} samples kept")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
