#!/usr/bin/env python
"""Probe (#13, NOTES 29): does a mini VAE's round trip of one style's teacher outputs climb when it
trains on that style alone (so length and data mix are what hold it), or stay (capacity)?

    python scripts/train_mini.py --resume .carry/mini2/ckpt-v2.safetensors --export /tmp/mini-v2
    python scripts/probes/vae_style.py /tmp/mini-v2 starry-night 600

On this CPU, 128 px crops of the licence-clean stills (.data/crops), batches of 16, AdamW 3e-4,
the L1 + Sobel loss of train_mini's vae stage; the round trip's PSNR on 16 held-out teacher outputs
every 100 steps. Nothing is saved: the log goes to stdout, a JSON line at the end."""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from diffusers import AutoencoderTiny
from samples import StyleSamples
from stylize.train.mini_steps import pixel_loss, encode01, decode01
torch.set_num_threads(2)
folder, style, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
vae = AutoencoderTiny.from_pretrained(folder / "vae").float()
samples = StyleSamples(style)
def batch(seed, step, n):
    return samples(seed, step, n)[2]
held = torch.cat([batch(99, k, 8) for k in range(2)])  # 16 held-out teacher outputs
def psnr():
    vae.eval()
    with torch.no_grad():
        y = decode01(vae, encode01(vae, held)).float().clamp(0, 1)
    vae.train()
    return round(float(10 * torch.log10(1 / (y - held).square().mean())), 2)
opt = torch.optim.AdamW(vae.parameters(), lr=3e-4, weight_decay=0.0)
log = [{"step": 0, "psnr": psnr()}]; print(log[-1], flush=True); t = time.time()
for i in range(1, steps + 1):
    y = batch(0, i, 16)
    loss = pixel_loss(decode01(vae, encode01(vae, y)), y)
    opt.zero_grad(); loss.backward(); opt.step()
    if i % 100 == 0:
        log.append({"step": i, "psnr": psnr(), "s": round(time.time() - t)}); print(log[-1], flush=True)
print(json.dumps({"vae": str(folder), "style": style, "log": log}))
