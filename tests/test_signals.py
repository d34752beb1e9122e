"""SIGINT, SIGTERM and SIGHUP sent to `python -m stylize` runs at three named points (the
STYLIZE_TEST_PAUSE_AT hook of signals.py): during the model load, mid-encode and during the audio
remux. Each run must die of its signal within 5 s (its parent sees -N, a shell 128 + N, and a loop
over files stops at Ctrl-C), leave no partial file, keep the clip it finished before intact and its
inputs untouched; a SIGHUP ignored from the start (nohup) stays ignored.

A process spends ~5 CPU-s importing torch, diffusers, transformers and av before it does anything,
so the runs are forked from a zygote, one process that has imported them and built nothing: a
child takes its case's session, cwd, environment, argv and log (under nohup, SIGHUP ignored, as
nohup leaves it to the command it executes), then runs `python -m stylize` as the interpreter does
(runpy), and the zygote hands back its raw wait status: a death by a signal looks to the test as it
does to any parent. The two runs under a shell stay real processes, a bash loop and a shell's $?.
All start together and one polling loop drives them; the hook holds each at its point for as long
as the loop needs."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stylize import video
from stylize.signals import GRACE_S, PAUSE_AT
from tests.conftest import REPO, write_clip

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


# ----------------------------------------------------------------------------- the zygote

# What a run imports (cli.py, pipeline.py, models/loading.py); diffusers and transformers import a
# class on its first use, so the loader's are named.
PRELOAD = {
    "stylize.cli": (), "stylize.models": (), "stylize.pipeline": (), "stylize.stills": (), "torch": (), "av": (),
    "diffusers": ("AutoencoderTiny", "DreamLiteUNetModel", "FlowMatchEulerDiscreteScheduler"),
    "transformers": ("AutoTokenizer", "Qwen3VLModel"),
}  # fmt: skip
# The zygote's script: a forked child returns from serve() and goes on as `python -m stylize` does.
ZYGOTE = """
from tests import test_signals
test_signals.become(test_signals.serve())
import runpy
runpy.run_module("stylize", run_name="__main__", alter_sys=True)
"""


def serve() -> dict:
    """The zygote: imports PRELOAD, then reads requests on stdin, a JSON line each ({id, argv, env,
    cwd, log, nohup}), forks a child for each and answers on stdout {id, pid}, then, once that child
    has ended, {id, status} with its raw wait status. Returns in a forked child only: its request."""
    from stylize.config import use_persistent_compile_cache

    started_env = dict(os.environ)
    # as the CLI does before it imports torch: importing diffusers sets TORCHINDUCTOR_CACHE_DIR for good
    use_persistent_compile_cache()
    for name, attrs in PRELOAD.items():
        module = importlib.import_module(name)
        for attr in attrs:
            getattr(module, attr)
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (request id, pid)
    pending = b""

    def answer(**fields) -> None:
        os.write(1, (json.dumps(fields) + "\n").encode())

    while True:
        ready, _, _ = select.select([0, *children], [], [])
        for fd in ready:
            if fd != 0:  # a child has ended
                ident, pid = children.pop(fd)
                os.close(fd)
                answer(id=ident, status=os.waitpid(pid, 0)[1])
                continue
            data = os.read(0, 1 << 16)
            if not data:  # the test is done, or gone: no child outlives it
                for _, pid in children.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                os._exit(0)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                request = json.loads(line)
                _check_fork(request["env"], started_env)
                sys.stderr.flush()  # what the imports printed stays here
                pid = os.fork()
                if pid == 0:
                    for fd in children:
                        os.close(fd)
                    return request
                children[os.pidfd_open(pid)] = request["id"], pid
                answer(id=request["id"], pid=pid)


def _check_fork(env: dict, started_env: dict) -> None:
    """Fail rather than fork a child that would not be the process a real start gives. A fork
    copies only the thread that calls it (a lock another thread held stays held for ever in the
    child): the imports must have started none. Variables read at import (OMP_NUM_THREADS, Hugging
    Face's) are the zygote's own, as it started: a request may change only the hook's. The signal
    handlers must be Python's own at start-up."""
    threads, tasks = threading.enumerate(), os.listdir("/proc/self/task")
    if len(threads) != 1 or len(tasks) != 1:
        raise RuntimeError(f"the zygote must fork alone, but runs {threads} ({len(tasks)} OS threads)")
    changed = {k for k in env.keys() | started_env.keys() if env.get(k) != started_env.get(k)} - {PAUSE_AT}
    if changed:
        raise RuntimeError(f"a forked run cannot change {sorted(changed)}: start the zygote with them")
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
    if handlers != [signal.default_int_handler, signal.SIG_DFL, signal.SIG_DFL]:
        raise RuntimeError(f"the zygote's imports changed the signal handlers: {handlers}")


def become(request: dict) -> None:
    """In a forked child: become what `python -m stylize ARGV` (under nohup with NOHUP), started in a
    new session, in CWD, with ENV, its stdout and stderr into LOG, is once the interpreter is up."""
    os.setsid()
    null, log = os.open(os.devnull, os.O_RDONLY), os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd, to in ((null, 0), (log, 1), (log, 2)):
        os.dup2(fd, to)
    os.close(null)
    os.close(log)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["nohup"]:  # what nohup does before it executes the command (which keeps it ignored)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.argv = ["-m", *request["argv"]]  # runpy puts stylize/__main__.py first, as `python -m` does


class Zygote:
    """The test's end of the zygote: `fork()` gives a run, seen as a Popen."""

    def __init__(self, env: dict, log: Path):
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", ZYGOTE], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, start_new_session=True,
            )  # fmt: skip
        self.answers: dict[int, dict] = {}  # request id -> {"pid": ..., "status": ...}
        self.sent = 0
        self.pending = b""

    def fork(self, argv: list[str], env: dict, cwd: Path, log: Path, nohup: bool) -> Forked:
        request = {"id": self.sent, "argv": argv, "env": env, "cwd": str(cwd), "log": str(log), "nohup": nohup}
        self.sent += 1
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return Forked(self, request["id"])

    def read(self, timeout: float = 0.0) -> None:
        """Take in what the zygote has answered (waiting at most `timeout` for it)."""
        out = self.proc.stdout.fileno()
        if not select.select([out], [], [], timeout)[0]:
            return
        data = os.read(out, 1 << 16)
        if not data:
            raise RuntimeError(f"the zygote has ended: {self.log.read_text()}")
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            answer = json.loads(line)
            self.answers.setdefault(answer.pop("id"), {}).update(answer)

    def close(self) -> None:
        """End the zygote and the runs still going (it kills them too, should the test be gone)."""
        for answer in self.answers.values():
            if "status" not in answer:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(answer["pid"], signal.SIGKILL)
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Forked:
    """A run forked by the zygote, seen as a Popen: pid, and poll() (-N when killed by signal N)."""

    def __init__(self, zygote: Zygote, ident: int):
        self.zygote, self.ident = zygote, ident

    @property
    def pid(self) -> int:
        give_up = time.monotonic() + 60
        while "pid" not in self.zygote.answers.get(self.ident, {}):
            assert time.monotonic() < give_up, "the zygote has not forked"
            self.zygote.read(timeout=1)
        return self.zygote.answers[self.ident]["pid"]

    def poll(self) -> int | None:
        self.zygote.read()
        status = self.zygote.answers.get(self.ident, {}).get("status")
        return None if status is None else os.waitstatus_to_exitcode(status)


# ----------------------------------------------------------------------------- the matrix


class Watched:
    """A process the matrix drives (`proc`): when it was signalled, and once seen ended its
    returncode and the seconds from the signal to its exit."""

    signalled: float | None = None
    returncode: int | None = None
    exit_s: float | None = None

    def ended(self) -> bool:
        """Whether `proc` has ended; the first time it is seen ended, its returncode and exit_s are recorded."""
        if self.returncode is not None:
            return True
        code = self.proc.poll()
        if code is None:
            return False
        self.returncode = code
        self.exit_s = None if self.signalled is None else time.monotonic() - self.signalled
        return True


class Run(Watched):
    """One run over a folder of a.mp4 and b.mp4 (copied from `clips`), held at `stage` each time it
    gets there. It is sent `sig` (to the whole process group with `group`, as a terminal's Ctrl-C
    is) at its first arrival for "load", else at the first once b's partial file exists (a is done
    by then; the encoder opens its file with its first packets, a few frames in); other arrivals go
    on. The run is forked from `zygote`, with SIGHUP ignored under `nohup`; with `shell`, a bash
    script run in the folder instead, it is a real process."""

    def __init__(self, root: Path, clips: Path, stage: str, sig: int, env: dict, zygote: Zygote,
                 shell: str | None = None, group=False, nohup=False):  # fmt: skip
        self.stage, self.sig, self.group, self.nohup = stage, sig, group, nohup
        self.folder = root / f"{signal.Signals(sig).name}-{stage}{'-nohup' if nohup else ''}" / "clips"
        shutil.copytree(clips, self.folder)
        self.inputs = {name: _sha(self.folder / name) for name in FRAMES}
        self.marker = self.folder.parent / "held"
        self.log = self.folder.parent / "log"
        env = {**env, PAUSE_AT: f"{stage}:{self.marker}"}
        if shell:
            with open(self.log, "w") as log:
                self.proc = subprocess.Popen(
                    ["bash", "-c", shell], cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
        else:
            self.proc = zygote.fork([str(self.folder), *FAST], env, self.folder, self.log, nohup)
        self.partials_when_signalled: list[str] = []
        self.alive_after_signal: bool | None = None

    def step(self) -> None:
        if self.ended():
            return
        if self.signalled is not None and not self.nohup:
            if time.monotonic() - self.signalled > 2 * EXIT_S:  # long overdue: stop waiting for it
                os.killpg(self.proc.pid, signal.SIGKILL)
            return
        if self.nohup and self.signalled is not None and self.alive_after_signal is None:
            if time.monotonic() - self.signalled < 0.5:  # a handled signal would have ended it by then
                return
            self.alive_after_signal = True  # poll() above: still running
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
            return  # under nohup, held there until it has outlived the signal by 0.5 s
        self.marker.unlink()  # go on

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Every run of the matrix, driven to its end: {(signal name, stage): Run}, plus "nohup", and
    "hang" (a Hung, whose GRACE_S pass while the others run)."""
    root = tmp_path_factory.mktemp("signals")
    # 2 cores, many runs; and with one thread, OpenBLAS starts none at import: the zygote can fork
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    zygote = Zygote(env, root / "zygote.log")  # it imports while the tiny stack is built
    clips = root / "clips"
    runs = {}

    def start(name: str, stage: str) -> Run:
        shell = None
        if (name, stage) == ("SIGTERM", "encode"):  # what a shell sees, as `stylize ...; echo $?`
            shell = f'{STYLIZE} . {shlex.join(FAST)}; echo "status $?"'
        if (name, stage) == ("SIGINT", "load"):  # Ctrl-C at a terminal: the whole group gets it
            shell = f'for f in *.mp4; do {STYLIZE} "$f" {shlex.join(FAST)}; done; echo "the loop went on"'
        group = (name, stage) == ("SIGINT", "load")
        return Run(root, clips, stage, SIGNALS[name], env, zygote, shell, group)

    try:
        clips.mkdir()
        for name, frames in FRAMES.items():
            write_clip(clips / name, frames=frames, audio=True)
        request.getfixturevalue("tiny_dir")
        runs.update({(name, stage): start(name, stage) for name in SIGNALS for stage in STAGES})
        runs["nohup"] = Run(root, clips, "encode", signal.SIGHUP, env, zygote, nohup=True)
        runs["hang"] = Hung(root / "hang")
        give_up = time.monotonic() + 300
        while any(run.returncode is None for run in runs.values()):
            assert time.monotonic() < give_up, {k: run.output() for k, run in runs.items() if run.returncode is None}
            for run in runs.values():
                run.step()
            time.sleep(0.02)
    finally:
        for run in runs.values():
            if isinstance(run.proc, subprocess.Popen) and run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
        zygote.close()
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


class Hung(Watched):
    """HELD, sent SIGTERM once running; its clean-up hangs. Driven with the matrix's runs (as a Run:
    step(), returncode, exit_s), so that the 4 s it must wait pass while they run."""

    def __init__(self, folder: Path):
        folder.mkdir()
        self.marker = folder / "state"
        self.proc = subprocess.Popen([sys.executable, "-c", HELD, str(self.marker)], start_new_session=True)

    def step(self) -> None:
        if self.ended():
            return
        if self.signalled is None and self.output() == "running":
            self.proc.send_signal(signal.SIGTERM)
            self.signalled = time.monotonic()
        elif self.signalled is not None and time.monotonic() - self.signalled > GRACE_S + 5:
            self.proc.kill()

    def output(self) -> str:
        return self.marker.read_text() if self.marker.exists() else ""


def test_a_clean_up_that_hangs_is_cut_short(runs):
    run = runs["hang"]
    assert run.signalled is not None and run.returncode == -signal.SIGTERM, run.output()
    assert run.output() == "cleaning up"
    assert GRACE_S - 0.5 < run.exit_s < EXIT_S


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
