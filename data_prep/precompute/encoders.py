"""The precompute's encoders as callable classes for Ray Data actors: VAE latents, caption states, both.

Each callable class loads its model once in `__init__` (once per actor) and keeps `__call__(batch)`
a pure function of the batch; resources are set where `map_batches` is called.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from data_prep.precompute.rows import Batch, columns, decode_images, row_seed, shard_rows
from ldm.autoencoder.model import load_vae
from ldm.clip.encoder import load_text_encoder
from ldm.config import PipelineConfig, latent_resolution
from ldm.devices import native_bf16
from ldm.io import storage
from ldm.io.latents import part_bytes
from ldm.io.manifest import StageError

CPU_CHUNK = 16  # images per VAE forward on a CPU actor


def vae_compute_dtype(cfg, device_type: str):
    """The VAE's compute dtype: fp16 on a GPU and bf16 on CPUs with AMX or AVX512-BF16 when precompute.half."""
    if not cfg.precompute.half:
        return torch.float32
    if device_type == "cuda":
        return torch.float16
    return torch.bfloat16 if native_bf16() else torch.float32


def _threads(use_gpu: bool) -> None:
    if not use_gpu:
        torch.set_num_threads(1)  # one core per actor: Ray runs as many actors as cores allow


class VaeLatentEncoder:
    """Encodes pixels to VAE latents (posterior mean, or a sample seeded per key); fp16 bytes per row."""

    def __init__(self, cfg_dict: dict[str, Any], latent: str, seed: int):
        cfg = PipelineConfig.model_validate(cfg_dict)
        _threads(cfg.compute.use_gpu)
        self.device = torch.device("cuda" if cfg.compute.use_gpu and torch.cuda.is_available() else "cpu")
        self.dtype = vae_compute_dtype(cfg, self.device.type)
        # channels-last everywhere: on the CPU too it is ~1.3x faster for these convolutions.
        # On a CPU, weights and inputs stay fp32 and bf16 runs under autocast; on a GPU they are cast.
        self.cpu_bf16 = self.device.type == "cpu" and self.dtype == torch.bfloat16
        self.io_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.vae = load_vae(cfg).to(self.device, self.io_dtype).eval().to(memory_format=torch.channels_last)
        self.latent, self.seed = latent, seed
        # A GPU takes the whole batch; a CPU core runs small chunks faster (they stay in cache): one-thread
        # encode of the local VAE at 64 px measured ~190 images/s in chunks of 16 against ~120 in one of 64.
        self.chunk = None if self.device.type == "cuda" else CPU_CHUNK

    def __call__(self, batch: Batch) -> Batch:
        """Add `latent` (fp16 bytes, [C,h,w] per row); drop the pixels."""
        x = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).permute(0, 3, 1, 2)
        x = (x.to(self.device, self.io_dtype) / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16):
            dists = [self.vae.encode(part).latent_dist for part in x.split(self.chunk or len(x))]
            z = torch.cat([d.mean for d in dists])
            if self.latent == "sample":  # noise seeded by the row's key: the same whatever the batching
                eps = torch.stack([
                    torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(row_seed(self.seed, k)))
                    for k in batch["key"]
                ]).to(z)  # fmt: skip
                z = z + torch.cat([d.std for d in dists]) * eps
        z = z.float().cpu().numpy().astype(np.float16)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["latent"] = np.array([row.tobytes() for row in z], dtype=object)
        return out


class TextEmbedder:
    """Captions to the text encoder's per-token states, trimmed to each caption's true length; fp16 bytes per row."""

    def __init__(self, cfg_dict: dict[str, Any]):
        cfg = PipelineConfig.model_validate(cfg_dict)
        _threads(cfg.compute.use_gpu)
        self.encoder = load_text_encoder(cfg)
        if cfg.compute.use_gpu and torch.cuda.is_available():
            self.encoder.model.to("cuda").half()

    def __call__(self, batch: Batch) -> Batch:
        """Add `text_emb` (fp16 bytes, [len, D] per row) and `text_len`."""
        states, lengths = self.encoder.token_states(list(batch["caption"]))
        states = states.numpy().astype(np.float16)
        lens = lengths.numpy().astype(np.int32)
        out = dict(batch)
        out["text_emb"] = np.array([s[:n].tobytes() for s, n in zip(states, lens, strict=True)], dtype=object)
        out["text_len"] = lens
        return out


class ShardEncoder:
    """One actor call per filtered shard: read it, decode its JPEGs, VAE latents, caption token states, and
    write the shard's Parquet part (atomically) from the actor itself; the call returns one small row per shard.

    The whole row path in one actor type, instead of read tasks, decode tasks, a VAE pool and a text
    pool: on a 2-core CPU every extra worker process spent seconds importing before its first row (a
    read task's worker imported torch, diffusers and open_clip along with the module of shard_rows), and
    every extra operator is one more hop of each row through the object store. With one actor type the
    stage's fixed cost per run fell from 14 s to 5-6 s (docs/PERFORMANCE.md). The text tower and the
    decode are ~8% and ~3% of the VAE's work, so running them in line costs the VAE little; a shard is
    encoded in batches of precompute.batch_size rows, and an actor holds one shard's rows at a time.
    Writing the part where it was encoded keeps the rows off the object store and out of the driver,
    whose work is then one result per shard whatever the row count.
    """

    def __init__(self, cfg_dict: dict[str, Any], latent: str, seed: int, part: dict[str, Any]):
        cfg = PipelineConfig.model_validate(cfg_dict)
        self.resolution, self.crop, self.seed = latent_resolution(cfg), cfg.precompute.crop, cfg.seed
        self.batch_size = cfg.precompute.batch_size
        self.vae = VaeLatentEncoder(cfg_dict, latent, seed)
        self.text = TextEmbedder(cfg_dict)
        self.part = part  # parts_url, shape, text_dim, scale_factor, latent_is_sample

    def encode(self, name: str, url: str) -> list[dict[str, Any]]:
        """A shard's rows with `latent`, `text_emb` and `text_len`, in the part's row format."""
        rows = shard_rows({"name": name, "url": url})
        out = []
        for i in range(0, len(rows), self.batch_size):
            pixels = decode_images(columns(rows[i : i + self.batch_size]), self.resolution, self.crop, self.seed)
            b = self.text(self.vae(pixels))
            out += [
                {"key": str(b["key"][j]), "latent": b["latent"][j], "text_emb": b["text_emb"][j],
                 "text_len": int(b["text_len"][j]), "caption": str(b["caption"][j]),
                 "aesthetic": float(b["aesthetic"][j]), "similarity": float(b["similarity"][j]),
                 "scale_factor": self.part["scale_factor"], "latent_is_sample": self.part["latent_is_sample"]}
                for j in range(len(b["key"]))
            ]  # fmt: skip
        return out

    def __call__(self, shards: Batch) -> Batch:
        """Shards (`name`, `url`, `rows` expected) -> per shard: `name`, `rows` written, `bytes`, `sha256`."""
        result: dict[str, list] = {"name": [], "rows": [], "bytes": [], "sha256": []}
        for name, url, expected in zip(shards["name"], shards["url"], shards["rows"], strict=True):
            rows = self.encode(str(name), str(url))
            if len(rows) != int(expected):
                raise StageError(
                    f"precompute: filtered shard {url} holds {len(rows)} samples where the filter's manifest "
                    f"says {int(expected)}; rerun the filter stage with --overwrite"
                )
            data = part_bytes(rows, tuple(self.part["shape"]), int(self.part["text_dim"]))
            storage.write_bytes_atomic(storage.join(self.part["url"], f"{name}.parquet"), data)
            for k, v in (("name", str(name)), ("rows", len(rows)), ("bytes", len(data)),
                         ("sha256", hashlib.sha256(data).hexdigest())):  # fmt: skip
                result[k].append(v)
        return {k: np.array(v) for k, v in result.items()}
