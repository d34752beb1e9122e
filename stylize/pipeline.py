"""The one place that wires a run: video → batches → stylizer → video.

    stack = load_stack(model_config("tiny"), "cpu")
    stylizer = build_stylizer(stack, PipelineConfig(prompt="..."), EngineConfig())
    stats = stylize_video("in.mp4", "out.mp4", stylizer, OutputConfig())

`build_stylizer` decides between the streaming engine and the plain reference path, and whether
to compile; `stylize_video` runs one clip through whichever it got (both are a `Stylizer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from . import video
from .config import EngineConfig, OutputConfig, PipelineConfig
from .errors import StylizeError
from .writer import VideoWriter

__all__ = ["OutputConfig", "Progress", "RunStats", "Stylizer", "build_stylizer", "out_of_memory_is_one_line",
           "run_job", "stylize_video"]  # fmt: skip


@dataclass(frozen=True)
class Progress:
    """Reported to `on_progress` after each batch is handed to the encoder."""

    done: int
    total: int | None
    elapsed_s: float
    status: str = ""  # e.g. a one-time compile in progress


@dataclass(frozen=True)
class RunStats:
    """One clip's result. fps: frames over wall time from the first decoded frame to the last
    encoded one; latency: per frame, from its decode to the hand-off of its output to the encoder."""

    src: str
    dst: str
    frames: int
    seconds: float
    fps: float
    latency_p50_ms: float
    latency_p95_ms: float
    width: int
    height: int
    first_output_s: float  # from the call to the first frame handed to the encoder (compile included)
    # where a clip's time goes (what the user waits for, #14): the probe, the one-time prepare
    # (compile or graph capture), the rate after the first two batches, and the end (flush,
    # encoder flush, audio remux)
    probe_s: float = math.nan
    prepare_s: float = math.nan
    steady_fps: float = math.nan  # frames after the first two batches over the time they took
    flush_s: float = math.nan

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dataclasses.asdict(self).items()}


class Stylizer(Protocol):
    """What `stylize_video` drives: the engine (engine.py) and the reference path (reference.py)."""

    cfg: PipelineConfig
    ring: object | None  # a buffers.HostRing for the decoder to fill, or None

    def output_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]: ...

    def prepare(self, in_hw: tuple[int, int], status: Callable[[str], None] | None = None) -> None: ...

    def reset(self, sink: Callable[[video.FrameBatch], None] | None = None, first_frame: int = 0) -> None: ...

    def feed(self, batch: video.FrameBatch) -> list[video.FrameBatch]: ...

    def flush(self) -> list[video.FrameBatch]: ...

    def close(self) -> None: ...


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds; nan when empty."""
    if not seconds:
        return math.nan, math.nan
    a = np.asarray(seconds) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def build_stylizer(stack, cfg: PipelineConfig, ecfg: EngineConfig = EngineConfig(),
                   clips: Sequence[Path] = (), fps: float | None = None) -> Stylizer:  # fmt: skip
    """The streaming engine on CUDA, or wherever an engine option differs from the defaults;
    the plain reference path otherwise. Compiled when `ecfg.compile` says so: "auto" compiles on
    CUDA when `clips` (probed only then) are long enough to repay it, and otherwise replays the
    eager steps as CUDA graphs (`ecfg.graphs`); "off" runs them plainly eager."""
    from .reference import ReferenceStylizer

    if stack.device.type != "cuda" and ecfg == EngineConfig():
        return ReferenceStylizer(stack, cfg)
    from .engine import Engine
    from .optimize import should_compile

    engine = Engine(stack, cfg, ecfg)
    frames = _frames_in(clips, fps) if ecfg.compile == "auto" and stack.device.type == "cuda" else None
    if should_compile(ecfg.compile, stack.device, frames, warm=_any_warm_cache()):
        engine.enable_compile()
    elif ecfg.compile == "auto" and ecfg.graphs and stack.device.type == "cuda":
        engine.enable_graphs()
    return engine


def _frames_in(clips: Sequence[Path], fps: float | None) -> int:
    """About how many frames the run will stylize; a clip that cannot be probed counts as 0 (it is
    reported when its turn comes)."""
    total = 0
    for clip in clips:
        try:
            total += video.probe(clip, fps).frames or 0
        except Exception:  # noqa: BLE001
            pass
    return total


def _any_warm_cache() -> bool:
    from .optimize import cache_root

    return any((cache_root() / "compiled").glob("*.bin"))


class _Output:
    """Where finished batches go: the writer, the latency record and the progress callback. Called
    on the stylizer's hand-back thread; read by the caller only after `flush()` returns."""

    def __init__(self, writer: VideoWriter, total: int | None, on_progress):
        self.writer, self.total, self.on_progress = writer, total, on_progress
        self.latencies: list[float] = []
        self.done = 0
        self.first_decoded: float | None = None  # set by the feeding thread before any batch comes back
        self.first_output: float | None = None
        self.batches = 0
        self.after_two: tuple[float, int] | None = None  # (time, frames done) as the second batch came back
        self.last_output: float | None = None

    def __call__(self, batch: video.FrameBatch) -> None:
        self.writer.write(batch.frames, batch.pts)
        now = time.perf_counter()
        self.first_output = self.first_output or now
        self.latencies.extend(now - t for t in batch.decoded_at)
        self.done += len(batch.pts)
        self.batches += 1
        self.last_output = now
        if self.batches == 2:
            self.after_two = (now, self.done)
        if self.on_progress:
            self.on_progress(Progress(self.done, self.total, now - self.first_decoded))


def stylize_video(
    src: str | Path,
    dst: str | Path,
    stylizer: Stylizer,
    out: OutputConfig = OutputConfig(),
    on_progress: Callable[[Progress], None] | None = None,
    chunk=None,
) -> RunStats:
    """Stylize the clip at `src` (a video file or a numbered-image folder) into `dst` (.mp4),
    keeping its timestamps, display size and orientation, and audio. `dst` appears only once
    complete; on any error or interrupt it is left as it was.

    `chunk` (a chunks.Chunk): only that part of the clip, without audio: its frames from
    `chunk.feed_from` are fed, those before `chunk.start` are not written, and the complete file
    is left at a hidden name beside `dst` (the stats' dst) for chunks.join."""
    started = time.perf_counter()
    info = video.probe(src, out.fps)
    probed = time.perf_counter()
    in_hw = (info.display_height, info.display_width)
    out_h, out_w = stylizer.output_hw(in_hw)
    target = dataclasses.replace(info, display_width=out_w, display_height=out_h)  # crop mode: the square
    status = (lambda s: on_progress(Progress(0, info.frames, 0.0, s))) if on_progress else None
    stylizer.prepare(in_hw, status)  # one-time per frame size (compile), before any frame is decoded
    prepared = time.perf_counter()
    total = info.frames if chunk is None else chunk.stop - chunk.start
    # a chunk: no audio (the join adds it), kept at its hidden name, its pts shifted as the clip's
    part = {"audio": out.audio} if chunk is None else {"audio": False, "keep": True, "first_pts": chunk.first_pts}
    with VideoWriter(dst, target, crf=out.crf, preset=out.preset, **part) as writer:
        output = _Output(writer, total, on_progress)
        if chunk is None:
            stylizer.reset(sink=output)
        else:
            stylizer.reset(sink=chunk.written(output), first_frame=chunk.feed_from)
        try:
            batches = video.read_batches(info, stylizer.cfg.batch_size, realtime=out.realtime, ring=stylizer.ring,
                                         span=None if chunk is None else chunk.span)  # fmt: skip
            for batch in batches:
                output.first_decoded = output.first_decoded or batch.decoded_at[0]
                stylizer.feed(batch)
            fed = time.perf_counter()
            stylizer.flush()
        except BaseException:
            stylizer.reset()  # drop what is in flight before the writer discards its file
            raise
    ended = time.perf_counter()
    first = output.first_decoded
    steady = math.nan
    if output.after_two is not None and output.last_output > output.after_two[0]:
        steady = (output.done - output.after_two[1]) / (output.last_output - output.after_two[0])
    seconds = time.perf_counter() - first if first else 0.0
    p50, p95 = percentiles_ms(output.latencies)
    return RunStats(
        src=str(src), dst=str(dst if chunk is None else writer.tmp), frames=output.done, seconds=seconds, fps=output.done / seconds if seconds else 0.0,
        latency_p50_ms=p50, latency_p95_ms=p95, width=out_w, height=out_h,
        first_output_s=(output.first_output - started) if output.first_output else 0.0,
        probe_s=probed - started, prepare_s=prepared - probed, steady_fps=steady, flush_s=ended - fed,
    )  # fmt: skip


def run_job(job, stylizer: Stylizer, out: OutputConfig = OutputConfig(),
            on_progress: Callable[[Progress], None] | None = None) -> RunStats:  # fmt: skip
    """One `jobs.Job`: a still (stills.stylize_still) or a clip (stylize_video), as every run
    drives it (the CLI in one process, each worker of workers.py). Afterwards, done or failed,
    the C heap's freed pages go back to the OS (`return_freed_heap`)."""
    try:
        if job.still:
            from .stills import stylize_still

            return stylize_still(job.src, job.dst, stylizer, on_progress)
        return stylize_video(job.src, job.dst, stylizer, out, on_progress)
    finally:
        return_freed_heap()


@functools.cache
def _libc_trim() -> Callable[[int], int] | None:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to hand back this way
        return None


def return_freed_heap() -> None:
    """glibc's malloc keeps the pages a clip freed (its decode and encode buffers, a CUDA graph
    capture's host side) for reuse, and a folder of clips of many shapes fragments them: RSS grew
    6.3% over 105 clips on the H200 without a trim and 0.3% with one after each clip (NOTES 35;
    the second run also had NOTES 31's capture streams, so it cannot say which did it, only that
    nothing grows once trimmed). malloc_trim(0) returns them: ~1 ms after ~1 GB of scattered
    frees on this CPU. A no-op without glibc."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def out_of_memory_is_one_line(cfg: PipelineConfig) -> Iterator[None]:
    """Around one clip or still: torch.OutOfMemoryError becomes a StylizeError of one line, what to
    lower and the GPU's peak memory. No retry at a smaller batch or size: that would change the
    shapes (a new compile) and the adapter's schedule, and the output would no longer be the one
    asked for."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None
        raise StylizeError(out_of_memory_message(cfg, peak)) from e


def out_of_memory_message(cfg: PipelineConfig, peak_bytes: int | None) -> str:
    """'out of GPU memory (peak 3.21 GiB allocated): lower --batch-size (now 8) or --size (now 512)';
    the peak only where CUDA was used, the batch size only where there is one to lower."""
    lower = f"--size (now {cfg.size})"
    if cfg.batch_size > 1:
        lower = f"--batch-size (now {cfg.batch_size}) or {lower}"
    peak = "" if peak_bytes is None else f" (peak {peak_bytes / 2**30:.2f} GiB allocated)"
    return f"out of GPU memory{peak}: lower {lower}"
