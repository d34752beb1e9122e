#!/usr/bin/env python
"""Probe (#13, NOTES 34): can mini's U-Net carry the source's detail to where it draws? In
DreamLite's edit mode the source latent sits beside the generated half (cat([x_t, source],
width)) and the prediction is the left half, so every detail must travel w latent pixels sideways.
Convolutions reach a few pixels; only self-attention moves information that far, and mini (as
DreamLite-mobile) has self-attention only at its lowest level, 1/4 of the latent's resolution
(8x16 tokens for a 256 px crop). The test that isolates this: the identity edit (the target is the
source latent itself), from pure noise, one step, the text states fixed; the held-out PSNR of
decode(noise - v) against decode(E(x)) (the VAE's own round trip, so 100% transport would be
+inf). One U-Net config a run (`variant`), the same data, seed and steps.

    python scripts/probes/transport.py .carry/mini2/ckpt-v2.safetensors base 300
    python scripts/probes/transport.py .carry/mini2/ckpt-v2.safetensors up12 300

variants: base (DreamLite-mobile's layout, mini's until NOTES 34), up12 (self-attention in the up
path at every level: mini.yaml now), up1 (in the top up block only), attn12 (at every level, down
and up).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from stylize.config import model_config
from stylize.reference import velocity
from stylize.train import checkpoint as ckpt, data as train_data, mini_data
from stylize.train.mini_steps import decode01, encode01

VARIANTS = {
    "base": {  # DreamLite-mobile's layout, as mini had it until NOTES 34
        "down_block_types": ["CrossAttnDownRemoveSelfAttnBlock2D", "CrossAttnDownRemoveSelfAttnBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpRemoveSelfAttnBlock2DV1", "UpBlock2D"],
    },
    "attn2": {
        "down_block_types": ["CrossAttnDownRemoveSelfAttnBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    },
    "up12": {  # self-attention in the up path only, every level: the queries there carry the coarse
        # content the lowest level moved, which can find the source's detailed keys by content
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "up1": {  # self-attention added in the top up block only (the others as DreamLite-mobile's)
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpRemoveSelfAttnBlock2DV1", "CrossAttnUpBlock2D"],
    },
    "attn12": {
        "down_block_types": ["CrossAttnDownBlock2D"] * 3,
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
}

torch.set_num_threads(1)
path, variant, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
side = int(sys.argv[4]) if len(sys.argv) > 4 else 128
from diffusers import AutoencoderTiny, DreamLiteUNetModel  # noqa: E402

cfg = model_config("mini")
torch.manual_seed(0)
unet = DreamLiteUNetModel(**{**cfg.unet, **VARIANTS[variant]})
vae = AutoencoderTiny(**cfg.vae)
tensors, _ = ckpt.load_checkpoint(path)
ckpt.restore_modules({"vae": vae}, tensors)
vae.eval().requires_grad_(False)
stills = train_data.load_stills()
hw = [s.shape[:2] for s in stills]
stills_t = [torch.from_numpy(np.array(s)) for s in stills]


def crops(seed: int, step: int, n: int) -> torch.Tensor:
    p = mini_data.plan_step(seed, 1, step, hw, {"oil": ["x"]}, n * (side / 256) ** 2, (side,))
    return mini_data.gpu_crops(stills_t, p)


states = torch.zeros(1, 8, cfg.unet["encoder_hid_dim"])
mask = torch.ones(1, 8, dtype=torch.long)


def edit(x_latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    b = x_latent.shape[0]
    t = torch.full((b,), 1000.0)
    ids = torch.tensor([[side, side]], dtype=torch.float32).expand(b, -1)
    return velocity(unet, noise, x_latent, t, states.expand(b, -1, -1), mask.expand(b, -1), ids)


held = crops(99, 0, 16)
with torch.no_grad():
    held_z = encode01(vae, held)
    held_rt = decode01(vae, held_z).clamp(0, 1)
    held_noise = torch.randn(held_z.shape, generator=torch.Generator().manual_seed(1))


def psnr() -> float:
    unet.eval()
    with torch.no_grad():
        out = decode01(vae, held_noise - edit(held_z, held_noise)).clamp(0, 1)
    unet.train()
    return round(float((10 * torch.log10(1 / (out - held_rt).square().mean(dim=(1, 2, 3)))).mean()), 2)


opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01)
params = sum(p.numel() for p in unet.parameters())
log = [{"step": 0, "psnr_to_vae_round_trip": psnr()}]
print(variant, params, log[-1], flush=True)
t0 = time.time()
for i in range(1, steps + 1):
    with torch.no_grad():
        z = encode01(vae, crops(0, i, 16))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1000 + i))
    loss = (edit(z, noise) - (noise - z)).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    if i % 50 == 0 or i == steps:
        log.append({"step": i, "loss": round(float(loss.detach()), 4), "psnr_to_vae_round_trip": psnr(),
                    "s_per_step": round((time.time() - t0) / i, 2)})  # fmt: skip
        print(log[-1], flush=True)
print(json.dumps({"variant": variant, "unet_params": params, "side": side, "log": log}))
