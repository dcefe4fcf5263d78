"""`ldm stage evaluate`: the guidance sweep of a training run as MLflow child runs, the Pareto plot, the best point
registered. Every refusal (no checkpoint, no prompt file, no extractor weights, bad grid) comes before sampling."""

from __future__ import annotations

import csv
import io
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np

from ldm.io import manifest, storage
from ldm.io.manifest import StageError
from ldm.stage import StageRun

METRICS = ("fd", "clip_score", "judge_colour", "judge_shape", "judge_position", "judge_background")
POINT_TAG = "eval.point_key"


def grid_points(ev) -> list[dict]:
    """The configured grid (checkpoint x sampler x steps x guidance), then the untrained baseline point."""
    points = [{"checkpoint": c, "sampler": s, "steps": n, "guidance": float(g)}
              for c, s, n, g in itertools.product(ev.checkpoints, ev.samplers, ev.steps, ev.guidance)]  # fmt: skip
    first = {"sampler": ev.samplers[0], "steps": ev.steps[0], "guidance": float(ev.guidance[0])}
    base = {"checkpoint": "untrained", **first}
    return [*points, base]


def best_point(rows: list[dict], rule: str, floor: float) -> dict:
    """The trained point with the lowest FD (among those with clip_score >= floor, under fd_clip_floor, if any)."""
    trained = [r for r in rows if r["checkpoint"] != "untrained"]
    eligible = [r for r in trained if rule == "fd" or r["clip_score"] >= floor] or trained
    return min(eligible, key=lambda r: r["fd"])


def _pipeline_dir(url: str, tmp: str) -> Path:
    url = storage.normalize(url)
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    storage.download_folder(url, tmp)
    return Path(tmp)


def evaluate_stage(run: StageRun) -> dict:
    """Sweep the run's sampler grid into W/runs/<run>/eval/ and MLflow; register the best point as `candidate`."""
    from ldm.evaluate.data import prompt_set
    from ldm.evaluate.sweep import checkpoint_dir
    from ldm.metrics.features import check_extractor

    cfg, t0 = run.cfg, time.time()
    train_m = run.inputs["train"]
    check_extractor(cfg)
    prompts = prompt_set(cfg)
    parent = train_m.get("mlflow_run_id")
    if not parent:
        raise StageError(f"evaluate: run {train_m.get('run_id')} has no MLflow run (its training was untracked)")
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as ckpt:
        checkpoint = checkpoint_dir(train_m, ckpt)
        run.begin()
        pipeline_dir = _pipeline_dir(train_m["pipeline"], tmp)
        return _sweep(run, checkpoint, pipeline_dir, prompts, parent, t0)


def _sweep(run: StageRun, checkpoint: Path, pipeline_dir: Path, prompts, parent: str, t0: float) -> dict:
    from mlflow import MlflowClient

    from ldm.clip.encoder import load_encoder
    from ldm.devices import autocast_dtype
    from ldm.evaluate.data import real_batches, reference, reference_stats
    from ldm.evaluate.registry import register_best
    from ldm.evaluate.sweep import ceilings, judge_for, judge_key, load_parts, run_point
    from ldm.metrics import judge as J
    from ldm.metrics.features import make_extractor
    from ldm.tracking import tracking_uri
    from ldm.train.tracking import grid_png

    cfg, ev = run.cfg, run.cfg.evaluate
    clock = _Clock(t0)
    scorer = load_encoder(cfg)
    extractor = make_extractor(cfg, scorer)
    parts = load_parts(cfg, pipeline_dir, checkpoint, scorer, extractor)
    real = reference(cfg, prompts)
    ref = reference_stats(cfg, real, extractor)
    clock.lap("setup_s")
    targets, ceiling = None, {}
    if ev.judge and prompts.specs is not None:
        parts.judge = judge_for(cfg)
        clock.lap("judge_s")
        rows = [J.prompted(s) for s in prompts.specs]  # position and background only where named
        targets = {k: np.array([r[k] for r in rows]) for k in J.HEADS}
        ceiling = ceilings(parts, real_batches(cfg, prompts.specs, ev.batch_size), targets)
        clock.lap("ceilings_s")
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_run(parent).info.experiment_id
    bf16 = autocast_dtype(ev.mixed_precision, parts.unets["ema"].device.type) is not None
    common = {"n_samples": len(prompts.prompts), "resolution": cfg.ingest.resolution, "extractor": extractor.name,
              "weights_hash": extractor.weights_hash, "prompts": manifest.digest(prompts.origin),
              "seed": cfg.seed, "batch_size": ev.batch_size,
              "precision": "bf16" if bf16 else "fp32",
              "judge": judge_key(cfg) if parts.judge is not None else None,
              "judge_scoring": J.SCORING if parts.judge is not None else None}  # fmt: skip
    rows, keys, logged, skipped = [], {}, 0, 0
    for point in grid_points(ev):
        params = {**point, **common, "model_hash": parts.model_hashes[point["checkpoint"]]}
        key = manifest.digest(params)
        found = client.search_runs(
            [experiment], f"tags.`{POINT_TAG}` = '{key}' and tags.`mlflow.parentRunId` = '{parent}' "
            "and attributes.status = 'FINISHED'", max_results=1,
        )  # fmt: skip
        if found:  # logged before for these weights and params: reuse, do not resample
            child, metrics = found[0].info.run_id, dict(found[0].data.metrics)
            skipped += 1
        else:
            name = f"eval/{point['checkpoint']}/{point['sampler']}/s{point['steps']}/g{point['guidance']:g}"
            child = client.create_run(experiment, run_name=name,
                                      tags={"mlflow.parentRunId": parent, POINT_TAG: key}).info.run_id  # fmt: skip
            metrics, first = run_point(parts, prompts.prompts, targets, ref, point, cfg.seed, ev.batch_size,
                                      ev.mixed_precision)  # fmt: skip
            for k, v in params.items():
                client.log_param(child, k, v)
            for k, v in metrics.items():
                client.log_metric(child, k, v)
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "samples.png").write_bytes(grid_png(_to_unit(first)))
                client.log_artifact(child, str(Path(tmp) / "samples.png"))
            client.set_terminated(child)
            logged += 1
        keys[child] = key
        rows.append({**point, **{k: metrics.get(k, float("nan")) for k in METRICS}, "mlflow_run_id": child})
    clock.lap("points_s")
    best = best_point(rows, ev.best_rule, ev.clip_floor)
    untrained = next(r for r in rows if r["checkpoint"] == "untrained")
    csv_bytes, plot = _csv(rows), _pareto_png(rows)
    storage.write_bytes_atomic(storage.join(run.out, "grid.csv"), csv_bytes)
    storage.write_bytes_atomic(storage.join(run.out, "pareto.png"), plot)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in (("grid.csv", csv_bytes), ("pareto.png", plot)):
            (Path(tmp) / name).write_bytes(data)
            client.log_artifact(parent, str(Path(tmp) / name), "eval")
    for k, v in {**ceiling, "eval_fd_untrained": untrained["fd"], "eval_best_fd": best["fd"],
                 "eval_best_clip_score": best["clip_score"]}.items():  # fmt: skip
        client.log_metric(parent, k, v)
    point = {k: best[k] for k in ("checkpoint", "sampler", "steps", "guidance")}
    version = register_best(client, ev.registered_model, best["mlflow_run_id"], pipeline_dir,
                            parts.unets[best["checkpoint"]], point, keys[best["mlflow_run_id"]])  # fmt: skip
    return {
        "grid": rows, "best": best, "untrained_fd": untrained["fd"], "ceilings": ceiling,
        "prompts": prompts.origin, "extractor": {"name": extractor.name, "weights_hash": extractor.weights_hash},
        "registered_model": {"name": ev.registered_model, "version": version, "alias": "candidate"},
        "points": {"logged": logged, "skipped": skipped}, "mlflow_parent_run_id": parent,
        "plot": storage.join(run.out, "pareto.png"), "csv": storage.join(run.out, "grid.csv"),
        "timings": {**clock.laps, "register_s": clock.since(), "total_s": round(time.time() - t0, 2)},
    }  # fmt: skip


class _Clock:
    """Seconds per phase of the sweep, for the manifest (where the stage's minutes go)."""

    def __init__(self, t0: float):
        self.last, self.laps = t0, {}

    def since(self) -> float:
        """Seconds since the last lap, rounded."""
        return round(time.time() - self.last, 2)

    def lap(self, name: str) -> None:
        """Record the seconds since the last lap under a name."""
        self.laps[name], self.last = self.since(), time.time()


def _to_unit(images: np.ndarray):
    import torch

    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _pareto_png(rows: list[dict]) -> bytes:
    """FD against CLIP score, one line per checkpoint/sampler/steps, each point labelled by its guidance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["checkpoint"], r["sampler"], r["steps"]), []).append(r)
    for (ckpt, sampler, steps), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["guidance"])
        ax.plot([r["clip_score"] for r in rs], [r["fd"] for r in rs], "o-", label=f"{ckpt} {sampler} {steps} steps")
        for r in rs:
            ax.annotate(f"{r['guidance']:g}", (r["clip_score"], r["fd"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    ax.set_xlabel("CLIP score (higher: closer to the prompt)")
    ax.set_ylabel("FD (lower: closer to real images)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("guidance sweep")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def summary(m: dict) -> str:
    """The sweep table (guidance x metrics), the untrained baseline, the best point and the plot's path."""
    head = f"{'checkpoint':<10} {'sampler':<6} {'steps':>5} {'guidance':>8} " + " ".join(f"{k:>14}" for k in METRICS)
    lines = ["evaluate summary:", head]
    for r in m["grid"]:
        vals = " ".join(f"{r[k]:>14.4g}" for k in METRICS)
        lines.append(f"{r['checkpoint']:<10} {r['sampler']:<6} {r['steps']:>5} {r['guidance']:>8g} {vals}")
    ceil = m.get("ceilings") or {}
    if ceil:
        lines.append(
            "judge on real held-out renders: "
            + ", ".join(
                f"{k.removeprefix('judge_real_')} {v:.3f}" for k, v in ceil.items() if k.startswith("judge_real_")
            )
        )
        lines.append(
            "judge on their VAE reconstructions (ceiling): "
            + ", ".join(
                f"{k.removeprefix('judge_recon_')} {v:.3f}" for k, v in ceil.items() if k.startswith("judge_recon_")
            )
        )
    b, reg = m["best"], m["registered_model"]
    lines.append(
        f"FD {m['extractor']['name']} ({m['extractor']['weights_hash'][:24]}): trained best {b['fd']:.4g} "
        f"vs untrained UNet {m['untrained_fd']:.4g}"
    )
    lines.append(
        f"best: {b['checkpoint']} {b['sampler']} {b['steps']} steps guidance {b['guidance']:g}; registered "
        f"{reg['name']} v{reg['version']} @{reg['alias']}; {m['points']['logged']} points logged, "
        f"{m['points']['skipped']} reused"
    )
    lines.append(f"Pareto plot: {m['plot']}")
    return "\n".join(lines)
