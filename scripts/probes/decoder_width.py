#!/usr/bin/env python
"""Probe (#13, NOTES 33): with the trained encoder frozen (its latent space is what the U-Net
learns), does a wider TAESD decoder draw a style's teacher outputs sharper than mini's 32-channel
one? Both decoders start from random weights, so neither has a head start.

    python scripts/train_mini.py --resume .carry/mini2/ckpt-v2.safetensors --export /tmp/mini-v2b
    python scripts/probes/decoder_width.py /tmp/mini-v2b sketch 600 32,64

On this CPU, one torch thread, 128 px crops of the licence-clean stills (.data/crops), batches of
16 of that style's teacher outputs, AdamW 1e-3 (the vae stage's rate), the vae stage's L1 + Sobel
loss; every 100 steps, 16 held-out teacher outputs through encoder and decoder: PSNR and the
sharpness ratio to the teacher (metrics.sharpness, the eval's guard). Nothing is saved; a JSON
line at the end."""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from diffusers import AutoencoderTiny

from stylize.train import metrics
from stylize.train.mini_steps import decode01, encode01, pixel_loss

from samples import StyleSamples

torch.set_num_threads(1)
folder, style, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
widths = [int(w) for w in sys.argv[4].split(",")]
trained = AutoencoderTiny.from_pretrained(folder / "vae").float().eval()
samples = StyleSamples(style)


def batch(seed, step, n):
    return samples(seed, step, n)[2]


with torch.no_grad():
    held = torch.cat([batch(99, k, 8) for k in range(2)])
    held_z = encode01(trained, held)


def to_uint8(x):
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def measure(vae):
    vae.eval()
    with torch.no_grad():
        y = decode01(vae, held_z).float().clamp(0, 1)
    vae.train()
    psnr = float(10 * torch.log10(1 / (y - held).square().mean()))
    sharp = metrics.sharpness(to_uint8(y)) / metrics.sharpness(to_uint8(held))
    return round(psnr, 2), round(sharp, 3)


runs = {}
for width in widths:
    cfg = {**dict(trained.config), "decoder_block_out_channels": [width] * 4}
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "block_out_channels"}
    torch.manual_seed(0)
    vae = AutoencoderTiny(**cfg).float()
    vae.encoder.load_state_dict(trained.encoder.state_dict())
    vae.encoder.requires_grad_(False)
    params = [p for p in vae.decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    log = [{"step": 0, "psnr_sharpness": measure(vae)}]
    print(width, log[-1], flush=True)
    t = time.time()
    for i in range(1, steps + 1):
        y = batch(0, i, 16)
        with torch.no_grad():
            z = encode01(vae, y)
        loss = pixel_loss(decode01(vae, z), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % 100 == 0:
            log.append({"step": i, "psnr_sharpness": measure(vae), "s": round(time.time() - t)})
            print(width, log[-1], flush=True)
    runs[width] = {"decoder_parameters": sum(p.numel() for p in params), "log": log}
print(json.dumps({"vae": str(folder), "style": style, "trained_decoder": measure(trained), "runs": runs}))
