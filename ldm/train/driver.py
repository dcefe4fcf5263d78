"""The train stage's driver: refuse a bad plan before any worker starts, run the TorchTrainer, export the result."""

from __future__ import annotations

import time
from typing import Any

from ldm import budget
from ldm.config import PipelineConfig, to_yaml
from ldm.io import storage
from ldm.io.latents import latent_dataset
from ldm.io.manifest import StageError
from ldm.ray_cluster import ensure_ray
from ldm.stage import StageRun, Workdir
from ldm.unet.model import check_unet_matches, unet_config

CONFIG_FILE = "config.yaml"  # the resolved config, so `--resume <run>` needs nothing else
# Materialize (hold in the object store) latents up to this size, so workers never wait on reads
# for CPUs they themselves hold; larger sets stream from Parquet.
MATERIALIZE_BYTES = 2 << 30


class Stopped(StageError):
    """The run stopped at train.stop_at_step with a checkpoint; `--resume` continues it."""


def expected_components(cfg: PipelineConfig, wd: Workdir) -> dict[str, str]:
    """Where the config says the latents' VAE and text encoder come from."""
    te = cfg.text_encoder
    if not te.same_as_clip:  # a text encoder of its own (SD 2: OpenCLIP ViT-H-14)
        text = f"{te.arch}:{te.weights}"
    else:
        text = f"{cfg.clip.arch}:{cfg.clip.weights if cfg.clip.arch != 'tiny' else wd.output('train-clip')}"
    return {"vae": cfg.vae.path or wd.output("train-vae"), "text_encoder": text}


def check_plan(cfg: PipelineConfig, wd: Workdir, m: dict, latents_url: str) -> None:
    """Every refusal that needs no worker: batch split, UNet vs latents, the latents' components."""
    tc, workers = cfg.train, cfg.compute.num_workers
    if tc.batch_size % (workers * tc.grad_accum):
        raise StageError(
            f"train: train.batch_size {tc.batch_size} is not divisible by compute.num_workers {workers} "
            f"x train.grad_accum {tc.grad_accum}; make it a multiple of {workers * tc.grad_accum}"
        )
    shape, text_dim = m["latent_shape"], m["text_dim"]
    if shape[1] != shape[2]:
        raise StageError(f"train: latents in {latents_url} are {shape[1]}x{shape[2]}; the UNet needs square ones")
    if cfg.unet.init_from:  # the architecture is the initial weights' (their channels and width: check_init)
        want, which = init_record(cfg, wd)["config"], f"unet.init_from {cfg.unet.init_from}"
    else:  # the cross-attention width follows the text encoder unless the config pins it (then it must agree)
        which = f"unet.size {cfg.unet.size}"
        want = unet_config(cfg.unet.size, shape[0], shape[1], cfg.unet.cross_attention_dim or text_dim)
        try:
            check_unet_matches(want, shape, text_dim)
        except ValueError as e:
            raise StageError(f"train: {which} does not fit the latents in {latents_url}: {e}") from e
    levels = len(want["block_out_channels"]) - 1
    if shape[1] % (2**levels):
        raise StageError(
            f"train: {which} halves the latents {levels} times but latent size {shape[1]} "
            f"(in {latents_url}) is not divisible by {2**levels}"
        )
    want_vae, want_text = expected_components(cfg, wd).values()
    got_vae, got_text = str((m.get("vae") or {}).get("path")), _text_id(m.get("text_encoder") or {})
    if storage.normalize(got_vae) != storage.normalize(want_vae):
        raise StageError(
            f"train: latents in {latents_url} were made with the VAE {got_vae}, the config names {want_vae}; "
            "rerun the precompute stage"
        )
    if _norm_text(got_text) != _norm_text(want_text):
        raise StageError(
            f"train: latents in {latents_url} were made with the text encoder {got_text}, the config names "
            f"{want_text}; rerun the precompute stage"
        )
    got_blocks, want_blocks = (m.get("text_encoder") or {}).get("blocks"), cfg.text_encoder.blocks
    if got_blocks != want_blocks:
        raise StageError(
            f"train: latents in {latents_url} hold text states after {_layer(got_blocks)}, the config names "
            f"text_encoder.blocks={want_blocks} ({_layer(want_blocks)}); rerun the precompute stage"
        )
    te, conditioning = cfg.text_encoder, latent_conditioning(m)
    for field, want in (("mask_padding", te.mask_padding), ("context_length", te.context_length)):
        if want is not None and conditioning[field] != want:
            raise StageError(
                f"train: latents in {latents_url} were made with text_encoder.{field}={conditioning[field]}, the "
                f"config says {want}; rerun the precompute stage"
            )
    if cfg.unet.init_from:
        from ldm.unet.init import check_init

        check_init(init_record(cfg, wd), shape, text_dim, conditioning, cfg.diffusion.prediction_type)


def latent_conditioning(m: dict) -> dict:
    """The conditioning convention of a latent set (manifests from before it was recorded: masked)."""
    return m.get("conditioning") or {"depth": None, "context_length": m.get("context_length"), "mask_padding": True}


def init_record(cfg: PipelineConfig, wd: Workdir) -> dict:
    """unet.init_from resolved (its weights' content hash is cached by ldm.stage.content_id)."""
    from ldm.unet.init import resolve_init

    return resolve_init(str(cfg.unet.init_from), wd.url)


def _layer(blocks: int | list[int] | None) -> str:
    if isinstance(blocks, list):
        return " and ".join(_layer(b) for b in blocks) + ", side by side"
    return "the penultimate block" if blocks is None else f"{blocks} block(s)"


def _norm_text(text_id: str) -> str:
    arch, _, path = text_id.partition(":")
    return f"{arch}:{storage.normalize(path) if path not in ('', 'None') else path}"


def _text_id(text: dict) -> str:
    return f"{text.get('arch')}:{text.get('path')}"


def _sampler_inputs(cfg: PipelineConfig, m: dict, vae_url: str) -> dict[str, Any] | None:
    """Prompt states and the VAE folder for the checkpoint sample grids; None (no grids) when unavailable."""
    try:
        from ldm.autoencoder.model import local_path
        from ldm.clip.encoder import load_text_encoder

        encoder = load_text_encoder(cfg)
        states, lengths = encoder.token_states(cfg.train.sample_prompts)
        longest = int(lengths.max())
        vae_dir = str(local_path(vae_url))
    except (StageError, OSError, ValueError) as e:
        print(f"train: no sample grids ({e})")
        return None
    from ldm.io.latents import empty_prompt

    return {
        "prompt_states": states[:, :longest].tolist(),
        "prompt_lengths": lengths.tolist(),
        "empty_states": empty_prompt(m).tolist(),
        "latent_shape": m["latent_shape"],
        "text_dim": m["text_dim"],
        "scale_factor": m["scale_factor"],
        "vae_dir": vae_dir,
    }


def train_stage(run: StageRun) -> dict:
    """Train the UNet on W/latents with Ray Train DDP into W/runs/<run>/; export the EMA pipeline at the end."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ldm.train.export import export_pipeline
    from ldm.train.loop import train_loop
    from ldm.train.state import read_meta
    from ldm.train.tracking import ensure_run

    cfg, tc, wd = run.cfg, run.cfg.train, run.workdir
    latents_url, m = wd.output("precompute"), run.inputs["precompute"]
    check_plan(cfg, wd, m, latents_url)
    size = m["rows"] * (2 * (_numel(m["latent_shape"]) + m.get("context_length", 77) * m["text_dim"]))
    cpus = ensure_ray(cfg).get("CPU", 0)
    if size >= MATERIALIZE_BYTES:
        _check_room_to_stream(cfg, size, cpus)
    t0 = time.time()
    run.begin()
    storage.write_bytes_atomic(storage.join(run.out, CONFIG_FILE), to_yaml(cfg).encode())
    init = init_record(cfg, wd) if cfg.unet.init_from else None
    lineage = None if init is None else {k: init[k] for k in ("from", "path", "weights", "parent")}
    if init is not None:
        print(f"train: initial weights from {init['path']} ({init['weights']}); the UNet's architecture is theirs")
    params = {**cfg.model_dump(mode="json"), "inputs": {"precompute": m["config_hash"]},
              "components": {"vae": m.get("vae"), "text_encoder": m.get("text_encoder")},
              **({"init": {k: lineage[k] for k in ("path", "weights")}} if lineage else {})}  # fmt: skip
    mlflow_id = ensure_run(cfg, run.out, params)
    ds, _ = latent_dataset(latents_url)
    if size < MATERIALIZE_BYTES:
        ds = _materialize_in_order(ds)
    latents = {k: m[k] for k in ("latent_shape", "text_dim", "scale_factor", "empty_prompt", "text_encoder")}
    latents["conditioning"] = latent_conditioning(m)
    unet_init = None if init is None else {"path": init["path"], "config": init["config"]}
    vae_url = expected_components(cfg, wd)["vae"]
    sampler = _sampler_inputs(cfg, m, vae_url)
    if sampler is not None:
        sampler["init"] = unet_init
    fs, storage_path = storage.fs_for(storage.join(wd.url, "runs"))
    storage_fs = None
    if not run.out.startswith("file://"):
        import pyarrow.fs as pafs

        storage_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    from ray.data import ExecutionOptions

    sized = None  # the budget: a count recorded for this config, or the workers time their steps and fix one
    if budget.applies(cfg, "train"):
        record = budget.recall(cfg, "train", run.config_hash)
        sized = {"record": record} if record is not None else {"config_hash": run.config_hash}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": worker_config(cfg), "latents": latents, "run_dir": run.out,
                           "mlflow_run_id": mlflow_id, "sampler": sampler,
                           "budget": sized, "init": unet_init},
        scaling_config=ScalingConfig(num_workers=cfg.compute.num_workers, use_gpu=cfg.compute.use_gpu),
        run_config=RunConfig(
            name=tc.run_id, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
        datasets={"train": ds},
        # Same row order on every run: a resumed run skips to its data position in the same sequence.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )  # fmt: skip
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps the worker's error; the user needs its last line
        raise StageError(f"train: run {tc.run_id} failed: {_last_line(e)}") from e
    if result.checkpoint is None:
        raise StageError(f"train: run {tc.run_id} reported no checkpoint; rerun it with --overwrite")
    with result.checkpoint.as_directory() as d:
        meta = read_meta(d)
        total = (meta.get("budget") or {}).get("steps", tc.steps)
        if meta["step"] < total:
            raise Stopped(
                f"train: run {tc.run_id} stopped at step {meta['step']} of {total} (train.stop_at_step); "
                f"continue with `ldm stage train --resume {tc.run_id}`"
            )
        pipeline_url = storage.join(run.out, "pipeline")
        export_pipeline(cfg, d, pipeline_url, latents, vae_url, unet_init)
    return {
        "run_id": tc.run_id, "steps": meta["step"], "skipped_steps": meta["skipped"], "budget": meta.get("budget"),
        "checkpoint": _as_url(result.checkpoint.path, wd.url), "pipeline": pipeline_url, "mlflow_run_id": mlflow_id,
        "latents": {"config_hash": m["config_hash"], "rows": m["rows"], "url": latents_url}, "init": lineage,
        "timings": {"total_s": round(time.time() - t0, 2)},
    }  # fmt: skip


def _check_room_to_stream(cfg: PipelineConfig, size: int, cpus: float) -> None:
    """Refuse CPU workers that would hold every CPU of the cluster while the latents stream from Parquet:
    Ray Data's read tasks would never be scheduled and the run would wait forever."""
    if not cfg.compute.use_gpu and cfg.compute.num_workers >= cpus:
        raise StageError(
            f"train: the latents ({size / 2**30:.1f} GiB) stream from Parquet, and {cfg.compute.num_workers} CPU "
            f"workers would hold all {cpus:g} CPUs of the Ray cluster, leaving none to read them; set "
            f"compute.num_workers below {cpus:g} or add CPUs"
        )


def _materialize_in_order(ds):
    """The dataset held in the object store, rows in key order.

    Two runs over the same parts saw them in different block orders (preserve_order set or not), so a
    resumed run's data position pointed at other rows. Sorting by key makes the order a property of
    the data; the workers shuffle it with seeded windows.
    """
    return ds.sort("key").materialize()


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def worker_config(cfg: PipelineConfig) -> dict:
    """The config as the workers get it: work directory and tracking store as absolute URLs.

    Ray starts workers in their own folders, so a relative workdir (the demo's `work/local`) or the
    SQLite store derived from it would point each worker somewhere else (a fresh, empty store).
    """
    from ldm.tracking import tracking_uri

    fixed = cfg.model_copy(deep=True)
    fixed.tracking.uri = tracking_uri(cfg)
    fixed.workdir = storage.normalize(cfg.workdir)
    return fixed.model_dump(mode="json")


def _last_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    for line in reversed(text):
        if "Error" in line or "error" in line:
            return line.strip()[:400]
    return (text[-1] if text else repr(e))[:400]


def _as_url(path: str, workdir_url: str) -> str:
    """Ray reports a checkpoint as a path on its storage filesystem; give it the work directory's scheme."""
    scheme = workdir_url.split("://", 1)[0] if "://" in workdir_url else "file"
    return path if "://" in path else f"{scheme}://{path}" if scheme != "file" else storage.normalize(path)


def summary(m: dict) -> str:
    """One line on a train manifest."""
    return (
        f"train summary: run {m['run_id']}: {m['steps']} steps ({m['skipped_steps']} skipped) in "
        f"{m['timings']['total_s']} s; pipeline in {m['pipeline']}; MLflow run {m['mlflow_run_id']}"
    )


def resume_config(workdir_url: str, run_id: str) -> str:
    """The resolved config YAML a run recorded, for `--resume`; StageError if the run does not exist."""
    url = storage.join(workdir_url, "runs", run_id, CONFIG_FILE)
    if not storage.exists(url):
        raise StageError(f"train: no run {run_id!r} to resume ({url} does not exist)")
    fs, path = storage.fs_for(url)
    with fs.open(path, "rb") as f:
        return f.read().decode()
