#!/usr/bin/env python
"""Probe (#13, NOTES 32): does the latent stage's recipe (train_mini's `latent` loss, U-Net and text
encoder training, the VAE frozen) learn one style's one-step edit at all, and how fast does the
held-out edit PSNR climb? A check of the recipe on this CPU before device minutes go into it.

    python scripts/probes/latent_style.py .carry/mini2/ckpt-v2.safetensors oil 300 [mini|base] [noise|source]

`base` builds the U-Net in DreamLite-mobile's layout (mini's until NOTES 34); `mini` (the default)
the current one, warm-started as train_mini's --init-from does when the checkpoint is the other's.
The last argument sets the flow's start x_T (ModelConfig.start; default: mini.yaml's).

From the checkpoint's weights, 128 px crops of the licence-clean stills (.data/crops), batches of
16 of that style alone, AdamW 5e-4 (the stage's peak rate, no warm-up); the one-step edit of 16
held-out crops against the teacher every 50 steps. Nothing is saved: the log goes to stdout, a
JSON line at the end."""

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from stylize.config import model_config
from stylize.train import checkpoint as ckpt, mini
from stylize.train.mini_steps import Mini, Stage, edit01, optimizer_for, step_loss

from samples import StyleSamples

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_mini import config_sha  # noqa: E402

BASE_UP = ["CrossAttnUpBlock2D", "CrossAttnUpRemoveSelfAttnBlock2DV1", "UpBlock2D"]

torch.set_num_threads(1)
path, style, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
layout = sys.argv[4] if len(sys.argv) > 4 else "mini"  # "base": DreamLite-mobile's up blocks (mini's before NOTES 34)
cfg = model_config("mini")
if layout == "base":
    cfg = dataclasses.replace(cfg, unet={**cfg.unet, "up_block_types": BASE_UP})
if len(sys.argv) > 5:
    cfg = dataclasses.replace(cfg, start=sys.argv[5])
m = Mini(cfg, mini.build_mini_tokenizer(), 0, torch.device("cpu"))
tensors, meta = ckpt.load_checkpoint(path)
if meta["config_sha256"] == config_sha(cfg):
    ckpt.restore_modules(m.modules, tensors)
else:  # another layout's checkpoint: train_mini's --init-from warm start
    ckpt.zero_new_branches(m.modules, ckpt.restore_matching(m.modules, tensors)["fresh"])
stage = Stage("latent", steps, 16, 5e-4, ("unet", "text_encoder"))
params = m.trainable(stage)
opt = optimizer_for(params, torch.device("cpu"))
for g in opt.param_groups:
    g["lr"] = stage.lr
batch = StyleSamples(style, stage=1)


held = [batch(99, k, 8) for k in range(2)]  # 16 held-out crops and their teacher outputs


def psnr():
    for mod in m.modules.values():
        mod.eval()
    db = []
    for p, x, y in held:
        out = edit01(m, p, x, torch.Generator().manual_seed(0))
        db.append(10 * torch.log10(1 / (out - y).square().mean(dim=(1, 2, 3))))
    for k in ("unet", "text_encoder"):
        m.modules[k].train()
    return round(float(torch.cat(db).mean()), 2)


log = [{"step": 0, "edit_psnr": psnr()}]
print(log[-1], flush=True)
t = time.time()
for i in range(1, steps + 1):
    p, x, y = batch(0, i, 16)
    loss = step_loss(stage, m, p, x, y, torch.Generator().manual_seed(i))["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    opt.step()
    if i % 50 == 0:
        log.append({"step": i, "loss": round(float(loss), 4), "edit_psnr": psnr(), "s": round(time.time() - t)})
        print(log[-1], flush=True)
print(json.dumps({"checkpoint": str(path), "from_step": meta["step"], "style": style, "layout": layout, "start": cfg.start, "log": log}))
