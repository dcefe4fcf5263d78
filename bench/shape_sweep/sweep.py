"""One config of the shape sweep: train a UNet on the packed latents, then judge its samples of held-out prompts.

Which training setting teaches the embedded default's UNet shapes fastest? Each config trains like
ldm/train/loop.py does (same objective, min-SNR weighting, CFG dropout, AdamW, warm-up and cosine LR,
gradient clipping, EMA, bf16 autocast) on the rows pack.py wrote, and at each step in eval_at samples
the held-out prompts (DPM-Solver++, 10 steps, guidance 2/3/4/6), decodes them with the demo's VAE and
prints the judge's colour / shape / position accuracy as one JSON line. Run by run.sh, one process per
config, many at once on one GPU; it also runs on a CPU (slowly) to check it before spending GPU time.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from ldm.diffusion.guidance import make_sampler, sample, unet_model_fn
from ldm.diffusion.objective import apply_cfg_dropout, training_losses
from ldm.train.state import Ema, lr_at
from ldm.unet.model import UNET_SIZES, training_attention

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from judgenet import HEADS, JudgeNet, accuracy  # noqa: E402 - written by pack.py beside this file


def unet_kwargs(arch: str, text_dim: int, latent_shape: list[int], ch: list[int] | None = None) -> dict:
    """`tiny` and variants of it at about the same cost (attention at 16x16 too, wider, deeper, three levels)."""
    a = dict(UNET_SIZES["small" if arch == "small" else "tiny"])
    if arch == "attn16":
        a.update(down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
    elif arch == "wide":
        a.update(block_out_channels=(96, 192), attention_head_dim=(3, 6))
    elif arch == "nomid":  # no middle block: 18% fewer forward FLOPs
        a.update(mid_block_type=None)
    elif arch == "deep":
        a.update(layers_per_block=2)
    elif arch == "three":
        a.update(block_out_channels=(64, 128, 128), attention_head_dim=(2, 4, 4),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))  # fmt: skip
    a.pop("default_cross_attention_dim")
    if ch:  # narrower levels ("micro": [32, 64]): 32-wide heads, fewer norm groups below 64 channels
        groups = 8 if min(ch) < 32 else 16 if min(ch) < 64 else 32
        a.update(block_out_channels=tuple(ch), attention_head_dim=tuple(max(1, w // 32) for w in ch),
                 norm_num_groups=groups)  # fmt: skip
    c, h, _ = latent_shape
    return dict(a, in_channels=c, out_channels=c, sample_size=h, cross_attention_dim=text_dim)


def padded(flat: torch.Tensor, lens: torch.Tensor, length: int) -> torch.Tensor:
    out = torch.zeros(len(lens), length, flat.shape[-1])
    off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    for i in range(len(lens)):
        out[i, : lens[i]] = flat[off[i] : off[i + 1]].float()
    return out


def run(c: dict, dev: str, deadline: float) -> None:
    P = torch.load(os.path.join(HERE, "pack.pt"))
    V = torch.load(os.path.join(HERE, "text_variants.pt"))[c["text"]]
    length, text_dim = V["ev"].shape[1], V["ev"].shape[2]
    torch.manual_seed(c.get("seed", 0))
    unet = UNet2DConditionModel(**unet_kwargs(c.get("arch", "tiny"), text_dim, P["latent_shape"], c.get("ch"))).to(dev)
    training_attention(unet, torch.device(dev).type)  # as loop.py: plain attention when training on a CPU
    with open(os.path.join(HERE, "scheduler_config.json")) as f:
        sch = json.load(f)
    sch = {k: v for k, v in sch.items() if not k.startswith("_")} | {"prediction_type": c.get("pred", "epsilon")}
    alphas = DDPMScheduler(**sch).alphas_cumprod.to(dev)
    lat = P["lat"].float().to(dev)
    txt, lens = padded(V["flat"], V["lens"], length).to(dev), V["lens"].to(dev)
    if "rows" in c:  # train on the first `rows` latent rows only: is the UNet short of data or of steps?
        lat, txt, lens = lat[: c["rows"]], txt[: c["rows"]], lens[: c["rows"]]
    mask = torch.arange(length, device=dev)[None] < lens[:, None]
    empty = V["empty"].float().to(dev)[: V["empty_len"]]
    ema = Ema(unet, c.get("ema", 0.995), c.get("ema_warmup", 100))
    opt = torch.optim.AdamW(unet.parameters(), lr=c["lr"], weight_decay=0.01)
    fn, bs, steps = unet_model_fn(unet), c.get("bs", 64), c["steps"]
    g = torch.Generator(device=dev).manual_seed(c.get("seed", 0))  # init and batches; the samples keep seed 0
    n, pos, perm = lat.shape[0], 0, None
    t0, amp = time.time(), torch.device(dev).type
    for step in range(steps):
        if perm is None or pos + bs > n:
            perm, pos = torch.randperm(n, device=dev, generator=g), 0
        idx = perm[pos : pos + bs]
        pos += bs
        text, m, _ = apply_cfg_dropout(txt[idx], mask[idx], empty, 0.1, g)
        if c.get("tdist") == "logitnormal":  # SD3's timestep density: more steps mid-to-high noise
            u = torch.sigmoid(c.get("tmean", 0.0) + c.get("tstd", 1.0) * torch.randn(bs, generator=g, device=dev))
            t = (u * len(alphas)).long().clamp_(0, len(alphas) - 1)
        else:
            t = torch.randint(0, len(alphas), (bs,), generator=g, device=dev)
        noise = torch.randn(lat[idx].shape, generator=g, device=dev)
        with torch.autocast(amp, dtype=torch.bfloat16):
            loss = training_losses(fn, lat[idx], t, text, m, noise, alphas, sch["prediction_type"],
                                   c.get("snr", 5.0)).mean()  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, c["lr"], c.get("warmup", 100), steps, c.get("sched", "cosine"))
        opt.step()
        ema.update(unet, step + 1)
        if step + 1 in c.get("eval_at", [steps]):
            res = evaluate(unet, ema, P, V, dev, sch, c.get("guidance", [2, 3, 4, 6]))
            print(json.dumps({"name": c["name"], "step": step + 1, "train_s": round(time.time() - t0, 1), **res}),
                  flush=True)  # fmt: skip
        if time.time() > deadline:
            print(json.dumps({"name": c["name"], "stopped_at_deadline": step + 1}), flush=True)
            return


@torch.no_grad()
def evaluate(unet, ema, P, V, dev: str, sch: dict, guidance: list[float]) -> dict:
    e = UNet2DConditionModel.from_config(unet.config).to(dev).eval()
    ema.copy_to(e)
    vae = AutoencoderKL.from_pretrained(os.path.join(HERE, "vae")).to(dev).eval()
    judge = JudgeNet()
    judge.load_state_dict(P["judge"])
    judge.to(dev).eval()
    length = V["ev"].shape[1]
    states, lens = V["ev"].float().to(dev), V["ev_lens"].to(dev)
    mask = torch.arange(length, device=dev)[None] < lens[:, None]
    es = torch.zeros(1, length, V["ev"].shape[2], device=dev)
    es[0, : V["empty_len"]] = V["empty"].float().to(dev)[: V["empty_len"]]
    em = (torch.arange(length, device=dev) < V["empty_len"])[None]
    labels = {k: v.numpy() for k, v in P["labels"].items()}
    out = {}
    for scale in guidance:
        gen = torch.Generator(device=dev).manual_seed(0)
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
            z = sample(e, make_sampler("dpm++", sch), states, mask, es, em, 10, scale, gen, P["latent_shape"])
        x = ((vae.decode(z.float() / P["scale_factor"]).sample.clamp(-1, 1) + 1) * 127.5).round() / 255.0
        preds = {k: [] for k in HEADS}
        for i in range(0, len(x), 300):
            for k, v in judge(x[i : i + 300]).items():
                preds[k].append(v.argmax(1).cpu())
        acc = accuracy({k: torch.cat(v).numpy() for k, v in preds.items()}, labels)
        out[f"g{scale:g}"] = {k: round(acc[k], 3) for k in ("colour", "shape", "position")}
    return out


if __name__ == "__main__":
    cfg, device = json.loads(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cuda"
    run(cfg, device, time.time() + float(os.environ.get("SWEEP_BUDGET_S", "300")))
