"""The precompute stage: filtered shards -> VAE latents + text token embeddings, as Parquet parts (Ray Data).

One streaming Ray Data pipeline: a pool of encoder actors takes one shard per call (read, decode, VAE
latent, caption states) and writes that shard's rows as one Parquet part, atomically. The driver sees
one small result per shard (name, rows, bytes, checksum), never a row, so its work and memory do not
grow with the data. Parts are named by input shard, so a killed run resumes with the missing ones.
"""

from __future__ import annotations

import base64
import re
import time

import numpy as np
from PIL import UnidentifiedImageError

from data_prep.precompute.encoders import ShardEncoder, vae_compute_dtype
from ldm.autoencoder.model import load_vae
from ldm.clip.encoder import load_text_encoder
from ldm.config import PipelineConfig, latent_resolution
from ldm.io import storage
from ldm.io.manifest import StageError, root_cause
from ldm.io.shards import ShardError
from ldm.ray_cluster import actor_pool, ensure_ray
from ldm.stage import StageRun, content_id

STAGE = "precompute"


def _component_identities(run: StageRun) -> tuple[dict, dict]:
    """(VAE identity, text-encoder identity): where each came from and the hash of the stage that made it."""
    cfg = run.cfg
    vae = {"path": cfg.vae.path or run.workdir.output("train-vae"), "weights": run.inputs["train-vae"]["config_hash"]}
    te = cfg.text_encoder
    if not te.same_as_clip:  # its own model (SD 2: OpenCLIP ViT-H-14), identified by the file's content
        return vae, {"arch": te.arch, "path": te.weights, "weights": content_id(str(te.weights)), "blocks": te.blocks}
    text = {
        "arch": cfg.clip.arch,
        "path": cfg.clip.weights if cfg.clip.arch != "tiny" else run.workdir.output("train-clip"),
        "weights": run.inputs["train-clip"]["config_hash"],
        "blocks": te.blocks,
    }
    return vae, text


def _empty_prompt(encoder) -> dict:
    """The empty caption's token states, stored once for classifier-free guidance dropout at train time."""
    states, lengths = encoder.token_states([""])
    emb = states[0, : int(lengths[0])].numpy().astype(np.float16)
    return {"shape": list(emb.shape), "dtype": "float16", "data_b64": base64.b64encode(emb.tobytes()).decode()}


def precompute(run: StageRun) -> dict:
    """Encode W/filtered/shards into W/latents/parts/<shard>.parquet; the manifest's fields."""
    cfg, workdir, parts_url = run.cfg, run.workdir, run.workdir.latent_parts
    vae_id, text_id = _component_identities(run)
    expected = {s["name"].removesuffix(".tar"): s["samples"] for s in run.inputs["filter"]["shards"]}
    if not expected:
        raise StageError(f"{workdir.filtered_shards} holds no shards to precompute")
    t0 = time.time()
    for name in sorted(expected):  # before Ray starts: a cut shard is then one line, not a Ray task's trace
        _check_tar_end(storage.join(workdir.filtered_shards, f"{name}.tar"))
    resources = ensure_ray(cfg, cfg.precompute.object_store_mb)
    run.begin()
    done = {u.rsplit("/", 1)[1].removesuffix(".parquet") for u in storage.listdir(parts_url, "*.parquet")}
    todo = [n for n in sorted(expected) if n not in done]
    if done:
        print(f"precompute: resuming; {len(done)} of {len(expected)} parts already written")
    vae = load_vae(cfg)
    resolution = latent_resolution(cfg)
    shape = (int(vae.config.latent_channels), *(resolution // cfg.vae.downsample,) * 2)
    encoder = load_text_encoder(cfg)
    text_dim, context_length, empty = encoder.token_width, encoder.context_length, _empty_prompt(encoder)
    conditioning = encoder.conditioning
    scale = float(vae.config.scaling_factor)
    del vae, encoder  # the actors load their own copies
    part = {"url": parts_url, "shape": list(shape), "text_dim": text_dim, "scale_factor": scale,
            "latent_is_sample": cfg.precompute.latent == "sample"}  # fmt: skip
    written = _run_pipeline(cfg, workdir.filtered_shards, {n: expected[n] for n in todo}, part)
    parts = storage.listdir(parts_url, "*.parquet")
    rows = sum(expected.values())
    return dict(
        vae=vae_id, text_encoder=text_id, resolution=resolution, crop=cfg.precompute.crop, conditioning=conditioning,
        latent_shape=list(shape), latent_dtype="float16", scale_factor=scale, vae_compute_dtype=compute_dtype_name(cfg),
        latent_kind=cfg.precompute.latent, latent_seed=cfg.seed if cfg.precompute.latent == "sample" else None,
        text_dim=text_dim, text_dtype="float16", context_length=context_length,
        empty_prompt=empty, rows=rows,
        parts=[{"name": u.rsplit("/", 1)[1], "rows": expected[u.rsplit("/", 1)[1].removesuffix(".parquet")]}
               for u in parts],
        parts_resumed=len(done), timings={"total_s": round(time.time() - t0, 2)}, cluster=_cluster(resources),
        images_per_s=round(written / max(1e-9, time.time() - t0), 2),
    )  # fmt: skip


def summary(m: dict) -> str:
    """One line on a precompute manifest."""
    return (
        f"precompute summary: {m['rows']} rows in {len(m['parts'])} parts ({m['parts_resumed']} resumed), "
        f"latents {m['latent_shape']} fp16 from {m['resolution']} px, text states [len, {m['text_dim']}] fp16, "
        f"scale factor {m['scale_factor']:.4f}; {m['images_per_s']} images/s"
    )


def compute_dtype_name(cfg: PipelineConfig) -> str:
    """The dtype the VAE actors compute in (as judged on the driver's kind of machine)."""
    return str(vae_compute_dtype(cfg, "cuda" if cfg.compute.use_gpu else "cpu")).removeprefix("torch.")


def _cluster(resources: dict) -> dict:
    """Which Ray cluster ran the stage (its GCS address) and its size."""
    import ray

    return {
        "gcs_address": ray.get_runtime_context().gcs_address,
        "cpus": resources.get("CPU", 0),
        "gpus": resources.get("GPU", 0),
    }


def _run_pipeline(cfg, shards_url: str, todo: dict[str, int], part: dict) -> int:
    """Stream the shards through the encoder actors, which write the parts; returns the rows written."""
    import ray

    if not todo:
        return 0
    pc = cfg.precompute
    # On CPUs the VAE is ~90% of a row's work (64 px: 157 images/s per core vs 1,860 for the text tower and
    # ~6,000 for the decode), so one encoder actor per core, one torch thread each (that scales better than
    # intra-op threads); on GPUs one per GPU, half precision and channels-last inside the actors.
    actors, res = actor_pool(cfg, pc.actors, len(todo))
    items = [{"name": n, "url": storage.join(shards_url, f"{n}.tar"), "rows": r} for n, r in todo.items()]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardEncoder, fn_constructor_args=(cfg.model_dump(mode="json"), pc.latent, cfg.seed, part), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2), **res,
    )  # fmt: skip
    written = 0
    try:
        for result in ds.iter_rows():  # one row per shard, as each part is written
            written += int(result["rows"])
    except Exception as e:  # an actor's error arrives wrapped (RayTaskError, UserCodeException): name the cause
        raise _stage_error(e) from e
    missing = sorted(set(todo) - {u.rsplit("/", 1)[1].removesuffix(".parquet") for u in storage.listdir(
        part["url"], "*.parquet")})  # fmt: skip
    if missing:
        raise StageError(f"precompute lost parts for shards {missing}; rerun to redo them")
    return written


def _stage_error(e: Exception) -> Exception:
    """An actor's failure as the stage's one-line error where it is one the user can act on, else itself."""
    cause = root_cause(e)
    if isinstance(cause, ShardError):
        return StageError(f"precompute: unreadable filtered shard {cause}; rerun the filter stage with --overwrite")
    found = re.search(r"precompute: filtered shard .*? (has no|holds) .*", str(e))  # a row refused inside an actor
    if found:
        return StageError(found.group(0))
    if isinstance(cause, StageError | UnidentifiedImageError):
        return StageError(f"precompute: {' '.join(str(cause).split())}")
    # The cause's chain does not survive Ray's pickling; its "ShardError: ..." line does, in the text.
    found = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("ldm.io.shards.ShardError: ")]
    if found:
        what = found[-1].removeprefix("ldm.io.shards.ShardError: ")
        return StageError(f"precompute: unreadable filtered shard {what}; rerun the filter stage with --overwrite")
    return e


def _check_tar_end(url: str) -> None:
    """Refuse a missing or truncated tar in O(1): whole 512-byte blocks ending in the end-of-archive marker."""
    fs, path = storage.fs_for(url)
    if not fs.exists(path):
        raise StageError(f"precompute: filtered shard {url} is missing; rerun the filter stage with --overwrite")
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        tail = f.read()
    if size % 512 or size < 1024 or tail.strip(b"\0"):
        raise StageError(
            f"precompute: filtered shard {url} is truncated ({size} bytes, no end-of-archive marker); "
            "rerun the filter stage with --overwrite"
        )
