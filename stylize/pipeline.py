"""One clip, end to end: video → batches → stylizer → video. The one place that wires the rest.

    stack = load_stack(model_config("tiny"))
    stylizer = make_stylizer(stack, PipelineConfig(prompt="..."), device)
    stats = stylize_video("in.mp4", "out.mp4", stylizer, OutputConfig())
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import video
from .config import EngineConfig, PipelineConfig
from .writer import VideoWriter


@dataclass(frozen=True)
class OutputConfig:
    """How the output video is written and how an image-folder input is timed."""

    crf: int = 18
    preset: str = "medium"
    audio: bool = True
    fps: float | None = None  # frame rate of a numbered-image folder (default 24)
    realtime: bool = False  # decode no faster than the timestamps (a live source; for latency)


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

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dataclasses.asdict(self).items()}


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds; nan when empty."""
    if not seconds:
        return math.nan, math.nan
    a = np.asarray(seconds) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def make_stylizer(stack, cfg: PipelineConfig, ecfg: EngineConfig | None = None, frames_hint: int | None = None):
    """The streaming engine on CUDA (compiled when `ecfg.compile` says so for about
    `frames_hint` frames); the plain reference path on the CPU unless an EngineConfig is given."""
    from .reference import ReferenceStylizer

    if ecfg is None and stack.device.type != "cuda":
        return ReferenceStylizer(stack, cfg)
    from .engine import Engine
    from .optimize import should_compile

    ecfg = ecfg or EngineConfig()
    engine = Engine(stack, cfg, ecfg)
    if should_compile(ecfg.compile, stack.device, frames_hint, warm=_any_warm_cache()):
        engine.enable_compile()
    return engine


def _any_warm_cache() -> bool:
    from .optimize import cache_root

    return any((cache_root() / "compiled").glob("*.bin"))


def stylize_video(
    src: str | Path,
    dst: str | Path,
    stylizer,
    out: OutputConfig = OutputConfig(),
    on_progress: Callable[[Progress], None] | None = None,
) -> RunStats:
    """Stylize the clip at `src` (a video file or a numbered-image folder) into `dst` (.mp4),
    keeping its timestamps, display size and orientation, and audio. `dst` appears only once
    complete; on any error or interrupt it is left as it was."""
    started = time.perf_counter()
    info = video.probe(src, out.fps)
    out_h, out_w = stylizer.output_hw((info.display_height, info.display_width))
    target = dataclasses.replace(info, display_width=out_w, display_height=out_h)  # crop mode: the square
    stylizer.reset()
    latencies: list[float] = []
    first = first_output = None
    done = 0

    def emit(batch: video.FrameBatch) -> None:
        nonlocal done, first_output
        writer.write(batch.frames, batch.pts)
        now = time.perf_counter()
        first_output = first_output or now - started
        latencies.extend(now - t for t in batch.decoded_at)
        done += len(batch.pts)
        if on_progress:
            on_progress(Progress(done, info.frames, now - first))

    threaded = hasattr(stylizer, "start_sink")  # the engine hands batches back as soon as they are done
    with VideoWriter(dst, target, crf=out.crf, preset=out.preset, audio=out.audio) as writer:
        if threaded:
            stylizer.start_sink(emit)
        try:
            for batch in video.read_batches(info, stylizer.cfg.batch_size, realtime=out.realtime):
                first = first or batch.decoded_at[0]
                if on_progress and getattr(stylizer, "warming_up", lambda hw: False)(batch.frames.shape[1:3]):
                    on_progress(Progress(done, info.frames, time.perf_counter() - first, "compiling (one-time, cached)"))
                for ready in stylizer.feed(batch):
                    emit(ready)
            for ready in stylizer.flush():
                emit(ready)
        finally:
            if threaded:
                stylizer.stop_sink()
    seconds = time.perf_counter() - first if first else 0.0
    p50, p95 = percentiles_ms(latencies)
    return RunStats(
        src=str(src), dst=str(dst), frames=done, seconds=seconds, fps=done / seconds if seconds else 0.0,
        latency_p50_ms=p50, latency_p95_ms=p95, width=out_w, height=out_h, first_output_s=first_output or 0.0,
    )  # fmt: skip
