"""What a VAE recipe reaches in a given number of steps: PSNR and the judge on its reconstructions.

Trains the embedded default's VAE on a finished demo's filtered images with `vae.*` overrides, then
reports its PSNR on the 256 held-out renders train-vae uses and the evaluate stage's judge on 600
held-out prompts' renders and their reconstructions: the ceiling of what any UNet on these latents can
draw. The judge comes from the work directory's cache (a finished evaluate stage left it there; else
it is trained and cached).
One JSON line per run, also appended to --log if given.

    PYTHONPATH=. .venv/bin/python bench/vae_recipe.py --workdir work/local NAME steps=1115 crop=24 batch_size=28
    PYTHONPATH=. .venv/bin/python bench/vae_recipe.py --workdir work/local NAME steps=1115 --set seed=1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ldm.autoencoder.train import psnr, train_vae
from ldm.config import load_config
from ldm.evaluate.data import prompt_set, real_batches
from ldm.evaluate.sweep import ceilings, judge_for
from ldm.io.shards import load_image_set
from ldm.metrics import judge as J
from ldm.synthetic import heldout_set

PROMPTS = 600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a finished local-profile demo (filtered shards, judge cache)")
    ap.add_argument("--set", action="append", default=[], help="a whole-config override, e.g. seed=1")
    ap.add_argument("--log", help="a file to append the JSON line to")
    ap.add_argument("name")
    ap.add_argument("vae", nargs="*", help="vae.* overrides without the prefix, e.g. steps=1115 crop=24")
    args = ap.parse_args()
    overrides = ["budget=null", f"evaluate.prompt_count={PROMPTS}", *args.set, *(f"vae.{s}" for s in args.vae)]
    cfg = load_config("local", overrides, workdir=args.workdir)
    res = cfg.ingest.resolution
    data = load_image_set(f"file://{Path(args.workdir).resolve()}/filtered/shards", res)
    t0 = time.time()
    vae, _ = train_vae(data.images, cfg.vae, cfg.seed, progress=False)
    train_s = time.time() - t0
    held = heldout_set(cfg.source, 256, res)
    # The evaluate stage's own prompts, 600 of them (the demo's 150 read +-0.04), and the demo's own judge:
    # the judge's identity includes the seed, so a --set seed=N would otherwise train another one.
    judge_cfg = load_config("local", ["budget=null"], workdir=args.workdir)
    prompts = prompt_set(cfg)
    rows = [J.prompted(s) for s in prompts.specs]
    targets = {k: np.array([r[k] for r in rows]) for k in J.HEADS}
    parts = SimpleNamespace(vae=vae, judge=judge_for(judge_cfg))
    ceil = ceilings(parts, real_batches(cfg, prompts.specs, 64), targets)
    out = {"name": args.name, "vae": args.vae, "set": args.set, "cpu_threads": torch.get_num_threads(),
           "train_s": round(train_s, 1), "psnr": round(psnr(vae, held.images), 2),
           **{k: round(v, 3) for k, v in ceil.items() if k.endswith(("colour", "shape"))}}  # fmt: skip
    print(json.dumps(out))
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
