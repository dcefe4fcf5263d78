"""The per-worker training loop Ray Train runs: DDP UNet, AdamW, EMA, CFG dropout, checkpoints, fault injection."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from ldm import budget
from ldm.config import PipelineConfig
from ldm.devices import autocast_dtype
from ldm.diffusion.guidance import unet_model_fn
from ldm.diffusion.objective import apply_cfg_dropout, training_losses
from ldm.diffusion.schedule import make_noise_scheduler
from ldm.io.latents import collate, empty_prompt
from ldm.train.state import Ema, load_state, lr_at, read_meta, save_state
from ldm.unet.init import build_for, load_init
from ldm.unet.model import training_attention


def _step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    # Noise, timesteps and caption dropout are a pure function of (seed, step, rank, micro-batch), so a
    # resumed run draws exactly what an uninterrupted one would, with no RNG stream to replay.
    return (seed * 1_000_003 + step) * 1009 + rank * 31 + micro


def _windows(it, micro: int, window: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive groups of `window` rows (the last one shorter) from an iterator of row batches."""
    pending: list[dict[str, np.ndarray]] = []
    count = 0
    for rows in it:
        pending.append(rows)
        count += len(rows["key"])
        if count >= window:
            yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            pending, count = [], 0
    if pending:
        yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}


def _batches(shard, micro: int, seed: int, rank: int, buffer: int, epoch: int, skip: int) -> Iterator[tuple]:
    """(epoch, batches consumed in that epoch, rows) forever, starting after `skip` batches of `epoch`.

    The shuffle is ours, not Ray's local shuffle buffer: that one's output depends on how many blocks
    its prefetch thread has delivered, so two runs over the same rows batch them differently and an
    exact resume is impossible. Here rows are permuted within windows by a seeded RNG.
    """
    window = max(micro, buffer // micro * micro)
    while True:
        it = shard.iter_batches(batch_size=micro, batch_format="numpy", prefetch_batches=1)
        n = 0
        for w, rows in enumerate(_windows(it, micro, window)):
            order = np.random.default_rng([seed, epoch, rank, w]).permutation(len(rows["key"])) if buffer else None
            # drop_last: every rank gets the same number of full batches, so DDP never waits forever.
            for start in range(0, len(rows["key"]) - micro + 1, micro):
                n += 1
                if n > skip:
                    idx = order[start : start + micro] if order is not None else slice(start, start + micro)
                    yield epoch, n, {k: v[idx] for k, v in rows.items()}
        if n == 0:
            raise RuntimeError(f"rank {rank}: its data shard has fewer rows than one micro-batch of {micro}")
        epoch, skip = epoch + 1, 0


def _audit(run_dir: str, rank: int, record: dict) -> None:
    """Append one JSON line to the run's audit log for this rank (local work directories only)."""
    folder = Path(run_dir.removeprefix("file://")) / "audit"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def params_digest(model: torch.nn.Module) -> str:
    """A hash of a model's parameter bytes: equal digests mean bit-identical weights."""
    import hashlib

    h = hashlib.sha256()
    for _, p in sorted(model.state_dict().items()):
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: the whole training run on one rank."""
    cfg = PipelineConfig.model_validate(config["cfg"])
    tc, latents, run_dir = cfg.train, config["latents"], config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = "cuda" if cfg.compute.use_gpu else "cpu"
    amp = autocast_dtype(tc.mixed_precision, device)
    shape, text_dim = latents["latent_shape"], latents["text_dim"]
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restarted worker group or a resumed run: its count, never timed again
        with ckpt.as_directory() as d:
            sized = read_meta(d).get("budget")
    else:
        sized = (config.get("budget") or {}).get("record")
    if sized is not None:
        tc = budget.scaled_train(tc, sized["steps"])
    unet = build_for(cfg.unet.size, shape, text_dim, config.get("init"), seed=cfg.seed)
    if ckpt is None and config.get("init"):  # a fresh run from initial weights (a resumed one has its own)
        load_init(unet, config["init"])
    training_attention(unet, device)
    if tc.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    # On the device before the optimizer exists, so a restored AdamW state lands next to its parameters.
    unet.to(ray.train.torch.get_device())
    ema = Ema(unet, tc.ema_decay, tc.ema_warmup)
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    meta = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped": 0, "nonfinite_run": 0, "budget": sized}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta = load_state(d, unet, ema, opt)
        ema.shadow = {n: v.to(ray.train.torch.get_device()) for n, v in ema.shadow.items()}
    model = ray.train.torch.prepare_model(unet)  # DDP over gloo/NCCL; moves to this rank's device
    unet = model.module if hasattr(model, "module") else model
    if tc.compile:
        model = torch.compile(model)
    fn = unet_model_fn(model)
    alphas = make_noise_scheduler(cfg.diffusion).alphas_cumprod.to(device)
    empty = empty_prompt(latents).to(device)
    micro = tc.batch_size // (world * tc.grad_accum)
    data = _batches(
        ray.train.get_dataset_shard("train"), micro, cfg.seed, rank, tc.shuffle_buffer,
        meta["epoch"], meta["batch_in_epoch"],
    )  # fmt: skip

    def forward_backward(rows: dict[str, np.ndarray], step: int, i: int) -> float:
        """Micro-batch i of optimizer step `step`: loss and gradients; returns the loss."""
        batch = {k: v.to(device) for k, v in collate(rows, shape, text_dim).items()}
        g = torch.Generator(device=device).manual_seed(_step_seed(cfg.seed, step, rank, i))
        text, mask, _ = apply_cfg_dropout(batch["text"], batch["mask"], empty, tc.cfg_dropout, g)
        x0 = batch["latents"]
        t = torch.randint(0, cfg.diffusion.timesteps, (x0.shape[0],), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        # Gradients are all-reduced only on the last micro-batch of a step.
        sync = world == 1 or i == tc.grad_accum - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
                loss = training_losses(
                    fn, x0, t, text, mask, noise, alphas, cfg.diffusion.prediction_type,
                    cfg.diffusion.snr_gamma, cfg.diffusion.offset_noise, g,
                ).mean()  # fmt: skip
            (loss / tc.grad_accum).backward()
        return float(loss.detach())

    if ckpt is None and sized is None and config.get("budget"):
        # This CPU's step count, from steps timed here on a throwaway copy of the state: the run then
        # starts from the untouched initial weights, exactly as one configured with that count.
        first = next(data)
        data = itertools.chain([first], data)
        initial = {k: v.detach().clone() for k, v in unet.state_dict().items()}

        def probe() -> None:
            opt.zero_grad(set_to_none=True)
            for i in range(tc.grad_accum):
                forward_backward(first[2], 0, i)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.grad_clip or float("inf"))
            opt.step()
            ema.update(unet, 1)

        step_s, now = budget.time_steps(probe), time.time()
        if world > 1:  # one count for every rank: the slowest rank's step, the latest clock
            both = torch.tensor([step_s, now], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
            step_s, now = both.tolist()
        sized = budget.decide(cfg.budget, "train", tc.steps, step_s, now)
        if rank == 0:
            budget.remember(cfg, "train", config["budget"]["config_hash"], sized)
        tc = budget.scaled_train(tc, sized["steps"])
        unet.load_state_dict(initial)
        opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        ema = Ema(unet, tc.ema_decay, tc.ema_warmup)
        meta["budget"] = sized
    tracker = _Tracker(cfg, config, rank) if rank == 0 else None
    if tracker is not None and sized is not None and ckpt is None:
        tracker.mlflow.log_params({f"budget.{k}": v for k, v in sized.items()})
    last = tc.steps if tc.stop_at_step is None else min(tc.steps, tc.stop_at_step)
    step, t_window, wait_window, losses = meta["step"], time.perf_counter(), 0.0, []
    try:
        while step < last:
            opt.zero_grad(set_to_none=True)
            keys, loss_sum = [], 0.0
            for i in range(tc.grad_accum):
                t0 = time.perf_counter()
                epoch, pos, rows = next(data)
                wait_window += time.perf_counter() - t0
                loss_sum += forward_backward(rows, step, i) / tc.grad_accum
                keys.extend(str(k) for k in rows["key"])
            lr = lr_at(step, tc.lr, tc.warmup_steps, tc.steps, tc.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            # The norm is of the all-reduced gradients, so every rank takes the same skip decision; a
            # non-finite loss on any rank makes them non-finite too.
            norm = float(torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.grad_clip or float("inf")))
            step += 1
            if np.isfinite(norm):
                opt.step()
                ema.update(unet, step)
                meta["nonfinite_run"] = 0
            else:
                meta["skipped"] += 1
                meta["nonfinite_run"] += 1
                if meta["nonfinite_run"] >= tc.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"train: {meta['nonfinite_run']} non-finite steps in a row, the last at step {step} "
                        f"(loss {loss_sum}, grad norm {norm}); lower train.lr or set train.grad_clip"
                    )
            meta.update(step=step, epoch=epoch, batch_in_epoch=pos)
            losses.append(loss_sum)
            if tc.audit:
                _audit(run_dir, rank, {"step": step, "epoch": epoch, "keys": keys})
            if tracker is not None and (step % tc.log_every == 0 or step == last):
                dt = time.perf_counter() - t_window
                tracker.log(step, {
                    "loss": float(np.mean(losses)), "lr": lr, "grad_norm": norm,
                    "samples_per_s": len(losses) * tc.batch_size / dt, "data_wait_fraction": wait_window / dt,
                    "skipped_steps": meta["skipped"],
                })  # fmt: skip
                t_window, wait_window, losses = time.perf_counter(), 0.0, []
            if step % tc.checkpoint_every == 0 or step == last:
                _checkpoint(unet, ema, opt, meta, rank, loss_sum, tracker)
            if tc.fail_at_step == step and rank == world - 1:
                _inject_fault(run_dir)
        if tc.audit:
            node = ray.get_runtime_context().get_node_id()
            _audit(run_dir, rank, {"final_step": step, "params": params_digest(unet), "node": node})
    finally:
        if tracker is not None:
            tracker.close()


def _checkpoint(unet, ema, opt, meta, rank, loss, tracker) -> None:
    """Report metrics from every rank, with rank 0's checkpoint (and sample grid) attached."""
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            save_state(d, unet, ema, opt, meta)
            checkpoint = Checkpoint.from_directory(d)
            if tracker is not None:
                tracker.grid(meta["step"], ema)
        ray.train.report({"step": meta["step"], "loss": loss, "skipped": meta["skipped"]}, checkpoint=checkpoint)


def _inject_fault(run_dir: str) -> None:
    """Tests: SIGKILL this worker process, once per run (a marker file in the run folder remembers)."""
    marker = Path(run_dir.removeprefix("file://")) / "fault_injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    # The controller polls worker health every 2 s: give it time to register the checkpoint just
    # reported, so the restart resumes from it rather than from the one before.
    time.sleep(3)
    os.kill(os.getpid(), signal.SIGKILL)


class _Tracker:
    """Rank 0's MLflow logging into the run the driver created (so restarts continue the same run)."""

    def __init__(self, cfg: PipelineConfig, config: dict[str, Any], rank: int):
        from ldm.train.tracking import open_run

        self.cfg, self.rank = cfg, rank
        self.mlflow = open_run(cfg, config["mlflow_run_id"])
        self.sampler = config.get("sampler")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Log a dict of metrics at a step."""
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def grid(self, step: int, ema: Ema) -> None:
        """Log a sample grid of the fixed prompts from the EMA weights."""
        from ldm.train.tracking import log_grid

        log_grid(self.mlflow, self.cfg, self.sampler, ema, step)

    def close(self) -> None:
        """End the MLflow run in this process."""
        self.mlflow.end_run()
