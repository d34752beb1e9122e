"""Tests for stylize.video (the reader): probe, batched decode on its own thread, orientation,
colour, pacing. The writer's tests are in test_writer.py.

Most tests use tiny clips generated here with PyAV (tests/clips.py).
"""

from __future__ import annotations

import gc
import os
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from stylize.errors import InputError
from stylize.video import FrameBatch, VideoInfo, probe, read_batches
from stylize.writer import VideoWriter

from tests.clips import (MEDIA, FAST, pattern, sine, make_clip, make_image_folder, decode_audio, audio_packets, roundtrip, check_roundtrip, decode_threads)  # noqa: F401


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
