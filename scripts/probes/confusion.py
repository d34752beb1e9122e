#!/usr/bin/env python
"""Probe (#13, NOTES 34): does mini's prompt choose its style? The one-step edit of the same
held-out crops under each style's prompt, against each style's teacher: PSNR in dB, a row per
prompt, a column per teacher. A prompt that works is best on its own teacher's column (the
diagonal); rows alike mean the U-Net ignores the text encoder and draws one average style. Also
the outputs of two prompts against each other (how far apart the prompt moves the output) and the
input crop against each teacher.

    python scripts/probes/confusion.py .carry/mini2/ckpt-v2.safetensors [crops]
"""

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from stylize.config import model_config
from stylize.train import checkpoint as ckpt, data as train_data, mini, mini_data
from stylize.train.mini_steps import Mini, edit01

torch.set_num_threads(2)
path = Path(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
m = Mini(model_config("mini"), mini.build_mini_tokenizer(), 0, torch.device("cpu"))
tensors, meta = ckpt.load_checkpoint(path)
ckpt.restore_modules(m.modules, tensors)
for mod in m.modules.values():
    mod.eval()
styles = mini.mini_styles()
stills = train_data.load_stills()
hw = [s.shape[:2] for s in stills]
prompts = {s: mini.style_prompts(s)[:1] for s in styles}
p = mini_data.plan_step(7777, 1, 0, hw, {"oil": ["x"]}, n, (256,))  # n held-out crops, one side
x = mini_data.gpu_crops([torch.from_numpy(np.array(s)) for s in stills], p)
teach = {}
with torch.no_grad():
    for s in list(styles):
        t = mini_data.torch_teacher(s, "cpu")
        if t is None:  # anime's cv2 teacher has no torch form; edit_psnr leaves it out too
            styles.remove(s)
            continue
        teach[s] = t(x).clamp(0, 1)


def psnr(a, b):
    return round(float((10 * torch.log10(1 / (a - b).square().mean(dim=(1, 2, 3)).clamp_min(1e-10))).mean()), 2)


outs = {}
with torch.no_grad():
    for s in styles:
        plan = types.SimpleNamespace(prompts=[prompts[s][0]] * n)
        outs[s] = edit01(m, plan, x, torch.Generator().manual_seed(0))
table = {s: {t: psnr(outs[s], teach[t]) for t in styles} for s in styles}
w = max(map(len, styles))
print(f"step {meta['step']}: rows prompt, columns teacher, PSNR dB over {n} crops")
print(" " * (w + 1) + " ".join(f"{t[:7]:>7}" for t in styles))
for s in styles:
    print(f"{s:>{w}} " + " ".join(f"{table[s][t]:7.2f}" for t in styles))
print(f"{'input':>{w}} " + " ".join(f"{psnr(x, teach[t]):7.2f}" for t in styles))
apart = {s: psnr(outs[s], outs["oil"]) for s in styles if s != "oil"}
print("each prompt's output against the oil prompt's:", apart)
diag = sum(max(table[s], key=table[s].get) == s for s in styles)
print(json.dumps({"step": meta["step"], "diagonal_best": diag, "table": table, "apart_from_oil": apart}))
