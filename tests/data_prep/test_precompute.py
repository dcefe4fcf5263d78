"""The Ray Data precompute stage and the training read path, on the test profile (local and moto S3)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.registry import run as run_stage
from ldm.devices import native_bf16
from ldm.io import storage
from ldm.io.latents import collate, empty_prompt, latent_dataset, load_latent_manifest
from ldm.io.manifest import StageError
from ldm.io.shards import iter_samples
from tests.helpers import free_port, make_config


def _parts(workdir) -> list[Path]:
    return sorted((Path(workdir) / "latents" / "parts").glob("*.parquet"))


def test_rows_match_the_filtered_samples(latents):
    cfg, m = latents
    from ldm.clip.encoder import load_encoder

    kept = {s["key"]: s for tar in sorted((Path(cfg.workdir) / "filtered" / "shards").glob("*.tar"))
            for s in iter_samples(str(tar))}  # fmt: skip
    rows = [r for p in _parts(cfg.workdir) for r in pq.read_table(p).to_pylist()]
    assert m["rows"] == len(rows) == len(kept)
    shards = storage.read_json(f"{cfg.workdir}/filtered/manifest.json")["shards"]
    assert {p.name for p in _parts(cfg.workdir)} == {s["name"].replace(".tar", ".parquet") for s in shards}
    encoder = load_encoder(cfg)
    lengths = encoder.lengths(encoder.tokenize([r["caption"] for r in rows]))
    c, h, w = m["latent_shape"]
    assert (h, w) == (cfg.ingest.resolution // cfg.vae.downsample,) * 2
    for r, n in zip(rows, lengths.tolist(), strict=True):
        assert r["caption"] == kept[r["key"]]["txt"]
        assert r["aesthetic"] == pytest.approx(kept[r["key"]]["json"]["aesthetic"], abs=1e-3)
        latent = np.frombuffer(r["latent"], np.float16)
        assert latent.size == c * h * w and np.isfinite(latent).all()
        assert r["text_len"] == n and len(r["text_emb"]) == n * m["text_dim"] * 2  # no padding stored
        assert r["scale_factor"] == pytest.approx(m["scale_factor"]) and r["latent_is_sample"] is False


def test_latents_are_the_vae_posterior_means(latents):
    """The stored latents equal a plain fp32 encode of the same pixels, within the compute dtype's rounding."""
    import torch

    from ldm.autoencoder.model import load_vae
    from ldm.io.shards import decode_rgb

    cfg, m = latents
    # bf16 exactly where this CPU runs it fast (AMX or AVX512-BF16), fp32 elsewhere: catches a dtype choice
    # that ignores the hardware (or the manifest recording another dtype than the actors used).
    assert m["vae_compute_dtype"] == ("bfloat16" if native_bf16() else "float32")
    samples = {s["key"]: s for tar in sorted((Path(cfg.workdir) / "filtered" / "shards").glob("*.tar"))
               for s in iter_samples(str(tar))}  # fmt: skip
    rows = pq.read_table(_parts(cfg.workdir)[0]).to_pylist()[:16]
    px = np.stack([decode_rgb(samples[r["key"]]["jpg"], cfg.ingest.resolution) for r in rows])
    with torch.no_grad():
        x = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 127.5 - 1
        want = load_vae(cfg).eval().encode(x).latent_dist.mean.numpy()
    got = np.stack([np.frombuffer(r["latent"], np.float16).reshape(m["latent_shape"]) for r in rows]).astype(np.float32)
    rel_rms = np.sqrt(np.mean((got - want) ** 2)) / want.std()
    # What storing an fp32 encode as fp16 alone costs. bf16 keeps 8 mantissa bits to fp16's 11: a bf16 encode
    # lands well above that floor, an fp32 one on it. Bug caught: the manifest saying one dtype while the actors
    # ran the other (the old check accepted either dtype's error under the looser bound).
    fp16_floor = np.sqrt(np.mean((want.astype(np.float16).astype(np.float32) - want) ** 2)) / want.std()
    if m["vae_compute_dtype"] == "bfloat16":
        assert 4 * fp16_floor < rel_rms < 0.02, (rel_rms, fp16_floor)
    else:
        assert rel_rms < 2 * fp16_floor, (rel_rms, fp16_floor)


def test_manifest_records_identity_and_the_empty_prompt(latents):
    cfg, m = latents
    # Bug caught: a weights identity that does not follow the weights (a constant, or the wrong stage's hash):
    # a retrained VAE or CLIP would then leave stale latents "up to date". Compared with the upstream manifests.
    vae_manifest = storage.read_json(f"{cfg.workdir}/models/vae/manifest.json")
    clip_manifest = storage.read_json(f"{cfg.workdir}/models/clip/manifest.json")
    assert vae_manifest["config_hash"] != clip_manifest["config_hash"]
    assert m["vae"]["path"].endswith("models/vae") and m["vae"]["weights"] == vae_manifest["config_hash"]
    assert m["text_encoder"]["weights"] == clip_manifest["config_hash"]
    assert m["text_encoder"]["arch"] == "tiny" and m["latent_kind"] == "mean" and m["latent_seed"] is None
    assert m["latent_dtype"] == m["text_dtype"] == "float16" and m["resolution"] == cfg.ingest.resolution
    e = empty_prompt(m)
    assert tuple(e.shape) == (2, m["text_dim"])  # start and end of text


def test_a_finished_precompute_is_skipped(latents, capsys):
    cfg, m = latents
    assert run_stage("precompute", cfg) == m
    assert "up to date" in capsys.readouterr().out


def test_read_path_collates_padded_batches_with_a_mask(latents):
    """Bugs caught (beyond those below): the fp16 storage dtype leaking into training (the UNet and its loss
    run in fp32; autocast picks the compute dtype), unpadded or wrongly masked text."""
    import torch

    cfg, m = latents
    ds, lm = latent_dataset(storage.normalize(cfg.workdir) + "/latents", expect={"latent_shape": m["latent_shape"]},
                            shuffle_seed=0)  # fmt: skip
    seen = 0
    for batch in ds.iter_batches(
        batch_size=16, batch_format="numpy", local_shuffle_buffer_size=32, local_shuffle_seed=0
    ):
        t = collate(batch, lm["latent_shape"], lm["text_dim"])
        b = t["latents"].shape[0]
        # Bug caught: training on the VAE's raw latents (std 1/scale factor) while sampling decodes z / scale:
        # the diffusion data must be the latents times the scale factor.
        raw = np.stack([np.frombuffer(z, np.float16).reshape(lm["latent_shape"]) for z in batch["latent"]])
        assert np.allclose(t["latents"].numpy(), raw.astype(np.float32) * lm["scale_factor"], rtol=1e-6)
        assert tuple(t["latents"].shape) == (b, *lm["latent_shape"]) and t["latents"].dtype == torch.float32
        assert t["text"].shape[:2] == t["mask"].shape and t["text"].shape[1] == int(t["lengths"].max())
        assert (t["mask"].sum(1) == t["lengths"]).all()
        assert (t["text"][~t["mask"]] == 0).all()
        seen += b
    assert seen == m["rows"]


def test_read_path_refuses_a_mismatch_naming_both_values(latents):
    cfg, m = latents
    with pytest.raises(StageError, match=r"latent_shape \[4, 8, 8\] but training expects \[4, 32, 32\]"):
        latent_dataset(storage.normalize(cfg.workdir) + "/latents", expect={"latent_shape": [4, 32, 32]})


def _copy_latents(cfg, tmp_path: Path) -> Path:
    shutil.copytree(Path(cfg.workdir) / "latents", tmp_path / "latents")
    return tmp_path / "latents"


def test_a_corrupt_part_is_named(latents, tmp_path):
    cfg, _ = latents
    folder = _copy_latents(cfg, tmp_path)
    part = _parts(tmp_path)[0]
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(StageError, match=f"{part.name} is not a readable Parquet file"):
        latent_dataset(str(folder))


def test_a_part_with_another_latent_shape_is_named(latents, tmp_path):
    cfg, _ = latents
    folder = _copy_latents(cfg, tmp_path)
    part = _parts(tmp_path)[0]
    table = pq.read_table(part)
    pq.write_table(table.replace_schema_metadata({b"latent_shape": b"4,16,16", b"text_dim": b"1"}), part)
    with pytest.raises(StageError, match=rf"{part.name} has latent shape \[4,16,16\]"):
        latent_dataset(str(folder))


def test_parts_without_a_manifest_are_never_read(latents, tmp_path):
    cfg, _ = latents
    folder = _copy_latents(cfg, tmp_path)
    (folder / "manifest.json").unlink()
    with pytest.raises(StageError, match="parts but no manifest: the precompute did not finish"):
        latent_dataset(str(folder))
    with pytest.raises(StageError, match="no latents there"):
        latent_dataset(str(tmp_path / "empty"))


def test_no_filtered_output_is_refused(tmp_path):
    with pytest.raises(StageError, match="run the filter stage first"):
        run_stage("precompute", make_config(tmp_path))


def _stage_inputs(cfg, dest: Path) -> Path:
    for sub in ("filtered", "models"):
        shutil.copytree(Path(cfg.workdir) / sub, dest / sub)
    (dest / "raw").mkdir()
    shutil.copy(Path(cfg.workdir) / "raw" / "manifest.json", dest / "raw")  # upstream identity, not data
    return dest


def _replicate_filtered(workdir: Path, copies: int) -> None:
    """More, smaller units of work: each filtered shard copied under `copies` names (c0-00000.tar, ...)."""
    folder = workdir / "filtered" / "shards"
    fm = storage.read_json(str(workdir / "filtered" / "manifest.json"))
    shards = []
    for s in fm["shards"]:
        for c in range(copies):
            shutil.copy(folder / s["name"], folder / f"c{c}-{s['name']}")
            shards.append({"name": f"c{c}-{s['name']}", "samples": s["samples"]})
        (folder / s["name"]).unlink()
    storage.write_json_atomic(str(workdir / "filtered" / "manifest.json"), {**fm, "shards": shards})


def test_a_killed_precompute_keeps_finished_parts_and_redoes_the_rest(latents, tmp_path):
    cfg, m = latents
    workdir = _stage_inputs(cfg, tmp_path)
    _replicate_filtered(workdir, copies=4)
    overrides = ["precompute.batch_size=2", "precompute.actors=1"]
    cmd = [sys.executable, "-m", "flows.cli", "stage", "precompute", "--profile", "test", "--workdir", str(workdir)]
    cmd += [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not _parts(workdir):
        assert proc.poll() is None and time.monotonic() < deadline, "precompute ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # A worker Ray started outside the killed process group can finish the part it was writing (atomically)
    # before it notices its raylet is gone (seen under load): what was kept is what is there once it settles.
    settled, seen, since = time.monotonic() + 30, None, time.monotonic()
    while time.monotonic() < settled and time.monotonic() - since < 3:
        now = sorted(p.name for p in _parts(workdir))
        seen, since = (now, time.monotonic()) if now != seen else (seen, since)
        time.sleep(0.2)
    kept = {p.name: pq.read_table(p) for p in _parts(workdir)}
    kept_mtimes = {p.name: p.stat().st_mtime_ns for p in _parts(workdir)}
    assert len(kept) > 0 and not (workdir / "latents" / "manifest.json").exists()
    # resumed with other parallelism (bug caught: knobs in the identity refuse the resume)
    resumed = run_stage("precompute", make_config(workdir, "precompute.batch_size=4", "precompute.actors=2"))
    assert resumed["parts_resumed"] == len(kept) < len(resumed["parts"]) == 4 * len(m["parts"])
    reference = {p.name: pq.read_table(p).to_pylist() for p in _parts(cfg.workdir)}
    for name, table in kept.items():  # every part the killed run left matches an uninterrupted run's
        rows, ref = table.to_pylist(), reference[name.split("-", 1)[1]]
        assert [(r["key"], r["caption"], r["text_len"]) for r in rows] == [
            (r["key"], r["caption"], r["text_len"]) for r in ref
        ], name
        for r, q in zip(rows, ref, strict=True):  # fp16 values: equal up to batch-size-dependent float rounding
            for col in ("latent", "text_emb"):
                a, b = np.frombuffer(r[col], np.float16), np.frombuffer(q[col], np.float16)
                np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-2, atol=1e-2)
    # Counted from the rows actually written, not the manifest's expectation. Bugs caught: a resume that
    # rewrites finished parts, or one that skips the unfinished ones (the manifest would still say 4 * rows).
    after = {p.name: p for p in _parts(workdir)}
    assert {n: after[n].stat().st_mtime_ns for n in kept_mtimes} == kept_mtimes
    redone = {n: pq.read_table(p).num_rows for n, p in after.items() if n not in kept}
    assert len(redone) == 4 * len(m["parts"]) - len(kept)
    for name, n in redone.items():
        assert n == pq.read_metadata(Path(cfg.workdir) / "latents" / "parts" / name.split("-", 1)[1]).num_rows, name
    assert sum(pq.read_metadata(p).num_rows for p in after.values()) == resumed["rows"] == 4 * m["rows"]


def test_precompute_reads_and_writes_s3(latents, s3_bucket):
    import ray
    import s3fs

    ray.shutdown()  # the workers must start with the moto endpoint in their environment
    try:  # a failure here must not leave this Ray instance (with the moto endpoint) to the next module
        cfg, m = latents
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        for sub in ("filtered", "models"):
            fs.put(str(Path(cfg.workdir) / sub), f"{s3_bucket}/w/{sub}", recursive=True)
        fs.put(str(Path(cfg.workdir) / "raw" / "manifest.json"), f"{s3_bucket}/w/raw/manifest.json")
        s3cfg = make_config(f"{s3_bucket}/w")
        result = run_stage("precompute", s3cfg)
        assert result["rows"] == m["rows"] and len(result["parts"]) == len(m["parts"])
        ds, lm = latent_dataset(f"{s3_bucket}/w/latents")
        assert ds.count() == m["rows"] and load_latent_manifest(f"{s3_bucket}/w/latents")["rows"] == m["rows"]
    finally:
        ray.shutdown()


def test_precompute_joins_the_cluster_named_by_ray_address(latents, tmp_path):
    """A `ray start --head` cluster stands in for KubeRay: the stage runs on it instead of starting its own."""
    cfg, m = latents
    workdir = _stage_inputs(cfg, tmp_path / "w")
    port = free_port()
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--num-gpus=0", "--include-dashboard=false", "--object-store-memory=268435456", "--disable-usage-stats"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        cmd = [sys.executable, "-m", "flows.cli", "stage", "precompute", "--profile", "test", "--workdir", str(workdir)]
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        got = storage.read_json(f"{workdir}/latents/manifest.json")
        # Ray advertises the head by the machine's own address (not off-host) even with --node-ip-address.
        assert got["cluster"]["gcs_address"].endswith(f":{port}"), got["cluster"]
        assert got["cluster"]["cpus"] == 2 and got["rows"] == m["rows"]
    finally:  # the head's GCS, raylet and workers share its process group
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def test_a_sample_without_scores_or_caption_is_refused(tmp_path):
    """Bug caught: a missing aesthetic/similarity score stored as NaN, a missing caption as "" (silently)."""
    from data_prep.precompute.rows import MissingField, shard_rows
    from ldm.io.shards import write_shard

    url = str(tmp_path / "00000.tar")
    good = {"key": "k0", "jpg": b"x", "txt": "a cat", "json": {"aesthetic": 5.0, "similarity": 0.3}}
    for sample, what in [
        ({**good, "key": "k1", "json": {"similarity": 0.3}}, "aesthetic score"),
        ({**good, "key": "k1", "json": {"aesthetic": 5.0}}, "similarity score"),
        ({k: v for k, v in {**good, "key": "k1"}.items() if k != "txt"}, "caption"),
    ]:
        write_shard(url, [good, sample])
        with pytest.raises(MissingField, match=f"{url} sample k1 has no {what}"):
            shard_rows({"name": "00000", "url": url})
    write_shard(url, [good])
    assert shard_rows({"name": "00000", "url": url})[0]["aesthetic"] == 5.0
