#!/usr/bin/env python
"""Each GPU step of the engine alone (#14): eager, replayed as a CUDA graph, and (optionally)
compiled, with the kernels that take the GPU time. What `bench.py`'s timeline cannot say: there
the text encoder shares the GPU with the U-Net, and a stage's time is stretched by the other's.

    python scripts/profile_steps.py --out $OUT/steps.json [--batch 8] [--size 512] [--compiled text]

The engine runs one batch of a real-looking input (the `random-full` stack, a bench row's
configuration, default `cf8`: fast text encoder, fused QKV), with each step's callable wrapped so
that its arguments are kept. Then, per step (text, vae_encode, velocity, vae_decode): the median of
--iters calls timed with CUDA events, eager and as a `StreamGraph` replay (one launch), and a
torch.profiler table of one eager call (the kernels are the same in the graph): the top kernels
by GPU time, and the GPU time summed by kind (GEMM, attention, normalisation, elementwise, copies).
`--compiled STEP,...`: those steps compiled as the engine compiles them (minutes for the U-Net).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import ROWS  # noqa: E402

from stylize import video  # noqa: E402
from stylize.config import PipelineConfig, model_config, style_config  # noqa: E402
from stylize.engine import Engine  # noqa: E402
from stylize.models import load_stack  # noqa: E402
from stylize.optimize import StreamGraph  # noqa: E402

STEPS = ("text", "vae_encode", "denoise", "vae_decode")
KINDS = [  # kernel name pattern -> kind (first match)
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("gemm", r"gemm|sm90_xmma|cutlass|nvjet|matmul|cublas"),
    ("conv", r"conv|implicit|wgrad|dgrad|cudnn"),
    ("norm", r"norm|welford|reduce"),
    ("copy", r"copy|cat|memcpy|memset|contiguous|index|gather|scatter"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|triton"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, pat in KINDS if re.search(pat, low)), "other")


def timed(fn, args, iters: int) -> float:
    """Median ms of `iters` calls of fn(*args), each between two CUDA events on the current stream."""
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_table(fn, args, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(ev.name, [0, 0.0])
            k[0] += 1
            k[1] += ev.device_time_total / 1000 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1000
    by_kind: dict[str, float] = {}
    for name, (_, ms) in kernels.items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + ms
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    return {
        "kernels": sum(n for n, _ in kernels.values()),
        "gpu_ms": round(sum(ms for _, ms in kernels.values()), 3),
        "by_kind_ms": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"kernel": name[:140], "calls": n, "ms": round(ms, 3)} for name, (n, ms) in rows[:top]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--row", default="cf8", help="a bench.py row whose engine configuration to use (eager)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--model", default="random-full")
    ap.add_argument("--compiled", default="", help="steps also timed compiled, e.g. text,velocity")
    ap.add_argument("--channels-last", action="store_true", help="the U-Net and the VAE in channels_last memory format")
    args = ap.parse_args()

    batch, ecfg, _, _ = ROWS[args.row]
    t = time.perf_counter()
    stack = load_stack(model_config(args.model), "cuda")
    load_s = time.perf_counter() - t
    if args.channels_last:
        stack.unet.to(memory_format=torch.channels_last)
        stack.vae.to(memory_format=torch.channels_last)
    cfg = PipelineConfig(prompt=style_config("oil").prompt, size=args.size, crop="center", batch_size=batch)
    engine = Engine(stack, cfg, ecfg)
    kept: dict[str, tuple] = {}

    def keep(name, fn):
        def call(*a):
            kept.setdefault(name, a)
            return fn(*a)

        return call

    plain = engine.steps
    engine.use(dataclasses.replace(plain, **{n: keep(n, getattr(plain, n)) for n in STEPS}))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (batch, args.size, args.size, 3), dtype=np.uint8)
    engine.prepare((args.size, args.size))
    engine.reset()
    engine.feed(video.FrameBatch(frames, list(range(batch)), [0.0] * batch))
    engine.flush()
    torch.cuda.synchronize()

    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
        "row": args.row, "channels_last": args.channels_last, "batch": batch, "size": args.size, "model_load_s": round(load_s, 1), "steps": {},
    }  # fmt: skip
    compiled = [s for s in args.compiled.split(",") if s]
    with torch.inference_mode():
        for name in STEPS:
            if name not in kept:
                continue
            fn, a = getattr(plain, name), kept[name]
            graph = StreamGraph(fn)
            graph(*a), graph(*a)  # eager warm-up, then capture
            row = {
                "shapes": [list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in a],
                "eager_ms": round(timed(fn, a, args.iters), 3),
                "graph_ms": round(timed(graph, a, args.iters), 3),
            }
            if name in compiled:
                t = time.perf_counter()
                compiled_fn = torch.compile(fn, fullgraph=True, dynamic=False)
                compiled_fn(*a), compiled_fn(*a)  # compile and autotune before any capture (inductor
                torch.cuda.synchronize()  # syncs while autotuning, which a capture refuses)
                comp = StreamGraph(compiled_fn)
                comp(*a), comp(*a)
                row["compile_s"] = round(time.perf_counter() - t, 1)
                row["compiled_graph_ms"] = round(timed(comp, a, args.iters), 3)
            row["profile"] = kernel_table(fn, a, args.top)
            result["steps"][name] = row
            print(name, json.dumps({k: v for k, v in row.items() if k != "profile"}),
                  json.dumps(row["profile"]["by_kind_ms"]), flush=True)  # fmt: skip
            for k in row["profile"]["top"][:8]:
                print(f"    {k['ms']:8.3f} ms {k['calls']:5d}x  {k['kernel'][:110]}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    engine.close()


if __name__ == "__main__":
    main()
