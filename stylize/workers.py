"""Every GPU of one host (`--gpus`, #17): one worker process per GPU, each with its own stack and
stylizer, fed the run's jobs longest clip first; results come back in completion order.

    failed = Pool(opts, "cuda", gpus=(0, 2), events).run(tasks)

- A worker is a "spawn" process (no fork of a parent that may hold CUDA or threads). Its
  CUDA_VISIBLE_DEVICES names its one GPU before torch is imported (indices count within the
  parent's CUDA_VISIBLE_DEVICES); on the CPU, N workers share the cores (torch threads cores // N
  each), which is how the tests run this code. It loads the stack and builds its stylizer once
  (`load_stack`, `build_stylizer`, as the one-process run does) and then takes one task at a time.
- The parent holds the queue and hands the next task to whichever worker is free, so it always
  knows what each worker holds. One pipe per worker carries tasks down and progress, results and
  errors up (a pipe has no lock that a killed writer could keep, as a shared Queue has).
- A worker that dies (killed, a segfault, a CUDA error that ends the process) loses only its
  task: the parent removes the partial files the dead process left (`partial.remove_predecessors`)
  and gives the task once more to the next free worker (a fresh process replaces the dead one);
  a second death fails that input, and the others go on.
- More workers than clips: the longest clips are split into chunks, one task each, and joined by
  the parent as the last chunk of a clip comes in (chunks.py); a chunk that fails fails its clip.
- A signal to the parent (SIGINT, SIGTERM, SIGHUP; signals.py): the workers are told to stop
  (SIGTERM: each drops its clip in progress and its partial file, as a one-process run does),
  those still there after STOP_S are killed, the partial files of every task in flight are
  removed, and the parent dies of the signal. Workers ignore SIGINT themselves (a terminal's
  Ctrl-C reaches the whole process group; the parent decides) and, on Linux, get SIGTERM when the
  parent dies outright.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from . import partial, signals
from .errors import StylizeError
from .jobs import Job

log = logging.getLogger(__name__)

STOP_S = 2.5  # a stopped worker's time to clean up before it is killed (within signals.GRACE_S)
ATTEMPTS = 2  # a task whose worker dies is run once more; a second death fails it
PROGRESS_S = 0.2  # the least time between two progress messages of a worker


@dataclass(frozen=True)
class Task:
    """One unit of work for a worker: a job (a clip or a still), or one chunk of a split clip."""

    id: int
    job: Job
    frames: int | None = None  # the clip's length (the queue's order), None for stills and unknown
    chunk: object | None = None  # a chunks.Chunk of `job`'s clip, or None: the whole job
    attempt: int = 1


def longest_first(jobs: Sequence[Job], fps: float | None = None) -> list[Task]:
    """Tasks for `jobs`, the longest clip first (frames from `video.probe`); stills and clips of
    unknown length (or that cannot be probed: they fail when their turn comes) last."""
    from . import video

    tasks = []
    for n, job in enumerate(jobs):
        frames = None
        if not job.still:
            try:
                frames = video.probe(job.src, fps).frames
            except Exception:  # noqa: BLE001 - reported by the worker that runs it
                frames = None
        tasks.append(Task(n, job, frames))
    return sorted(tasks, key=lambda t: (t.frames is None, -(t.frames or 0), t.id))


def worker_env(gpu: int, device: str, visible: str | None = None) -> str:
    """CUDA_VISIBLE_DEVICES for the worker of index `gpu` (an index within the parent's `visible`
    list, or the physical index when that is unset); "" on the CPU, which uses no GPU."""
    if device != "cuda":
        return ""
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(gpu)
    return [v.strip() for v in visible.split(",") if v.strip()][gpu]


@dataclass
class Events:
    """What the pool tells its caller (the CLI renders): each runs on the parent's main thread."""

    done: Callable[[Task, object, dict], None]  # (task, RunStats, extra: model_load_s, peak_gpu_mem_gib, gpu)
    failed: Callable[[Task, str, str], None]  # (task, one-line message, traceback text)
    progress: Callable[[int, Task | None, object], None] = lambda gpu, task, p: None  # (gpu, task, Progress|str)


@dataclass
class _Worker:
    gpu: int  # the index as the user gave it
    process: object
    conn: object
    ready: bool = False
    task: Task | None = None
    load_s: float | None = None
    open: bool = True  # its pipe not at its end yet


@dataclass
class Pool:
    """The workers of one run and the parent's queue (see the module docstring)."""

    opts: object  # config.RunOptions, already on its device
    device: str  # "cuda" or "cpu"
    gpus: tuple[int, ...]
    events: Events
    clips: Sequence = ()  # the run's clip paths (build_stylizer's compile decision)
    debug: bool = False
    splits: object | None = None  # a chunks.Splits: the split clips, joined as their last chunk is in
    target: Callable | None = None  # a worker's life: _worker_main (tests: a stand-in, a module-level function)
    workers: list[_Worker] = field(default_factory=list)
    deaths: dict = field(default_factory=dict)  # gpu -> workers of it that died

    def run(self, tasks: Sequence[Task]) -> int:
        """Run every task, in the order given as workers come free; returns how many failed."""
        self.pending = deque(tasks)
        self.failures = 0
        self.gpus = self.gpus[: max(1, len(tasks))]  # no worker loads a stack it will not use
        try:
            for gpu in self.gpus:
                self._start(gpu)
            while self.pending or any(w.task is not None for w in self.workers):
                self._step()
            for w in self.workers:
                if w.ready and w.process.is_alive():
                    w.conn.send(None)  # no more work: the worker closes its stylizer and exits
            for w in self.workers:
                if w.ready:  # one still loading (a dead one's replacement) is stopped below
                    w.process.join(STOP_S)
        finally:
            self._stop()
        return self.failures

    # -- the parent's loop ---------------------------------------------------------------------

    def _step(self) -> None:
        for w in self.workers:
            if w.ready and w.open and w.task is None and self.pending and w.process.is_alive():
                w.task = self.pending.popleft()
                try:
                    w.conn.send(w.task)
                except OSError:  # it has just died: the task goes back when its end is seen below
                    w.open = False
        live = [w for w in self.workers if w.open]
        if not live:
            self._fail_rest("no worker is left to run it")
            return
        wait([w.conn for w in live] + [w.process.sentinel for w in live], timeout=1.0)
        for w in live:
            self._read(w)  # what a worker sent before it ended comes first
            if not w.open or w.process.exitcode is not None:
                self._read(w)
                self._ended(w)

    def _read(self, w: _Worker) -> None:
        while w.open:
            try:
                if not w.conn.poll():
                    return
                msg = w.conn.recv()
            except Exception as e:  # noqa: BLE001 - its end (EOFError), or a message cut short by its death
                log.debug("worker %s: %s", w.gpu, e)
                w.open = False
                return
            self._handle(w, msg)  # what it raises (stdout closed, a stack that did not load) ends the run

    def _handle(self, w: _Worker, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            w.ready, w.load_s = True, msg[1]
            self.events.progress(w.gpu, None, "ready")
        elif kind == "progress":
            if w.task is not None:
                self.events.progress(w.gpu, w.task, msg[1])
        elif kind == "done":
            task, w.task = w.task, None
            extra = {"model_load_s": w.load_s, **msg[2], "gpu": w.gpu}
            if task.chunk is None:
                self.events.done(task, msg[1], extra)
                return
            try:  # a chunk: the clip is joined (here, on the parent) once its last chunk is in
                joined = self.splits.done(task, msg[1], extra)
            except Exception as e:  # noqa: BLE001 - that clip fails, the rest go on
                self._failed(task, _one_line(e), traceback.format_exc())
                return
            if joined is not None:
                self.events.done(task, *joined)
        elif kind == "failed":
            task, w.task = w.task, None
            self._failed(task, msg[1], msg[2])
        elif kind == "broken":  # the stack did not load: every worker would fail the same way
            raise StylizeError(msg[1])

    def _ended(self, w: _Worker) -> None:
        """A worker that ended (its pipe closed or its process gone) without being told to."""
        w.process.join(STOP_S)
        if w.process.is_alive():  # its pipe closed but the process hangs on: end it
            _signal(w.process, signal.SIGKILL)
            w.process.join(1.0)
        self.workers.remove(w)
        w.conn.close()
        code = w.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        self.deaths[w.gpu] = self.deaths.get(w.gpu, 0) + 1
        task = w.task
        if task is not None:
            _remove_partials_of(task)  # what the dead process was writing
            if task.attempt >= ATTEMPTS:
                self._failed(task, f"its worker (gpu {w.gpu}) died twice on it ({how})", "")
            else:
                log.info("worker %s died (%s) on %s; retrying it", w.gpu, how, task.job.src)
                self.pending.appendleft(_again(task))
        if self.pending and self.deaths[w.gpu] <= ATTEMPTS:
            self._start(w.gpu)  # a fresh worker for this GPU
        self.events.progress(w.gpu, None, f"worker died ({how})")

    def _failed(self, task: Task, message: str, tb: str) -> None:
        if task.chunk is not None:  # a split clip fails once, whichever of its chunks failed
            first = self.splits.failed(task)
            self.pending = deque(t for t in self.pending if t.job != task.job)
            if not first:
                return
        self.failures += 1
        self.events.failed(task, message, tb)

    def _fail_rest(self, why: str) -> None:
        while self.pending:
            self._failed(self.pending.popleft(), why, "")

    # -- starting and stopping workers ---------------------------------------------------------

    def _start(self, gpu: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        threads = max(1, (os.cpu_count() or 1) // len(self.gpus)) if self.device == "cpu" else 0
        process = ctx.Process(
            target=self.target or _worker_main, name=f"stylize-gpu{gpu}", daemon=True,
            args=(child, worker_env(gpu, self.device), threads, self.opts, self.device, list(self.clips), self.debug),
        )  # fmt: skip
        process.start()
        child.close()  # the worker's end: only the worker holds it now, so its death closes the pipe
        self.workers.append(_Worker(gpu, process, parent))

    def _stop(self) -> None:
        """Every worker still running is told to stop (SIGTERM), killed after STOP_S; then what
        the tasks in flight were writing is removed (their processes have all ended by now)."""
        running = [w for w in self.workers if w.process.is_alive()]
        for w in running:
            _signal(w.process, signal.SIGTERM)
        until = time.monotonic() + STOP_S
        for w in running:
            w.process.join(max(0.0, until - time.monotonic()))
            if w.process.is_alive():
                _signal(w.process, signal.SIGKILL)
                w.process.join(1.0)
        for w in self.workers:
            if w.task is not None:
                _remove_partials_of(w.task)
            w.conn.close()
        self.workers.clear()
        if self.splits is not None:
            self.splits.discard_all()  # the finished chunks of clips not joined


def _again(task: Task) -> Task:
    from dataclasses import replace

    return replace(task, attempt=task.attempt + 1)


def _signal(process, signum: int) -> None:
    try:
        os.kill(process.pid, signum)
    except (ProcessLookupError, TypeError):
        pass


def _remove_partials_of(task: Task) -> None:
    """Partial files of the task's output left by processes that have ended (its worker)."""
    partial.remove_predecessors(task.job.dst)


# -- the worker process -----------------------------------------------------------------------


def _worker_main(conn, cuda_visible: str, threads: int, opts, device: str, clips: list, debug: bool) -> None:
    """A worker's whole life: its GPU, its stack, then tasks until told to stop."""
    os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible  # before torch is imported (below, lazily)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what a Ctrl-C stops
    _die_with_parent()
    try:
        with signals.handled():  # SIGTERM from the parent: the clip in progress is dropped, its file removed
            _serve(conn, threads, opts, device, clips, debug)
    except signals.Signalled as e:
        raise SystemExit(128 + e.signum) from None


def _die_with_parent() -> None:
    """Linux: SIGTERM to this worker when the parent dies outright (kill -9), so none outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        raise SystemExit(1)


def _serve(conn, threads: int, opts, device: str, clips: list, debug: bool) -> None:
    from .config import use_persistent_compile_cache

    use_persistent_compile_cache()  # before torch is imported: the one on-disk cache every worker shares
    import torch

    from .cli import _quiet_libraries
    from .models import load_stack
    from .pipeline import build_stylizer

    _quiet_libraries(debug)
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        signals.pause_point("load")
        stack = load_stack(opts.model, device)
        stylizer = build_stylizer(stack, opts.pipeline, opts.engine, clips, opts.output.fps)
    except Exception as e:  # noqa: BLE001 - sent to the parent as one line
        conn.send(("broken", _one_line(e), traceback.format_exc()))
        return
    conn.send(("ready", round(time.perf_counter() - started, 2)))
    try:
        while (task := conn.recv()) is not None:
            _run_task(conn, task, stylizer, opts, device)
    except EOFError:  # the parent has gone
        pass
    finally:
        stylizer.close()


def _run_task(conn, task: Task, stylizer, opts, device: str) -> None:
    from .pipeline import out_of_memory_is_one_line, run_job, stylize_video

    last = [0.0]

    def on_progress(p) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_S or p.status or p.done == p.total:
            last[0] = now
            conn.send(("progress", p))

    try:
        with out_of_memory_is_one_line(stylizer.cfg):
            if task.chunk is not None:  # left at a hidden name for the parent's join (chunks.py)
                stats = stylize_video(task.job.src, task.job.dst, stylizer, opts.output, on_progress, task.chunk)
            else:
                stats = run_job(task.job, stylizer, opts.output, on_progress)
    except Exception as e:  # noqa: BLE001 - that input fails; the worker goes on with the next
        conn.send(("failed", _one_line(e), traceback.format_exc()))
        return
    extra = {}
    if device == "cuda":  # this worker's peak so far, as the one-process run reports its own
        import torch

        extra["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    conn.send(("done", stats, extra))


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
