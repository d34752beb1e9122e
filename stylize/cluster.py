"""Many hosts through Ray (issue #17): `stylize FOLDER --ray ADDRESS` (the `cluster` extra).

The driver (the `stylize` process) plans the jobs as a one-GPU run does (cli.py: names, skips,
`-o`), connects to the cluster, starts `workers` Ray actors and hands each one clip (or still) at a
time; results come back in completion order. Each actor loads the stack and builds its stylizer
once, then runs `stylize_video` / `stylize_still` per task, writing straight to the destination,
which every node must see at the same path (shared storage), as it must the inputs and the model.
Ray does the placement (one actor per GPU, `num_gpus=1`, or per CPU), the restarts and the retries:
an actor whose process dies is restarted (`max_restarts`) and its clip run again on it
(`max_task_retries`). A clip that fails with an error (a bad input) is not retried: that clip fails,
the others go on.

No partial file is left: each output is written to a hidden file named by its run and renamed onto
the destination once complete (partial.py). Before submitting, the driver removes what an earlier,
killed run left at its destinations, on whatever host it ran (a cluster run owns its outputs: two
runs writing the same outputs at once are not supported); a restarted actor does the same for the
clip it retries, whose first attempt died elsewhere; a driver stopped by a signal kills its actors
and removes the partial files of the clips they held. Resuming is running the same command again:
finished outputs are skipped (without -y), the rest redone.

Workers: one per GPU when `--device` is cuda, or auto and the cluster has GPUs; else one per CPU.
`--ray-workers N` asks for N (more than the cluster holds now wait for the autoscaler); by default,
as many as the cluster holds, at most one per input. A worker's environment is its node's, but
for the driver's STYLIZE_TEST_* variables (the tests' hooks).

Why plain actors and not Ray Data's `map_batches`: a clip is one long task (minutes) that writes a
file, not a row to transform; results must stream back one clip at a time with that clip's error
(Ray Data fails or drops rows, and reports per block); and `ray[data]` adds pyarrow and pandas
(~150 MB) for nothing a clip needs. The loop below is Ray's `ActorPool` pattern (a task per idle
actor over `ray.wait`), written out so that it knows which clip a lost worker held and gives work
only to actors that have started (so asking for more workers than the cluster holds now waits for
the autoscaler without stalling the run).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import StylizeError, UsageError
from .jobs import Job
from .partial import remove_predecessors

if TYPE_CHECKING:
    from .pipeline import RunStats

INSTALL = 'pip install "stylize[cluster]"'
RESTARTS = 4  # times Ray restarts an actor whose process died (max_restarts)
RETRIES = 2  # times a clip is run again after its actor died mid-clip (max_task_retries)
# A blocking ray.wait runs Python's signal handlers inside C++, which turns the driver's Signalled
# (signals.py) into a SystemError; so the driver polls, and a signal meets it in time.sleep.
POLL_S = 0.1
CONNECT_TIMEOUT_S = 5.0  # to reach the cluster's address before Ray's own retries (minutes) start
FORWARDED = ("STYLIZE_TEST_",)  # the driver's variables the actors get (the tests' hooks, signals.py)


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda": one GPU per actor; "cpu": one CPU per actor
    workers: int


@dataclass(frozen=True)
class Finished:
    """One job's outcome, as the actor that ran it reports it: `stats` (a RunStats) or `error`
    (one line)."""

    job: Job
    worker: int
    node: str
    stats: RunStats | None = None
    error: str | None = None
    model_load_s: float | None = None
    peak_gpu_mem_gib: float | None = None


def check_options(address: str | None, workers: int | None) -> None:
    """`--ray` and `--ray-workers`, checked before anything is planned: Ray installed, a count >= 1."""
    if address is None:
        raise UsageError("--ray-workers goes with --ray ADDRESS")
    if workers is not None and workers < 1:
        raise UsageError(f"--ray-workers must be at least 1, not {workers}")
    import_ray()


def import_ray():
    """The `ray` module, or a UsageError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


@contextlib.contextmanager
def connected(address: str, debug: bool = False) -> Iterator[object]:
    """Connected to the cluster at `address` ("auto": the one RAY_ADDRESS names, or one running on
    this machine); yields `ray`. A session this process already has (a test's) is used as it is."""
    ray = import_ray()
    _reachable(address)
    if ray.is_initialized():
        yield ray
        return
    try:
        # Workers' output stays in their log files (the driver reports each clip's error itself)
        ray.init(address=address, logging_level="INFO" if debug else "ERROR", log_to_driver=debug)
    except (ConnectionError, ValueError, RuntimeError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--ray {address}: cannot connect to a Ray cluster ({message})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _reachable(address: str) -> None:
    """Fail in seconds, with one line, when the cluster's address does not answer: given a dead
    address, `ray.init` retries for minutes."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if address in ("", "auto", "local"):
            return  # Ray looks for a cluster on this machine and says at once if there is none
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray {address}: give HOST:PORT (the head node's address) or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UsageError(f"--ray {address}: cannot reach the Ray cluster ({e.strerror or e}); is it running?") from None


def placement(ray, device: str, workers: int | None, jobs: int) -> Placement:
    """Where the actors go: one per GPU when `device` is "cuda", or "auto" and the cluster has GPUs;
    else one per CPU (Ray then gives each one torch thread: OMP_NUM_THREADS=1). `workers` None: as
    many as the cluster holds now; never more than one per job."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if device == "cuda" and gpus == 0:
        raise UsageError("--device cuda: the Ray cluster has no GPUs; use --device cpu")
    on = "cuda" if device != "cpu" and gpus > 0 else "cpu"
    slots = gpus if on == "cuda" else cpus
    if workers is None and slots == 0:
        raise UsageError("--ray: the Ray cluster has no CPUs to run on")
    return Placement(on, max(1, min(workers or slots, jobs)))


class Worker:
    """One actor: the stack loaded and the stylizer built once, then one job per `run` call.
    Wrapped by `ray.remote` in `run_on_cluster` (this module imports without Ray)."""

    def __init__(self, opts, device: str, clips: Sequence, index: int):
        self.index, self.device, self.opts = index, device, opts.on_device(device)
        self.node = socket.gethostname()
        self.error, self.stylizer = None, None
        started = time.perf_counter()
        try:
            self.stylizer = self._build(clips)
        except Exception as e:  # reported by `ready`: the run stops with it, as a one-GPU run does
            self.error = _one_line(e)
        self.load_s = round(time.perf_counter() - started, 2)

    def _build(self, clips):
        from .config import use_persistent_compile_cache

        use_persistent_compile_cache()  # before torch is imported
        from .models import load_stack
        from .pipeline import build_stylizer

        opts = self.opts
        stack = load_stack(opts.model, self.device)
        return build_stylizer(stack, opts.pipeline, opts.engine, clips, opts.output.fps)

    def ready(self) -> tuple[str, str | None]:
        """(node, the load's error or None)."""
        return self.node, self.error

    def run(self, job: Job) -> Finished:
        from .pipeline import out_of_memory_is_one_line, stylize_video
        from .stills import stylize_still

        if _restarted():  # the clip's first attempt may have died on another host: its partial file too
            remove_predecessors(job.dst, everyone=True)
        try:
            with out_of_memory_is_one_line(self.stylizer.cfg):
                if job.still:
                    stats = stylize_still(job.src, job.dst, self.stylizer)
                else:
                    stats = stylize_video(job.src, job.dst, self.stylizer, self.opts.output)
        except Exception as e:  # that clip fails; the actor goes on with the next
            return Finished(job, self.index, self.node, error=_one_line(e))
        return Finished(job, self.index, self.node, stats=stats, model_load_s=self.load_s, peak_gpu_mem_gib=_peak())


def _restarted() -> bool:
    import ray

    with warnings.catch_warnings():  # Ray's own property warns of a deprecated call it makes
        warnings.simplefilter("ignore")
        return ray.get_runtime_context().was_current_actor_reconstructed


def _peak() -> float | None:
    import torch

    if not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_on_cluster(ray, jobs: Sequence[Job], opts, where: Placement) -> Iterator[Finished]:
    """Run `jobs` on `where.workers` actors; yield each job's Finished as it completes. A StylizeError
    if no actor can load the model. An actor lost for good (past its restarts) fails the clip it held;
    the others take the rest."""
    for job in jobs:  # what a killed earlier run left at these destinations, on any host
        remove_predecessors(job.dst, everyone=True)
    resources = {"num_gpus": 1} if where.device == "cuda" else {"num_cpus": 1}
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}
    actor = ray.remote(max_restarts=RESTARTS, max_task_retries=RETRIES, **resources)(Worker)
    clips = [job.src for job in jobs if not job.still]
    actors = [
        actor.options(runtime_env={"env_vars": env} if env else None).remote(opts, where.device, clips, index)
        for index in range(where.workers)
    ]  # fmt: skip
    todo = deque(jobs)
    waiting = {actors[i].ready.remote(): (i, None) for i in range(len(actors))}  # ref -> (actor, its job)
    live = set(range(len(actors)))
    try:
        while waiting and (todo or any(job for _, job in waiting.values())):
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=0)
            if not ready:
                time.sleep(POLL_S)
                continue
            ref = ready[0]
            index, job = waiting.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:  # the actor is gone for good
                live.discard(index)
                if job is not None:
                    yield Finished(job, index, "?", error=f"worker {index} was lost ({_one_line(e)})")
                if not live:
                    yield from (Finished(j, index, "?", error="no Ray worker is left to run it") for j in todo)
                    return
                continue
            if job is None and result[1] is not None:  # the model did not load: no actor will load it
                raise StylizeError(result[1])
            if job is not None:
                yield result
            if todo:
                nxt = todo.popleft()
                waiting[actors[index].run.remote(nxt)] = (index, nxt)
    finally:
        for a in actors:  # also those still waiting for resources
            ray.kill(a)
        # Clips still running when the driver was interrupted: Ray's cancel does not stop a running
        # actor task, and a killed actor leaves its partial file, so the driver removes those itself
        # (a cluster run owns its destinations; what a driver killed outright leaves, the next run removes)
        for job in (job for _, job in waiting.values() if job is not None):
            remove_predecessors(job.dst, everyone=True)
