"""Video input and output: probe, decode in batches, encode H.264/MP4 with the source's audio.

All PyAV use of the project lives here. Conventions:

- Frames are numpy uint8 RGB arrays, (B, H, W, 3), values 0..255, in DISPLAY orientation: the
  stream's display matrix (phone rotation) is applied on decode, so the output needs none.
- Timestamps are ints in the source stream's time_base, as the decoder gave them (VFR stays
  VFR). A folder of numbered images (00000.jpg, ...) is one clip with time_base 1/fps, pts 0..N-1.
- Output: libx264 in .mp4, yuv420p, BT.709 limited range, tagged; timestamps are shifted like
  ffmpeg does by default so the file starts at 0 (the source's container start time is
  subtracted from video and audio alike, which keeps them in sync).
- Odd sizes: yuv420p needs even width and height, so an odd-sized output is encoded as yuv444p
  (H.264 High 4:4:4 profile) at its exact size instead of being padded or cropped. Browsers,
  QuickTime and hardware decoders may not play that profile; even sizes are unaffected.
- Audio: each source audio track is copied packet for packet when MP4 holds the codec
  (aac, mp3, alac, opus, ac3, eac3, flac); any other codec is re-encoded to AAC.
- Source colours are read with the stream's tagged matrix and range; untagged streams are
  taken as BT.709 when HD (width >= 1280 or height > 576), else BT.601, as players do.
- Display-matrix mirroring (rare flip flags) is not applied; only rotation is.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, VideoReformatter
from PIL import Image, ImageOps

from stylize.errors import InputError, OutputError, UsageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MP4_AUDIO_COPY = frozenset({"aac", "mp3", "alac", "opus", "ac3", "eac3", "flac"})
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
DEFAULT_IMAGE_FPS = Fraction(24)
QUEUE_BATCHES = 3

# AVColorSpace tag of a decoded frame -> swscale matrix.
_MATRIX = {1: Colorspace.ITU709, 4: Colorspace.FCC, 5: Colorspace.ITU601, 6: Colorspace.ITU601,
           7: Colorspace.SMPTE240M, 9: Colorspace.BT2020, 10: Colorspace.BT2020}


@dataclass(frozen=True)
class AudioInfo:
    """One audio track of the source: stream index, codec name, rate in Hz, channel count."""

    index: int
    codec: str
    sample_rate: int
    channels: int
    duration: float | None


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learned about a clip. Sizes in pixels, durations in seconds.

    rotation is the display matrix's counter-clockwise angle in degrees (as PyAV reports it,
    e.g. -90 for a phone held upright); display_* are the sizes after applying it.
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
        """Length of one frame at the nominal rate, in time_base ticks (at least 1)."""
        return max(1, round(1 / (self.fps * self.time_base)))


@dataclass
class FrameBatch:
    """frames: uint8 RGB (B, H, W, 3) in display orientation; pts: one int per frame in the
    source time_base; decoded_at: time.perf_counter() when each frame was ready."""

    frames: np.ndarray
    pts: list[int]
    decoded_at: list[float]


def _as_fraction(fps: Fraction | float | int | None) -> Fraction:
    if fps is None:
        return DEFAULT_IMAGE_FPS
    value = Fraction(fps).limit_denominator(1_001_000)
    if value <= 0:
        raise UsageError(f"frame rate must be positive, got {fps}")
    return value


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _image_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=_natural_key)


def _load_image(path: Path) -> np.ndarray:
    """Read one image as uint8 RGB (H, W, 3), EXIF orientation applied."""
    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read this image ({exc}); replace or remove it") from exc


def _probe_images(folder: Path, fps) -> VideoInfo:
    files = _image_files(folder)
    if not files:
        raise InputError(f"{folder}: folder holds no images; give a video file or a folder of "
                         f"numbered frames such as 00000.jpg, 00001.jpg, ...")
    height, width = _load_image(files[0]).shape[:2]
    rate = _as_fraction(fps)
    return VideoInfo(path=folder, is_image_sequence=True, coded_width=width, coded_height=height,
                     display_width=width, display_height=height, rotation=0, fps=rate,
                     time_base=1 / rate, duration=float(len(files) / rate), frames=len(files),
                     video_codec=files[0].suffix.lower().lstrip("."), image_files=tuple(files))


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), "r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a video this tool can read ({exc}); "
                         f"give an .mp4/.mov/.mkv/.webm file or a folder of frames") from exc


def _stream_seconds(value: int | None, time_base) -> float | None:
    return float(value * time_base) if value is not None and time_base else None


def _tag_duration(container, stream) -> float | None:
    """Video duration when the stream header lacks one: Matroska's per-track DURATION tag (the
    track's end time), else the container's duration."""
    match = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d*)?)", stream.metadata.get("DURATION", ""))
    if match:
        end = int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3])
        start = _stream_seconds(stream.start_time, stream.time_base) or 0.0
        return end - start if end > start else end
    return container.duration / av.time_base if container.duration else None


def probe(path: str | os.PathLike, fps: Fraction | float | None = None) -> VideoInfo:
    """Describe a video file or a folder of numbered images; raise InputError if unreadable.

    fps applies to image folders only (default 24); a video keeps its own timing.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the input path")
    if path.is_dir():
        return _probe_images(path, fps)
    with _open(path) as container:
        if not container.streams.video:
            raise InputError(f"{path}: has no video stream; give a file that contains video")
        stream = container.streams.video[0]
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as exc:
            raise InputError(f"{path}: the video stream cannot be decoded ({exc})") from exc
        if first is None:
            raise InputError(f"{path}: the video stream holds no decodable frames")
        rotation = int(first.rotation)
        quarter = round(rotation / 90) % 4
        width, height = first.width, first.height
        disp_w, disp_h = (height, width) if quarter % 2 else (width, height)
        time_base = stream.time_base or Fraction(1, 90000)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate or _as_fraction(None)
        duration = _stream_seconds(stream.duration, time_base) or _tag_duration(container, stream)
        audio = tuple(
            AudioInfo(index=a.index, codec=a.codec_context.codec.canonical_name, sample_rate=a.rate,
                      channels=a.channels, duration=_stream_seconds(a.duration, a.time_base))
            for a in container.streams.audio)
        start = container.start_time / av.time_base if container.start_time is not None else 0.0
        return VideoInfo(path=path, is_image_sequence=False, coded_width=width,
                         coded_height=height, display_width=disp_w, display_height=disp_h,
                         rotation=rotation, fps=Fraction(rate), time_base=Fraction(time_base),
                         duration=duration, frames=stream.frames or None, audio=audio,
                         start_time=start, video_codec=stream.codec_context.codec.canonical_name)


def _to_rgb(frame: av.VideoFrame, sws: VideoReformatter, info: VideoInfo) -> np.ndarray:
    """Decoded frame -> uint8 RGB (H, W, 3) at coded size, rotated to display orientation."""
    matrix = _MATRIX.get(int(frame.colorspace))
    if matrix is None:
        matrix = Colorspace.ITU709 if frame.width >= 1280 or frame.height > 576 else Colorspace.ITU601
        # (frame.format.name startswith yuvj means full-range JPEG-style YUV)
    full = int(frame.color_range) == 2 or frame.format.name.startswith("yuvj")
    rgb = sws.reformat(frame, width=info.coded_width, height=info.coded_height, format="rgb24",
                       src_colorspace=matrix, dst_colorspace=matrix,
                       src_color_range=ColorRange.JPEG if full else ColorRange.MPEG,
                       dst_color_range=ColorRange.JPEG).to_ndarray()
    quarter = round(info.rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, quarter)) if quarter else rgb


def _video_frames(info: VideoInfo, stop: threading.Event) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (uint8 RGB display-orientation frame, pts) for every decoded frame, in order."""
    if info.is_image_sequence:
        for index, path in enumerate(info.image_files):
            image = _load_image(path)
            if image.shape[:2] != (info.display_height, info.display_width):
                raise InputError(f"{path}: size {image.shape[1]}x{image.shape[0]} differs from the "
                                 f"first frame's {info.display_width}x{info.display_height}")
            yield image, index
        return
    sws = VideoReformatter()
    previous = None
    with _open(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if stop.is_set():
                    return
                pts = frame.pts
                if pts is None:
                    pts = 0 if previous is None else previous + info.nominal_ticks
                elif previous is not None and pts <= previous:
                    log.warning("%s: non-increasing timestamp %d after %d; using %d",
                                info.path, pts, previous, previous + 1)
                    pts = previous + 1
                previous = pts
                yield _to_rgb(frame, sws, info), pts
        except av.FFmpegError as exc:
            raise InputError(f"{info.path}: decoding failed after pts {previous} ({exc})") from exc


def _produce(info: VideoInfo, batch_size: int, out: queue.Queue, stop: threading.Event) -> None:
    """Decode thread body: put FrameBatch items, then None; an exception is put as itself."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    frames, pts, stamps = [], [], []
    try:
        for image, stamp in _video_frames(info, stop):
            frames.append(image)
            pts.append(stamp)
            stamps.append(time.perf_counter())
            if len(frames) == batch_size:
                if not put(FrameBatch(np.stack(frames), pts, stamps)):
                    return
                frames, pts, stamps = [], [], []
        if frames and not put(FrameBatch(np.stack(frames), pts, stamps)):
            return
        put(None)
    except BaseException as exc:  # handed to the consumer, which re-raises it
        put(exc)


def read_batches(path_or_info: str | os.PathLike | VideoInfo, batch_size: int,
                 fps: Fraction | float | None = None) -> Iterator[FrameBatch]:
    """Decode a clip into FrameBatch items of batch_size frames (the last may be shorter).

    Probes eagerly (InputError is raised here); decoding starts on the first next(), runs on a
    background thread a few batches ahead, and stops when the iterator is closed or exhausted.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    info = path_or_info if isinstance(path_or_info, VideoInfo) else probe(path_or_info, fps)
    return _consume(info, batch_size)


def _consume(info: VideoInfo, batch_size: int) -> Iterator[FrameBatch]:
    out: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
    stop = threading.Event()
    worker = threading.Thread(target=_produce, args=(info, batch_size, out, stop),
                              name=f"decode:{info.path.name}", daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                out.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()


class _AudioPump:
    """Copies (or re-encodes to AAC) the source's audio tracks into `output`, interleaved."""

    def __init__(self, info: VideoInfo, output: av.container.OutputContainer):
        self.source = _open(info.path)
        self.output = output
        self.shift = Fraction(info.start_time).limit_denominator(10**6)
        self.routes = {}
        for stream in self.source.streams.audio:
            self.routes[stream.index] = self._route(stream)
        self.packets = self.source.demux(*self.source.streams.audio)
        self.pending = None

    def _route(self, stream):
        name = stream.codec_context.codec.canonical_name
        if name in MP4_AUDIO_COPY:
            try:
                return stream, self.output.add_stream_from_template(stream), True
            except ValueError:
                pass
        rate = stream.rate if stream.rate in AAC_RATES else 48000
        layout = stream.layout.name
        if "channels" in layout or stream.channels > 8:  # unnamed order: AAC needs a named one
            layout = "mono" if stream.channels == 1 else "stereo"
        encoder = self.output.add_stream("aac", rate=rate, layout=layout)
        encoder.bit_rate = 96_000 * encoder.channels
        log.info("%s: audio track %d (%s) re-encoded to AAC", self.source.name, stream.index, name)
        return stream, encoder, False

    def pump(self, until: float | None) -> None:
        """Mux source audio up to `until` seconds of output time (None: all of it)."""
        while True:
            packet = self.pending or next(self.packets, None)
            self.pending = None
            if packet is None:
                return
            when = packet.pts if packet.pts is not None else packet.dts
            if until is not None and when is not None and packet.time_base and \
                    float(when * packet.time_base - self.shift) > until:
                self.pending = packet
                return
            self._mux(packet)

    def _mux(self, packet) -> None:
        source, target, copy = self.routes[packet.stream.index]
        ticks = round(self.shift / packet.time_base) if packet.time_base else 0
        if copy:
            if packet.size == 0 or packet.dts is None:
                return
            if not packet.duration:  # MP4 would drop a last sample of unknown length
                samples = sum(f.samples for f in source.decode(packet))
                packet.duration = round(Fraction(samples, source.rate) / packet.time_base)
            packet.pts = None if packet.pts is None else packet.pts - ticks
            packet.dts -= ticks
            packet.stream = target
            self.output.mux(packet)
            return
        for frame in source.decode(packet if packet.size else None):
            if frame.pts is not None:
                frame.pts -= ticks
            self.output.mux(target.encode(frame))

    def finish(self) -> None:
        self.pump(None)
        for _, target, copy in self.routes.values():
            if not copy:
                self.output.mux(target.encode(None))

    def close(self) -> None:
        self.source.close()


class VideoWriter:
    """Writes uint8 RGB frames (B, H, W, 3) at the source's display size to an H.264 .mp4.

    Use as a context manager. The file is written to a hidden temporary name beside dst and
    renamed onto dst only after a clean exit; on any exception it is deleted and dst untouched.
    """

    def __init__(self, dst: str | os.PathLike, info: VideoInfo, crf: int = 18,
                 preset: str = "medium", audio: bool = True):
        self.dst = Path(dst)
        self.info = info
        self.crf, self.preset, self.audio = crf, preset, audio
        if self.dst.suffix.lower() not in (".mp4", ".m4v"):
            raise OutputError(f"{self.dst}: output must be an .mp4 file; change the name")
        if self.dst.is_dir():
            raise OutputError(f"{self.dst}: is a folder; give an output file name ending in .mp4")
        if _same_file(self.dst, info.path):
            raise OutputError(f"{self.dst}: is the input itself; choose another output path")
        self.tmp: Path | None = None
        self.container = None
        self.stream = None
        self.pump: _AudioPump | None = None
        self.pending = None  # (frame, pts) held until the next pts gives its duration
        self.last_pts = None
        self.last_ticks = info.nominal_ticks
        self.frames_written = 0
        self.durations: dict[int, int] = {}
        self.sws = VideoReformatter()

    def __enter__(self) -> VideoWriter:
        folder = self.dst.parent
        folder.mkdir(parents=True, exist_ok=True)
        self.tmp = folder / f".{self.dst.stem}.partial-{secrets.token_hex(4)}.mp4"
        try:
            self._open()
        except BaseException as exc:
            self._discard()
            if isinstance(exc, (av.FFmpegError, OSError)):
                raise OutputError(f"{self.dst}: cannot write here ({exc})") from exc
            raise
        return self

    def _open(self) -> None:
        info = self.info
        width, height = info.display_width, info.display_height
        self.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        self.container = av.open(str(self.tmp), "w", format="mp4")
        stream = self.container.add_stream(
            "libx264", rate=info.fps, options={"crf": str(self.crf), "preset": self.preset})
        stream.width, stream.height, stream.pix_fmt = width, height, self.pix_fmt
        stream.time_base = info.time_base
        stream.codec_context.time_base = info.time_base
        ctx = stream.codec_context
        ctx.colorspace, ctx.color_primaries, ctx.color_trc = 1, 1, 1  # BT.709
        ctx.color_range = 1  # limited (MPEG) range
        self.stream = stream
        if self.audio and info.audio and not info.is_image_sequence:
            self.pump = _AudioPump(info, self.container)

    def write(self, frames: np.ndarray, pts) -> None:
        """Encode uint8 RGB frames (B, H, W, 3) with their source pts (strictly increasing)."""
        frames = np.asarray(frames)
        expected = (self.info.display_height, self.info.display_width, 3)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != expected:
            raise ValueError(f"frames must be uint8 (B, {expected[0]}, {expected[1]}, 3) RGB at "
                             f"the display size, got {frames.dtype} {frames.shape}")
        pts = [int(p) for p in pts]
        if len(pts) != len(frames):
            raise ValueError(f"got {len(frames)} frames but {len(pts)} timestamps")
        if self.container is None:
            raise RuntimeError("VideoWriter.write() called outside its with-block")
        for image, stamp in zip(frames, pts):
            if self.last_pts is not None and stamp <= self.last_pts:
                raise ValueError(f"timestamps must increase: {stamp} after {self.last_pts}")
            if self.last_pts is not None:
                self.last_ticks = stamp - self.last_pts
            self._flush_pending(self.last_ticks)
            self.pending = (image, stamp)
            self.last_pts = stamp
        if self.pump is not None and self.last_pts is not None:
            self.pump.pump(float(self.last_pts * self.info.time_base) - self.info.start_time + 1.0)

    def _flush_pending(self, ticks: int) -> None:
        if self.pending is None:
            return
        image, stamp = self.pending
        self.pending = None
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame = self.sws.reformat(frame, format=self.pix_fmt, dst_colorspace=Colorspace.ITU709,
                                  src_color_range=ColorRange.JPEG,
                                  dst_color_range=ColorRange.MPEG)
        frame.pts = stamp - round(Fraction(self.info.start_time).limit_denominator(10**6)
                                  / self.info.time_base)
        frame.time_base = self.info.time_base
        self.durations[frame.pts] = ticks
        self._mux_video(self.stream.encode(frame))
        self.frames_written += 1

    def _mux_video(self, packets) -> None:
        # libx264 leaves packet durations at 0; the muxer then guesses the last frame's length.
        for packet in packets:
            packet.duration = self.durations.pop(packet.pts, 0)
            self.container.mux(packet)

    def _last_duration(self) -> int:
        """Last frame's length in ticks: up to the source's end when that is plausible."""
        info = self.info
        if info.duration is not None and self.last_pts is not None:
            end = round(Fraction(info.start_time + info.duration) / info.time_base)
            if 0 < end - self.last_pts <= 3 * max(self.last_ticks, info.nominal_ticks):
                return end - self.last_pts
        return self.last_ticks

    def _finish(self) -> None:
        self._flush_pending(self._last_duration())
        if self.frames_written == 0:
            raise OutputError(f"{self.dst}: no frames were written; nothing to save")
        self._mux_video(self.stream.encode(None))
        if self.pump is not None:
            self.pump.finish()
        self.container.close()
        with open(self.tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.tmp, self.dst)

    def _discard(self) -> None:
        for closer in (self.pump, self.container):
            try:
                if closer is not None:
                    closer.close()
            except Exception:  # already failing; the temp file is removed below
                pass
        self.pump = self.container = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self._finish()
            except BaseException as error:
                self._discard()
                if isinstance(error, (av.FFmpegError, OSError)):
                    raise OutputError(f"{self.dst}: writing failed ({error})") from error
                raise
            if self.pump is not None:
                self.pump.close()
            self.pump = self.container = None
            return False
        self._discard()
        return False


def _same_file(dst: Path, src: Path) -> bool:
    """True when dst would overwrite src (same resolved path or same inode)."""
    if dst.resolve() == src.resolve():
        return True
    try:
        return dst.exists() and os.path.samefile(dst, src)
    except OSError:
        return False
