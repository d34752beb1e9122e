#!/usr/bin/env python
"""The GPU benchmark ladder (DESIGN §6): one row per configuration, written as JSON and a table.

    python scripts/bench.py --clip parkour.mp4 --rows a,b8,c8,d8 --out benchmarks/results/x.json

Protocol: the `random-full` stack at 512x512 (centre crop of the 512² DAVIS clip), `parkour`
looped to --frames frames, real PyAV decode and encode (stylize_video, the CLI's own path).
Per row: wall-clock fps from the first decoded frame to the last encoded one, after a warm-up run
(compile included) whose time is reported beside it; the reference runtime's "step-only" fps
(frames over the summed GPU time of TE + VAE + U-Net per batch); per-frame latency p50/p95 from
decode to hand-off to the encoder, decoding flat out and paced at the clip's frame rate; peak GPU
memory; a per-stage timeline from CUDA events; the share of the measured bf16 matmul ceiling; and
the max/mean abs difference (0-255) from the reference row on the same frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stylize import video  # noqa: E402
from stylize.writer import VideoWriter  # noqa: E402
from stylize.config import EngineConfig, PipelineConfig, model_config, style_config  # noqa: E402
from stylize.engine import Engine  # noqa: E402
from stylize.models import load_stack  # noqa: E402
from stylize.pipeline import OutputConfig, stylize_video  # noqa: E402
from stylize.reference import ReferenceStylizer  # noqa: E402

# GFLOP per 512² frame (DESIGN §3, measured with a FLOP counter): the work a row is credited with.
FLOPS_UNET_STEP, FLOPS_TE_256, FLOPS_TAESD = 652.6, 661.0, 263.0

# name -> (batch size, engine config or None for the reference path, compile (True, False, or
# "graphs": the eager steps replayed as CUDA graphs, optimize.graph_steps), paced run)
ROWS = {
    "a": (1, None, False, False),  # the sequential reference path, one frame at a time
    **{f"b{b}": (b, EngineConfig(side_stream=False, fast_te=False, compile="off"), False, False) for b in (8, 16)},
    **{f"c{b}": (b, EngineConfig(fast_te=False, compile="off"), False, False) for b in (8, 16)},
    **{f"cf{b}": (b, EngineConfig(compile="off"), False, False) for b in (8, 16)},  # + fast TE, eager
    **{f"d{b}": (b, EngineConfig(compile="on"), True, True) for b in (8, 16)},
    **{f"dn{b}": (b, EngineConfig(compile="on", side_stream=False), True, False) for b in (8, 16)},
    **{f"du{b}": (b, EngineConfig(compile="on", fuse_qkv=False), True, False) for b in (8, 16)},  # q, k, v apart
    # two batches in flight instead of three (EngineConfig.in_flight): a batch period less latency
    **{f"dl{b}": (b, EngineConfig(compile="on", in_flight=2), True, False) for b in (8, 16)},
    **{
        f"el{b}": (b, EngineConfig(compile="on", adapter="random", adapter_refresh_every=8, in_flight=2), True, False)
        for b in (8, 16)
    },
    # side-stream steps (text encoder, TAESD encode) launched kernel by kernel, not as CUDA graphs
    **{f"dg{b}": (b, EngineConfig(compile="on", side_graphs=False), True, False) for b in (8, 16)},
    **{f"fm{b}": (b, EngineConfig(compile="on", te_refresh_every=8), True, True) for b in (8, 16)},
    **{f"fo{b}": (b, EngineConfig(compile="on", te_batch_one=True), True, False) for b in (8, 16)},
    **{  # TE reuse (M=8) with the champion adapter
        f"fe{b}": (
            b,
            EngineConfig(compile="on", te_refresh_every=8, adapter="random", adapter_refresh_every=8),
            True,
            False,
        )
        for b in (8, 16)
    },
    **{f"fs{b}": (b, EngineConfig(compile="on", static_prompt=True), True, False) for b in (8, 16)},
    # (e) the temporal adapter (random weights: speed only): the paper's champion, and all hooks N=1
    **{
        f"e{b}": (b, EngineConfig(compile="on", adapter="random", adapter_refresh_every=8), True, True) for b in (8, 16)
    },
    **{
        f"eu{b}": (
            b,
            EngineConfig(compile="on", adapter="random", adapter_refresh_every=8, fuse_qkv=False),
            True,
            False,
        )
        for b in (8, 16)
    },
    **{
        f"eg{b}": (
            b,
            EngineConfig(compile="on", adapter="random", adapter_refresh_every=8, side_graphs=False),
            True,
            False,
        )
        for b in (8, 16)
    },
    **{  # e with DIS's "fast" preset (the default is "ultrafast": flow.py)
        f"ef{b}": (
            b,
            EngineConfig(compile="on", adapter="random", adapter_refresh_every=8, flow="dis-fast"),
            True,
            False,
        )
        for b in (8, 16)
    },
    **{
        f"ea{b}": (
            b,
            EngineConfig(compile="on", adapter="random", adapter_hooks="all", adapter_refresh_every=1),
            True,
            False,
        )
        for b in (8, 16)
    },
    # (r) no compile: the eager steps as CUDA graphs (what --compile auto runs on short clips), the
    # d and e rows' configurations
    **{f"r{b}": (b, EngineConfig(compile="off"), "graphs", True) for b in (8, 16)},
    **{
        f"re{b}": (b, EngineConfig(compile="off", adapter="random", adapter_refresh_every=8), "graphs", True)
        for b in (8, 16)
    },
}


def matmul_ceiling_tflops() -> float:
    """The measured bf16 matmul ceiling: an 8192³ product on random data, median of 10."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    return 2 * 8192**3 / float(np.median(times)) / 1e12


def looped_clip(src: Path, frames: int, folder: Path) -> Path:
    """`src` looped to `frames` frames, re-encoded once (near-lossless) with continuous timestamps."""
    info = video.probe(src)
    dst = folder / f"{src.stem}_x{frames}.mp4"
    batches = [b for b in video.read_batches(info, 64)]
    clip = np.concatenate([b.frames for b in batches])
    step = info.nominal_ticks
    with VideoWriter(dst, info, crf=10, preset="veryfast", audio=False) as w:
        for start in range(0, frames, 64):
            idx = [i % len(clip) for i in range(start, min(frames, start + 64))]
            w.write(clip[idx], [i * step for i in range(start, start + len(idx))])
    return dst


def timeline_summary(timeline: list, batch_size: int) -> dict:
    """Per-stage median GPU ms per batch, busy time per stream and the GPU's idle share."""
    torch.cuda.synchronize()
    origin = timeline[0][3]
    spans, per_stage = [], {}
    per_batch_gpu: dict[int, float] = {}
    for batch, stage, stream, start, end in timeline:
        t0, t1 = origin.elapsed_time(start), origin.elapsed_time(end)
        spans.append((t0, t1, stream))
        per_stage.setdefault(stage, []).append(t1 - t0)
        if stage in ("te", "vae_enc", "unet", "vae_dec"):
            per_batch_gpu[batch] = per_batch_gpu.get(batch, 0.0) + (t1 - t0)
    wall = max(t1 for _, t1, _ in spans) - min(t0 for t0, _, _ in spans)
    gaps = _main_gaps(timeline, origin)
    busy = _union([(a, b) for a, b, _ in spans])
    per_stream = {s: _union([(a, b) for a, b, st in spans if st == s]) for s in ("main", "side")}
    step_ms = float(np.median(list(per_batch_gpu.values())))
    return {
        "stage_ms_median": {k: round(float(np.median(v)), 2) for k, v in per_stage.items()},
        "stage_calls": {k: len(v) for k, v in per_stage.items()},
        "stream_busy_ms": {k: round(v, 1) for k, v in per_stream.items()},
        "gpu_span_ms": round(wall, 1),
        "gpu_idle_share": round(1 - busy / wall, 3) if wall else None,
        "streams_overlap_ms": round(per_stream["main"] + per_stream["side"] - busy, 1),
        "step_only_fps": round(batch_size / step_ms * 1000, 1),
        **gaps,
    }


def _main_gaps(timeline: list, origin) -> dict:
    """Where the main stream waited: its idle time before each batch's first main-stream stage,
    split by whether that batch refreshed the adapter's conditioning (a flow on the host)."""
    first_main: dict[int, float] = {}
    last_main: dict[int, float] = {}
    refreshed = {batch for batch, stage, *_ in timeline if stage == "adapter"}
    for batch, _, stream, start, end in timeline:
        if stream == "main":
            first_main[batch] = min(first_main.get(batch, 1e18), origin.elapsed_time(start))
            last_main[batch] = max(last_main.get(batch, -1e18), origin.elapsed_time(end))
    idle = {b: max(0.0, first_main[b] - last_main[b - 1]) for b in first_main if b - 1 in last_main}
    return {
        "main_idle_ms_refresh_batches": round(sum(v for b, v in idle.items() if b in refreshed), 1),
        "main_idle_ms_other_batches": round(sum(v for b, v in idle.items() if b not in refreshed), 1),
        "main_idle_ms_max": round(max(idle.values(), default=0.0), 1),
    }


def _union(intervals) -> float:
    total, end = 0.0, -1e18
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


SIZE = 512


def make(stack, name: str, prompt: str, seed: int = 0):
    batch, ecfg, compile_, _ = ROWS[name]
    cfg = PipelineConfig(prompt=prompt, size=SIZE, crop="center", batch_size=batch, seed=seed)
    if ecfg is None:
        return ReferenceStylizer(stack, cfg)
    engine = Engine(stack, cfg, ecfg)
    if compile_ == "graphs":
        engine.enable_graphs()
    elif compile_:
        engine.enable_compile()
    return engine


def outputs(stylizer, frames: np.ndarray) -> np.ndarray:
    """The stylizer's uint8 output for `frames`, fed in its batch size, from a fresh clip state."""
    stylizer.reset()
    bs = stylizer.cfg.batch_size
    out = []
    for s in range(0, len(frames), bs):
        chunk = frames[s : s + bs]
        out += stylizer.feed(video.FrameBatch(chunk, list(range(s, s + len(chunk))), [0.0] * len(chunk)))
    out += stylizer.flush()
    return np.concatenate([b.frames for b in out])


def run_row(stack, name, clip, prompt, ceiling, parity, ref_out, tmp, paced_frames, warm_only=False, paced_ok=True):
    batch, ecfg, compile_, paced = ROWS[name]
    print(f"[{name}] building", flush=True)
    t = time.perf_counter()
    stylizer = make(stack, name, prompt)
    enc = OutputConfig(crf=18, preset="veryfast", audio=False)
    # warm-up: compile (when on) and first batches, timed on their own
    warm_clip = video.probe(clip)
    warm_n = batch * 3
    warm_src = tmp / f"warm_{name}.mp4"
    with VideoWriter(warm_src, warm_clip, crf=10, preset="ultrafast", audio=False) as w:
        b = next(iter(video.read_batches(clip, warm_n)))
        w.write(b.frames, b.pts)
    stylize_video(warm_src, tmp / f"warm_{name}_out.mp4", stylizer, enc)
    warmup_s = time.perf_counter() - t
    print(f"[{name}] warm-up {warmup_s:.1f} s", flush=True)
    if warm_only:  # a cache-filling run (rows compiled in parallel processes before a measured one)
        stylizer.close()
        return {"row": name, "batch": batch, "warmup_s": round(warmup_s, 1)}, None

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timeline = stylizer.start_timeline() if isinstance(stylizer, Engine) and cuda else None
    stats = stylize_video(clip, tmp / f"{name}_out.mp4", stylizer, enc)
    row = {
        "row": name, "batch": batch, "engine": dataclasses.asdict(ecfg) if ecfg else None, "compiled": compile_,
        "frames": stats.frames, "wall_s": round(stats.seconds, 2), "fps": round(stats.fps, 1),
        "warmup_s": round(warmup_s, 1), "latency_p50_ms": round(stats.latency_p50_ms, 1),
        "latency_p95_ms": round(stats.latency_p95_ms, 1),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }  # fmt: skip
    if isinstance(stylizer, Engine) and stylizer.flow_ms:
        row["flow_host_ms_median"] = round(float(np.median(stylizer.flow_ms)), 1)
        row["flow_wait_ms_median"] = round(float(np.median(stylizer.temporal.flow_wait_ms)), 1)
        row["flow_refreshes"] = len(stylizer.flow_ms)
    if timeline is not None:
        stylizer.stop_timeline()
        row["timeline"] = timeline_summary(timeline, batch)
        row["step_only_fps"] = row["timeline"]["step_only_fps"]
    te_share = 1.0
    if ecfg is not None:
        te_share = 0.0 if ecfg.static_prompt else (1 / batch if ecfg.te_batch_one else 1 / ecfg.te_refresh_every)
    gflop = FLOPS_UNET_STEP + FLOPS_TE_256 * te_share + FLOPS_TAESD
    row["gflop_per_frame"] = round(gflop, 1)
    row["ceiling_share"] = round(gflop * 1e9 * stats.fps / (ceiling * 1e12), 3)
    if paced and paced_ok:
        paced_src = tmp / f"paced_{name}.mp4"
        if not paced_src.exists():
            looped = looped_clip(clip, paced_frames, tmp)
            looped.rename(paced_src)
        p = _paced_latency(paced_src, stylizer, tmp / f"{name}_paced.mp4", enc)
        row.update(p)
    out = outputs(stylizer, parity)
    if ref_out is not None:
        d = np.abs(out.astype(np.int16) - ref_out.astype(np.int16))
        row["max_abs_diff_vs_ref"], row["mean_abs_diff_vs_ref"] = int(d.max()), round(float(d.mean()), 3)
    print(json.dumps({k: v for k, v in row.items() if k not in ("engine", "timeline")}), flush=True)
    if "timeline" in row:
        print(f"[{name}] timeline {json.dumps(row['timeline'])}", flush=True)
    stylizer.close()
    del stylizer
    if cuda:
        torch.cuda.empty_cache()
    return row, out


def _paced_latency(src, stylizer, dst, enc) -> dict:
    """Latency with decode paced at the clip's frame rate (a live source)."""
    stats = stylize_video(src, dst, stylizer, dataclasses.replace(enc, realtime=True))
    return {"paced_frames": stats.frames, "paced_latency_p50_ms": round(stats.latency_p50_ms, 1),
            "paced_latency_p95_ms": round(stats.latency_p95_ms, 1), "paced_fps": round(stats.fps, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", type=Path, required=True, help="parkour.mp4 from shared/media/davis512sq")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=480)
    ap.add_argument("--paced-frames", type=int, default=240)
    ap.add_argument("--rows", default="a,b8,b16,c8,c16,cf8,cf16")
    ap.add_argument("--ref", default="a", help="the row the others are compared with")
    ap.add_argument("--ref-from", type=Path, help="a .npy of the reference row's outputs from an earlier call")
    ap.add_argument("--model", default="random-full")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--save-ref", type=Path, help="write the reference row's outputs here (.npy)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (tiny model)")
    ap.add_argument("--warm-only", action="store_true", help="compile and warm up each row, measure nothing")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the rows, interleaved (paced runs in the first)")
    args = ap.parse_args()

    cuda = args.device == "cuda"
    global SIZE
    SIZE = args.size
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    ceiling = matmul_ceiling_tflops() if cuda else 1.0
    print(f"{gpu}: bf16 matmul ceiling {ceiling:.0f} TFLOP/s", flush=True)
    t = time.perf_counter()
    stack = load_stack(model_config(args.model), args.device)
    load_s = time.perf_counter() - t
    prompt = style_config("oil").prompt
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    clip = looped_clip(args.clip, args.frames, tmp)
    parity = np.concatenate([b.frames for b in video.read_batches(clip, 16)])[:16]

    import diffusers
    import transformers

    result = {
        "gpu": gpu, "date": datetime.date.today().isoformat(), "host": platform.node(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "av": video.av.__version__, "python": platform.python_version()},
        "command": " ".join(sys.argv), "model": args.model, "prompt": prompt, "clip": str(args.clip),
        "frames": args.frames, "size": args.size, "steps": 1, "bf16_ceiling_tflops": round(ceiling, 1),
        "model_load_s": round(load_s, 1), "rows": [],
    }  # fmt: skip
    ref_out = np.load(args.ref_from) if args.ref_from else None
    compiled_out: dict[int, np.ndarray] = {}  # rows (f) change the output by design: compare with (d)
    names = args.rows.split(",")
    for rnd in range(args.repeat):  # rounds interleave the rows: a machine's drift hits them alike
        for name in names:
            batch = ROWS[name][0]
            base = compiled_out.get(batch) if name.startswith("f") else ref_out
            row, out = run_row(stack, name, clip, prompt, ceiling, parity, base, tmp, args.paced_frames,
                               args.warm_only, paced_ok=rnd == 0)  # fmt: skip
            row["round"] = rnd
            result["rows"].append(row)
            if args.warm_only:
                continue
            if name.startswith("f"):
                row["diff_against"] = f"d{batch}" if base is not None else None
            if name == f"d{batch}":
                compiled_out[batch] = out
            if name == args.ref and rnd == 0:
                ref_out = out
                if args.save_ref:
                    np.save(args.save_ref, out)
            adapter_costs(result["rows"])
            result["median_fps"] = median_fps(result["rows"])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))  # after every row: a killed run keeps its rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if not args.warm_only:
        print_table(result)


def median_fps(rows: list[dict]) -> dict:
    """Per row name over the rounds: the median fps, and for adapter rows the median cost."""
    out = {}
    for name in dict.fromkeys(r["row"] for r in rows):
        mine = [r for r in rows if r["row"] == name]
        out[name] = {"fps": round(float(np.median([r["fps"] for r in mine])), 1), "rounds": len(mine)}
        costs = [r["adapter_cost"] for r in mine if "adapter_cost" in r]
        if costs:
            out[name]["adapter_cost"] = round(float(np.median(costs)), 3)
    return out


def adapter_costs(rows: list[dict]) -> None:
    """Each adapter row (e, ea) against the plain row (d) of its batch size from the same run and
    round: the share of fps the adapter costs."""
    for r in rows:
        plain = {"eu": "du", "eg": "dg", "el": "dl", "fe": "fm"}.get(r["row"][:2], "d")  # same engine options
        d = next((p for p in rows if p["row"] == f"{plain}{r['batch']}" and p["round"] == r["round"]), None)
        if r["row"].startswith(("e", "fe")) and d is not None:
            r["adapter_cost_vs"] = d["row"]
            r["adapter_cost"] = round(1 - r["fps"] / d["fps"], 3)


def print_table(result: dict) -> None:
    print(f"\n{result['gpu']}  torch {result['versions']['torch']}  ceiling {result['bf16_ceiling_tflops']} TFLOP/s")
    print(
        f"{'row':6} {'B':>3} {'fps':>7} {'step':>7} {'p50':>6} {'p95':>6} {'paced50':>7} {'warm s':>7} {'GiB':>5} {'ceil%':>6} {'maxdiff':>7} {'adapter':>7}"
    )
    for r in result["rows"]:
        r = {k: ("" if v is None else v) for k, v in r.items()}
        print(
            f"{r['row']:6} {r['batch']:>3} {r['fps']:>7} {r.get('step_only_fps', ''):>7} {r['latency_p50_ms']:>6} "
            f"{r['latency_p95_ms']:>6} {r.get('paced_latency_p50_ms', ''):>7} {r['warmup_s']:>7} "
            f"{r['peak_gpu_mem_gib']:>5} {100 * r['ceiling_share']:>6.1f} {r.get('max_abs_diff_vs_ref', ''):>7} "
            f"{r.get('adapter_cost', ''):>7}"
        )
    if any(m["rounds"] > 1 for m in result.get("median_fps", {}).values()):
        for name, m in result["median_fps"].items():
            print(
                f"median over {m['rounds']} rounds: {name} {m['fps']} fps"
                + (f", adapter cost {m['adapter_cost']}" if "adapter_cost" in m else "")
            )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser("~/.cache/stylize/inductor"))
    main()
