"""SIGINT, SIGTERM and SIGHUP: the run cleans up, then the process dies of the signal itself.

- `handled()` turns each into `Signalled`, raised on the main thread as Ctrl-C's KeyboardInterrupt
  is, so that the clip in progress is dropped the way a failing one is: its in-flight batches
  dropped, its hidden partial output (video or still) deleted. Finished outputs are complete files
  already (written under a temporary name, renamed once whole).
- The CLI then reports 128 + N, and `dying_of_signals()` at the process's entry point ends it with
  the signal's default action: the parent sees it killed by N (a shell prints 130, 143 or 129),
  and `for f in *.mp4; do stylize "$f"; done` stops at Ctrl-C. An `exit(130)` would not stop it:
  bash takes a child that exits, rather than dies, as one that handled the signal, and goes on.
- A signal ignored when the run starts stays ignored (SIGHUP under `nohup`).
- The first signal puts the default actions back: a second one ends the process at once. The
  clean-up has GRACE_S; past it the process is killed by the first signal as it stands, so it ends
  within 5 s of a signal whatever the clean-up waits for. (Python runs the handler between bytecodes
  of the main thread: a single long call into C, one huge operation on a slow CPU, delays it and the
  deadline with it.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}
GRACE_S = 4.0  # for the clean-up after a signal; then it is killed (issue #16: gone within 5 s)
PAUSE_AT = "STYLIZE_TEST_PAUSE_AT"  # the test hook's variable: "<stage>:<marker file>"
PAUSE_ONCE = "STYLIZE_TEST_PAUSE_ONCE"  # the same, held at the first arrival only (tests/test_cluster.py)
PAUSE_S = 60.0  # the longest a test hook holds the run


class Signalled(BaseException):
    """SIGINT, SIGTERM or SIGHUP, raised on the main thread. Not an Exception: the per-clip
    `except Exception` must not take it for one bad clip."""

    def __init__(self, signum: int):
        super().__init__(WORDS[signum])
        self.signum = signum


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """While running, SIGINT, SIGTERM and SIGHUP raise Signalled on the main thread (their default
    actions would end the process on the spot and leave the partial file behind)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in HANDLED}
    ours = [sig for sig, handler in previous.items() if handler is not signal.SIG_IGN]
    deadline: list[threading.Timer] = []

    def handle(signum, frame):
        for sig in ours:
            signal.signal(sig, signal.SIG_DFL)
        # the process was told to go: if the clean-up hangs, the signal's default action ends it
        timer = threading.Timer(GRACE_S, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        deadline.append(timer)
        raise Signalled(signum)

    for sig in ours:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for timer in deadline:  # cleaned up in time
            timer.cancel()
        for sig in ours:
            signal.signal(sig, previous[sig])


def die(signum: int) -> NoReturn:
    """End the process by the signal's default action, so that its parent sees it killed by it."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # what was printed goes out first; a closed stream has nothing to lose
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached: the default action has ended the process


@contextlib.contextmanager
def dying_of_signals() -> Iterator[None]:
    """Around the whole process (the console script): an exit with 128 + N for a handled signal N,
    what the run reports once it has cleaned up after N, becomes a death by N. Outside the run
    (parsing options, exiting) Ctrl-C ends the process at once, as SIGTERM's and SIGHUP's default
    actions do: nothing is being written then, and Python's KeyboardInterrupt would reach click,
    which prints 'Aborted!' and exits 1."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when ignored (`cmd &`)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, int) and e.code - 128 in HANDLED:
            die(e.code - 128)
        raise


def pause_point(stage: str) -> None:
    """Test hook (tests/test_signals.py): with STYLIZE_TEST_PAUSE_AT=<stage>:<marker file>, the run
    writes its process id into the marker file each time its main thread reaches `stage`, and waits
    while that file exists (at most PAUSE_S): a test signals it at a known point, or deletes the
    file to let it go on. Stages: "load" (the model's load begins), "encode" (a batch of frames
    handed to the encoder), "remux" (the video encoded, the rest of the audio not yet muxed). On other
    threads (the engine's hand-back) it does nothing: a signal could not stop it.

    STYLIZE_TEST_PAUSE_ONCE=<stage>:<marker file> holds only the first arrival of any process (a
    cluster's workers, tests/test_cluster.py): the one that creates the marker waits while it exists;
    every later arrival finds it there and goes on, so a retry of a killed worker is not held again."""
    if threading.current_thread() is not threading.main_thread():
        return
    at, _, marker = os.environ.get(PAUSE_AT, "").partition(":")
    if at == stage and marker:
        _hold(Path(marker), exclusive=False)
    at, _, marker = os.environ.get(PAUSE_ONCE, "").partition(":")
    if at == stage and marker:
        _hold(Path(marker), exclusive=True)


def _hold(path: Path, exclusive: bool) -> None:
    """Write this process's id into `path` (whole when it appears: the test reads the id from it),
    then wait while it exists. `exclusive`: only if no one has written it yet."""
    written = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    written.write_text(str(os.getpid()))
    if exclusive:
        try:
            os.link(written, path)  # fails if the marker exists: one process wins, even across hosts
        except FileExistsError:
            return
        finally:
            written.unlink()
    else:
        os.replace(written, path)
    until = time.monotonic() + PAUSE_S
    while path.exists() and time.monotonic() < until:
        time.sleep(0.02)  # a signal's handler runs (and raises) here
