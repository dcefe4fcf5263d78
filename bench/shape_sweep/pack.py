"""Pack what the shape sweep needs from a finished demo work directory, for a GPU machine without our stack.

Writes into --out (default .gpu/, git-ignored; carried to the device): pack.pt (the latents, the held-out
prompts' judge labels, the judge's weights, the VAE's scale factor), text_variants.pt (caption token
states from a chosen text encoder and layer, for the training rows and the held-out prompts), the VAE
folder, the scheduler config and judgenet.py (the judge's network, so the device needs only torch and
diffusers). Variants: name=<open_clip folder written by train-clip>:<layers run>, e.g. the demo's own
CLIP at its penultimate layer (3 of 4), its first layer, both of 0 and 3 side by side (0+3), or a CLIP
trained another way.

    .venv/bin/python bench/shape_sweep/pack.py --workdir work/demo \
        --variant pen=work/demo/models/clip:3 --variant L1=work/demo/models/clip:1
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ldm.clip.encoder import ClipEncoder
from ldm.clip.model import load_saved
from ldm.config import load_config
from ldm.evaluate.data import prompt_set
from ldm.metrics import judge as J


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="work/demo")
    p.add_argument("--out", default=".gpu")
    p.add_argument("--prompts", type=int, default=600, help="held-out prompts each config is judged on")
    p.add_argument("--variant", action="append", required=True, help="name=<clip folder>:<layers>")
    args = p.parse_args()
    torch.set_num_threads(2)
    work, out = Path(args.workdir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = json.loads((work / "latents/manifest.json").read_text())
    c, h, w = m["latent_shape"]
    lat, caps = [], []
    for part in sorted(glob.glob(str(work / "latents/parts/*.parquet"))):
        t = pq.read_table(part, columns=["latent", "scale_factor", "caption"]).to_pydict()
        for b, sf, cap in zip(t["latent"], t["scale_factor"], t["caption"], strict=True):
            lat.append(np.frombuffer(b, np.float16).reshape(c, h, w).astype(np.float32) * sf)
            caps.append(cap)
    cfg = load_config("local", [f"evaluate.prompt_count={args.prompts}"], workdir=str(work))
    ps = prompt_set(cfg)
    labels = {k: torch.tensor([J.prompted(s)[k] for s in ps.specs]) for k in J.HEADS}
    from ldm.evaluate.sweep import judge_for

    judge = judge_for(cfg)  # the sweep's own judge (cached in the work directory)
    torch.save({"lat": torch.from_numpy(np.stack(lat)).half(), "labels": labels, "judge": judge.state_dict(),
                "prompts": ps.prompts, "scale_factor": m["scale_factor"], "latent_shape": [c, h, w]},
               out / "pack.pt")  # fmt: skip
    variants = {}
    for spec in args.variant:
        name, rest = spec.split("=", 1)
        folder, layers = rest.rsplit(":", 1)
        depths = [int(d) for d in layers.split("+")]  # "0+3": both layers side by side
        enc = ClipEncoder(load_saved(folder), blocks=depths[0] if len(depths) == 1 else depths)
        s, n = enc.token_states(caps)
        es, en = enc.token_states(ps.prompts)
        e0, e0n = enc.token_states([""])
        variants[name] = {"flat": torch.cat([s[i, : n[i]] for i in range(len(caps))]).half(), "lens": n,
                          "ev": es.half(), "ev_lens": en, "empty": e0[0].half(), "empty_len": int(e0n[0])}  # fmt: skip
    torch.save(variants, out / "text_variants.pt")
    src = f"import numpy as np\nimport torch\nfrom torch import nn\n\nIGNORE = {J.IGNORE}\nHEADS = {J.HEADS!r}\n\n"
    (out / "judgenet.py").write_text(src + inspect.getsource(J.JudgeNet) + "\n\n" + inspect.getsource(J.accuracy))
    pipe = work / "runs/local/pipeline"
    shutil.copytree(pipe / "vae", out / "vae", dirs_exist_ok=True)
    shutil.copy(pipe / "scheduler/scheduler_config.json", out / "scheduler_config.json")
    shutil.copy(Path(__file__).with_name("sweep.py"), out / "sweep.py")
    print(f"packed {len(lat)} rows, {len(ps.prompts)} prompts, variants {list(variants)} into {out}")


if __name__ == "__main__":
    main()
