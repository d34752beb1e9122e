"""Clips and checks shared by the reader and writer tests: generated clips (PyAV), a round trip
through decode and encode, audio decoding."""

from __future__ import annotations

import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from stylize.video import probe, read_batches
from stylize.writer import VideoWriter

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
FAST = {"preset": "ultrafast"}


# ----------------------------------------------------------------------------- helpers


def pattern(index: int, width: int, height: int) -> np.ndarray:
    """uint8 RGB (H, W, 3): smooth gradients plus a moving square, so motion is visible."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                      np.full_like(x, (index * 37) % 256)], axis=-1).astype(np.uint8)
    side = max(4, min(width, height) // 4)
    left = (index * 3) % max(1, width - side)
    frame[height // 3:height // 3 + side, left:left + side] = (250, 250, 250)
    return frame


def sine(seconds: float, rate: int, channels: int, freq: float = 440.0) -> np.ndarray:
    """float32 (channels, samples) at half amplitude."""
    t = np.arange(int(seconds * rate)) / rate
    return np.tile(0.5 * np.sin(2 * np.pi * freq * t), (channels, 1)).astype(np.float32)


def make_clip(path: Path, pts=None, size=(64, 48), time_base=Fraction(1, 1000), rate=25,
              audio_codec=None, audio_start=None, audio_rate=44100, channels=2,
              rotation=None) -> Path:
    """Write a small H.264 clip (frames from `pattern`) with optional sine audio.

    pts: video timestamps in time_base ticks (default: 20 frames at `rate`).
    audio_start: seconds of the first audio sample (default: the first video frame's time).
    """
    width, height = size
    if pts is None:
        pts = [round(i / (rate * time_base)) for i in range(20)]
    pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate, options={"preset": "ultrafast", "crf": "10"})
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        video.time_base = video.codec_context.time_base = time_base
        if rotation is not None:
            video.set_display_rotation(rotation)
        if audio_codec:
            layout = "stereo" if channels == 2 else "mono"
            sound = out.add_stream(audio_codec, rate=audio_rate, layout=layout)
        for index, stamp in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(pattern(index, width, height), format="rgb24")
            frame = frame.reformat(format=pix_fmt)
            frame.pts, frame.time_base = stamp, time_base
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if audio_codec:
            start = pts[0] * time_base if audio_start is None else Fraction(audio_start)
            seconds = float((pts[-1] - pts[0]) * time_base) + 1 / rate
            samples = sine(seconds, audio_rate, channels)
            fmt = sound.codec_context.format.name
            for first in range(0, samples.shape[1], 1024):
                chunk = samples[:, first:first + 1024]
                data = chunk if fmt.endswith("p") else chunk.T.reshape(1, -1)
                if fmt.startswith("s16"):
                    data = (data * 32767).astype(np.int16)
                elif fmt.startswith("s32"):
                    data = (data * 2**31 * 0.999).astype(np.int32)
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt,
                                                   layout=layout)
                frame.sample_rate = audio_rate
                frame.pts = round(start * audio_rate) + first
                frame.time_base = Fraction(1, audio_rate)
                out.mux(sound.encode(frame))
            out.mux(sound.encode())
    return path


def make_image_folder(folder: Path, count=12, size=(64, 48), suffix=".png") -> Path:
    folder.mkdir()
    for index in range(count):
        Image.fromarray(pattern(index, *size)).save(folder / f"{index:05d}{suffix}", quality=95)
    return folder


def decode_audio(path: Path) -> tuple[np.ndarray, float]:
    """(float32 (channels, samples) of the first audio track, first sample time in seconds)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        frames = list(container.decode(stream))
    first = float(frames[0].pts * frames[0].time_base)
    data = [f.to_ndarray().astype(np.float32) for f in frames]
    if not frames[0].format.is_planar:
        data = [d.reshape(-1, stream.channels).T for d in data]
    if frames[0].format.name.startswith("s16"):
        data = [d / 32768 for d in data]
    return np.concatenate(data, axis=1), first


def audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(audio=0) if p.size]


def roundtrip(src, dst: Path, batch_size=8, keep=12, fps=None, **writer_args):
    """Decode src, write the frames unchanged to dst, decode dst. Returns a dict of findings.

    Keeps about `keep` evenly spaced frames for the pixel comparison (mean abs diff, 0..255).
    """
    info = probe(src, fps=fps)
    step = max(1, (info.frames or 1) // keep)
    kept, pts_in = {}, []
    with VideoWriter(dst, info, **writer_args) as writer:
        for batch in read_batches(info, batch_size):
            for i, frame in enumerate(batch.frames):
                if (len(pts_in) + i) % step == 0:
                    kept[len(pts_in) + i] = frame.copy()
            writer.write(batch.frames, batch.pts)
            pts_in += batch.pts
    out = probe(dst)
    pts_out, diffs, shape = [], [], None
    for batch in read_batches(out, batch_size):
        shape = batch.frames.shape[1:]
        for i, frame in enumerate(batch.frames):
            if len(pts_out) + i in kept:
                original = kept[len(pts_out) + i].astype(np.int16)
                diffs.append(np.abs(frame.astype(np.int16) - original).mean())
        pts_out += batch.pts
    sec_in = np.array(pts_in) * float(info.time_base) - info.start_time
    sec_out = np.array(pts_out) * float(out.time_base) - out.start_time
    return {"info": info, "out": out, "sec_in": sec_in, "sec_out": sec_out,
            "mad": max(diffs), "shape": shape}


def check_roundtrip(r: dict) -> None:
    """The assertions every round trip must pass."""
    info, out = r["info"], r["out"]
    assert len(r["sec_out"]) == len(r["sec_in"]), "frame count changed"
    if info.frames:
        assert len(r["sec_in"]) == info.frames
    tick = float(max(info.time_base, out.time_base))
    np.testing.assert_allclose(r["sec_out"], r["sec_in"], rtol=0, atol=tick + 1e-9)
    assert (out.display_width, out.display_height) == (info.display_width, info.display_height)
    assert r["shape"] == (info.display_height, info.display_width, 3)
    assert out.rotation == 0
    if info.duration is not None:
        assert out.duration == pytest.approx(info.duration, abs=tick + 1e-6)
    assert r["mad"] < 6, f"mean abs pixel diff {r['mad']:.2f}"


def decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("decode:") and t.is_alive()]


# ----------------------------------------------------------------------------- probe
