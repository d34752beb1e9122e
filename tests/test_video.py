"""Tests for stylize.video (the reader): probe, batched decode on its own thread, orientation,
colour, pacing. The writer's tests are in test_writer.py.

Most tests use tiny clips generated here with PyAV (tests/clips.py).
"""

from __future__ import annotations

import gc
import os
import struct
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from stylize.errors import InputError
from stylize.video import FrameBatch, VideoInfo, probe, read_batches
from stylize.writer import VideoWriter
from tests.clips import (  # noqa: F401
    FAST,
    MEDIA,
    audio_packets,
    check_roundtrip,
    decode_audio,
    decode_threads,
    make_clip,
    make_image_folder,
    pattern,
    roundtrip,
    sine,
)


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
            format="yuv444p",
            dst_colorspace=getattr(Colorspace, matrix),
            src_color_range=ColorRange.JPEG,
            dst_color_range=ColorRange.MPEG,
        )
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


# ----------------------------------------------------------------------------- damaged inputs (found by test_fuzz.py)


def _damaged_mkv(tmp_path: Path, old: bytes, new: bytes) -> Path:
    """A Matroska clip (H.264, 3 frames, PCM audio) with one run of bytes replaced, same length."""
    clip = make_clip(tmp_path / "clip.mkv", pts=[0, 40, 80], audio_codec="pcm_s16le", audio_rate=8000, channels=1)
    data = clip.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    damaged = tmp_path / "damaged.mkv"
    damaged.write_bytes(data.replace(old, new))
    return damaged


def _write_all(src: Path, dst: Path, audio: bool = True) -> None:
    info = probe(src)
    with VideoWriter(dst, info, audio=audio, **FAST) as writer:
        for batch in read_batches(info, 4):
            writer.write(batch.frames, batch.pts)


@pytest.mark.parametrize("old, new, problem", [
    (b"A_PCM/INT/LIT", b"A_XXX/INT/LIT", "has an unknown codec"),  # was AttributeError in probe
    (b"\xb5\x88" + struct.pack(">d", 8000.0), b"\xb5\x88" + struct.pack(">d", 5.0), "has a sample rate of 5 Hz"),
], ids=["unknown-codec", "5-hz"])  # fmt: skip
def test_unusable_audio_track_is_refused_with_a_way_out(tmp_path, old, new, problem):
    """A track no decoder knows (a damaged codec tag) made probe raise AttributeError; one whose
    header says 5 Hz had the writer resample its samples into minutes of AAC (seconds of work for
    a 5 kB file, hours for a large one). Both: one line naming the file and --no-audio, nothing
    left beside the output; with audio off the clip goes through."""
    src = _damaged_mkv(tmp_path, old, new)
    assert probe(src).audio[0].problem == problem
    start = time.perf_counter()
    with pytest.raises(InputError) as error:
        _write_all(src, tmp_path / "out.mp4")
    assert time.perf_counter() - start < 2
    message = str(error.value)
    assert message.startswith(f"{src}: audio track 1 {problem}") and "--no-audio" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mkv", "damaged.mkv"]
    _write_all(src, tmp_path / "out.mp4", audio=False)
    assert probe(tmp_path / "out.mp4").audio == ()


def test_video_stream_without_a_decoder_says_so(tmp_path):
    src = _damaged_mkv(tmp_path, b"V_MPEG4/ISO/AVC", b"V_XXXXX/ISO/AVC")
    with pytest.raises(InputError, match="the video stream's codec is unknown"):
        probe(src)


def _damaged_png(tmp_path: Path, damage: str) -> bytes:
    """A 64x48 PNG with an EXIF block, damaged as the fuzzer found (CRCs mended where Pillow checks)."""
    from PIL import Image

    from tests.fuzzing import mend_crc, png_chunks

    path = tmp_path / "good.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: Pillow parses the block to turn the picture
    Image.fromarray(pattern(0, 64, 48)).save(path, exif=exif)
    data = bytearray(path.read_bytes())
    path.unlink()
    chunks = {c.tag: c for c in png_chunks(bytes(data))}
    if damage == "chunk length":  # IDAT's length halved: its tail is read as the next chunk
        idat = chunks[b"IDAT"]
        data[idat.at : idat.at + 4] = ((idat.size - 12) // 2).to_bytes(4, "big")
    elif damage == "exif header":  # no longer a TIFF header
        data[chunks[b"eXIf"].data] = 0x0D
        mend_crc(data, chunks[b"eXIf"])
    elif damage == "empty iCCP":  # IEND (no data) renamed
        data[chunks[b"IEND"].at + 4 : chunks[b"IEND"].at + 8] = b"iCCP"
        mend_crc(data, chunks[b"IEND"])
    else:  # a decompression bomb: 20000 x 20000 pixels
        data[chunks[b"IHDR"].data : chunks[b"IHDR"].data + 8] = (20000).to_bytes(4, "big") * 2
        mend_crc(data, chunks[b"IHDR"])
    return bytes(data)


@pytest.mark.parametrize("damage", ["chunk length", "exif header", "empty iCCP", "bomb"])
def test_damaged_image_is_an_input_error(tmp_path, damage):
    """Pillow raises SyntaxError (a broken chunk, a broken EXIF block), IndexError (an empty iCCP
    chunk) and DecompressionBombError, not only OSError and ValueError: each escaped the frame
    reader (a folder's frame) and read_still (a still) as a crash."""
    from stylize.stills import read_still

    data = _damaged_png(tmp_path, damage)
    folder = make_image_folder(tmp_path / "frames", count=3)
    (folder / "00001.png").write_bytes(data)
    with pytest.raises(InputError, match="00001.png: cannot read this image"):
        for _ in read_batches(folder, 1):
            pass
    (tmp_path / "still.png").write_bytes(data)
    with pytest.raises(InputError, match="still.png: cannot read this image"):
        read_still(tmp_path / "still.png")


def test_mp4_track_id_out_of_range_is_refused(tmp_path):
    """A fragmented MP4 whose track id is 2^31 or more (FFmpeg reads it as negative) costs FFmpeg
    ~2 s per open, and the file was opened three times (probe, decoder, audio copy): a 4 kB clip
    took 9 s. probe now refuses it after the first."""
    from tests.fuzzing import mp4_boxes, muxed_clip

    src = muxed_clip(tmp_path / "frag.mp4", "libx264", "aac", 8000, {"movflags": "frag_keyframe+empty_moov"})
    data = bytearray(src.read_bytes())
    tkhd = next(b for b in mp4_boxes(bytes(data)) if b.tag == b"tkhd")
    data[tkhd.at + 20] |= 0x80  # the video track's id, + 2^31
    src.write_bytes(data)
    with pytest.raises(InputError, match="track id is out of range"):
        probe(src)


def test_frames_over_the_size_limit_are_refused(tmp_path, monkeypatch):
    """A damaged header can decode as a huge frame (FFmpeg allows 16k x 16k), and a batch of them
    would take gigabytes: frames over MAX_PIXELS are refused at probe, for files and folders."""
    import stylize.video

    monkeypatch.setattr(stylize.video, "MAX_PIXELS", 64 * 48 - 1)
    with pytest.raises(InputError, match="64x48 are larger than this tool reads"):
        probe(make_clip(tmp_path / "clip.mp4", pts=[0, 40]))
    with pytest.raises(InputError, match="00000.png: frames of 64x48 are larger"):
        probe(make_image_folder(tmp_path / "frames", count=2))


def test_start_time_is_never_after_the_first_frame(tmp_path):
    """FFmpeg's Matroska reader gives a 3-frame clip whose audio starts at 0.5 s a start time of
    0.5 s for its video too. The writer shifted every frame by it, to negative times, and the
    output's video did not decode (found by the fuzzer as a damaged audio block timestamp)."""
    clip = make_clip(tmp_path / "late.mkv", pts=[0, 40, 80], audio_codec="pcm_s16le", audio_rate=8000, channels=1,
                     audio_start=0.5)  # fmt: skip
    assert probe(clip).start_time == 0
    r = roundtrip(clip, tmp_path / "out.mp4", **FAST)
    np.testing.assert_allclose(r["sec_out"], [0, 0.04, 0.08], atol=1e-3)
    assert decode_audio(tmp_path / "out.mp4")[1] > 0.3  # the audio still starts later


def test_file_whose_open_holds_absurd_memory_is_refused(tmp_path, monkeypatch):
    """A fragmented MP4 whose trun box says 1 (a 64-bit size follows) made FFmpeg hold 1.2 GB per
    open for a 4 kB file; the decoder and the audio copy open it at once: 2.8 GiB at the peak.
    probe measures what opening the file holds and refuses the file past a limit (lowered here:
    a trun claiming 2M samples holds ~70 MB)."""
    import stylize.video
    from tests.fuzzing import mp4_boxes, muxed_clip

    src = muxed_clip(tmp_path / "frag.mp4", "libx264", "aac", 8000, {"movflags": "frag_keyframe+empty_moov"})
    data = bytearray(src.read_bytes())
    last = [b for b in mp4_boxes(bytes(data)) if b.tag == b"trun"][-1]
    data[last.at + 12 : last.at + 16] = (2_000_000).to_bytes(4, "big")  # its sample count
    src.write_bytes(data)
    monkeypatch.setattr(stylize.video, "OPEN_MEMORY_BYTES", 16 << 20)
    with pytest.raises(InputError, match=r"opening it takes \d+ MB of memory"):
        probe(src)
