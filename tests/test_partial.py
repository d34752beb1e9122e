"""Partial outputs are named by their run; the next attempt at a destination removes those that a
run killed outright left, and leaves live runs' alone (issue #17: a retried worker leaves nothing)."""

import subprocess
import sys

from stylize import partial


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partial_names_carry_the_run(tmp_path):
    path = partial.partial_path(tmp_path / "clip_oil.mp4")
    assert path.parent == tmp_path and path.name.startswith(f".clip_oil.partial-{partial.run_id()}-")
    assert path.suffix == ".mp4" and partial.partials_of(tmp_path / "clip_oil.mp4") == []
    path.touch()
    assert partial.partials_of(tmp_path / "clip_oil.mp4") == [path]
    assert partial.partials_of(tmp_path / "clip.mp4") == []  # another output's are not its own


def test_a_dead_runs_partial_is_removed_a_live_ones_kept(tmp_path):
    dst = tmp_path / "a_oil.mp4"
    dead = tmp_path / f".a_oil.partial-{partial.HOST}-{_dead_pid()}-abc123.mp4"
    live = tmp_path / f".a_oil.partial-{partial.HOST}-1-abc123.mp4"  # pid 1 is always alive
    mine = partial.partial_path(dst)
    other_host = tmp_path / ".a_oil.partial-ffffff-12345-abc123.mp4"
    other_output = tmp_path / f".b_oil.partial-{partial.HOST}-{_dead_pid()}-abc123.mp4"
    for p in (dead, live, mine, other_host, other_output):
        p.touch()
    if partial.HOST == "ffffff":  # pragma: no cover - a host whose hash is that
        other_host.unlink()
    assert partial.remove_predecessors(dst) == [dead]
    assert live.exists() and mine.exists() and other_output.exists()
    # a retry that knows the earlier attempt is over (a cluster's task) removes all but its own
    partial.remove_predecessors(dst, everyone=True)
    assert mine.exists() and not live.exists() and other_output.exists()


def test_the_writer_removes_a_killed_runs_partial(tmp_path):
    import numpy as np

    from stylize import video
    from stylize.writer import VideoWriter
    from tests.clips import make_clip

    src = make_clip(tmp_path / "src.mp4", pts=[0, 40], size=(32, 32))
    dst = tmp_path / "out.mp4"
    stale = tmp_path / f".out.partial-{partial.HOST}-{_dead_pid()}-abc123.mp4"
    stale.write_bytes(b"half a file")
    info = video.probe(src)
    with VideoWriter(dst, info, audio=False) as w:
        for batch in video.read_batches(info, 2):
            w.write(np.zeros((len(batch.pts), 32, 32, 3), np.uint8), batch.pts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "src.mp4"]
