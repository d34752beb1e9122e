"""One clip split into chunks (chunks.py), in process on the tiny stack (CPU, fp32): the frames
the stylizer hands to the writer compared with the whole clip's run, and the joined file."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from stylize import video
from stylize.chunks import FrameTable, cut_before, frame_table, join, plan_chunks, run_chunk
from stylize.config import EngineConfig, OutputConfig, PipelineConfig
from stylize.errors import OutputError
from stylize.partial import partials_of
from stylize.pipeline import stylize_video
from tests.clips import audio_packets, make_clip, pattern

OIL = "transfer this to oil painting style, vibrant colors"
B = 4


def encode(path: Path, frames: np.ndarray, keyframes=(), gop=10) -> Path:
    """An H.264 clip of `frames` at 25 fps, a keyframe every `gop` frames and at each of `keyframes`."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"preset": "ultrafast", "crf": "12", "g": str(gop)})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            if i in keyframes:
                frame.pict_type = av.video.frame.PictureType.I
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def scenes(n: int, cut: int | None = None, w: int = 64, h: int = 48) -> np.ndarray:
    """A dim moving pattern; from frame `cut` on its bright negative (a scene cut)."""
    frames = np.stack([pattern(i, w, h) // 4 for i in range(n)])
    if cut is not None:
        frames[cut:] = 255 - frames[cut:]
    return frames


def adapter_engine(tiny_stack, **ecfg):
    from stylize.engine import Engine
    from tests.test_lllite import _randomise

    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=B, fixed_noise=False)
    engine = Engine(tiny_stack, cfg, EngineConfig(adapter="random", adapter_refresh_every=2, **ecfg))
    _randomise(engine.steps.lllite, seed=1)  # released weights start with up = 0; make it act
    return engine


def stylized(info, chunks, stylizer) -> tuple[np.ndarray, list[int]]:
    """What the writer would get, chunk after chunk: frames (N, H, W, 3) and their pts."""
    got = []
    for chunk in chunks:
        run_chunk(info, chunk, stylizer, got.append)
    return np.concatenate([b.frames for b in got]), [p for b in got for p in b.pts]


def whole(table, ecfg):
    return plan_chunks(table, 1, B, ecfg)


def test_split_at_a_batch_aligned_scene_cut_is_exact(tiny_stack, tmp_path):
    src = encode(tmp_path / "cut.mp4", scenes(64, cut=32), keyframes={32})
    info, table = video.probe(src), frame_table(video.probe(src))
    engine = adapter_engine(tiny_stack, te_refresh_every=3)
    ecfg = engine.ecfg
    assert cut_before(info, table, 32, ecfg.scene_cut) and not cut_before(info, table, 20, ecfg.scene_cut)
    chunks = plan_chunks(table, 2, B, ecfg, lambda k: cut_before(info, table, k, ecfg.scene_cut))
    assert [(c.feed_from, c.start, c.stop) for c in chunks] == [(0, 0, 32), (32, 32, 64)]  # no overlap
    one, one_pts = stylized(info, whole(table, ecfg), engine)
    two, two_pts = stylized(info, chunks, engine)
    assert one_pts == two_pts == list(table.pts)
    assert np.array_equal(one, two)
    engine.close()


def test_split_away_from_cuts_converges_after_the_overlap(tiny_stack, tmp_path):
    """No cut: the seam is on the refresh grid, the second chunk fed from one adapter period
    before it (decoded from the keyframe before that); from the seam + 8 frames on it is within
    2 of the whole run, and before the seam it is the whole run."""
    src = encode(tmp_path / "steady.mp4", scenes(64), gop=10)
    info, table = video.probe(src), frame_table(video.probe(src))
    engine = adapter_engine(tiny_stack)
    chunks = plan_chunks(table, 2, B, engine.ecfg, lambda k: False)
    second = chunks[1]
    assert second.start == 32 and second.feed_from == 24 and 24 not in table.keyframes
    one, _ = stylized(info, whole(table, engine.ecfg), engine)
    two, pts = stylized(info, chunks, engine)
    assert pts == list(table.pts)
    assert np.array_equal(one[:32], two[:32])
    diff = np.abs(one.astype(int) - two.astype(int))
    assert diff[40:].max() <= 2, diff.reshape(64, -1).max(axis=1)
    engine.close()


def test_plan_needs_long_enough_chunks_and_prefers_cuts():
    table = FrameTable(tuple(range(0, 6000, 10)), frozenset({0, 296, 300}))  # 600 frames
    no_adapter = EngineConfig()
    b = 8
    assert len(plan_chunks(FrameTable(table.pts[:400], table.keyframes), 2, b, no_adapter)) == 1  # < 2 x 4 periods
    grid = plan_chunks(table, 2, b, no_adapter, lambda k: False)
    assert [(c.feed_from, c.start, c.stop) for c in grid] == [(0, 0, 304), (304, 304, 600)]  # nothing carries
    cut = plan_chunks(table, 2, b, no_adapter, lambda k: k == 296)
    assert [(c.start, c.stop) for c in cut] == [(0, 296), (296, 600)] and cut[1].span == (2960, None)
    longer = FrameTable(tuple(range(0, 9000, 10)), frozenset({0}))  # 900 frames: 3 chunks of >= 4 periods
    adapter = plan_chunks(longer, 3, b, EngineConfig(adapter="random"), lambda k: False)
    # the grid: lcm(M=1, N=8) batches = 64 frames; the overlap one adapter period (8 batches)
    assert [(c.feed_from, c.start, c.stop) for c in adapter] == [(0, 0, 320), (256, 320, 576), (512, 576, 900)]


def test_joined_file_has_the_sources_frames_pts_and_audio(tiny_stack, tmp_path):
    from stylize.reference import ReferenceStylizer

    src = make_clip(tmp_path / "a.mp4", pts=[i * 40 for i in range(64)], audio_codec="aac")
    info, table = video.probe(src), frame_table(video.probe(src))
    stylizer = ReferenceStylizer(tiny_stack, PipelineConfig(prompt=OIL, size=64, batch_size=B))
    dst = tmp_path / "a_oil.mp4"
    out = OutputConfig(preset="ultrafast")
    chunks = plan_chunks(table, 2, B, EngineConfig(adapter_refresh_every=2), lambda k: False)
    assert len(chunks) == 2
    files = [Path(stylize_video(src, dst, stylizer, out, chunk=c).dst) for c in chunks]
    assert not dst.exists() and set(partials_of(dst)) == set(files)  # hidden until joined
    join(info, files, dst)
    for f in files:
        f.unlink()
    assert not partials_of(dst)
    joined = video.probe(dst)
    assert joined.frames == 64 and joined.audio and joined.duration == pytest.approx(info.duration, abs=0.001)
    with av.open(str(dst)) as c, av.open(str(src)) as s:
        assert [f.pts * f.time_base for f in c.decode(video=0)] == [f.pts * f.time_base for f in s.decode(video=0)]
    assert audio_packets(dst) == audio_packets(src)  # AAC copied packet for packet
    assert sum(len(b.pts) for b in video.read_batches(dst, 16)) == 64  # decodes to the end


def test_join_refuses_chunks_encoded_differently_and_leaves_nothing(tiny_stack, tmp_path):
    from stylize.reference import ReferenceStylizer

    src = make_clip(tmp_path / "a.mp4", pts=[i * 40 for i in range(64)])
    info, table = video.probe(src), frame_table(video.probe(src))
    stylizer = ReferenceStylizer(tiny_stack, PipelineConfig(prompt=OIL, size=64, batch_size=B))
    dst = tmp_path / "a_oil.mp4"
    chunks = plan_chunks(table, 2, B, EngineConfig(adapter_refresh_every=2), lambda k: False)
    files = [Path(stylize_video(src, dst, stylizer, OutputConfig(preset=p), chunk=c).dst)
             for c, p in zip(chunks, ("ultrafast", "medium"))]  # fmt: skip
    with pytest.raises(OutputError, match="different parameters"):
        join(info, files, dst)
    assert not dst.exists() and set(partials_of(dst)) == set(files)


def test_splits_own_finished_chunks_and_remove_them_when_the_clip_fails(tmp_path):
    """A finished chunk becomes the parent's partial file (a dead worker's are removed by others,
    not it); a failed chunk fails its clip once and removes the clip's finished chunks; the rest
    go when the run stops."""
    import os
    from types import SimpleNamespace

    from stylize.chunks import Splits
    from stylize.jobs import Job
    from stylize.partial import run_id

    job = Job(tmp_path / "a.mp4", tmp_path / "a_oil.mp4")
    splits = Splits()
    splits.add(job, None, 3)
    worker_file = tmp_path / ".a_oil.partial-abcdef-999999-1a2b3c.mp4"  # as a worker names it
    worker_file.write_bytes(b"chunk 0")
    task = SimpleNamespace(job=job, chunk=SimpleNamespace(index=0))
    assert splits.done(task, SimpleNamespace(dst=str(worker_file)), {}) is None  # 1 of 3
    (mine,) = partials_of(job.dst)
    assert run_id() in mine.name and mine.read_bytes() == b"chunk 0"
    assert splits.failed(task) and not splits.failed(task)  # the clip fails once
    assert not partials_of(job.dst)
    late = tmp_path / ".a_oil.partial-abcdef-999998-4d5e6f.mp4"
    late.write_bytes(b"chunk 1")
    assert (
        splits.done(SimpleNamespace(job=job, chunk=SimpleNamespace(index=1)), SimpleNamespace(dst=str(late)), {})
        is None
    )
    assert not partials_of(job.dst) and not os.listdir(tmp_path)
    other = Job(tmp_path / "b.mp4", tmp_path / "b_oil.mp4")
    splits.add(other, None, 2)
    (tmp_path / ".b_oil.partial-abcdef-999997-0a0b0c.mp4").write_bytes(b"chunk 0")
    splits.done(SimpleNamespace(job=other, chunk=SimpleNamespace(index=0)),
                SimpleNamespace(dst=str(tmp_path / ".b_oil.partial-abcdef-999997-0a0b0c.mp4")), {})  # fmt: skip
    splits.discard_all()  # a signal, or the run's end: nothing of ours stays
    assert not os.listdir(tmp_path)
