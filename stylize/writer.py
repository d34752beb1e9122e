"""Video out: the stylized frames as H.264/MP4 with the source's audio, written atomically.

- Output: libx264 in .mp4, BT.709 limited range (tagged). Timestamps are shifted as ffmpeg does
  by default: the source's start time is subtracted from video and audio alike, so the file
  starts at 0 and keeps its A/V offset.
- Odd sizes: yuv420p needs even width and height, so an odd-sized output is encoded as yuv444p
  (H.264 High 4:4:4) at its exact size rather than padded or cropped. Browsers, QuickTime and
  hardware decoders may not play that profile; even sizes always get plain yuv420p.
- Audio: each source track is copied packet for packet when MP4 holds the codec (aac, mp3,
  alac, opus, ac3, eac3, flac); any other codec is re-encoded to AAC.
- The file appears at its name only when complete (a hidden temporary file is renamed onto it).
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, VideoReformatter

from stylize.errors import InputError, OutputError
from stylize.partial import partial_path, remove_predecessors
from stylize.signals import pause_point
from stylize.threads import Pipe
from stylize.video import VideoInfo, open_input

log = logging.getLogger(__name__)

MP4_AUDIO_COPY = frozenset({"aac", "mp3", "alac", "opus", "ac3", "eac3", "flac"})
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
QUEUE_BATCHES = 4  # batches handed to the encode thread and not yet encoded


class AudioPump:
    """Moves the source's audio tracks into `output`: packet copies, or AAC re-encodes."""

    def __init__(self, info: VideoInfo, output: av.container.OutputContainer):
        self.source, self.output, self.pending = open_input(info.path), output, None
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
    (.<name>.partial-<run>-<random>.mp4, partial.py), renamed onto dst only after a clean exit. On any exception,
    KeyboardInterrupt included, the temporary file is deleted and dst is left as it was.
    Colour conversion, encoding and muxing run on a background thread behind a bounded queue, so
    `write` returns at once; an error there is raised by the next `write` or at the exit.
    """

    def __init__(self, dst: str | os.PathLike, info: VideoInfo, crf: int = 18,
                 preset: str = "medium", audio: bool = True, keep: bool = False,
                 first_pts: int | None = None):
        self.dst, self.info = Path(dst), info
        self.crf, self.preset, self.audio = crf, preset, audio
        # a chunk of a split clip (chunks.py): the complete file stays at its hidden name (`tmp`)
        # for the join, and its last frame lasts to the clip's end only when it is the clip's last
        self.keep, self.clip_first_pts = keep, first_pts
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
        self.pipe: Pipe | None = None  # to the encode thread
        self.queued_last_pts = None

    def __enter__(self) -> VideoWriter:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        remove_predecessors(self.dst)  # what an earlier run that was killed outright left
        self.tmp = partial_path(self.dst)
        try:
            self._open()
        except BaseException as exc:
            self._discard()
            if isinstance(exc, (av.FFmpegError, OSError)):
                raise OutputError(f"{self.dst}: cannot write here ({exc})") from exc
            raise
        self.pipe = Pipe(lambda item: self._write_now(*item), f"encode:{self.dst.name}", limit=QUEUE_BATCHES + 1)
        return self

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
            bad = next((a for a in info.audio if a.problem), None)  # see video._audio_info
            if bad is not None:
                raise InputError(f"{info.path}: audio track {bad.index} {bad.problem} (a damaged file?); "
                                 f"give --no-audio to leave the audio out")
            self.pump = AudioPump(info, self.container)

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
        self.pipe.put((frames, pts))  # waits only when the encoder is a few batches behind
        pause_point("encode")

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
            first = self.first_pts if self.clip_first_pts is None else self.clip_first_pts
            end = first + info.ticks(info.duration)
            if 0 < end - self.last_pts <= 3 * max(self.last_ticks, info.nominal_ticks):
                return end - self.last_pts
        return self.last_ticks

    def _finish(self) -> None:
        self._encode_pending(self._last_ticks())
        if self.written == 0:
            raise OutputError(f"{self.dst}: no frames were written; nothing to save")
        self._mux_video(self.stream.encode(None))
        if self.pump is not None:
            pause_point("remux")
            self.pump.finish()
            self.pump.source.close()
        self.container.close()
        with open(self.tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if not self.keep:
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
        pipe, self.pipe = self.pipe, None
        try:
            if pipe is not None:  # failing: the thread skips what is left; else its error is raised
                pipe.close(discard=exc_type is not None)
            if exc_type is None:
                self._finish()
        except (av.FFmpegError, OSError) as error:
            self._discard()
            raise OutputError(f"{self.dst}: writing failed ({error})") from error
        except BaseException:
            if pipe is not None:
                # a signal can cut the close above short: stop the encoder and wait until it has let go
                # of the file before closing it (by the pipe's count of unhandled items: Python 3.11
                # takes a thread whose join was interrupted for one that has ended)
                pipe.close(discard=True)
                pipe.join()
            self._discard()
            raise
        finally:
            if exc_type is not None:
                self._discard()
            self.pump = self.container = None
        return False
