"""Training samples/s: the train stage (Ray Train + the latent Ray Dataset) against a bare PyTorch loop.

1. Ray path: `flows.registry.run("train", cfg)`, the production stage itself (driver, TorchTrainer,
   `ldm/train/loop.py` on compute.num_workers workers of 1 CPU each, DDP over gloo), for --steps steps on
   a copy of the work directory's latents. Its steady-state rate and data-wait fraction are read back
   from the metrics rank 0 logs to MLflow every --log-every steps (`samples_per_s`, `data_wait_fraction`),
   leaving out the first --warmup steps; Ray Train's start-up, checkpoint, sample grid and export are
   outside those windows. The driver holds latents under 2 GiB in the object store (the demo's 4,000
   rows) and streams larger sets from the Parquet parts; --stream streams whatever the size, on a local
   cluster with one logical CPU more than the cores (with exactly the cores, Ray Data's read tasks would
   wait for the CPUs the workers hold: the stage refuses that plan).
2. Bare loop: one process, the same UNet (size from the config), global batch, precision (the loop's
   `autocast_dtype` rule), objective and per-step work as the loop (CFG dropout, clipping, AdamW, EMA),
   over the same rows collated once into in-memory tensors: no Ray, no DDP, no reader, no MLflow.
   Run with as many threads as the Ray path has workers x 1 thread (same total cores), and with 1
   thread for the per-core view.

Alternating repeats; medians and ratios (goals: Ray/bare >= 0.9 at equal threads, data wait < 5%).
Needs a work directory where precompute ran (e.g. after `make demo`); it is only read (copied to a
temporary folder):

    .venv/bin/python bench/train_step.py --workdir work/local [--steps 200] [--warmup 20] [--repeats 3]
        [--log-every 10] [--stream]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from _common import cpu_name, median_line

from flows.registry import run as run_stage
from ldm.config import PipelineConfig, load_config
from ldm.devices import autocast_dtype
from ldm.diffusion.guidance import unet_model_fn
from ldm.diffusion.objective import apply_cfg_dropout, training_losses
from ldm.diffusion.schedule import make_noise_scheduler
from ldm.io import storage
from ldm.io.latents import collate, empty_prompt
from ldm.stage import Workdir
from ldm.train.state import Ema, lr_at
from ldm.unet.model import build_unet, training_attention


def stage_workdir(src: Path, dest: Path) -> None:
    """A work directory holding the source's latents, models and the upstream manifests the train stage checks.

    The latents manifest names its VAE and text encoder by URL; they are pointed at the copies, as the
    train stage refuses latents made with components other than the ones its work directory holds.
    """
    for folder in ("latents", "models"):
        shutil.copytree(src / folder, dest / folder)
    for folder in ("raw", "filtered"):  # identity the stages check down the chain, not data
        (dest / folder).mkdir(parents=True)
        shutil.copy(src / folder / "manifest.json", dest / folder)
    wd = Workdir.of(PipelineConfig(workdir=str(dest)))
    url = storage.join(wd.output("precompute"), "manifest.json")
    m = storage.read_json(url)
    m["vae"]["path"] = wd.output("train-vae")
    m["text_encoder"]["path"] = wd.output("train-clip")
    storage.write_json_atomic(url, m)


def in_memory_batches(cfg: PipelineConfig, m: dict, latents_url: str) -> list[dict[str, torch.Tensor]]:
    """All latent rows, collated once into global batches (the last partial one dropped)."""
    rows: dict[str, list] = {}
    for part in m["parts"]:
        table = pq.read_table(storage.join(latents_url, "parts", part["name"]).removeprefix("file://"))
        for k, v in table.to_pydict().items():
            rows.setdefault(k, []).extend(v)
    bs, n = cfg.train.batch_size, len(rows["key"])
    return [
        collate({k: v[i : i + bs] for k, v in rows.items()}, m["latent_shape"], m["text_dim"])
        for i in range(0, n - bs + 1, bs)
    ]


def bare_loop(cfg: PipelineConfig, m: dict, batches: list, threads: int, steps: int, warmup: int) -> float:
    """Samples/s of the loop's per-step work in one process over in-memory batches, after `warmup` steps."""
    torch.set_num_threads(threads)
    tc, shape, text_dim = cfg.train, m["latent_shape"], m["text_dim"]
    amp = autocast_dtype(tc.mixed_precision, "cpu")
    unet = build_unet(cfg.unet.size, shape[0], shape[1], text_dim, seed=cfg.seed)
    training_attention(unet, "cpu")
    ema = Ema(unet, tc.ema_decay, tc.ema_warmup)
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    fn, alphas, empty = unet_model_fn(unet), make_noise_scheduler(cfg.diffusion).alphas_cumprod, empty_prompt(m)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = batches[step % len(batches)]
        g = torch.Generator().manual_seed(step)
        text, mask, _ = apply_cfg_dropout(batch["text"], batch["mask"], empty, tc.cfg_dropout, g)
        x0 = batch["latents"]
        t = torch.randint(0, cfg.diffusion.timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = training_losses(
                fn, x0, t, text, mask, noise, alphas, cfg.diffusion.prediction_type,
                cfg.diffusion.snr_gamma, cfg.diffusion.offset_noise, g,
            ).mean()  # fmt: skip
        loss.backward()
        float(loss.detach())  # the loop reads the loss every step
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc.lr, tc.warmup_steps, tc.steps, tc.lr_schedule)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.grad_clip or float("inf"))
        opt.step()
        ema.update(unet, step + 1)
        times.append(time.perf_counter() - t0)
    return tc.batch_size * (steps - warmup) / sum(times[warmup:])


def ray_path(cfg: PipelineConfig, run_id: str, steps: int, warmup: int) -> tuple[float, float, float]:
    """(steady samples/s, steady data-wait fraction, wall s) of one train-stage run, from its MLflow metrics."""
    from mlflow.tracking import MlflowClient

    from ldm.tracking import tracking_uri

    cfg = cfg.model_copy(deep=True)
    cfg.train.run_id, cfg.train.steps, cfg.train.checkpoint_every = run_id, steps, steps
    t0 = time.perf_counter()
    out = run_stage("train", cfg)
    wall = time.perf_counter() - t0
    client = MlflowClient(tracking_uri(cfg))
    rate = {x.step: x.value for x in client.get_metric_history(out["mlflow_run_id"], "samples_per_s")}
    wait = {x.step: x.value for x in client.get_metric_history(out["mlflow_run_id"], "data_wait_fraction")}
    seconds = samples = waited = 0.0
    prev = 0
    for step in sorted(rate):
        n = (step - prev) * cfg.train.batch_size
        if prev >= warmup:  # a window wholly after the warm-up
            dt = n / rate[step]
            seconds, samples, waited = seconds + dt, samples + n, waited + wait[step] * dt
        prev = step
    if not seconds:
        raise SystemExit(f"no logged window after step {warmup}: raise --steps or lower --warmup/--log-every")
    return samples / seconds, waited / seconds, wall


def held(m: dict) -> bool:
    """Whether the driver materializes these latents in the object store (its size rule) rather than streaming."""
    from ldm.train.driver import MATERIALIZE_BYTES

    c, h, w = m["latent_shape"]
    return m["rows"] * 2 * (c * h * w + m.get("context_length", 77) * m["text_dim"]) < MATERIALIZE_BYTES


def ray_worker_threads() -> int:
    """torch's thread count in a 1-CPU Ray task: what each Train worker computes with."""
    import ray

    @ray.remote(num_cpus=1)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


def main() -> None:
    """Print the Ray path's and the bare loop's samples/s side by side, with ratios and the data-wait fraction."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="work/local", help="where precompute ran (read only)")
    p.add_argument("--profile", default="local")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=20, help="first steps left out (rounded up to --log-every)")
    p.add_argument("--log-every", type=int, default=10, help="train.log_every: the Ray path's timing windows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stream", action="store_true", help="stream the latents from Parquet even when small")
    a = p.parse_args()
    warmup = -(-a.warmup // a.log_every) * a.log_every
    if a.steps <= warmup:
        p.error(f"--steps {a.steps} must exceed the warm-up ({warmup} steps)")
    src = Path(a.workdir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        stage_workdir(src, Path(tmp))
        cfg = load_config(a.profile, [f"train.log_every={a.log_every}"], tmp)
        wd = Workdir.of(cfg)
        m = storage.read_json(storage.join(wd.output("precompute"), "manifest.json"))
        from ldm.ray_cluster import ensure_ray

        t0 = time.perf_counter()
        if a.stream:
            import ray

            import ldm.train.driver

            ldm.train.driver.MATERIALIZE_BYTES = 0  # the driver decides in this process: stream every size
            # Ray Data's read tasks each want a CPU; with the workers holding every CPU of the cluster they
            # never start and the run hangs (seen here: 2 CPUs, 2 workers). One extra logical CPU lets them run.
            ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, num_gpus=0, include_dashboard=False,
                     object_store_memory=512 << 20, log_to_driver=False)  # fmt: skip
        ensure_ray(cfg)  # up before anything is timed, so both sides run beside the same idle cluster
        startup = time.perf_counter() - t0
        workers = cfg.compute.num_workers
        per_worker = ray_worker_threads()
        batches = in_memory_batches(cfg, m, wd.output("precompute"))
        ray_name, bare_name, core_name = f"ray train {workers}x{per_worker} thr", f"bare {workers} thr", "bare 1 thr"
        rates: dict[str, list[float]] = {ray_name: [], bare_name: [], core_name: []}
        waits, walls = [], []
        for r in range(a.repeats):

            def ray_run(r: int = r) -> None:
                rate, wait, wall = ray_path(cfg, f"bench-{r}", a.steps, warmup)
                rates[ray_name].append(rate)
                waits.append(wait)
                walls.append(wall)

            order = [
                ray_run,
                lambda: rates[bare_name].append(bare_loop(cfg, m, batches, workers, a.steps, warmup)),
                lambda: rates[core_name].append(bare_loop(cfg, m, batches, 1, a.steps, warmup)),
            ]
            for fn in order if r % 2 == 0 else order[::-1]:
                fn()
            print(f"repeat {r + 1}/{a.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
        amp = autocast_dtype(cfg.train.mixed_precision, "cpu")
        print(
            f"\n{cpu_name()}, {os.cpu_count()} cores; unet {cfg.unet.size}, latents {m['latent_shape']}, "
            f"{m['rows']} rows, global batch {cfg.train.batch_size}, {'bf16 autocast' if amp else 'fp32'}; "
            f"{a.steps} steps per run, first {warmup} left out; latents "
            f"{'streamed from Parquet' if a.stream or not held(m) else 'held in the object store (< 2 GiB)'}"
        )
        print(f"samples/s (Ray start-up {startup:.1f} s not included; stage wall s per run: "
              f"{', '.join(f'{w:.0f}' for w in walls)})")  # fmt: skip
        for name, xs in rates.items():
            print(median_line(name, xs, "samples/s"))
        ray_rate = statistics.median(rates[ray_name])
        print(f"  ratio ray/bare at {workers} threads: {ray_rate / statistics.median(rates[bare_name]):.2f}x")
        print(f"  ratio ray/bare 1 thread: {ray_rate / statistics.median(rates[core_name]):.2f}x")
        print(f"  data-wait fraction (rank 0): median {100 * statistics.median(waits):.1f}%   "
              f"runs {', '.join(f'{100 * w:.1f}%' for w in waits)}")  # fmt: skip


if __name__ == "__main__":
    main()
