#!/usr/bin/env python
"""Probe (#13, NOTES 34): where a `latent` training step of mini goes on the GPU. Item 30's log
puts a latent step at ~340-370 ms on the H200 against the ~63 ms train_mini.py's arithmetic
predicts, so each part is timed alone (device syncs between them): the VAE encodes (no grad), the
text encoder's forward, the U-Net's forward, the backward, the optimiser; at each crop side, with
the U-Net in NCHW and in channels_last (PyTorch runs bf16 depthwise convolutions on cuDNN only in
channels_last; NCHW takes its native depthwise kernels, whose backward is slow), and cudnn.benchmark
on as train_mini.py sets it. Then the real batch maker (crops, the nine GPU teachers, the anime
workers) over 40 steps of the plan's latent stage, and torch.profiler's top kernels of one step.

    python3 scripts/probes/train_step.py [--ckpt .carry/mini2/ckpt-v2.safetensors] [--out X.json]

Random crops stand in for the batch in the timing part (the cost does not depend on the pixels).
"""

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from stylize.config import model_config
from stylize.reference import velocity
from stylize.train import checkpoint as ckpt, data as train_data, mini
from stylize.train.mini_data import batch_for
from stylize.train.mini_steps import Batches, Mini, condition, encode01, optimizer_for, _time_ids

ap = argparse.ArgumentParser()
ap.add_argument("--ckpt", type=Path)
ap.add_argument("--out", type=Path)
ap.add_argument("--steps", type=int, default=8)
ap.add_argument("--sides", default="256,512")
ap.add_argument("--device", default="cuda")
ap.add_argument("--batch-steps", type=int, default=40)
args = ap.parse_args()
dev = torch.device(args.device)
torch.backends.cudnn.benchmark = True
m = Mini(model_config("mini"), mini.build_mini_tokenizer(), 0, dev)
if args.ckpt and args.ckpt.is_file():
    ckpt.restore_modules(m.modules, ckpt.load_checkpoint(args.ckpt)[0])
styles = mini.mini_styles()
prompts = [mini.style_prompts(s)[0] for s in styles]


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def one(side: int, channels_last: bool, timings: dict | None):
    b = batch_for(side, 64)
    x = torch.rand(b, 3, side, side, device=dev)
    y = torch.rand(b, 3, side, side, device=dev)
    plan = types.SimpleNamespace(prompts=[prompts[i % len(prompts)] for i in range(b)])
    marks = [time.monotonic()]

    def mark():
        sync()
        marks.append(time.monotonic())

    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        with torch.no_grad():
            source, target = encode01(m.vae, x), encode01(m.vae, y)
        mark()
        states, mask = condition(m, plan, x)
        mark()
        noise = torch.randn_like(target)
        sigma = torch.ones(b, device=dev)
        x_t = noise
        if channels_last:
            x_t, source = x_t.contiguous(memory_format=torch.channels_last), source.contiguous(memory_format=torch.channels_last)
        v = velocity(m.unet, x_t, source, sigma * 1000, states, mask, _time_ids(x)).float()
        loss = (v - (noise - target).float()).square().mean()
        mark()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    mark()
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    opt.step()
    mark()
    if timings is not None:
        for k, a, c in zip(("encode", "text_encoder_fwd", "unet_fwd", "backward", "optimizer"), marks, marks[1:]):
            timings.setdefault(k, []).append((c - a) * 1000)


stage = types.SimpleNamespace(trains=("unet", "text_encoder"))
params = m.trainable(stage)
opt = optimizer_for(params, dev)
rows = []
for channels_last in (False, True):
    for module in (m.unet, m.vae):
        module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    opt = optimizer_for(params, dev)  # moments in the parameters' new format
    for side in map(int, args.sides.split(",")):
        t0 = time.monotonic()
        for _ in range(3):
            one(side, channels_last, None)
        warm_s = time.monotonic() - t0
        timings: dict = {}
        for _ in range(args.steps):
            one(side, channels_last, timings)
        ms = {k: round(statistics.median(v), 1) for k, v in timings.items()}
        row = {"side": side, "batch": batch_for(side, 64), "channels_last": channels_last, "ms": ms,
               "total_ms": round(sum(ms.values()), 1), "first_3_steps_s": round(warm_s, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

# the top kernels of one step at 256, NCHW
for module in (m.unet, m.vae):
    module.to(memory_format=torch.contiguous_format)
from torch.profiler import ProfilerActivity, profile

with profile(activities=[ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU]) as prof:
    one(int(args.sides.split(",")[0]), False, None)
    sync()
table = prof.key_averages().table(sort_by="self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total", row_limit=18, max_name_column_width=70)
print(table, flush=True)

# the real batch maker: the plan's latent stage, reuse 4, side periods of 50, the anime workers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_mini  # noqa: E402

plan = train_mini.PLAN
first = plan[0].steps
batches = Batches(train_data.load_stills(), styles, plan, 0, dev, 14 if dev.type == "cuda" else 0, ahead=28)
gets = []
try:
    for step in range(first, first + args.batch_steps):
        sync()
        t = time.monotonic()
        batches.get(step, sum(s.steps for s in plan))
        sync()
        gets.append((time.monotonic() - t) * 1000)
finally:
    batches.close()
batch_row = {"batch_get_ms_first_10": [round(g) for g in gets[:10]], "batch_get_ms_median_last_30": round(statistics.median(gets[min(10, len(gets) - 1):]), 1)}
print(json.dumps(batch_row), flush=True)
if args.out:
    args.out.write_text(json.dumps({"rows": rows, "profile_256_nchw": table, **batch_row}, indent=1))
