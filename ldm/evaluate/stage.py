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


def evaluate_stage(run: StageRun) -> dict:
    """Sweep the run's sampler grid into W/runs/<run>/eval/ and MLflow; register the best point as `candidate`."""
    from ldm.evaluate.data import prompt_set
    from ldm.evaluate.sweep import checkpoint_dir, pipeline_dir
    from ldm.metrics.features import extractor_identity

    cfg, t0 = run.cfg, time.time()
    train_m = run.inputs["train"]
    extractor = extractor_identity(cfg)  # refuses absent weights (or no trained CLIP) before anything starts
    prompts = prompt_set(cfg)
    parent = train_m.get("mlflow_run_id")
    if not parent:
        raise StageError(f"evaluate: run {train_m.get('run_id')} has no MLflow run (its training was untracked)")
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as ckpt:
        checkpoint = checkpoint_dir(train_m, ckpt)  # here too: hashed into every point's key, refused if gone
        run.begin()
        root = pipeline_dir(train_m["pipeline"], tmp)
        return _sweep(run, checkpoint, root, prompts, parent, extractor, t0)


def _sweep(run: StageRun, checkpoint: Path, pipeline_dir: Path, prompts, parent: str, extractor: tuple[str, str],
           t0: float) -> dict:  # fmt: skip
    """The sweep on the Ray cluster: the actors load the models and sample; this process keys the points,
    trains the judge, folds each point's batches into its metrics and logs them."""
    from ldm.evaluate.sweep import batch_count, judge_for, judge_targets
    from ldm.evaluate.workers import Pool
    from ldm.ray_cluster import ensure_ray

    cfg, ev = run.cfg, run.cfg.evaluate
    clock = _Clock(t0)
    resources = ensure_ray(cfg)
    n_batches = batch_count(len(prompts.prompts), ev.batch_size)
    pool = Pool(cfg, run.inputs["train"], prompts, resources, most=len(grid_points(ev)) * n_batches)
    clock.lap("ray_s")  # joining (or starting) the cluster; the actors go on loading in the background
    try:
        judge_url, targets = None, None
        if ev.judge and prompts.specs is not None:  # trained here while the actors load (cached for later runs)
            judge_for(cfg)
            judge_url, targets = _judge_url(cfg), judge_targets(prompts.specs)
            clock.lap("judge_s")
        info = pool.ready()
        clock.lap("actors_s")
        sweep = _Sweep(run, pipeline_dir, checkpoint, prompts, parent, extractor, info, judge_url is not None)
        units = [("reference",)] if sweep.todo else []
        units += [("ceilings", judge_url)] if judge_url else []
        units += [("batch", i, sweep.points[i], b, judge_url, sweep.precision) for i in sweep.todo
                  for b in range(n_batches)]  # fmt: skip
        pool.run(units, lambda unit, result: sweep.take(unit, result, targets))
        clock.lap("points_s")
        cluster = pool.summary()
    finally:
        pool.close()
    return sweep.finish(clock, t0, cluster)


def _judge_url(cfg) -> str:
    from ldm.evaluate.data import cache_url
    from ldm.evaluate.sweep import judge_key

    return cache_url(cfg, "judge", judge_key(cfg), "safetensors")


class _Sweep:
    """The driver's side of a sweep: every grid point's key, the points logged before, and each new point's
    batches folded into metrics and logged to MLflow as soon as the last of them is in."""

    def __init__(self, run: StageRun, pipeline_dir: Path, checkpoint: Path, prompts, parent: str,
                 extractor: tuple[str, str], actors: list[dict], judged: bool):  # fmt: skip
        from mlflow import MlflowClient

        from ldm.evaluate.sweep import batch_count, judge_key, model_hashes, read_index
        from ldm.metrics import judge as J
        from ldm.tracking import tracking_uri

        cfg, ev = run.cfg, run.cfg.evaluate
        self.run, self.pipeline_dir, self.checkpoint, self.parent = run, pipeline_dir, checkpoint, parent
        self.hashes = model_hashes(cfg, read_index(pipeline_dir), checkpoint)
        self.precision = _precision(actors)
        self.client = MlflowClient(tracking_uri(cfg))
        self.experiment = self.client.get_run(parent).info.experiment_id
        name, weights_hash = extractor
        common = {"n_samples": len(prompts.prompts), "resolution": cfg.ingest.resolution, "extractor": name,
                  "weights_hash": weights_hash, "prompts": manifest.digest(prompts.origin),
                  "seed": cfg.seed, "batch_size": ev.batch_size, "precision": self.precision,
                  "judge": judge_key(cfg) if judged else None,
                  "judge_scoring": J.SCORING if judged else None}  # fmt: skip
        self.extractor = {"name": name, "weights_hash": weights_hash}
        self.points = grid_points(ev)
        self.params = [{**p, **common, "model_hash": self.hashes[p["checkpoint"]]} for p in self.points]
        self.keys = [manifest.digest(p) for p in self.params]
        self.rows: list[dict | None] = [None] * len(self.points)
        self.todo, self.skipped = [], 0
        for i, key in enumerate(self.keys):
            found = self.client.search_runs(
                [self.experiment], f"tags.`{POINT_TAG}` = '{key}' and tags.`mlflow.parentRunId` = '{parent}' "
                "and attributes.status = 'FINISHED'", max_results=1,
            )  # fmt: skip
            if found:  # logged before for these weights and params: reuse, do not resample
                self._row(i, found[0].info.run_id, dict(found[0].data.metrics))
                self.skipped += 1
            else:
                self.todo.append(i)
        self.n_batches = batch_count(len(prompts.prompts), ev.batch_size)
        self.origin = prompts.origin
        self.pieces: dict[int, dict[int, dict]] = {i: {} for i in self.todo}
        self.ref, self.ceiling, self.logged = None, {}, 0

    def _row(self, i: int, child: str, metrics: dict) -> None:
        self.rows[i] = {**self.points[i], **{k: metrics.get(k, float("nan")) for k in METRICS},
                        "mlflow_run_id": child}  # fmt: skip

    def take(self, unit: tuple, result, targets: dict | None) -> None:
        """One unit's result: keep it; log every point whose batches (and the reference) are all in."""
        if unit[0] == "reference":
            self.ref = result
        elif unit[0] == "ceilings":
            self.ceiling = result
        else:
            self.pieces[unit[1]][unit[3]] = result
        for i in [i for i, got in self.pieces.items() if len(got) == self.n_batches and self.ref is not None]:
            got = self.pieces.pop(i)
            self._log(i, [got[b] for b in range(self.n_batches)], targets)

    def _log(self, i: int, pieces: list[dict], targets: dict | None) -> None:
        from ldm.evaluate.sweep import point_metrics
        from ldm.train.tracking import grid_png

        metrics, first = point_metrics(pieces, self.ref, targets)
        p, client = self.points[i], self.client
        name = f"eval/{p['checkpoint']}/{p['sampler']}/s{p['steps']}/g{p['guidance']:g}"
        tags = {"mlflow.parentRunId": self.parent, POINT_TAG: self.keys[i]}
        child = client.create_run(self.experiment, run_name=name, tags=tags).info.run_id
        for k, v in self.params[i].items():
            client.log_param(child, k, v)
        for k, v in metrics.items():
            client.log_metric(child, k, v)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "samples.png").write_bytes(grid_png(_to_unit(first)))
            client.log_artifact(child, str(Path(tmp) / "samples.png"))
        client.set_terminated(child)
        self.logged += 1
        self._row(i, child, metrics)

    def finish(self, clock: _Clock, t0: float, cluster: dict) -> dict:
        """Write the grid and the plot, log the parent's metrics, register the best point; the manifest's fields."""
        from ldm.evaluate.registry import register_best

        run, ev, client, parent = self.run, self.run.cfg.evaluate, self.client, self.parent
        rows: list[dict] = list(self.rows)  # type: ignore[arg-type] - every point: logged now or before
        keys = {r["mlflow_run_id"]: k for r, k in zip(rows, self.keys, strict=True)}
        best = best_point(rows, ev.best_rule, ev.clip_floor)
        untrained = next(r for r in rows if r["checkpoint"] == "untrained")
        csv_bytes, plot = _csv(rows), _pareto_png(rows)
        storage.write_bytes_atomic(storage.join(run.out, "grid.csv"), csv_bytes)
        storage.write_bytes_atomic(storage.join(run.out, "pareto.png"), plot)
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in (("grid.csv", csv_bytes), ("pareto.png", plot)):
                (Path(tmp) / name).write_bytes(data)
                client.log_artifact(parent, str(Path(tmp) / name), "eval")
        for k, v in {**self.ceiling, "eval_fd_untrained": untrained["fd"], "eval_best_fd": best["fd"],
                     "eval_best_clip_score": best["clip_score"]}.items():  # fmt: skip
            client.log_metric(parent, k, v)
        point = {k: best[k] for k in ("checkpoint", "sampler", "steps", "guidance")}
        unet = None
        if point["checkpoint"] == "raw":  # the export holds the EMA weights: the raw ones are registered
            from diffusers import UNet2DConditionModel

            from ldm.evaluate.sweep import load_raw_unet

            unet = load_raw_unet(UNet2DConditionModel.from_pretrained(self.pipeline_dir / "unet"), self.checkpoint)
        version = register_best(client, ev.registered_model, best["mlflow_run_id"], self.pipeline_dir, unet, point,
                                keys[best["mlflow_run_id"]])  # fmt: skip
        return {
            "grid": rows, "best": best, "untrained_fd": untrained["fd"], "ceilings": self.ceiling,
            "prompts": self.origin, "extractor": self.extractor,
            "registered_model": {"name": ev.registered_model, "version": version, "alias": "candidate"},
            "points": {"logged": self.logged, "skipped": self.skipped}, "mlflow_parent_run_id": parent,
            "plot": storage.join(run.out, "pareto.png"), "csv": storage.join(run.out, "grid.csv"),
            "cluster": cluster, "precision": self.precision,
            "timings": {**clock.laps, "register_s": clock.since(), "total_s": round(time.time() - t0, 2)},
        }  # fmt: skip


def _precision(actors: list[dict]) -> str:
    """bf16 when every actor samples in bf16 (auto: GPUs, CPUs with native bf16), else fp32 for all: one
    precision per sweep, whatever mix of nodes the actors landed on, since it changes the images."""
    return "bf16" if all(a["bf16"] for a in actors) else "fp32"


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

    return torch.as_tensor(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # a copy: Ray's are read-only


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
    actors = (m.get("cluster") or {}).get("actors", [])
    if actors:
        nodes = len({a["node"] for a in actors})
        lines.append(f"sampled by {len(actors)} Ray actors ({actors[0]['device']}) on {nodes} node(s), "
                     f"{m['precision']}")  # fmt: skip
    lines.append(f"Pareto plot: {m['plot']}")
    return "\n".join(lines)
