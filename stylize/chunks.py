"""One long clip across GPUs (#17): plan its chunks, run one on a stylizer, join the chunk files.

    table = frame_table(info)                           # every frame's pts and the keyframes (demux only)
    chunks = plan_chunks(table, 2, batch_size, ecfg, is_cut=lambda k: cut_before(info, table, k, ecfg.scene_cut))
    run_chunk(info, chunks[1], stylizer, sink)          # in process (tests); workers call stylize_video(chunk=)
    join(info, [files...], dst, audio=True)

Where a clip is cut (the seams), for chunks of at least MIN_PERIODS adapter periods each:
- At a scene cut, where a keyframe on a batch boundary near an even split point is one (the test
  the engine runs, `schedule.scene_cut` on the thumbnails of the frames either side): the whole
  clip's run refreshes the text encoder and the adapter there from this batch's own frames, and
  the chunk's first batch does the same, so the split is exact with no overlap.
- Else at the point of the refresh grid nearest the split point: a multiple of lcm(M, N) batches
  (the text encoder's and the adapter's periods), where the whole clip's run refreshes both
  (`RefreshSchedule` keeps its grid through cuts). With an adapter, the chunk starts one grid
  period (at least N batches) earlier, fed but not written, so that the conditioning it warps at
  the seam comes from frames of the same scene; not exact (the seam differs a little, and
  converges). Without one nothing else carries from batch to batch, so the seam is exact with no
  overlap.
- Decoding starts at the keyframe before the chunk's first fed frame (a seek); the frames before
  it are discarded (`video.read_batches(span=)`). Noise is drawn per frame index
  (`reference.draw_noise`), so a chunk draws what the whole run draws.

Joining: the chunks are stream-copied into one file, with the source's audio (`writer.AudioPump`),
rather than fed to one encoder in order: each worker encodes its own chunk (x264 on the CPU is
itself a bottleneck at several GPUs' rates, and raw frames would have to cross processes), and
the copy costs only I/O. Every chunk is encoded by the same code with the same settings and size
and starts with an IDR frame; the join checks that their codec parameters (extradata: SPS/PPS)
are identical, so the file has one set. Each chunk keeps the source's pts (the writer shifts them
as for the whole clip), so the joined file has exactly the source's timestamps.

Files: a chunk is written by its worker to a hidden partial file of the clip's output
(`partial.partial_path(dst)`, named by the worker's run), which the parent renames to one of its
own run once the chunk is complete (`Splits`); a dead worker's are removed as any partial output;
the parent removes its own on failure, on signals and after the join. The joined file is written
hidden and renamed onto dst once complete.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import video
from .config import EngineConfig
from .errors import OutputError
from .partial import partial_path

log = logging.getLogger(__name__)

MIN_PERIODS = 4  # a chunk shorter than this many adapter periods (N·B frames) is not worth a split


@dataclass(frozen=True)
class FrameTable:
    """A clip's frames: pts in presentation order (source time base), and which are keyframes."""

    pts: tuple[int, ...]
    keyframes: frozenset[int]  # frame indices


def frame_table(info: video.VideoInfo) -> FrameTable | None:
    """Every frame's pts and the keyframes, from the packets (no decoding); None when the clip
    cannot be split by pts (a packet without one, or two of a kind)."""
    if info.is_image_sequence:
        n = len(info.image_files)
        return FrameTable(tuple(range(n)), frozenset(range(n)))
    packets = []
    with video.open_input(info.path) as container:
        for packet in container.demux(container.streams.video[0]):
            if packet.size == 0:
                continue
            if packet.pts is None:
                return None
            packets.append((packet.pts, packet.is_keyframe))
    packets.sort()
    pts = tuple(p for p, _ in packets)
    if len(set(pts)) != len(pts):
        return None
    return FrameTable(pts, frozenset(i for i, (_, key) in enumerate(packets) if key))


@dataclass(frozen=True)
class Chunk:
    """Frames [start, stop) of a clip, written; frames [feed_from, start) fed before them and not
    written (the overlap). `span`: the pts of feed_from and of stop (None: the clip's end), what
    the decoder reads; `first_pts`: the clip's first (the writer's rule for the last frame)."""

    index: int
    count: int
    feed_from: int
    start: int
    stop: int
    span: tuple[int, int | None]
    start_pts: int
    first_pts: int

    def written(self, sink: Callable) -> Callable:
        """`sink`, given only the frames from `start` on (the overlap's batches are dropped)."""

        def keep(batch) -> None:
            first = next((i for i, p in enumerate(batch.pts) if p >= self.start_pts), None)
            if first is None:
                return
            if first:
                batch = dataclasses.replace(batch, frames=batch.frames[first:], pts=batch.pts[first:],
                                            decoded_at=batch.decoded_at[first:])  # fmt: skip
            sink(batch)

        return keep


def grid_frames(batch_size: int, ecfg: EngineConfig) -> int:
    """Frames between two points where the whole clip's run refreshes the text encoder and (with
    an adapter) the adapter by their periods: lcm(M, N) batches."""
    n = ecfg.adapter_refresh_every if ecfg.adapter else 1
    return math.lcm(ecfg.te_refresh_every, n) * batch_size


def plan_chunks(table: FrameTable, parts: int, batch_size: int, ecfg: EngineConfig,
                is_cut: Callable[[int], bool] | None = None) -> list[Chunk]:  # fmt: skip
    """At most `parts` chunks of the clip (see the module docstring); one, the whole clip, when
    chunks of MIN_PERIODS adapter periods would not fit. `is_cut(k)`: whether the engine sees a
    scene cut between frames k-1 and k (asked only of keyframes on batch boundaries)."""
    n, b = len(table.pts), batch_size
    grid = grid_frames(b, ecfg)
    overlap = grid * math.ceil(ecfg.adapter_refresh_every * b / grid) if ecfg.adapter else 0
    parts = min(parts, n // (MIN_PERIODS * ecfg.adapter_refresh_every * b))
    seams: list[tuple[int, bool]] = []  # (first frame of a chunk, exact: at a cut)
    keys = sorted(k for k in table.keyframes if k % b == 0 and 0 < k < n)
    for j in range(1, max(parts, 1)):
        ideal, window = j * n / parts, n / (4 * parts)
        after = seams[-1][0] if seams else 0
        near = sorted((k for k in keys if abs(k - ideal) <= window and k > after), key=lambda k: abs(k - ideal))
        cut = next((k for k in near if is_cut is not None and is_cut(k)), None)
        seam = (cut, True) if cut is not None else (round(ideal / grid) * grid, False)
        if after < seam[0] < n and seam[0] - (0 if seam[1] else overlap) > 0:
            seams.append(seam)
    starts = [(0, True), *seams]
    chunks = []
    for i, (start, exact) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else n
        feed_from = start if exact else start - overlap
        chunks.append(Chunk(
            index=i, count=len(starts), feed_from=feed_from, start=start, stop=stop,
            span=(table.pts[feed_from], table.pts[stop] if stop < n else None), start_pts=table.pts[start],
            first_pts=table.pts[0],
        ))  # fmt: skip
    return chunks


def cut_before(info: video.VideoInfo, table: FrameTable, k: int, threshold: float) -> bool:
    """Whether the engine sees a scene cut between frames k-1 and k, as it does between a batch
    ending at k-1 and one starting at k (their thumbnails, `schedule.scene_cut`): decodes from
    the keyframe before k-1 to k."""
    from .schedule import scene_cut, thumbnail

    end = table.pts[k + 1] if k + 1 < len(table.pts) else None
    batches = list(video.read_batches(info, 2, span=(table.pts[k - 1], end)))
    frames = [f for batch in batches for f in batch.frames]
    return len(frames) == 2 and scene_cut(thumbnail(frames[0]), thumbnail(frames[1]), threshold)


def plan_clip(info: video.VideoInfo, parts: int, batch_size: int, ecfg: EngineConfig) -> list[Chunk]:
    """`plan_chunks` for a probed clip: its frame table, scene cuts tested where the plan asks."""
    table = frame_table(info)
    if table is None or parts < 2:
        return []
    return plan_chunks(table, parts, batch_size, ecfg, lambda k: cut_before(info, table, k, ecfg.scene_cut))


def run_chunk(info: video.VideoInfo, chunk: Chunk, stylizer, sink: Callable) -> None:
    """Feed the chunk's frames (from `feed_from`) through `stylizer`; the stylized FrameBatches from
    `start` on go to `sink`, in order: what the writer would get (stylize_video(chunk=) runs the
    same with a writer)."""
    stylizer.reset(sink=chunk.written(sink), first_frame=chunk.feed_from)
    try:
        for batch in video.read_batches(info, stylizer.cfg.batch_size, ring=stylizer.ring, span=chunk.span):
            stylizer.feed(batch)
        stylizer.flush()
    except BaseException:
        stylizer.reset()
        raise


def join(info: video.VideoInfo, files: Sequence[Path], dst: Path, audio: bool = True) -> None:
    """Stream-copy the chunk files (in order) into `dst` with the source's audio; `dst` appears only
    once complete. OutputError when the chunks' codec parameters differ."""
    import av

    from .writer import AudioPump

    dst = Path(dst)
    tmp = partial_path(dst)
    output = pump = None
    try:
        with av.open(str(files[0])) as first:
            template = first.streams.video[0]
            extradata = bytes(template.codec_context.extradata or b"")
            output = av.open(str(tmp), "w", format="mp4")
            stream = output.add_stream_from_template(template)
        if audio and info.audio and not info.is_image_sequence:
            pump = AudioPump(info, output)
        last_dts = None
        for path in files:
            with av.open(str(path)) as chunk:
                source = chunk.streams.video[0]
                if bytes(source.codec_context.extradata or b"") != extradata:
                    raise OutputError(f"{dst}: the chunks were encoded with different parameters; run without --gpus")
                for packet in chunk.demux(source):
                    if packet.size == 0:
                        continue
                    if last_dts is not None and packet.dts <= last_dts:  # never with one encoder's settings
                        raise OutputError(f"{dst}: the chunks' decode times overlap at {path.name}")
                    last_dts = packet.dts
                    when = float(packet.pts * packet.time_base)
                    packet.stream = stream
                    output.mux(packet)
                    if pump is not None:
                        pump.pump(when + 1.0)  # audio ~1 s ahead of video, as the writer muxes it
        if pump is not None:
            pump.finish()
            pump.source.close()
        output.close()
        output = None
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, dst)
    except BaseException:
        for closer in (pump and pump.source, output):
            if closer is not None:
                try:
                    closer.close()
                except Exception as error:  # noqa: BLE001 - already failing; the temp file goes below
                    log.debug("closing after a failure: %s", error)
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class Splits:
    """The parent's record of its split clips: which chunks are done (their files, renamed to
    this run), which clips failed; joins a clip once its last chunk is in."""

    audio: bool = True
    clips: dict = field(default_factory=dict)  # job -> {"info", "count", "files": {index: path}, "stats", "failed"}

    def add(self, job, info: video.VideoInfo, count: int) -> None:
        self.clips[job] = {"info": info, "count": count, "files": {}, "stats": {}, "failed": False}

    def done(self, task, stats, extra: dict):
        """A finished chunk; returns the clip's (stats, extra) once joined, else None."""
        clip = self.clips[task.job]
        mine = partial_path(task.job.dst)
        os.replace(stats.dst, mine)  # this run's now: a dead worker's files are removed, not this
        if clip["failed"]:
            mine.unlink(missing_ok=True)
            return None
        clip["files"][task.chunk.index] = mine
        clip["stats"][task.chunk.index] = (stats, extra)
        if len(clip["files"]) < clip["count"]:
            return None
        import time

        joining = time.perf_counter()
        try:
            files = [clip["files"][i] for i in range(clip["count"])]
            join(clip["info"], files, task.job.dst, self.audio)
        finally:
            self._discard(clip)
        return _joined([clip["stats"][i] for i in range(clip["count"])], task.job, time.perf_counter() - joining)

    def failed(self, task) -> bool:
        """A chunk failed: the clip fails (True the first time, to report it once)."""
        clip = self.clips[task.job]
        first = not clip["failed"]
        clip["failed"] = True
        self._discard(clip)
        return first

    def discard_all(self) -> None:
        for clip in self.clips.values():
            self._discard(clip)

    def _discard(self, clip) -> None:
        for path in clip["files"].values():
            path.unlink(missing_ok=True)
        clip["files"] = {}


def _joined(parts: list, job, join_s: float):
    """One RunStats for a clip run as chunks side by side: frames summed, wall time the longest
    chunk's plus the join, latencies the worst chunk's; extra's gpu the chunks' workers, in order."""
    stats = [s for s, _ in parts]
    frames = sum(s.frames for s in stats)
    seconds = max(s.seconds for s in stats) + join_s
    steady = [s.steady_fps for s in stats if not math.isnan(s.steady_fps)]
    joined = dataclasses.replace(
        stats[0], dst=str(job.dst), frames=frames, seconds=seconds, fps=frames / seconds if seconds else 0.0,
        latency_p50_ms=max(s.latency_p50_ms for s in stats), latency_p95_ms=max(s.latency_p95_ms for s in stats),
        first_output_s=stats[0].first_output_s, probe_s=max(s.probe_s for s in stats),
        prepare_s=max(s.prepare_s for s in stats), steady_fps=sum(steady) if steady else math.nan,
        flush_s=max(s.flush_s for s in stats) + join_s,
    )  # fmt: skip
    extras = [e for _, e in parts]
    extra = {**extras[0], "gpu": [e["gpu"] for e in extras], "chunks": len(parts)}
    if any("peak_gpu_mem_gib" in e for e in extras):
        extra["peak_gpu_mem_gib"] = max(e.get("peak_gpu_mem_gib", 0) for e in extras)
    extra["model_load_s"] = max(e.get("model_load_s") or 0 for e in extras)
    return joined, extra


def split_tasks(tasks: list, workers: int, opts) -> tuple[list, Splits]:
    """With more workers than tasks, the longest clips split into chunks (one task each), the
    extra workers given to the clips with the most frames per chunk; returns the tasks, longest
    first, and the `Splits` that joins them."""
    splits = Splits(audio=opts.output.audio)
    clips = [t for t in tasks if t.frames]
    if workers <= len(tasks) or not clips:
        return list(tasks), splits
    parts = {t.id: 1 for t in clips}
    for _ in range(workers - len(tasks)):
        best = max(clips, key=lambda t: t.frames / parts[t.id])
        parts[best.id] += 1
    out = []
    for task in tasks:
        chunks = _chunks_of(task, parts.get(task.id, 1), opts)
        if len(chunks) < 2:
            out.append(task)
            continue
        splits.add(task.job, video.probe(task.job.src, opts.output.fps), len(chunks))
        out += [dataclasses.replace(task, id=task.id, frames=c.stop - c.feed_from, chunk=c) for c in chunks]
    return sorted(out, key=lambda t: (t.frames is None, -(t.frames or 0))), splits


def _chunks_of(task, parts: int, opts) -> list[Chunk]:
    if parts < 2:
        return []
    try:
        info = video.probe(task.job.src, opts.output.fps)
        if any(a.problem for a in info.audio) and opts.output.audio:
            return []  # the one-process path reports it at once
        return plan_clip(info, parts, opts.pipeline.batch_size, opts.engine)
    except Exception as e:  # noqa: BLE001 - not split; its worker reports what is wrong with it
        log.debug("%s: not split (%s)", task.job.src, e)
        return []
