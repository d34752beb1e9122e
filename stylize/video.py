"""Video in: probe a clip and decode it in batches (the writer is in writer.py).

Conventions (shared with writer.py):

- Frames are numpy uint8 RGB, (B, H, W, 3), values 0..255, in DISPLAY orientation: a stream's
  display-matrix rotation (phones) is applied on decode, so outputs carry no rotation. Mirror
  flags in a display matrix (rare) are not applied.
- Timestamps (pts) are ints in the source stream's time_base, as the decoder gave them, so VFR
  stays VFR. A folder of numbered images (00000.jpg, ...) is one clip: time_base 1/fps, pts 0..N-1.
- Colours are read with the source's tagged matrix and range; untagged streams count as BT.709
  when HD (width >= 1280 or height > 576), else BT.601, as players guess.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, VideoReformatter
from PIL import Image, ImageOps

from stylize.errors import InputError, UsageError
from stylize.formats import IMAGE_SUFFIXES
from stylize.threads import produce

log = logging.getLogger(__name__)

DECODE_AHEAD = 1  # decoded batches kept ready for the consumer: more only adds latency
OPEN_MEMORY_BYTES = 256 << 20  # held by an open file beyond its own size (real files: a few MB)
MAX_PIXELS = 8192 * 8192  # a frame: a batch of 8 is then 1.6 GB of RGB (FFmpeg's own limit is 16k x 16k)
AUDIO_RATES_HZ = (4000, 768_000)  # outside: a damaged header (the lowest real rate is AAC's 7350)
# What Pillow (13) raises on a damaged image: OSError and ValueError mostly, SyntaxError for a broken
# PNG chunk or EXIF block, IndexError for an empty iCCP chunk, DecompressionBombError for a header
# of over 179M pixels (all found by tests/test_fuzz.py).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, IndexError, Image.DecompressionBombError)
# AVColorSpace tag of a decoded frame -> swscale matrix.
_MATRIX = {
    1: Colorspace.ITU709,
    4: Colorspace.FCC,
    5: Colorspace.ITU601,
    6: Colorspace.ITU601,
    7: Colorspace.SMPTE240M,
    9: Colorspace.BT2020,
    10: Colorspace.BT2020,
}


@dataclass(frozen=True)
class AudioInfo:
    """One source audio track: stream index, codec name, rate in Hz, channels, seconds; `problem`
    says why the track cannot be carried ("" when it can)."""

    index: int
    codec: str
    sample_rate: int
    channels: int
    duration: float | None
    problem: str = ""


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` found. Sizes in pixels; duration and start_time in seconds.

    rotation: the display matrix's counter-clockwise angle in degrees as PyAV reports it (-90
    for an upright phone clip, whose picture players turn 90 degrees clockwise); display_* are
    the sizes after it. fps is the mean frame rate; frames is None when the header lacks it.
    """

    path: Path
    is_image_sequence: bool
    coded_width: int
    coded_height: int
    display_width: int
    display_height: int
    rotation: int
    fps: Fraction
    time_base: Fraction
    duration: float | None
    frames: int | None
    audio: tuple[AudioInfo, ...] = ()
    start_time: float = 0.0
    video_codec: str = ""
    image_files: tuple[Path, ...] = field(default=(), repr=False)

    @property
    def nominal_ticks(self) -> int:
        """One frame at the nominal rate, in time_base ticks (at least 1)."""
        return max(1, round(1 / (self.fps * self.time_base)))

    def ticks(self, seconds: float) -> int:
        return round(Fraction(seconds).limit_denominator(10**6) / self.time_base)


@dataclass
class FrameBatch:
    """frames: uint8 RGB (B, H, W, 3), display orientation; pts: B ints in the source
    time_base; decoded_at: B time.perf_counter() stamps, taken when each frame was ready.
    slot: the ring buffer `frames` lives in (`buffers.Slot`: batch-sized, pinned, a short batch
    padded), or None; whoever consumes the batch calls `release` once nothing reads it any more."""

    frames: np.ndarray
    pts: list[int]
    decoded_at: list[float]
    slot: object | None = field(default=None, repr=False)

    def release(self, after=None) -> None:
        """Hand the ring buffer back (refilled only once the CUDA event `after` has fired)."""
        if self.slot is not None:
            self.slot.release(after)
            self.slot = None


def _image_files(folder: Path) -> list[Path]:
    """Image files of a folder in natural order (2.png before 10.png), hidden files skipped."""
    files = [
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(files, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def _load_image(path: Path) -> np.ndarray:
    """One image as uint8 RGB (H, W, 3), EXIF orientation applied."""
    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except IMAGE_ERRORS as exc:
        raise InputError(f"{path}: cannot read this image ({exc}); replace or remove it") from exc


def _resident_bytes() -> int | None:
    """This process's resident memory now (Linux), else None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _check_held_memory(path: Path, before: int | None) -> None:
    """FFmpeg's MP4 reader sizes its sample index by the counts in the header and zeroes it: a few
    damaged bytes in a 4 kB file can hold 1.2 GB for as long as the file is open, and the decoder
    and the audio copy each open it again, at once. A real file's index is a few MB, never much
    more than the file itself; refuse one that holds more than OPEN_MEMORY_BYTES beyond its size."""
    now = _resident_bytes()
    held = 0 if before is None or now is None else now - before
    if held > OPEN_MEMORY_BYTES + path.stat().st_size:
        raise InputError(f"{path}: opening it takes {held >> 20} MB of memory, far more than its index "
                         f"can need (a damaged header); replace the file")  # fmt: skip


def _check_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise InputError(f"{path}: frames of {width}x{height} are larger than this tool reads (8192x8192 "
                         f"pixels); a damaged header, or scale them down first (ffmpeg -vf scale=-2:2160)")  # fmt: skip


def _probe_images(folder: Path, fps) -> VideoInfo:
    files = _image_files(folder)
    if not files:
        raise InputError(
            f"{folder}: folder holds no images; give a video file or a folder of "
            f"numbered frames (00000.jpg, 00001.jpg, ...)"
        )
    rate = Fraction(24 if fps is None else fps).limit_denominator(1_001_000)
    if rate <= 0:
        raise UsageError(f"frame rate must be positive, got {fps}")
    height, width = _load_image(files[0]).shape[:2]
    _check_size(files[0], width, height)
    return VideoInfo(
        path=folder,
        is_image_sequence=True,
        coded_width=width,
        coded_height=height,
        display_width=width,
        display_height=height,
        rotation=0,
        fps=rate,
        time_base=1 / rate,
        duration=float(len(files) / rate),
        frames=len(files),
        video_codec=files[0].suffix.lower().lstrip("."),
        image_files=tuple(files),
    )


def open_input(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), "r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{path}: not a video this tool can read ({exc}); give an "
            f".mp4/.mov/.mkv/.webm file or a folder of numbered frames"
        ) from exc


def _seconds(value: int | None, time_base) -> float | None:
    return float(value * time_base) if value is not None and time_base else None


def _video_duration(container, stream) -> float | None:
    """Stream duration; else Matroska's per-track DURATION tag (an end time); else the file's."""
    if stream.duration:
        return _seconds(stream.duration, stream.time_base)
    tag = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d*)?)", stream.metadata.get("DURATION", ""))
    if tag:
        end = int(tag[1]) * 3600 + int(tag[2]) * 60 + float(tag[3])
        start = _seconds(stream.start_time, stream.time_base) or 0.0
        return end - start if end > start else end
    return container.duration / av.time_base if container.duration else None


def _start_time(container, first: av.VideoFrame) -> float:
    """The file's start in seconds, never after its first frame: FFmpeg's Matroska reader gives a
    clip of a few frames whose audio starts later that audio's start for the video too, and the
    writer, which shifts every frame by it, would write them at negative times."""
    start = (container.start_time or 0) / av.time_base
    return start if first.time is None else min(start, first.time)


def _audio_info(stream) -> AudioInfo:
    """One audio track. `problem` is set when it cannot be carried into the output: no decoder
    knows its codec, or its header gives a rate or channel count no real track has (a damaged
    file; a bogus low rate would have the writer resample seconds of samples into hours). The
    writer then refuses the clip at once, and --no-audio leaves the track out."""
    ctx, seconds = stream.codec_context, _seconds(stream.duration, stream.time_base)
    if ctx is None or ctx.codec is None:
        return AudioInfo(stream.index, "", 0, 0, seconds, problem="has an unknown codec")
    info = AudioInfo(stream.index, ctx.codec.canonical_name, ctx.sample_rate, ctx.channels, seconds)
    if not AUDIO_RATES_HZ[0] <= ctx.sample_rate <= AUDIO_RATES_HZ[1]:
        return replace(info, problem=f"has a sample rate of {ctx.sample_rate} Hz")
    if ctx.channels < 1:
        return replace(info, problem=f"has {ctx.channels} channels")
    return info


def probe(path: str | os.PathLike, fps: Fraction | float | None = None) -> VideoInfo:
    """Describe a video file or a folder of numbered images; InputError if unreadable.

    fps applies to image folders only (default 24); a video keeps its own timing.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the input path")
    if path.is_dir():
        return _probe_images(path, fps)
    before = _resident_bytes()
    with open_input(path) as container:
        _check_held_memory(path, before)
        if not container.streams.video:
            raise InputError(f"{path}: has no video stream; give a file that contains video")
        if "mp4" in container.format.name and any(s.id < 0 for s in container.streams):
            # a track id of 2^31 or more, which FFmpeg reads as negative: a damaged header, and in a
            # fragmented file one that costs seconds per open (the decoder and the audio copy open it again)
            raise InputError(f"{path}: a track id is out of range (a damaged header); re-mux it "
                             f"(ffmpeg -i FILE -c copy NEW.mp4) or replace it")  # fmt: skip
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise InputError(
                f"{path}: the video stream's codec is unknown (a damaged file, or a codec this "
                f"FFmpeg build cannot decode)"
            )
        try:  # decode one frame: it proves the stream readable and carries the display matrix
            first = next(container.decode(stream), None)
        except av.FFmpegError as exc:
            raise InputError(f"{path}: the video stream cannot be decoded ({exc})") from exc
        if first is None:
            raise InputError(f"{path}: the video stream holds no decodable frames")
        rotation = int(first.rotation)
        if rotation % 90:
            log.warning("%s: rotation %d degrees is rounded to a quarter turn", path, rotation)
        w, h = first.width, first.height
        _check_size(path, w, h)
        audio = tuple(_audio_info(a) for a in container.streams.audio)
        return VideoInfo(
            path=path,
            is_image_sequence=False,
            coded_width=w,
            coded_height=h,
            display_width=h if round(rotation / 90) % 2 else w,
            display_height=w if round(rotation / 90) % 2 else h,
            rotation=rotation,
            fps=Fraction(stream.average_rate or stream.guessed_rate or stream.base_rate or 24),
            time_base=Fraction(stream.time_base or Fraction(1, 90000)),
            duration=_video_duration(container, stream),
            frames=stream.frames or None,
            audio=audio,
            start_time=_start_time(container, first),
            video_codec=stream.codec_context.codec.canonical_name,
        )


def _to_rgb(frame: av.VideoFrame, sws: VideoReformatter, info: VideoInfo) -> np.ndarray:
    """Decoded frame -> uint8 RGB (H, W, 3) at the coded size, turned to display orientation."""
    matrix = _MATRIX.get(int(frame.colorspace))
    if matrix is None:  # untagged: guess like players do
        matrix = Colorspace.ITU709 if frame.width >= 1280 or frame.height > 576 else Colorspace.ITU601
    full = int(frame.color_range) == 2 or frame.format.name.startswith("yuvj")
    rgb = sws.reformat(
        frame,
        width=info.coded_width,
        height=info.coded_height,
        format="rgb24",
        src_colorspace=matrix,
        dst_color_range=ColorRange.JPEG,
        src_color_range=ColorRange.JPEG if full else ColorRange.MPEG,
    ).to_ndarray()
    return np.rot90(rgb, round(info.rotation / 90) % 4)  # a view; copied into the batch


def _video_frames(info: VideoInfo, stop: threading.Event, span: tuple[int, int | None] | None = None
                  ) -> Iterator[tuple[np.ndarray, int]]:  # fmt: skip
    """(uint8 RGB (H, W, 3) display-orientation frame, pts) for every decoded frame, in order; with
    `span` (first pts, end pts or None), only the frames from first to before end: decoding starts
    at the keyframe before `first` (a seek) and what comes before it is discarded."""
    if info.is_image_sequence:
        first, end = span or (0, None)
        for index, path in enumerate(info.image_files[first:end], start=first):
            image = _load_image(path)
            if image.shape[:2] != (info.display_height, info.display_width):
                raise InputError(
                    f"{path}: size {image.shape[1]}x{image.shape[0]} differs from the "
                    f"first frame's {info.display_width}x{info.display_height}"
                )
            yield image, index
        return
    sws, previous = VideoReformatter(), None
    with open_input(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if span is not None:  # chunks.py plans spans only in clips whose every packet has a pts
            container.seek(span[0], stream=stream, backward=True, any_frame=False)
        try:
            for frame in container.decode(stream):
                if stop.is_set():
                    return
                pts = frame.pts
                if span is not None and (pts is None or pts < span[0]):
                    continue  # decoded from the keyframe before the span, not part of it
                if span is not None and span[1] is not None and pts >= span[1]:
                    return
                if pts is None:  # e.g. raw .h264: continue at the nominal rate
                    pts = 0 if previous is None else previous + info.nominal_ticks
                elif previous is not None and pts <= previous:
                    log.warning("%s: timestamp %d after %d; using %d", info.path, pts, previous, previous + 1)
                    pts = previous + 1
                previous = pts
                yield _to_rgb(frame, sws, info), pts
        except av.FFmpegError as exc:
            where = "at the first frame" if previous is None else f"after pts {previous}"
            raise InputError(f"{info.path}: decoding failed {where} ({exc})") from exc


def _batches(info: VideoInfo, batch_size: int, ring, stop: threading.Event, span=None) -> Iterator[FrameBatch]:
    """Decoded frames gathered into FrameBatch items, each filled only once the consumer has room
    for it (`threads.produce`): a frame's latency starts when it is decoded, and a batch held back
    would add a whole batch period to it. With a `ring`, each batch lands in one of its reused
    (pinned) batch-sized buffers, a short last batch padded by repeating its last frame."""
    batch = None
    for image, stamp in _video_frames(info, stop, span):
        if batch is None:
            batch = _new_batch(info, batch_size, ring, stop)
            if batch is None:
                return
        batch.frames[len(batch.pts)] = image
        batch.pts.append(stamp)
        batch.decoded_at.append(time.perf_counter())
        if len(batch.pts) == batch_size:
            yield batch
            batch = None
    if batch is not None:
        real = len(batch.pts)
        if batch.slot is not None:
            batch.slot.array[real:] = batch.slot.array[real - 1]  # static shapes downstream
        batch.frames = batch.frames[:real]
        yield batch


def _new_batch(info: VideoInfo, batch_size: int, ring, stop: threading.Event) -> FrameBatch | None:
    shape = (batch_size, info.display_height, info.display_width, 3)
    if ring is None:
        return FrameBatch(np.empty(shape, np.uint8), [], [])
    slot = ring.acquire(shape, stop)
    return None if slot is None else FrameBatch(slot.array, [], [], slot)


def read_batches(
    path_or_info: str | os.PathLike | VideoInfo,
    batch_size: int,
    fps: Fraction | float | None = None,
    realtime: bool = False,
    ring=None,
    span: tuple[int, int | None] | None = None,
) -> Iterator[FrameBatch]:
    """FrameBatch items of batch_size frames (the last may be shorter), every frame once.

    Probes now (InputError is raised here). Decoding starts at the first next() on a background
    thread a few batches ahead; closing the iterator (close(), break) stops and joins it.
    realtime: deliver frames no sooner than their timestamps say (as a live source, or ffmpeg's
    -re); each frame's decoded_at is then the moment it would have arrived.
    ring: a `buffers.HostRing` whose reused (pinned) batch-sized buffers the frames land in; the
    consumer hands each back with `batch.release()`.
    span: (first pts, end pts or None): only the frames from first to before end, decoded from the
    keyframe before first (a chunk of a split clip, chunks.py); for a numbered-image folder the
    pts are the frames' indices.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    info = path_or_info if isinstance(path_or_info, VideoInfo) else probe(path_or_info, fps)
    batches = _consume(info, batch_size, ring, span)
    return _paced(batches, info.time_base) if realtime else batches


def _paced(batches: Iterator[FrameBatch], time_base: Fraction) -> Iterator[FrameBatch]:
    t0 = pts0 = None
    try:
        for batch in batches:
            if t0 is None:
                t0, pts0 = batch.decoded_at[0], batch.pts[0]
            arrivals = [t0 + float((p - pts0) * time_base) for p in batch.pts]
            wait = arrivals[-1] - time.perf_counter()  # the batch is complete when its last frame arrives
            if wait > 0:
                time.sleep(wait)
            batch.decoded_at = [max(d, a) for d, a in zip(batch.decoded_at, arrivals)]
            yield batch
    finally:
        batches.close()


def _consume(info: VideoInfo, batch_size: int, ring=None, span=None) -> Iterator[FrameBatch]:
    return produce(lambda stop: _batches(info, batch_size, ring, stop, span), f"decode:{info.path.name}", DECODE_AHEAD)
