"""`--gpus` (workers.py) on the CPU: `--device cpu --gpus 2` runs two worker processes, the same
code path as two GPUs. Sharding, skip/-y/exit codes, a worker killed mid-clip (its clip retried),
a clip whose workers die twice (stand-in workers), a signal to the parent, one clip split across
the workers, and the option's errors."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stylize import video
from stylize.cli import run_app
from stylize.config import parse_gpus
from stylize.errors import UsageError
from stylize.signals import PAUSE_AT
from stylize.workers import worker_env
from tests.conftest import write_clip

FAST = ["--model", "tiny", "--size", "64", "--preset", "ultrafast", "--batch-size", "4", "--device", "cpu"]
PARTIAL = re.compile(r"^\.(?P<stem>.+)\.partial-[0-9a-f]{6}-(?P<pid>\d+)-[0-9a-f]+\.mp4$")


def invoke(*args):
    return CliRunner().invoke(run_app, [str(a) for a in args], catch_exceptions=False)


def partials(folder: Path) -> dict[str, int]:
    """stem -> pid of the process writing it, for every partial output in `folder`."""
    found = {}
    for p in folder.iterdir():
        m = PARTIAL.match(p.name)
        if m:
            found[m["stem"]] = int(m["pid"])
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (killed, not yet reaped) is gone for us
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_for(predicate, timeout=60.0):
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_dir):
    """One run over a folder of three clips of different lengths, a still and a broken clip, with
    -y over an old output of the longest; that clip's worker is SIGKILLed mid-clip, paused at its
    first encoded batch by the test hook (the other pauses are released as they come)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("sharded")
    for name, frames in (("short", 6), ("long", 20), ("mid", 12)):
        write_clip(root / f"{name}.mp4", frames=frames)
    (root / "broken.mp4").write_bytes(b"not a video" * 10)
    Image.fromarray(np.full((40, 56, 3), 120, np.uint8)).save(root / "still.png")
    (root / "long_oil.mp4").write_bytes(b"old output")
    marker = root.parent / f"{root.name}.paused"
    killed, stop = [], threading.Event()

    def writing_long():
        pid = partials(root).get("long_oil")
        return pid if pid is not None and alive(pid) and marker.exists() else None

    def killer():
        pid = wait_for(writing_long)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        while not stop.is_set():
            marker.unlink(missing_ok=True)
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    old = os.environ.get(PAUSE_AT)
    os.environ[PAUSE_AT] = f"encode:{marker}"  # the workers inherit it
    thread.start()
    try:
        r = invoke(root, "--style", "oil", "--json", "--stills", "-y", "--gpus", "2", *FAST)
    finally:
        stop.set()
        thread.join(5)
        os.environ.pop(PAUSE_AT) if old is None else os.environ.update({PAUSE_AT: old})
    return root, r, killed


def test_gpus_2_writes_every_output_with_its_worker(sharded):
    root, r, _ = sharded
    assert r.exit_code == 1, r.output  # the broken clip failed; the rest went on
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(Path(rec["dst"]).name for rec in records) == ["long_oil.mp4", "mid_oil.mp4", "short_oil.mp4",
                                                                  "still_oil.png"]  # fmt: skip
    assert all(rec["gpu"] in (0, 1) and rec["status"] == "ok" for rec in records)
    ends = [rec["process_s_at_end"] for rec in records]
    assert ends == sorted(ends)  # printed by the parent as each completes
    for name, frames in (("short", 6), ("long", 20), ("mid", 12)):
        assert video.probe(root / f"{name}_oil.mp4").frames == frames
    assert "broken.mp4" in r.stderr and "4 of 5 inputs done, 1 failed" in r.stderr
    assert not partials(root)


def test_a_worker_killed_mid_clip_has_its_clip_retried(sharded):
    """The long clip's worker died mid-clip: the clip was run again and written whole over the old
    output (-y, checked above), and the dead worker's partial file is gone."""
    root, _, killed = sharded
    assert len(killed) == 1 and not alive(killed[0])
    assert video.probe(root / "long_oil.mp4").frames == 20 and not partials(root)


def test_gpus_skips_existing_outputs(sharded):
    root, _, _ = sharded
    done = [root / f"{n}.mp4" for n in ("short", "long", "mid")]
    r = invoke(*done, "--style", "oil", "--gpus", "2", *FAST)
    assert r.exit_code == 0 and r.stdout == ""
    assert "nothing to do: all 3 outputs exist" in r.stderr


@pytest.mark.parametrize(
    ("spec", "message"),
    [("x", "expected all"), ("0", "at least 1"), ("1,1", "given twice"), ("999", "only"), ("999,", "no CPU core 999"),
     ("all", "--gpus N")],
)  # fmt: skip
def test_gpus_errors_are_one_line_usage_errors(clip, spec, message):
    r = invoke(clip, "--style", "oil", "--gpus", spec, *FAST)
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not clip.with_name("clip_oil.mp4").exists()


def test_gpus_selection_and_visible_devices():
    assert parse_gpus(None) is None
    assert parse_gpus("all").resolve(3, "cuda") == (0, 1, 2)
    assert parse_gpus("2").resolve(3, "cuda") == (0, 1)
    assert parse_gpus("0,2").resolve(3, "cuda") == (0, 2)
    assert parse_gpus("2,").resolve(3, "cuda") == (2,)
    with pytest.raises(UsageError, match="no GPU 3"):
        parse_gpus("0,3").resolve(3, "cuda")
    with pytest.raises(UsageError, match="only 2 GPUs"):
        parse_gpus("4").resolve(2, "cuda")
    # indices count within the parent's CUDA_VISIBLE_DEVICES
    assert worker_env(1, "cuda", "4,5,6") == "5" and worker_env(2, "cuda", "GPU-a,GPU-b,GPU-c") == "GPU-c"
    assert worker_env(0, "cpu", "4,5") == ""


def stand_in_worker(conn, cuda_visible, threads, opts, device, clips, debug):
    """A worker without a model (Pool(target=)): it opens each task's partial output as a real
    one does, then dies outright on an input named die*, else writes the output."""
    from stylize.partial import partial_path
    from stylize.pipeline import RunStats

    conn.send(("ready", 0.0))
    while (task := conn.recv()) is not None:
        tmp = partial_path(task.job.dst)
        tmp.write_bytes(b"half")
        if task.job.src.name.startswith("die"):
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, task.job.dst)
        conn.send(("done", RunStats(str(task.job.src), str(task.job.dst), 1, 0.1, 10.0, 1, 1, 8, 8, 0.1), {}))


def test_a_clip_whose_worker_dies_twice_fails_and_the_rest_go_on(tmp_path):
    from stylize.jobs import Job
    from stylize.workers import Events, Pool, Task

    jobs = [Job(tmp_path / f"{name}.mp4", tmp_path / f"{name}_oil.mp4") for name in ("die", "ok1", "ok2", "ok3")]
    done, failed = [], []
    events = Events(done=lambda task, stats, extra: done.append((task.job.src.name, extra["gpu"])),
                    failed=lambda task, message, tb: failed.append((task.job.src.name, message)))  # fmt: skip
    pool = Pool(None, "cpu", (0, 3), events, target=stand_in_worker)
    assert pool.run([Task(n, job) for n, job in enumerate(jobs)]) == 1
    assert failed == [("die.mp4", failed[0][1])] and "died twice" in failed[0][1] and "signal 9" in failed[0][1]
    assert sorted(name for name, _ in done) == ["ok1.mp4", "ok2.mp4", "ok3.mp4"]
    assert {gpu for _, gpu in done} <= {0, 3}  # the indices as given
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok1_oil.mp4", "ok2_oil.mp4", "ok3_oil.mp4"]


def test_signal_to_the_parent_stops_the_workers_and_removes_partials(tmp_path, tiny_dir, monkeypatch):
    """SIGTERM to the parent (this process, inside the run's signal handling) while both workers
    are mid-clip: the workers end, no partial file is left, the output that existed is
    untouched, and the run reports 128 + 15 (which the console script turns into dying of it)."""
    a, b = write_clip(tmp_path / "a.mp4", frames=16), write_clip(tmp_path / "b.mp4", frames=12)
    old = tmp_path / "a_oil.mp4"
    old.write_bytes(b"old output")
    marker = tmp_path / "paused"
    monkeypatch.setenv(PAUSE_AT, f"encode:{marker}")
    writing = {}

    def terminate():
        writing.update(wait_for(lambda: (p := partials(tmp_path)) and len(p) == 2 and marker.exists() and p))
        os.kill(os.getpid(), signal.SIGTERM)  # the run's handler has it: the pool is running

    thread = threading.Thread(target=terminate, daemon=True)
    thread.start()
    r = invoke(a, b, "--style", "oil", "-y", "--gpus", "2", *FAST)
    thread.join(5)
    assert r.exit_code == 128 + signal.SIGTERM and "terminated" in r.stderr, r.output
    assert writing and not any(alive(pid) for pid in writing.values())
    assert not partials(tmp_path) and old.read_bytes() == b"old output" and not (tmp_path / "b_oil.mp4").exists()


def test_one_long_clip_is_split_across_the_workers_and_joined(tmp_path, tiny_dir):
    """More workers than clips: the clip runs as two chunks, one per worker, joined into one file
    with the source's frames, timestamps and audio; one record, naming both chunks' workers."""
    import av

    from tests.clips import audio_packets, make_clip

    src = make_clip(tmp_path / "long.mp4", pts=[i * 40 for i in range(64)], audio_codec="aac")
    r = invoke(src, "--style", "oil", "--json", "--gpus", "2", "--adapter-every", "2", *FAST)
    assert r.exit_code == 0, r.output
    (record,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert record["chunks"] == 2 and len(record["gpu"]) == 2 and record["frames"] == 64
    dst = tmp_path / "long_oil.mp4"
    with av.open(str(dst)) as out, av.open(str(src)) as source:
        assert [f.pts * f.time_base for f in out.decode(video=0)] == [
            f.pts * f.time_base for f in source.decode(video=0)
        ]
    assert audio_packets(dst) == audio_packets(src)
    assert not partials(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4", "long_oil.mp4"]
