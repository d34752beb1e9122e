"""Tests for stylize.video: probe, batched decode, atomic H.264/MP4 writing with audio.

Most tests use tiny clips generated here with PyAV; the real clips in ../shared/media (beside the
checkout) are round-tripped in full when that folder exists. Encoding uses preset "ultrafast" to
keep the file fast on small machines; the default (medium) is exercised once.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from stylize.errors import InputError, OutputError
from stylize.video import FrameBatch, VideoInfo, probe, read_batches
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


def test_probe_generated_clip(tmp_path):
    clip = make_clip(tmp_path / "a.mp4", audio_codec="aac")
    info = probe(clip)
    assert isinstance(info, VideoInfo) and not info.is_image_sequence
    assert (info.coded_width, info.coded_height) == (64, 48)
    assert (info.display_width, info.display_height, info.rotation) == (64, 48, 0)
    assert info.fps == 25 and info.frames == 20
    assert info.duration == pytest.approx(0.8, abs=0.001)
    assert [(a.codec, a.sample_rate, a.channels) for a in info.audio] == [("aac", 44100, 2)]


def test_probe_image_folder_uses_fps_argument(tmp_path):
    folder = make_image_folder(tmp_path / "frames", count=5, suffix=".jpg")
    (folder / "notes.txt").write_text("ignored")
    info = probe(folder, fps=30)
    assert info.is_image_sequence and info.frames == 5
    assert (info.fps, info.time_base) == (30, Fraction(1, 30))
    assert info.duration == pytest.approx(5 / 30)
    assert probe(folder).fps == 24


@pytest.mark.parametrize("kind", ["missing", "garbage", "empty_folder", "text_folder", "audio_only"])
def test_unreadable_input_raises_input_error(tmp_path, kind):
    path = tmp_path / "input.mp4"
    if kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind in ("empty_folder", "text_folder"):
        path = tmp_path / "frames"
        path.mkdir()
        if kind == "text_folder":
            (path / "readme.txt").write_text("no frames here")
    elif kind == "audio_only":
        path = tmp_path / "sound.m4a"
        with av.open(str(path), "w") as out:
            stream = out.add_stream("aac", rate=44100, layout="mono")
            frame = av.AudioFrame.from_ndarray(sine(0.1, 44100, 1), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, 0
            out.mux(stream.encode(frame))
            out.mux(stream.encode())
    with pytest.raises(InputError) as error:
        probe(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    with pytest.raises(InputError):
        read_batches(path, 4)


# ----------------------------------------------------------------------------- decode


def test_batches_shapes_and_partial_last_batch(tmp_path):
    clip = make_clip(tmp_path / "a.mkv", pts=[i * 40 for i in range(23)])  # keeps 1/1000
    for size, expected in [(8, [8, 8, 7]), (1, [1] * 23), (23, [23]), (50, [23])]:
        batches = list(read_batches(clip, size))
        assert [len(b.frames) for b in batches] == expected
        assert all(isinstance(b, FrameBatch) and b.frames.dtype == np.uint8 for b in batches)
        assert all(b.frames.shape[1:] == (48, 64, 3) for b in batches)
        assert all(len(b.pts) == len(b.decoded_at) == len(b.frames) for b in batches)
        stamps = [t for b in batches for t in b.decoded_at]
        assert stamps == sorted(stamps)
        assert [p for b in batches for p in b.pts] == [i * 40 for i in range(23)]
    with pytest.raises(ValueError):
        read_batches(clip, 0)


def test_decoder_starts_a_batch_only_when_there_is_room(tmp_path):
    """One batch ready ahead of a slow consumer, and no more: the next batch is decoded after the
    consumer takes the previous one, not decoded early and held (which would add a whole batch
    period to every frame's latency)."""
    clip = make_clip(tmp_path / "a.mp4", pts=[i * 40 for i in range(16)])
    taken = []
    batches = []
    for batch in read_batches(clip, 4):
        taken.append(time.perf_counter())
        batches.append(batch)
        time.sleep(0.3)  # a slow consumer: the decoder fills the one ready slot, then waits
    # batch k+2 was started only after batch k+1 was taken (batch k+1 waited in the slot)
    for k in range(len(batches) - 2):
        assert batches[k + 2].decoded_at[0] >= taken[k + 1], k


def open_files(path: Path) -> list[str]:
    """Paths this process holds open that resolve to `path` (Linux /proc; [] elsewhere)."""
    fd_dir = Path("/proc/self/fd")
    links = [os.path.realpath(fd_dir / fd) for fd in os.listdir(fd_dir)] if fd_dir.is_dir() else []
    return [link for link in links if link == str(path.resolve())]


@pytest.mark.parametrize("how", ["close", "break"])
def test_early_close_stops_decode_thread(tmp_path, how):
    clip = make_clip(tmp_path / "a.mp4", pts=[i * 40 for i in range(60)])
    before = set(decode_threads())
    if how == "close":
        batches = read_batches(clip, 2)
        next(batches)  # the thread now runs ahead and blocks on the full queue
        assert set(decode_threads()) - before, "decoding should run on a background thread"
        assert open_files(clip) or not Path("/proc/self/fd").is_dir()
        batches.close()
    else:
        for _ in read_batches(clip, 2):
            break
    gc.collect()
    assert not set(decode_threads()) - before
    assert not open_files(clip), "the decoder's file handle leaked"


def test_error_in_decode_thread_reaches_consumer(tmp_path):
    folder = make_image_folder(tmp_path / "frames", count=10)
    (folder / "00006.png").write_bytes(b"not a png")
    seen = []
    with pytest.raises(InputError, match="00006.png"):
        for batch in read_batches(folder, 2):
            seen.append(len(batch.frames))
    assert seen == [2, 2, 2]
    assert not [t for t in decode_threads() if t.name == "decode:frames"]


def test_missing_pts_are_synthesized(tmp_path):
    raw = tmp_path / "raw.h264"  # an elementary stream: the decoder gives no timestamps
    with av.open(str(raw), "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(12):
            frame = av.VideoFrame.from_ndarray(pattern(index, 64, 48), format="rgb24")
            frame.pts = index
            out.mux(stream.encode(frame.reformat(format="yuv420p")))
        out.mux(stream.encode())
    info = probe(raw)
    pts = [p for b in read_batches(info, 5) for p in b.pts]
    assert len(pts) == 12
    assert np.diff(pts).tolist() == [info.nominal_ticks] * 11
    r = roundtrip(raw, tmp_path / "out.mp4", **FAST)
    assert len(r["sec_out"]) == 12
    np.testing.assert_allclose(r["sec_out"], np.arange(12) / 25, atol=1e-3)


def test_rotation_is_applied_like_ffmpeg_autorotate(tmp_path):
    # rotation -90 (QuickTime rotate=90): players turn the picture 90 degrees clockwise,
    # so the coded top-left corner ends up top-right.
    clip = make_clip(tmp_path / "rot.mp4", size=(64, 32), rotation=-90)
    info = probe(clip)
    assert (info.coded_width, info.coded_height, info.rotation) == (64, 32, -90)
    assert (info.display_width, info.display_height) == (32, 64)
    first = next(read_batches(info, 1)).frames[0].astype(int)
    coded = pattern(0, 64, 32).astype(int)
    assert np.abs(first - np.rot90(coded, -1)).mean() < 3  # clockwise
    assert np.abs(first - np.rot90(coded, 1)).mean() > 30  # not counter-clockwise
    r = roundtrip(clip, tmp_path / "out.mp4", **FAST)
    check_roundtrip(r)
    assert (r["out"].coded_width, r["out"].coded_height) == (32, 64)


@pytest.mark.parametrize("tag, matrix", [(1, "ITU709"), (6, "ITU601"), (None, "ITU601")])
def test_decode_uses_the_streams_colour_matrix(tmp_path, tag, matrix):
    # Saturated colours come out right only when YUV->RGB uses the matrix they were coded with;
    # an untagged SD stream is read as BT.601, like players do.
    from av.video.reformatter import ColorRange, Colorspace

    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 200, 0]], np.uint8)
    image = np.repeat(np.repeat(colours[None], 32, axis=0), 16, axis=1)  # (32, 64, 3)
    clip = tmp_path / "tagged.mkv"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"preset": "ultrafast", "qp": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv444p"
        if tag is not None:
            stream.codec_context.colorspace, stream.codec_context.color_range = tag, 1
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
            format="yuv444p", dst_colorspace=getattr(Colorspace, matrix),
            src_color_range=ColorRange.JPEG, dst_color_range=ColorRange.MPEG)
        frame.pts = 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    decoded = next(read_batches(clip, 1)).frames[0].astype(int)
    assert np.abs(decoded - image).max() <= 3
    # The writer converts with BT.709 and tags it, so its output reads back the same colours.
    with VideoWriter(tmp_path / "out.mp4", probe(clip), **FAST) as writer:
        writer.write(np.repeat(image[None], 3, axis=0), [0, 1, 2])
    with av.open(str(tmp_path / "out.mp4")) as out:
        ctx = out.streams.video[0].codec_context
        assert (ctx.colorspace, ctx.color_primaries, ctx.color_trc, ctx.color_range) == (1, 1, 1, 1)
    again = next(read_batches(tmp_path / "out.mp4", 1)).frames[0].astype(int)
    inner = np.r_[4:12, 20:28, 36:44, 52:60]  # away from the colour edges (chroma is 4:2:0)
    assert np.abs(again[4:-4, inner] - image[4:-4, inner]).max() <= 8


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("case", ["cfr", "vfr", "odd_size", "png_folder", "jpg_folder", "medium"])
def test_roundtrip_generated(tmp_path, case):
    args = dict(FAST)
    if case in ("cfr", "medium"):
        src = make_clip(tmp_path / "src.mp4")
        if case == "medium":
            args = {}
    elif case == "vfr":
        ticks = np.cumsum([0, 33, 34, 33, 80, 17, 33, 140, 33, 20, 60, 33, 33, 34, 100, 33])
        src = make_clip(tmp_path / "src.mov", pts=ticks.tolist(), time_base=Fraction(1, 1000))
    elif case == "odd_size":
        src = make_clip(tmp_path / "src.mkv", size=(63, 47))
    else:
        src = make_image_folder(tmp_path / "frames", suffix=".png" if case == "png_folder" else ".jpg")
    r = roundtrip(src, tmp_path / "out.mp4", fps=30 if "folder" in case else None, **args)
    check_roundtrip(r)
    if case == "vfr":
        assert len(set(np.round(np.diff(r["sec_out"]), 3))) > 5, "VFR must stay VFR"
    if case == "odd_size":
        assert (r["out"].display_width, r["out"].display_height) == (63, 47)
        with av.open(str(tmp_path / "out.mp4")) as out:
            assert out.streams.video[0].codec_context.pix_fmt == "yuv444p"
    else:
        with av.open(str(tmp_path / "out.mp4")) as out:
            assert out.streams.video[0].codec_context.name == "h264"
            assert out.streams.video[0].codec_context.pix_fmt == "yuv420p"
    if "folder" in case:
        assert r["out"].fps == 30 and r["out"].frames == 12


def media_clips() -> list:
    if not MEDIA.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(
            reason=f"real clips not found at {MEDIA} (expected ../shared/media beside the checkout)"))]
    found = []
    for folder in (MEDIA, *sorted(p for p in MEDIA.iterdir() if p.is_dir())):
        for path in sorted(folder.iterdir()):
            is_frames = path.is_dir() and any(path.glob("00000.*"))
            if is_frames or path.suffix.lower() in (".mp4", ".mov", ".mkv", ".webm"):
                found.append(pytest.param(path, id=str(path.relative_to(MEDIA))))
    return found


def manifest() -> dict:
    try:
        return {e["name"]: e["info"] for e in json.loads((MEDIA / "manifest.json").read_text())}
    except (OSError, ValueError, KeyError):
        return {}


@pytest.mark.media
@pytest.mark.parametrize("clip", media_clips())
def test_roundtrip_real_media(tmp_path, clip):
    r = roundtrip(clip, tmp_path / "out.mp4", **FAST)
    check_roundtrip(r)
    info, out = r["info"], r["out"]
    facts = manifest().get(clip.name)
    if facts:
        frames = facts.get("decoded_frames", facts.get("frames"))
        assert len(r["sec_in"]) == frames
        assert (info.display_width, info.display_height) == (facts["display_width"],
                                                             facts["display_height"])
        assert info.rotation == facts.get("rotation_deg", 0)
        if "video_duration_s" in facts:
            assert out.duration == pytest.approx(facts["video_duration_s"], abs=0.002)
        audio = facts.get("audio")
        assert [(a.codec, a.sample_rate, a.channels) for a in out.audio] == (
            [(audio["codec"], audio["sample_rate"], audio["channels"])] if audio else [])
    assert len(out.audio) == len(info.audio)
    for before, after in zip(info.audio, out.audio):  # copied: same track, same length
        assert (after.codec, after.sample_rate, after.channels) == (
            before.codec, before.sample_rate, before.channels)
        assert after.duration == pytest.approx(before.duration, abs=1024 / before.sample_rate)
    if clip.name.startswith("iphone_rotated"):
        assert (out.display_width, out.display_height, out.rotation) == (320, 568, 0)
        assert (out.coded_width, out.coded_height) == (320, 568)


# ----------------------------------------------------------------------------- audio


@pytest.mark.media
def test_audio_copy_real_clip_is_identical(tmp_path):
    src = MEDIA / "tuneavideo_man-skiing_718x718_29.97fps_aac.mp4"
    if not src.exists():
        pytest.skip(f"real clip not found: {src} (expected ../shared/media beside the checkout)")
    dst = tmp_path / "out.mp4"
    info = probe(src)
    with VideoWriter(dst, info, **FAST) as writer:
        for batch in read_batches(info, 16):
            writer.write(batch.frames, batch.pts)
    assert audio_packets(dst) == audio_packets(src)
    before, start_before = decode_audio(src)
    after, start_after = decode_audio(dst)
    assert np.sqrt(np.mean(before ** 2)) > 0.05, "source should be loud"
    assert after.shape == before.shape and start_after == start_before
    np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize("codec", ["aac", "libmp3lame", "libopus", "ac3", "alac", "flac"])
def test_audio_codecs_mp4_can_hold_are_copied(tmp_path, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"encoder {codec} not in this FFmpeg build")
    src = make_clip(tmp_path / "src.mkv", audio_codec=codec, audio_rate=48000)
    r = roundtrip(src, tmp_path / "out.mp4", **FAST)
    check_roundtrip(r)
    assert r["out"].audio[0].codec == r["info"].audio[0].codec
    assert audio_packets(tmp_path / "out.mp4") == audio_packets(src)


@pytest.mark.parametrize("container, codec", [(".mov", "pcm_s16le"), (".mkv", "pcm_s16le"),
                                              (".mkv", "mp2")])
def test_audio_other_codecs_are_reencoded_to_aac(tmp_path, container, codec):
    src = make_clip(tmp_path / f"src{container}", audio_codec=codec, audio_rate=48000)
    r = roundtrip(src, tmp_path / "out.mp4", **FAST)
    check_roundtrip(r)
    (track,) = r["out"].audio
    assert (track.codec, track.sample_rate, track.channels) == ("aac", 48000, 2)
    before, _ = decode_audio(src)
    after, start = decode_audio(tmp_path / "out.mp4")
    assert abs(after.shape[1] - before.shape[1]) <= 2048
    assert abs(start) < 0.03
    assert np.sqrt(np.mean(after ** 2)) == pytest.approx(np.sqrt(np.mean(before ** 2)), rel=0.1)
    spectrum = np.abs(np.fft.rfft(after[0]))
    assert np.argmax(spectrum) * 48000 / len(after[0]) == pytest.approx(440, abs=5)


def test_audio_offset_and_nonzero_start_stay_in_sync(tmp_path):
    # Video starts at 1.0 s and audio at 1.25 s; the output starts at 0 with audio at 0.25 s.
    pts = [1000 + 40 * i for i in range(25)]
    src = make_clip(tmp_path / "src.mkv", pts=pts, audio_codec="pcm_s16le", audio_start=1.25,
                    audio_rate=48000)
    info = probe(src)
    assert info.start_time == pytest.approx(1.0)
    r = roundtrip(src, tmp_path / "out.mp4", **FAST)
    check_roundtrip(r)
    assert r["sec_out"][0] == pytest.approx(0.0, abs=1e-3)
    _, start = decode_audio(tmp_path / "out.mp4")
    assert start == pytest.approx(0.25, abs=0.03)


def test_audio_false_drops_audio(tmp_path):
    src = make_clip(tmp_path / "src.mp4", audio_codec="aac")
    r = roundtrip(src, tmp_path / "out.mp4", audio=False, **FAST)
    assert r["info"].audio and r["out"].audio == ()


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_dst_untouched_and_no_temp(tmp_path, error):
    src = make_clip(tmp_path / "src.mp4", audio_codec="aac")
    dst = tmp_path / "out" / "result.mp4"
    dst.parent.mkdir()
    dst.write_bytes(b"previous good output")
    info = probe(src)
    with pytest.raises(error), VideoWriter(dst, info, **FAST) as writer:
        for batch in read_batches(info, 4):
            writer.write(batch.frames, batch.pts)
            assert dst.read_bytes() == b"previous good output"
            assert len(list(dst.parent.glob(".result.partial-*.mp4"))) <= 1  # the encode thread may not have written yet
            raise error("interrupted")
    assert dst.read_bytes() == b"previous good output"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["result.mp4"]


def test_successful_write_replaces_dst_atomically(tmp_path):
    src = make_clip(tmp_path / "src.mp4")
    dst = tmp_path / "result.mp4"
    dst.write_bytes(b"old")
    info = probe(src)
    with VideoWriter(dst, info, **FAST) as writer:
        for batch in read_batches(info, 8):
            writer.write(batch.frames, batch.pts)
        assert dst.read_bytes() == b"old"
    assert probe(dst).frames == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.mp4", "src.mp4"]


def test_writer_refuses_to_overwrite_its_input(tmp_path):
    src = make_clip(tmp_path / "src.mp4")
    before = src.read_bytes()
    info = probe(src)
    link = tmp_path / "link.mp4"
    os.link(src, link)
    for dst in (src, tmp_path / "." / "src.mp4", link):
        with pytest.raises(OutputError, match="input"):
            VideoWriter(dst, info)
    assert src.read_bytes() == before


def test_writer_rejects_bad_frames_and_names(tmp_path):
    info = probe(make_clip(tmp_path / "src.mp4"))
    with pytest.raises(OutputError):
        VideoWriter(tmp_path / "out.avi", info)
    with pytest.raises(ValueError, match="64"), VideoWriter(tmp_path / "out.mp4", info, **FAST) as writer:
        writer.write(np.zeros((2, 64, 48, 3), np.uint8), [0, 1])
    with pytest.raises(ValueError, match="increase"), VideoWriter(tmp_path / "out.mp4", info, **FAST) as writer:
        writer.write(np.zeros((2, 48, 64, 3), np.uint8), [5, 5])
    with pytest.raises(OutputError, match="no frames"), VideoWriter(tmp_path / "out.mp4", info, **FAST):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.mp4"]


def test_realtime_pacing_delivers_frames_at_their_timestamps(tmp_path):
    """realtime=True: a 12-frame 24 fps clip takes about 0.5 s to arrive, and each frame's
    decoded_at is its arrival time (t0 + its timestamp)."""
    import time as _time

    from tests.conftest import write_clip

    clip = write_clip(tmp_path / "paced.mp4", frames=12, fps=24)
    start = _time.perf_counter()
    batches = list(read_batches(clip, 4, realtime=True))
    took = _time.perf_counter() - start
    assert sum(len(b.pts) for b in batches) == 12
    assert 11 / 24 - 0.05 <= took < 1.5
    arrivals = [t for b in batches for t in b.decoded_at]
    gaps = np.diff(arrivals)
    assert np.allclose(gaps, 1 / 24, atol=0.01)
