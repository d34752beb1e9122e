"""Tests for stylize.writer: atomic H.264/MP4 writing with audio, round trips through decode and
encode. The real clips in ../shared/media (beside the checkout) are round-tripped in full when that
folder exists. Encoding uses preset "ultrafast" to keep the file fast on small machines; the
default (medium) is exercised once.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction

import av
import numpy as np
import pytest

from stylize.errors import OutputError
from stylize.video import probe, read_batches
from stylize.writer import VideoWriter

from tests.clips import (MEDIA, FAST, pattern, sine, make_clip, make_image_folder, decode_audio, audio_packets, roundtrip, check_roundtrip, decode_threads)  # noqa: F401


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
