"""The filter stage: score every raw sample with CLIP and the aesthetic MLP, keep those above the thresholds.

A Ray Data stage: raw shard URLs in, a pool of scorer actors (one per CPU core, or per GPU on GPUs),
each shard's outputs written atomically by the actor that scored it (data_prep/filter/score.py). The
driver sees one small result per shard and builds the report from the shards' stats files, so its
memory does not grow with the rows.
"""

from __future__ import annotations

import io
import json
import re
import time
import warnings

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep.filter.report import GOOD_RATING, from_counts, histogram_png, merge_histograms
from data_prep.filter.score import Scorer, ShardFilter, drop_reason, filter_shard
from ldm.io import storage
from ldm.io.manifest import StageError, root_cause
from ldm.io.shards import shard_urls
from ldm.ray_cluster import actor_pool, ensure_ray
from ldm.stage import StageRun
from ldm.tracking import mlflow_run

__all__ = ["Scorer", "drop_reason", "filter_shard", "filter_stage", "score_shards", "summary"]
STAGE = "filter"
REASONS = ("low_aesthetic", "low_similarity")


def score_shards(cfg, todo: list[str], shards_out: str) -> list[str]:
    """Filter the raw shards `todo` on the actor pool; returns the unreadable ones' errors."""
    import ray

    actors, res = actor_pool(cfg, cfg.filter.actors, len(todo))
    ds = ray.data.from_items([{"url": u} for u in todo], override_num_blocks=len(todo)).map_batches(
        ShardFilter, fn_constructor_args=(cfg.model_dump(mode="json"), shards_out), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2), **res,
    )  # fmt: skip
    skipped = []
    bar = tqdm(total=len(todo), desc="filter", unit="shard", disable=None)
    try:
        for r in ds.iter_rows():  # one row per shard, as each shard's outputs are written
            if r["error"]:
                warnings.warn(f"filter: skipping unreadable shard {r['error']}", stacklevel=1)
                skipped.append(str(r["error"]))
            bar.update(1)
    except Exception as e:  # an actor's error arrives wrapped (RayTaskError): the stage's own one-liner if it is one
        cause = root_cause(e, stop=(StageError,))
        if isinstance(cause, StageError):
            raise StageError(" ".join(str(cause).split())) from e
        # The cause's type does not always survive Ray's pickling; the stage's own message does, in the text.
        found = re.search(r"filter: sample .*? has no decodable jpg .*?; remove the shard or rerun the ingest stage "
                          r"with --overwrite", " ".join(str(e).split()))  # fmt: skip
        if found:
            raise StageError(found.group(0)) from e
        raise
    finally:
        bar.close()
    return skipped


def _report(cfg, stats: dict[str, dict], skipped: list[str]) -> tuple[dict, dict]:
    """(report, merged histograms) from the shards' stats: counts by reason, ground truth where rated."""
    samples = sum(s["samples"] for s in stats.values())
    reasons = {r: sum(s["dropped"].get(r, 0) for s in stats.values()) for r in REASONS}
    counts = {"samples": samples, "kept": sum(s["kept"] for s in stats.values()), **reasons}
    report: dict = {"counts": counts, "thresholds": cfg.filter.model_dump(mode="json"), "skipped_shards": skipped}
    truth = {k: sum(s["truth"][k] for s in stats.values()) for k in ("rated", "predicted_good", "actually_good",
                                                                      "true_positives")}  # fmt: skip
    if truth["rated"]:  # ground truth only exists where the source ships ratings (the synthetic one)
        report["ground_truth"] = {"good_rating": GOOD_RATING, "rated_samples": truth["rated"], **from_counts(truth)}
    return report, merge_histograms([s["hist"] for s in stats.values()])


def _stats(shards_out: str) -> dict[str, dict]:
    fs, path = storage.fs_for(shards_out)
    return {
        p.rsplit("/", 1)[1].removesuffix("_stats.json"): json.loads(fs.cat(p))
        for p in sorted(fs.glob(f"{path}/*_stats.json"))
    }


def filter_stage(run: StageRun) -> dict:
    """Filter W/raw/shards into W/filtered/shards; write filter_report.json and a score histogram."""
    cfg, out, shards_out = run.cfg, run.out, run.workdir.filtered_shards
    t0 = time.time()
    ensure_ray(cfg)
    run.begin()
    raw_shards = shard_urls(run.workdir.raw_shards)
    done = set(_stats(shards_out)) if storage.exists(shards_out) else set()
    todo = [u for u in raw_shards if u.rsplit("/", 1)[1].removesuffix(".tar") not in done]
    if done:
        print(f"filter: resuming; {len(done)} of {len(raw_shards)} shards already filtered")
    skipped = score_shards(cfg, todo, shards_out) if todo else []
    stats = _stats(shards_out)  # a fresh listing: the shards were written since
    report, hist = _report(cfg, stats, skipped)
    counts = report["counts"]
    storage.write_json_atomic(storage.join(out, "filter_report.json"), report)
    png = histogram_png(hist, cfg.filter)
    storage.write_bytes_atomic(storage.join(out, "scores.png"), png)
    metrics = {
        "kept": counts["kept"],
        "kept_fraction": counts["kept"] / max(1, counts["samples"]),
        "seconds": round(time.time() - t0, 2),
    }
    if "ground_truth" in report:
        metrics |= {k: report["ground_truth"][k] for k in ("precision", "recall")}
    with mlflow_run(cfg, STAGE, run.config) as mlf:
        mlf.log_metrics(metrics)
        mlf.log_dict(report, "filter_report.json")
        mlf.log_image(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), "scores.png")
    return dict(
        counts=counts,
        skipped_shards=len(skipped),
        skipped=skipped,
        metrics=metrics,
        shards=[{"name": f"{k}.tar", "samples": v["kept"]} for k, v in sorted(stats.items())],
        report=storage.join(out, "filter_report.json"),
        filter_report=report,
    )


def summary(m: dict) -> str:
    """A human summary of the filter manifest and its report."""
    report = m["filter_report"]
    c = report["counts"]
    lines = [f"filter summary: kept {c['kept']} of {c['samples']} samples"]
    lines += [f"  dropped {r:<15} {c[r]:>7}" for r in REASONS if c[r]]
    if report["skipped_shards"]:
        lines.append(f"  skipped {len(report['skipped_shards'])} unreadable shard(s)")
    gt = report.get("ground_truth")
    if gt:
        lines.append(
            f"  vs ground-truth ratings (good = rating >= {gt['good_rating']:g}): "
            f"precision {gt['precision']:.3f}, recall {gt['recall']:.3f}"
        )
    return "\n".join(lines)
