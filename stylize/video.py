"""Video in and out: probe a clip, decode it in batches, write H.264/MP4 with the source's audio.

All PyAV use of the project lives here. Conventions:

- Frames are numpy uint8 RGB, (B, H, W, 3), values 0..255, in DISPLAY orientation: a stream's
  display-matrix rotation (phones) is applied on decode, so outputs carry no rotation. Mirror
  flags in a display matrix (rare) are not applied.
- Timestamps (pts) are ints in the source stream's time_base, as the decoder gave them, so VFR
  stays VFR. A folder of numbered images (00000.jpg, ...) is one clip: time_base 1/fps, pts 0..N-1.
- Output: libx264 in .mp4, BT.709 limited range (tagged). Timestamps are shifted as ffmpeg does
  by default: the source's start time is subtracted from video and audio alike, so the file
  starts at 0 and keeps its A/V offset.
- Odd sizes: yuv420p needs even width and height, so an odd-sized output is encoded as yuv444p
  (H.264 High 4:4:4) at its exact size rather than padded or cropped. Browsers, QuickTime and
  hardware decoders may not play that profile; even sizes always get plain yuv420p.
- Audio: each source track is copied packet for packet when MP4 holds the codec (aac, mp3,
  alac, opus, ac3, eac3, flac); any other codec is re-encoded to AAC.
- Colours are read with the source's tagged matrix and range; untagged streams count as BT.709
  when HD (width >= 1280 or height > 576), else BT.601, as players guess.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, VideoReformatter
from PIL import Image, ImageOps

from stylize.errors import InputError, OutputError, UsageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MP4_AUDIO_COPY = frozenset({"aac", "mp3", "alac", "opus", "ac3", "eac3", "flac"})
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
QUEUE_BATCHES = 3  # batches waiting for the encode thread
DECODE_AHEAD = 1  # decoded batches kept ready for the consumer: more only adds latency
# AVColorSpace tag of a decoded frame -> swscale matrix.
_MATRIX = {1: Colorspace.ITU709, 4: Colorspace.FCC, 5: Colorspace.ITU601, 6: Colorspace.ITU601,
           7: Colorspace.SMPTE240M, 9: Colorspace.BT2020, 10: Colorspace.BT2020}


@dataclass(frozen=True)
class AudioInfo:
    """One source audio track: stream index, codec name, rate in Hz, channels, seconds."""

    index: int
    codec: str
    sample_rate: int
    channels: int
    duration: float | None


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
    time_base; decoded_at: B time.perf_counter() stamps, taken when each frame was ready."""

    frames: np.ndarray
    pts: list[int]
    decoded_at: list[float]


def _image_files(folder: Path) -> list[Path]:
    """Image files of a folder in natural order (2.png before 10.png), hidden files skipped."""
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: [int(t) if t.isdigit() else t
                                        for t in re.split(r"(\d+)", p.name)])


def _load_image(path: Path) -> np.ndarray:
    """One image as uint8 RGB (H, W, 3), EXIF orientation applied."""
    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read this image ({exc}); replace or remove it") from exc


def _probe_images(folder: Path, fps) -> VideoInfo:
    files = _image_files(folder)
    if not files:
        raise InputError(f"{folder}: folder holds no images; give a video file or a folder of "
                         f"numbered frames (00000.jpg, 00001.jpg, ...)")
    rate = Fraction(24 if fps is None else fps).limit_denominator(1_001_000)
    if rate <= 0:
        raise UsageError(f"frame rate must be positive, got {fps}")
    height, width = _load_image(files[0]).shape[:2]
    return VideoInfo(path=folder, is_image_sequence=True, coded_width=width, coded_height=height,
                     display_width=width, display_height=height, rotation=0, fps=rate,
                     time_base=1 / rate, duration=float(len(files) / rate), frames=len(files),
                     video_codec=files[0].suffix.lower().lstrip("."), image_files=tuple(files))


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), "r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a video this tool can read ({exc}); give an "
                         f".mp4/.mov/.mkv/.webm file or a folder of numbered frames") from exc


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


def probe(path: str | os.PathLike, fps: Fraction | float | None = None) -> VideoInfo:
    """Describe a video file or a folder of numbered images; InputError if unreadable.

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
        audio = tuple(AudioInfo(a.index, a.codec_context.codec.canonical_name, a.rate,
                                a.channels, _seconds(a.duration, a.time_base))
                      for a in container.streams.audio)
        return VideoInfo(
            path=path, is_image_sequence=False, coded_width=w, coded_height=h,
            display_width=h if round(rotation / 90) % 2 else w,
            display_height=w if round(rotation / 90) % 2 else h, rotation=rotation,
            fps=Fraction(stream.average_rate or stream.guessed_rate or stream.base_rate or 24),
            time_base=Fraction(stream.time_base or Fraction(1, 90000)),
            duration=_video_duration(container, stream), frames=stream.frames or None,
            audio=audio, start_time=(container.start_time or 0) / av.time_base,
            video_codec=stream.codec_context.codec.canonical_name)


def _to_rgb(frame: av.VideoFrame, sws: VideoReformatter, info: VideoInfo) -> np.ndarray:
    """Decoded frame -> uint8 RGB (H, W, 3) at the coded size, turned to display orientation."""
    matrix = _MATRIX.get(int(frame.colorspace))
    if matrix is None:  # untagged: guess like players do
        matrix = Colorspace.ITU709 if frame.width >= 1280 or frame.height > 576 else Colorspace.ITU601
    full = int(frame.color_range) == 2 or frame.format.name.startswith("yuvj")
    rgb = sws.reformat(frame, width=info.coded_width, height=info.coded_height, format="rgb24",
                       src_colorspace=matrix, dst_color_range=ColorRange.JPEG,
                       src_color_range=ColorRange.JPEG if full else ColorRange.MPEG).to_ndarray()
    return np.rot90(rgb, round(info.rotation / 90) % 4)  # a view; copied into the batch


def _video_frames(info: VideoInfo, stop: threading.Event) -> Iterator[tuple[np.ndarray, int]]:
    """(uint8 RGB (H, W, 3) display-orientation frame, pts) for every decoded frame, in order."""
    if info.is_image_sequence:
        for index, path in enumerate(info.image_files):
            image = _load_image(path)
            if image.shape[:2] != (info.display_height, info.display_width):
                raise InputError(f"{path}: size {image.shape[1]}x{image.shape[0]} differs from the "
                                 f"first frame's {info.display_width}x{info.display_height}")
            yield image, index
        return
    sws, previous = VideoReformatter(), None
    with _open(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if stop.is_set():
                    return
                pts = frame.pts
                if pts is None:  # e.g. raw .h264: continue at the nominal rate
                    pts = 0 if previous is None else previous + info.nominal_ticks
                elif previous is not None and pts <= previous:
                    log.warning("%s: timestamp %d after %d; using %d", info.path, pts, previous,
                                previous + 1)
                    pts = previous + 1
                previous = pts
                yield _to_rgb(frame, sws, info), pts
        except av.FFmpegError as exc:
            raise InputError(f"{info.path}: decoding failed after pts {previous} ({exc})") from exc


def _produce(info: VideoInfo, batch_size: int, out: queue.Queue, stop: threading.Event) -> None:
    """Decode-thread body: puts FrameBatch items, then None, or the exception that ended it."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    shape = (batch_size, info.display_height, info.display_width, 3)
    batch = FrameBatch(np.empty(shape, np.uint8), [], [])
    try:
        for image, stamp in _video_frames(info, stop):
            batch.frames[len(batch.pts)] = image
            batch.pts.append(stamp)
            batch.decoded_at.append(time.perf_counter())
            if len(batch.pts) == batch_size:
                if not put(batch):
                    return
                batch = FrameBatch(np.empty(shape, np.uint8), [], [])
        if batch.pts:
            batch.frames = batch.frames[:len(batch.pts)]
            if not put(batch):
                return
        put(None)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
        put(exc)


def read_batches(path_or_info: str | os.PathLike | VideoInfo, batch_size: int,
                 fps: Fraction | float | None = None, realtime: bool = False) -> Iterator[FrameBatch]:
    """FrameBatch items of batch_size frames (the last may be shorter), every frame once.

    Probes now (InputError is raised here). Decoding starts at the first next() on a background
    thread a few batches ahead; closing the iterator (close(), break) stops and joins it.
    realtime: deliver frames no sooner than their timestamps say (as a live source, or ffmpeg's
    -re); each frame's decoded_at is then the moment it would have arrived.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    info = path_or_info if isinstance(path_or_info, VideoInfo) else probe(path_or_info, fps)
    batches = _consume(info, batch_size)
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


def _consume(info: VideoInfo, batch_size: int) -> Iterator[FrameBatch]:
    out: queue.Queue = queue.Queue(maxsize=DECODE_AHEAD)
    stop = threading.Event()
    worker = threading.Thread(target=_produce, args=(info, batch_size, out, stop),
                              name=f"decode:{info.path.name}", daemon=True)
    worker.start()
    try:
        while (item := out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # drain so a blocked put() sees the stop flag
            try:
                out.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()


class _AudioPump:
    """Moves the source's audio tracks into `output`: packet copies, or AAC re-encodes."""

    def __init__(self, info: VideoInfo, output: av.container.OutputContainer):
        self.source, self.output, self.pending = _open(info.path), output, None
        self.shift = Fraction(info.start_time).limit_denominator(10**6)
        self.routes = {s.index: self._route(s) for s in self.source.streams.audio}
        self.packets = self.source.demux(*self.source.streams.audio)

    def _route(self, stream) -> tuple:
        name = stream.codec_context.codec.canonical_name
        if name in MP4_AUDIO_COPY:
            try:
                return stream, self.output.add_stream_from_template(stream), True
            except ValueError:  # this FFmpeg's mp4 muxer refuses it after all
                pass
        layout = stream.layout.name
        if "channels" in layout or stream.channels > 8:  # unnamed order: AAC needs a named one
            layout = "mono" if stream.channels == 1 else "stereo"
        rate = stream.rate if stream.rate in AAC_RATES else 48000
        encoder = self.output.add_stream("aac", rate=rate, layout=layout)
        encoder.bit_rate = 96_000 * encoder.channels
        log.info("%s: audio track %d (%s) is re-encoded to AAC", self.source.name, stream.index,
                 name)
        return stream, encoder, False

    def pump(self, until: float | None) -> None:
        """Mux source audio up to `until` seconds of output time (None: all that is left)."""
        while True:
            packet = next(self.packets, None) if self.pending is None else self.pending
            if packet is None:
                return
            self.pending = None
            when = packet.pts if packet.pts is not None else packet.dts
            if until is not None and when is not None and packet.time_base and \
                    float(when * packet.time_base - self.shift) > until:
                self.pending = packet
                return
            self._mux(packet)

    def _mux(self, packet) -> None:
        source, target, copy = self.routes[packet.stream.index]
        ticks = round(self.shift / packet.time_base) if packet.time_base else 0
        if not copy:
            for frame in source.decode(packet if packet.size else None):
                if frame.pts is not None:
                    frame.pts -= ticks
                self.output.mux(target.encode(frame))
            return
        if packet.size == 0 or packet.dts is None:
            return
        if not packet.duration:  # mp4 would drop a last sample of unknown length
            samples = sum(f.samples for f in source.decode(packet))
            packet.duration = round(Fraction(samples, source.rate) / packet.time_base)
        packet.pts = None if packet.pts is None else packet.pts - ticks
        packet.dts -= ticks
        packet.stream = target
        self.output.mux(packet)

    def finish(self) -> None:
        self.pump(None)
        for _, target, copy in self.routes.values():
            if not copy:
                self.output.mux(target.encode(None))


class VideoWriter:
    """Writes uint8 RGB frames (B, H, W, 3) at info's display size to an H.264 .mp4 at dst.

    A context manager: frames go to a hidden temporary file beside dst
    (.<name>.partial-<random>.mp4), renamed onto dst only after a clean exit. On any exception,
    KeyboardInterrupt included, the temporary file is deleted and dst is left as it was.
    Colour conversion, encoding and muxing run on a background thread behind a bounded queue, so
    `write` returns at once; an error there is raised by the next `write` or at the exit.
    """

    def __init__(self, dst: str | os.PathLike, info: VideoInfo, crf: int = 18,
                 preset: str = "medium", audio: bool = True):
        self.dst, self.info = Path(dst), info
        self.crf, self.preset, self.audio = crf, preset, audio
        if self.dst.suffix.lower() not in (".mp4", ".m4v"):
            raise OutputError(f"{self.dst}: output must be an .mp4 file; change the name")
        if self.dst.is_dir():
            raise OutputError(f"{self.dst}: is a folder; give an output file name ending in .mp4")
        if self.dst.resolve() == info.path.resolve() or (
                self.dst.exists() and info.path.exists() and os.path.samefile(self.dst, info.path)):
            raise OutputError(f"{self.dst}: is the input itself; choose another output path")
        self.tmp = self.container = self.stream = self.pump = None
        self.pending = None  # (image, pts) held until the next pts gives its duration
        self.first_pts = self.last_pts = None
        self.last_ticks = info.nominal_ticks
        self.written, self.durations = 0, {}
        self.shift = info.ticks(info.start_time)
        self.sws = VideoReformatter()
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.worker: threading.Thread | None = None
        self.error: BaseException | None = None
        self.queued_last_pts = None

    def __enter__(self) -> VideoWriter:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dst.parent / f".{self.dst.stem}.partial-{secrets.token_hex(4)}.mp4"
        try:
            self._open()
        except BaseException as exc:
            self._discard()
            if isinstance(exc, (av.FFmpegError, OSError)):
                raise OutputError(f"{self.dst}: cannot write here ({exc})") from exc
            raise
        self.worker = threading.Thread(target=self._work, name=f"encode:{self.dst.name}", daemon=True)
        self.worker.start()
        return self

    def _work(self) -> None:
        """The encode thread: frames off the queue into the container until the None sentinel."""
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._write_now(*item)
                except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                    self.error = exc

    def _stop_worker(self) -> None:
        if self.worker is None:
            return
        self.queue.put(None)
        self.worker.join()
        self.worker = None

    def _open(self) -> None:
        info = self.info
        width, height = info.display_width, info.display_height
        self.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        self.container = av.open(str(self.tmp), "w", format="mp4")
        self.stream = self.container.add_stream(
            "libx264", rate=info.fps, options={"crf": str(self.crf), "preset": self.preset})
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, self.pix_fmt
        ctx = self.stream.codec_context
        ctx.time_base = self.stream.time_base = info.time_base
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = 1  # BT.709
        ctx.color_range = 1  # limited ("MPEG") range
        if self.audio and info.audio and not info.is_image_sequence:
            self.pump = _AudioPump(info, self.container)

    def write(self, frames: np.ndarray, pts) -> None:
        """Encode uint8 RGB frames (B, H, W, 3) with their source pts (strictly increasing)."""
        frames = np.asarray(frames)
        frames = frames[None] if frames.ndim == 3 else frames
        want = (self.info.display_height, self.info.display_width, 3)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != want:
            raise ValueError(f"frames must be uint8 RGB (B, {want[0]}, {want[1]}, 3), the display "
                             f"size; got {frames.dtype} {frames.shape}")
        pts = [int(p) for p in pts]
        if len(pts) != len(frames):
            raise ValueError(f"got {len(frames)} frames but {len(pts)} timestamps")
        if self.container is None:
            raise RuntimeError("VideoWriter.write() called outside its with-block")
        for stamp in pts:
            if self.queued_last_pts is not None and stamp <= self.queued_last_pts:
                raise ValueError(f"timestamps must increase: {stamp} after {self.queued_last_pts}")
            self.queued_last_pts = stamp
        if self.error is not None:
            raise self.error
        self.queue.put((frames, pts))  # blocks only when the encoder is a few batches behind

    def _write_now(self, frames: np.ndarray, pts: list[int]) -> None:
        for image, stamp in zip(frames, pts):
            if self.last_pts is not None:
                if stamp <= self.last_pts:
                    raise ValueError(f"timestamps must increase: {stamp} after {self.last_pts}")
                self.last_ticks = stamp - self.last_pts
            self._encode_pending(self.last_ticks)
            self.pending, self.last_pts = (image, stamp), stamp
            self.first_pts = stamp if self.first_pts is None else self.first_pts
        if self.pump is not None and self.last_pts is not None:  # audio ~1 s ahead of video
            self.pump.pump(float((self.last_pts - self.shift) * self.info.time_base) + 1.0)

    def _encode_pending(self, ticks: int) -> None:
        if self.pending is None:
            return
        (image, stamp), self.pending = self.pending, None
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame = self.sws.reformat(frame, format=self.pix_fmt, dst_colorspace=Colorspace.ITU709,
                                  src_color_range=ColorRange.JPEG, dst_color_range=ColorRange.MPEG)
        frame.pts, frame.time_base = stamp - self.shift, self.info.time_base
        self.durations[frame.pts] = ticks
        self._mux_video(self.stream.encode(frame))
        self.written += 1

    def _mux_video(self, packets) -> None:
        for packet in packets:  # libx264 leaves durations at 0; mp4 needs the last one
            packet.duration = self.durations.pop(packet.pts, 0)
            self.container.mux(packet)

    def _last_ticks(self) -> int:
        """The last frame lasts until the source's end (first pts + duration) when that is
        plausible, else as long as the one before it."""
        info = self.info
        if info.duration is not None and self.last_pts is not None:
            end = self.first_pts + info.ticks(info.duration)
            if 0 < end - self.last_pts <= 3 * max(self.last_ticks, info.nominal_ticks):
                return end - self.last_pts
        return self.last_ticks

    def _finish(self) -> None:
        self._encode_pending(self._last_ticks())
        if self.written == 0:
            raise OutputError(f"{self.dst}: no frames were written; nothing to save")
        self._mux_video(self.stream.encode(None))
        if self.pump is not None:
            self.pump.finish()
            self.pump.source.close()
        self.container.close()
        with open(self.tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.tmp, self.dst)

    def _discard(self) -> None:
        for closer in (self.pump and self.pump.source, self.container):
            try:
                if closer is not None:
                    closer.close()
            except Exception as error:  # noqa: BLE001 - already failing; the temp file goes below
                log.debug("closing after a failure: %s", error)
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None:
                self.error = self.error or exc  # the thread skips what is left in the queue
            self._stop_worker()
            if exc_type is None and self.error is not None:
                raise self.error
            if exc_type is None:
                self._finish()
        except (av.FFmpegError, OSError) as error:
            self._discard()
            raise OutputError(f"{self.dst}: writing failed ({error})") from error
        except BaseException:
            self._discard()
            raise
        finally:
            if exc_type is not None:
                self._discard()
            self.pump = self.container = None
        return False
