#!/usr/bin/env python
"""Long runs (issue #16, item 4): memory, threads and file descriptors over one long clip and over a
folder of many short clips. A benchmark, not a test: the target is flat after warm-up (< 5% growth).

    python scripts/longrun.py frames --device cpu --frames 10000 --out benchmarks/results/X-frames.json
    python scripts/longrun.py clips --device cpu --clips 110 --out benchmarks/results/X-clips.json
    python scripts/longrun.py plot benchmarks/results/X-frames.json --plot benchmarks/longrun-frames-cpu.png

- `frames`: one generated clip (a scrolling texture with a moving bar, AAC audio; PyAV, in a temp
  folder) run as the CLI runs a clip: `run_options` -> `load_stack` -> `build_stylizer` ->
  `stylize_video` (the reference path on the CPU, the streaming engine on CUDA). A sample is taken
  from the progress callback every `--every` frames (on the thread that hands batches to the
  encoder: no polling thread).
- `clips`: a folder of `--clips` generated short clips (a few sizes, landscape and portrait, 1-2
  batches each, every third with audio) run in process by the CLI itself (`stylize FOLDER --json
  -o DIR`, `cli.run_app`); a sample is taken as each clip's --json record is printed, i.e. after
  the clip is complete and its threads are joined.

A sample: resident memory (psutil, else /proc/self/statm), torch.cuda.memory_allocated and
memory_reserved (when CUDA is in use), threads (threading.active_count and the kernel's count from
/proc/self/status) and open file descriptors (/proc/self/fd). The JSON (`--out`) is rewritten after
every sample, summary included, so a killed run keeps what it measured; the plot (`--plot`, default
benchmarks/longrun-MODE-DEVICE.png) is drawn at the end (matplotlib, else PIL), or later with `plot`.
Summary: start (frames: after the model load, before the first frame; clips: after clip 1), after
warm-up (`--warmup`: frames, default a tenth of the clip; clips, default 10), end (frames: the last
sample; clips: clip `--to`, default 100, and the last); per metric the growth from warm-up to end in
%, the peak after warm-up against it, and the medians of the first and last tenth of that range
(one RSS sample moves by a few % with the allocator and with the last clip's size).

## On the GPU machine (random-full through the engine; one command, < 10 min)

diffusers and av are not installed there: carry `.carry/wheels.tar.xz` (a `site/` folder with
diffusers 0.42.1 and av 18.1.0; matplotlib, psutil, typer and rich are in the image). `--compile
auto` (the CLI's default) compiles nothing on a machine with no compile cache (10,000 frames <
15k): the engine's eager steps, replayed as CUDA graphs where the engine does that (#14), captured
once per size. Expected: 2-4 min for the frames (10,000 frames at 512x288, ~50-100 fps), ~2 min for
the clips (110 clips of 5-12 frames at four sizes); each run is capped by `timeout` and leaves its
samples if cut:

    carry: [".carry/wheels.tar.xz"]
    tar xJf .carry/wheels.tar.xz -C /tmp && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 || exit; \\
    timeout 400 python3 scripts/longrun.py frames --device cuda --model random-full --size 512 \\
        --width 512 --height 288 --frames 10000 --out $OUT/h200-longrun-frames.json \\
        --plot $OUT/longrun-frames-cuda.png; \\
    timeout 170 python3 scripts/longrun.py clips --device cuda --model random-full --size 512 \\
        --clips 110 --out $OUT/h200-longrun-clips.json --plot $OUT/longrun-clips-cuda.png

then, here: copy the JSONs to benchmarks/results/ (dated) and the PNGs to benchmarks/ (a run cut by
`timeout` has no PNG: `python scripts/longrun.py plot JSON --plot PNG` draws it from the JSON, and
redoes the JSON's summary from its samples). On this 2-core CPU the tiny stack at --size 256 runs at
~2-5 fps, so a CPU run of 10,000 frames takes 35-80 min (benchmarks/NOTES.md, "Long runs").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stylize.config import run_options, use_persistent_compile_cache  # imports no torch

T0 = time.perf_counter()
FPS = 25
AUDIO_RATE = 44100
# the clips mode's sizes (width, height) at a long side of 256, scaled to --clip-size: landscape,
# portrait, 3:2, wide (at --size 256: worked at 256x128, 128x256, 256x160, 256x96)
CLIP_SIZES = ((256, 144), (144, 256), (240, 160), (256, 96))
METRICS = ("rss_mib", "rss_trimmed_mib", "pinned_mib", "gpu_allocated_mib", "gpu_reserved_mib", "threads", "os_threads",
           "fds")  # fmt: skip
TRIM = False  # --trim: each sample also gives RSS after glibc's malloc_trim(0)


# ----------------------------------------------------------------------------- sampling


def rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def os_threads() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def malloc_trim() -> None:
    """Hand the C heap's free pages back to the OS (glibc): RSS that drops here was freed memory
    the allocator kept (fragmentation), not memory still held."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def sample(**where) -> dict:
    """One row: `where` (frame or clip) and the process's resources now."""
    row = {**where, "t_s": round(time.perf_counter() - T0, 2), "rss_mib": round(rss_mib(), 1)}
    if TRIM:
        malloc_trim()
        row["rss_trimmed_mib"] = round(rss_mib(), 1)
    torch = sys.modules.get("torch")  # never imported here first (the CLI imports it after its checks)
    if torch is not None and torch.cuda.is_initialized():
        row["gpu_allocated_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        row["gpu_reserved_mib"] = round(torch.cuda.memory_reserved() / 2**20, 1)
        if hasattr(torch.cuda, "host_memory_stats"):  # pinned host blocks, in use and cached (part of RSS)
            pinned = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
            row["pinned_mib"] = round(pinned / 2**20, 1)
    row.update(threads=threading.active_count(), os_threads=os_threads(), fds=len(os.listdir("/proc/self/fd")))
    return row


class Recorder:
    """The run's JSON: metadata, samples and summary, rewritten (atomically) after each sample."""

    def __init__(self, path: Path, meta: dict, summarize):
        self.path, self.summarize = path, summarize
        self.result = {**meta, "complete": False, "samples": []}
        self.lock = threading.Lock()  # samples come from the engine's hand-back thread too

    def add(self, row: dict) -> None:
        with self.lock:
            self.result["samples"].append(row)
            self.save()

    def save(self, **extra) -> None:
        self.result.update(extra)
        self.result["summary"] = self.summarize(self.result)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        os.replace(tmp, self.path)


def growth(rows: dict[str, dict | None], after: list[dict]) -> dict:
    """Per metric: its value at each named row, growth from 'warm' to 'end' in %, and the peak of
    `after` (the rows from warm-up to end) against 'warm'. One sample of RSS moves by a few % with
    the allocator (and, per clip, with the clip's size), so the medians of the first and last tenth
    of `after` (at least 3 rows each) are compared too: `window_growth_pct`."""
    out = {}
    n = max(3, len(after) // 10)
    for m in METRICS:
        values = {k: r.get(m) if r else None for k, r in rows.items()}
        warm, end = values.get("warm"), values.get("end")
        if warm is None:
            continue
        series = [r[m] for r in after if m in r]
        peak = max(series, default=None)
        first, last = (float(np.median(series[:n])), float(np.median(series[-n:]))) if len(series) >= 2 * n else (0, 0)
        out[m] = {
            **values,
            "growth_pct": round(100 * (end - warm) / warm, 2) if end is not None and warm else None,
            "peak_after_warm": peak,
            "peak_growth_pct": round(100 * (peak - warm) / warm, 2) if peak is not None and warm else None,
            "window_medians": [first, last] if first else None,
            "window_growth_pct": round(100 * (last - first) / first, 2) if first else None,
        }
    flat = [v["growth_pct"] < 5 for v in out.values() if v["growth_pct"] is not None]
    return {"metrics": out, "flat": all(flat) if flat else None}


def summarize_frames(result: dict) -> dict:
    rows = [r for r in result["samples"] if r.get("frame") is not None]
    warm_at = result["warmup_frames"]
    start = next((r for r in rows if r["frame"] == 0), None)
    warm = next((r for r in rows if r["frame"] >= warm_at), None)
    end = rows[-1] if warm is not None and rows[-1]["frame"] > warm["frame"] else None
    after = [r for r in rows if warm is not None and r["frame"] >= warm["frame"]]
    return {
        "start_frame": 0, "warm_frame": warm and warm["frame"], "end_frame": end and end["frame"],
        **growth({"start": start, "warm": warm, "end": end}, after),
        "after_clip": next((r for r in result["samples"] if r.get("at") == "after the clip"), None),
    }  # fmt: skip


def summarize_clips(result: dict) -> dict:
    rows = [r for r in result["samples"] if (r.get("clip") or 0) >= 1]
    by_clip = {r["clip"]: r for r in rows}
    warm_at, to = result["warmup_clips"], result["to_clip"]
    after = [r for r in rows if warm_at <= r["clip"] <= to]
    summary = {
        "start_clip": 1, "warm_clip": warm_at, "end_clip": to,
        **growth({"start": by_clip.get(1), "warm": by_clip.get(warm_at), "end": by_clip.get(to)}, after),
    }  # fmt: skip
    if rows and rows[-1]["clip"] > to:  # and on to the last clip
        last = growth({"warm": by_clip.get(warm_at), "end": rows[-1]}, [r for r in rows if r["clip"] >= warm_at])
        summary["to_last"] = {"last_clip": rows[-1]["clip"], **last}
    summary["failed"] = result.get("failed_clips")
    summary["after_cli"] = next((r for r in result["samples"] if r.get("at") == "after the CLI"), None)
    return summary


# ----------------------------------------------------------------------------- clips


def texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB (height, width, 3): smooth colour blobs plus fine diagonal stripes, tileable
    along x (what scrolls past)."""
    from PIL import Image

    coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    blobs = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    y, x = np.mgrid[0:height, 0:width]
    stripes = 40 * np.sin(2 * np.pi * (x + y) / 12.0)[..., None]
    return np.clip(blobs * 0.8 + stripes + 20, 0, 255).astype(np.uint8)


def write_clip(path: Path, frames: int, size: tuple[int, int], audio: bool, seed: int = 0) -> Path:
    """An H.264 .mp4 of `frames` frames at FPS: a texture scrolling left (3 px a frame) with a
    bright bar moving down; with `audio`, a stereo 440 Hz AAC track as long as the video."""
    import av

    width, height = size
    tex = texture(height, 2 * width, np.random.default_rng(seed))
    cols = np.arange(width)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "crf": "18"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, FPS)
        sound = out.add_stream("aac", rate=AUDIO_RATE, layout="stereo") if audio else None
        for i in range(frames):
            image = tex[:, (cols + 3 * i) % tex.shape[1]]  # (H, W, 3), a copy
            bar = (2 * i) % height
            image[bar : bar + max(2, height // 16)] = 240
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if sound is not None:
            _write_audio(out, sound, frames / FPS)
    return path


def _write_audio(out, sound, seconds: float) -> None:
    import av

    fmt, total = sound.codec_context.format.name, int(seconds * AUDIO_RATE)
    for first in range(0, total, 1024):
        t = (first + np.arange(min(1024, total - first))) / AUDIO_RATE
        chunk = np.tile(0.3 * np.sin(2 * np.pi * 440 * t), (2, 1)).astype(np.float32)  # (2, n)
        data = chunk if fmt.endswith("p") else chunk.T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, first, Fraction(1, AUDIO_RATE)
        out.mux(sound.encode(frame))
    out.mux(sound.encode())


def clip_folder(folder: Path, count: int, long_side: int = 256) -> list[dict]:
    """`count` short clips in `folder`: sizes cycling through CLIP_SIZES (scaled to `long_side`,
    even), 5-12 frames (one or two batches of 8, most with a short last batch), every third with
    audio."""
    folder.mkdir(parents=True)
    made = []
    for k in range(count):
        size = tuple(2 * round(side * long_side / 512) for side in CLIP_SIZES[k % len(CLIP_SIZES)])
        frames, audio = 5 + (3 * k) % 8, k % 3 == 0
        write_clip(folder / f"clip{k:03d}.mp4", frames, size, audio, seed=k)
        made.append({"name": f"clip{k:03d}.mp4", "size": list(size), "frames": frames, "audio": audio})
    return made


# ----------------------------------------------------------------------------- runs


def meta(args, mode: str) -> dict:
    import av

    return {
        "mode": mode, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(), "host": platform.node(), "device": args.device,
        "model": args.model, "size": args.size, "batch_size": args.batch_size, "compile": args.compile,
        "versions": {"python": platform.python_version(), "av": av.__version__}, **tree(),
    }  # fmt: skip


def tree() -> dict:
    """The commit measured, and the library's files that differ from it (None without git)."""
    import subprocess

    def git(*a) -> str | None:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", "stylize")
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": status.splitlines() if status else status}


def versions(result: dict) -> None:
    """Library versions and the GPU's name, once torch is imported."""
    import diffusers
    import torch
    import transformers

    result["versions"].update(
        torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__
    )
    result["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_initialized() else None


def run_frames(args) -> dict:
    opts = run_options(style=args.style, prompt=None, model=args.model, size=args.size, batch_size=args.batch_size,
                       compile=args.compile)  # fmt: skip
    warmup = args.warmup if args.warmup is not None else max(args.every, args.frames // 10)
    rec = Recorder(args.out, {**meta(args, "frames"), "frames": args.frames, "input": [args.width, args.height],
                              "every": args.every, "warmup_frames": warmup}, summarize_frames)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="longrun-"))
    try:
        t = time.perf_counter()
        src = write_clip(tmp / "long.mp4", args.frames, (args.width, args.height), audio=True)
        rec.result["clip_write_s"] = round(time.perf_counter() - t, 1)
        rec.add(sample(frame=None, at="before load"))
        from stylize.models import load_stack
        from stylize.pipeline import build_stylizer, stylize_video

        stack = load_stack(opts.model, args.device)
        stylizer = build_stylizer(stack, opts.pipeline, opts.engine, [src], opts.output.fps)
        versions(rec.result)
        rec.result.update(stylizer=type(stylizer).__name__, compiled=bool(getattr(stylizer, "compiled", False)))
        rec.add(sample(frame=0, at="loaded"))
        next_at = [args.every]

        def on_progress(p) -> None:  # after each batch is handed to the encoder
            if p.done >= next_at[0] or p.done == p.total:  # and the last batch: the end of the clip
                next_at[0] = (p.done // args.every + 1) * args.every
                rec.add(sample(frame=p.done, fps=round(p.done / p.elapsed_s, 2) if p.elapsed_s else None))

        try:
            stats = stylize_video(src, tmp / "long_out.mp4", stylizer, opts.output, on_progress)
        finally:
            stylizer.close()
        rec.add(sample(frame=None, at="after the clip"))  # its threads joined, its files closed
        rec.save(complete=True, stats=stats.as_dict())
        return rec.result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _RecordTap(io.TextIOBase):
    """Stands in for stdout while the CLI runs: each complete line (a clip's --json record) goes to
    `on_line`, and on to the real stdout."""

    def __init__(self, on_line, echo):
        self.on_line, self.echo, self.buffer_ = on_line, echo, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.echo.write(text)
        self.buffer_ += text
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            if line.strip():
                self.on_line(line)
        return len(text)

    def flush(self) -> None:
        self.echo.flush()


def run_clips(args) -> dict:
    rec = Recorder(args.out, {**meta(args, "clips"), "clips": args.clips, "clip_size": args.clip_size or args.size,
                              "warmup_clips": args.warmup or 10, "to_clip": min(args.to, args.clips)},
                   summarize_clips)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="longrun-"))
    try:
        t = time.perf_counter()
        rec.result["inputs"] = clip_folder(tmp / "clips", args.clips, args.clip_size or args.size)
        rec.result["clip_write_s"] = round(time.perf_counter() - t, 1)
        rec.add(sample(clip=0, at="before the CLI"))
        done = [0]

        def on_record(line: str) -> None:  # the CLI has finished a clip (or this is not a record)
            try:
                record = json.loads(line)
            except ValueError:
                return
            done[0] += 1
            if done[0] == 1:
                versions(rec.result)
            rec.add(sample(clip=done[0], src=Path(record["src"]).name, frames=record["frames"],
                           fps=round(record["fps"], 2)))  # fmt: skip

        from stylize.cli import run_app

        argv = [str(tmp / "clips"), "--style", args.style, "--model", args.model, "--device", args.device,
                "--size", str(args.size), "--batch-size", str(args.batch_size), "--compile", args.compile,
                "-o", str(tmp / "out"), "--json"]  # fmt: skip
        rec.result["cli"] = "stylize " + " ".join(argv)
        with contextlib.redirect_stdout(_RecordTap(on_record, sys.stdout)):
            code = run_app(args=argv, prog_name="stylize", standalone_mode=False)
        rec.add(sample(clip=None, at="after the CLI"))
        rec.save(complete=True, exit_code=code or 0, failed_clips=args.clips - done[0])
        return rec.result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- plots


def series(result: dict) -> tuple[str, list, dict, list]:
    """(x label, x values, {name: y values} per panel, the vertical marks) of a run's samples."""
    frames = result["mode"] == "frames"
    key = "frame" if frames else "clip"
    rows = [r for r in result["samples"] if r.get(key) is not None and (frames or r[key] >= 1)]
    xs = [r[key] for r in rows]
    panels = [
        {m: [r.get(m) for r in rows] for m in METRICS[:5] if m in rows[0]},
        {m: [r[m] for r in rows] for m in ("threads", "os_threads", "fds")},
    ]
    s = result.get("summary", {})
    marks = [s.get("warm_frame")] if frames else [s.get("warm_clip"), s.get("end_clip")]
    return ("frames done" if frames else "clips done"), xs, panels, [m for m in marks if m]


def plot(result: dict, path: Path) -> None:
    """Memory (MiB) above, threads and file descriptors below, against frames or clips done."""
    xlabel, xs, panels, marks = series(result)
    s = result.get("summary", {}).get("metrics", {})
    rss = s.get("rss_mib", {})
    title = (f"{result['mode']}: {result['model']} on {result.get('gpu') or result['device']}, --size {result['size']}, "
             f"--compile {result['compile']}; "
             f"RSS {rss.get('warm')} -> {rss.get('end')} MiB after warm-up ({rss.get('growth_pct')}%)")  # fmt: skip
    if not result.get("complete"):  # killed (e.g. by `timeout`): say where it stopped
        title += f"\nstopped at {result['mode'][:-1]} {xs[-1]} of {result[result['mode']]} (not complete)"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
    except ImportError:
        return _plot_pil(xlabel, xs, panels, marks, title, path)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for ax, panel, ylabel in zip(axes, panels, ("MiB", "count")):
        for name, ys in panel.items():
            ax.plot(xs, ys, marker="." if len(xs) < 200 else None, label=name)
        for m in marks:
            ax.axvline(m, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel(xlabel + " (dashed: after warm-up" + (f", clip {marks[1]})" if len(marks) > 1 else ")"))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _to_pixel(x, y, left, y_top, right, y_bot, x0, x1, y_max) -> tuple[float, float]:
    return left + (x - x0) / ((x1 - x0) or 1) * (right - left), y_bot - y / y_max * (y_bot - y_top)


def _plot_pil(xlabel, xs, panels, marks, title, path: Path) -> None:
    """The same two panels drawn with PIL, where matplotlib is missing: lines, the y range from 0,
    min/max labels, a legend."""
    from PIL import Image, ImageDraw

    colors = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
    width, panel_h, left, top = 1000, 280, 70, 30
    img = Image.new("RGB", (width, top + 2 * panel_h + 40), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    x0, x1 = min(xs), max(xs) or 1
    for p, panel in enumerate(panels):
        y_top, y_bot = top + p * panel_h + 10, top + (p + 1) * panel_h - 20
        right = width - 20
        draw.rectangle((left, y_top, right, y_bot), outline="black")
        y_max = max(v for ys in panel.values() for v in ys if v is not None) * 1.1 or 1
        box = (left, y_top, right, y_bot, x0, x1, y_max)
        at = lambda x, y, box=box: _to_pixel(x, y, *box)

        for m in marks:
            draw.line((*at(m, 0), *at(m, y_max)), fill=(160, 160, 160))
        for k, (name, ys) in enumerate(panel.items()):
            points = [at(x, y) for x, y in zip(xs, ys) if y is not None]
            if len(points) > 1:
                draw.line(points, fill=colors[k % 4], width=2)
            draw.text((left + 10 + 170 * k, y_top + 5), name, fill=colors[k % 4])
        draw.text((5, y_top), f"{y_max:.0f}", fill="black")
        draw.text((5, y_bot - 10), "0", fill="black")
    draw.text((left, top + 2 * panel_h - 15), f"{x0}", fill="black")
    draw.text((width - 80, top + 2 * panel_h - 15), f"{x1}", fill="black")
    draw.text((width // 2 - 60, top + 2 * panel_h + 5), xlabel, fill="black")
    img.save(path)


# ----------------------------------------------------------------------------- main


def print_summary(result: dict) -> None:
    s = result["summary"]
    where = (f"frames 0 / {s['warm_frame']} / {s['end_frame']}" if result["mode"] == "frames"
             else f"clips 1 / {s['warm_clip']} / {s['end_clip']}")  # fmt: skip
    print(f"{result['mode']}: start / after warm-up / end at {where}; flat (< 5%): {s['flat']}")
    for m, v in s["metrics"].items():
        print(f"  {m:18} {v['start']} / {v['warm']} / {v['end']}  growth {v['growth_pct']}%  "
              f"peak {v['peak_after_warm']} ({v['peak_growth_pct']}%)  "
              f"medians {v['window_medians']} ({v['window_growth_pct']}%)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("frames", "clips", "plot"))
    ap.add_argument("json", nargs="?", type=Path, help="plot: an earlier run's JSON (its summary redone)")
    ap.add_argument("--out", type=Path, help="the JSON of samples and summary (rewritten after each sample)")
    ap.add_argument("--plot", type=Path, help="the PNG (default: benchmarks/longrun-MODE-DEVICE.png)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", default=None, help="default: tiny on the CPU, random-full on CUDA")
    ap.add_argument("--size", type=int, default=256, help="--size: the working resolution's long side")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="as the CLI's --compile")
    ap.add_argument("--style", default="oil")
    ap.add_argument("--frames", type=int, default=10_000, help="frames: the clip's length")
    ap.add_argument("--width", type=int, default=256, help="frames: the clip's width")
    ap.add_argument("--height", type=int, default=144, help="frames: the clip's height")
    ap.add_argument("--every", type=int, default=200, help="frames: sample every N frames")
    ap.add_argument("--clips", type=int, default=110, help="clips: how many")
    ap.add_argument("--to", type=int, default=100, help="clips: the end of the summary's range")
    ap.add_argument("--clip-size", type=int, help="clips: the clips' long side (default: --size)")
    ap.add_argument("--warmup", type=int, help="frames or clips before the warm-up sample (frames/10; 10 clips)")
    ap.add_argument("--trim", action="store_true",
                    help="each sample also records RSS after malloc_trim(0): a leak stays, fragmentation goes")  # fmt: skip
    args = ap.parse_args()
    global TRIM
    TRIM = args.trim
    args.model = args.model or ("random-full" if args.device == "cuda" else "tiny")
    if args.mode == "plot":
        result = json.loads(args.json.read_text())
        result["summary"] = (summarize_frames if result["mode"] == "frames" else summarize_clips)(result)
        args.json.write_text(json.dumps(result, indent=1))  # the summary of this script's version
        plot(result, args.plot or ROOT / "benchmarks" / f"longrun-{result['mode']}-{result['device']}.png")
        print_summary(result)
        return
    if args.out is None:
        ap.error("--out is required")
    use_persistent_compile_cache()  # as the CLI does, before torch is imported
    result = run_frames(args) if args.mode == "frames" else run_clips(args)
    plot(result, args.plot or ROOT / "benchmarks" / f"longrun-{args.mode}-{args.device}.png")
    print_summary(result)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
