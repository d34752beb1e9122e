"""SIGINT, SIGTERM and SIGHUP sent to a real `python -m stylize` at three named points (the
STYLIZE_TEST_PAUSE_AT hook of signals.py): during the model load, mid-encode and during the audio
remux. Each run must die of its signal within 5 s (its parent sees -N, a shell 128 + N, and a loop
over files stops at Ctrl-C), leave no partial file, keep the clip it finished before intact and its
inputs untouched; a SIGHUP ignored from the start (nohup) stays ignored.

The runs all start together and one polling loop drives them: each costs seconds of imports,
which two cores then overlap, and the hook holds each at its point for as long as the loop needs."""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stylize import video
from stylize.signals import GRACE_S, PAUSE_AT
from tests.conftest import write_clip

FAST = ["--style", "oil", "--model", "tiny", "--size", "64", "--preset", "ultrafast", "--batch-size", "4",
        "--device", "cpu"]  # fmt: skip
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}
STAGES = ("load", "encode", "remux")
EXIT_S = 5.0  # from the signal to the process's end (issue #16)
FRAMES = {"a.mp4": 4, "b.mp4": 10}  # a: one batch, finished before b; b: three
STYLIZE = shlex.join([sys.executable, "-m", "stylize"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def _ignore_sighup() -> None:  # what `nohup` does before it runs the command
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class Run:
    """One run over a folder of a.mp4 and b.mp4 (with audio), held at `stage` each time it gets
    there. It is sent `sig` (to the whole process group with `group`, as a terminal's Ctrl-C is) at
    its first arrival for "load", else at the first once b's partial file exists (a is done by then;
    the encoder opens its file with its first packets, a few frames in); other arrivals go on.
    `shell` is a bash script run in the folder instead of `stylize FOLDER`; `nohup` starts the run
    with SIGHUP ignored."""

    def __init__(self, root: Path, stage: str, sig: int, shell: str | None = None, group=False, nohup=False):
        self.stage, self.sig, self.group, self.nohup = stage, sig, group, nohup
        self.folder = root / f"{signal.Signals(sig).name}-{stage}{'-nohup' if nohup else ''}" / "clips"
        self.folder.mkdir(parents=True)
        for name, frames in FRAMES.items():
            write_clip(self.folder / name, frames=frames, audio=True)
        self.inputs = {name: _sha(self.folder / name) for name in FRAMES}
        self.marker = self.folder.parent / "held"
        self.log = self.folder.parent / "log"
        env = {**os.environ, PAUSE_AT: f"{stage}:{self.marker}", "OMP_NUM_THREADS": "1"}  # 2 cores, many runs
        cmd = ["bash", "-c", shell] if shell else [sys.executable, "-m", "stylize", str(self.folder), *FAST]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_ignore_sighup if nohup else None,
            )  # fmt: skip
        self.signalled: float | None = None
        self.partials_when_signalled: list[str] = []
        self.alive_after_signal: bool | None = None
        self.returncode: int | None = None
        self.exit_s: float | None = None

    def step(self) -> None:
        if self.returncode is not None:
            return
        code = self.proc.poll()
        if code is not None:
            self.returncode = code
            self.exit_s = None if self.signalled is None else time.monotonic() - self.signalled
            return
        if self.signalled is not None and not self.nohup:
            if time.monotonic() - self.signalled > 2 * EXIT_S:  # long overdue: stop waiting for it
                os.killpg(self.proc.pid, signal.SIGKILL)
            return
        if not self.marker.exists():
            return
        partials = _partials(self.folder)
        if self.signalled is None and (self.stage == "load" or any(p.startswith(".b_oil.") for p in partials)):
            self.partials_when_signalled = partials
            self.signalled = time.monotonic()
            if self.group:
                os.killpg(self.proc.pid, self.sig)
            else:
                os.kill(int(self.marker.read_text()), self.sig)  # the stylize process, under a shell too
            if not self.nohup:
                return
            time.sleep(0.5)  # a handled signal would have ended it by now
            self.alive_after_signal = self.proc.poll() is None
        self.marker.unlink()  # go on

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """Every run of the matrix, driven to its end: {(signal name, stage): Run}, plus "nohup"."""
    root = tmp_path_factory.mktemp("signals")
    runs = {}
    for name, sig in SIGNALS.items():
        for stage in STAGES:
            shell = None
            if (name, stage) == ("SIGTERM", "encode"):  # what a shell sees, as `stylize ...; echo $?`
                shell = f'{STYLIZE} . {shlex.join(FAST)}; echo "status $?"'
            if (name, stage) == ("SIGINT", "load"):  # Ctrl-C at a terminal: the whole group gets it
                shell = f'for f in *.mp4; do {STYLIZE} "$f" {shlex.join(FAST)}; done; echo "the loop went on"'
            runs[name, stage] = Run(root, stage, sig, shell, group=name == "SIGINT" and stage == "load")
    runs["nohup"] = Run(root, "encode", signal.SIGHUP, nohup=True)
    give_up = time.monotonic() + 300
    try:
        while any(run.returncode is None for run in runs.values()):
            assert time.monotonic() < give_up, {k: run.output() for k, run in runs.items() if run.returncode is None}
            for run in runs.values():
                run.step()
            time.sleep(0.02)
    finally:
        for run in runs.values():
            if run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
    return runs


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", SIGNALS)
def test_signal_cleans_up_and_kills(runs, name, stage):
    run, sig = runs[name, stage], SIGNALS[name]
    log = run.output()
    assert run.signalled is not None, f"never reached {stage}: {log}"
    assert run.exit_s < EXIT_S, log
    if (name, stage) == ("SIGTERM", "encode"):
        assert run.returncode == 0 and "status 143" in log.splitlines(), log  # 128 + SIGTERM, as a shell sees it
    else:  # killed by the signal; for the shell loop, bash itself: the loop stopped at Ctrl-C
        assert run.returncode == -sig, log
        assert "the loop went on" not in log
    assert _partials(run.folder) == []
    assert {clip: _sha(run.folder / clip) for clip in FRAMES} == run.inputs
    if stage == "load":  # nothing written yet; the shell loop did not go on to b.mp4
        assert sorted(p.name for p in run.folder.iterdir()) == sorted(FRAMES)
        return
    assert [p.split("-")[0] for p in run.partials_when_signalled] == [".b_oil.partial"]
    done = video.probe(run.folder / "a_oil.mp4")  # the clip finished before the signal is whole
    assert done.frames == FRAMES["a.mp4"] and done.audio
    assert not (run.folder / "b_oil.mp4").exists()


def test_ignored_sighup_stays_ignored(runs):
    """Under nohup (SIGHUP ignored from the start) a SIGHUP mid-encode changes nothing."""
    run = runs["nohup"]
    assert run.signalled is not None and run.alive_after_signal, run.output()
    assert run.returncode == 0, run.output()
    for name, frames in FRAMES.items():
        assert video.probe(run.folder / name.replace(".mp4", "_oil.mp4")).frames == frames
    assert _partials(run.folder) == []


# ----------------------------------------------------------------------------- the clean-up's limits

HELD = """
import pathlib, sys, time
from stylize import signals
with signals.handled():
    try:
        pathlib.Path(sys.argv[1]).write_text("running")
        time.sleep(60)
    except signals.Signalled:
        pathlib.Path(sys.argv[1]).write_text("cleaning up")
        time.sleep(60)  # a clean-up that hangs
"""


def _held(tmp_path: Path, state: str) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-c", HELD, str(marker)])
    give_up = time.monotonic() + 30
    while not (marker.exists() and marker.read_text() == state):
        assert time.monotonic() < give_up and proc.poll() is None
        time.sleep(0.02)
    return proc, marker


def test_a_clean_up_that_hangs_is_cut_short(tmp_path):
    proc, marker = _held(tmp_path, "running")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=GRACE_S + 5) == -signal.SIGTERM
    assert marker.read_text() == "cleaning up"
    assert GRACE_S - 0.5 < time.monotonic() - started < EXIT_S


def test_a_second_signal_ends_it_at_once(tmp_path):
    proc, _ = _held(tmp_path, "running")
    proc.send_signal(signal.SIGTERM)
    give_up = time.monotonic() + 10
    while (tmp_path / "state").read_text() != "cleaning up":
        assert time.monotonic() < give_up
        time.sleep(0.02)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=GRACE_S + 5) == -signal.SIGINT
    assert time.monotonic() - started < GRACE_S - 1


def test_writer_stops_its_encoder_before_closing_the_file(tmp_path, monkeypatch):
    """A signal that cuts short the wait for the encode thread at the end of a clip must not close
    the file under that thread (FFmpeg would mux into a freed context): it is stopped first."""
    from stylize.writer import VideoWriter

    info = video.probe(write_clip(tmp_path / "in.mp4", frames=8))
    encode, discard = VideoWriter._write_now, VideoWriter._discard
    encoding_at_discard = []

    def slow_encode(self, frames, pts):
        time.sleep(0.3)
        encode(self, frames, pts)

    def watched_discard(self):
        encoding_at_discard.append(any(t.name.startswith("encode:") for t in threading.enumerate()))
        discard(self)

    class Cut(Exception):
        pass

    def cut(signum, frame):
        raise Cut

    monkeypatch.setattr(VideoWriter, "_write_now", slow_encode)
    monkeypatch.setattr(VideoWriter, "_discard", watched_discard)
    previous = signal.signal(signal.SIGALRM, cut)
    try:
        with pytest.raises(Cut), VideoWriter(tmp_path / "out.mp4", info, preset="ultrafast") as writer:
            for batch in video.read_batches(info, 2):
                writer.write(batch.frames, batch.pts)
            signal.setitimer(signal.ITIMER_REAL, 0.2)  # fires while the exit waits ~1.2 s for the encoder
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert encoding_at_discard and not any(encoding_at_discard)
    assert [p.name for p in tmp_path.iterdir()] == ["in.mp4"]
