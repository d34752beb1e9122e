"""The `stylize` command: a thin typer shell over the library.

Rich progress and notices go to stderr; the result line per clip (or its --json record) to
stdout. Every option is checked (config.run_options, jobs.plan_jobs) before anything heavy is
imported. Exit codes: 0 all done (or nothing to do), 1 some clip failed, 2 usage error,
141 stdout closed by its reader (`| head`); SIGINT, SIGTERM and SIGHUP: the partial output is
deleted, then the process dies of the signal (signals.py), which a shell shows as 130 (interrupted),
143 (terminated) or 129 (hung up).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

from . import __version__, signals
from .errors import StylizeError, UsageError

STARTED = time.perf_counter()
EPILOG = "Other commands: `stylize styles` lists the style presets, `stylize models` the model stacks."
CONTEXT = {"help_option_names": ["-h", "--help"]}
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141  # 128 + SIGINT, SIGPIPE


class _Command(TyperCommand):
    """typer's command without the `<bool>` placeholder beside flags: they take no value."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # typer shows the metavar instead of the type when one is set
        return params


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Compile(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class Crop(str, Enum):
    none = "none"
    center = "center"


def _console(quiet: bool = False):
    from rich.console import Console

    class Stderr(Console):
        def on_broken_pipe(self) -> None:  # rich's own exits with 1; stop as for a closed stdout
            self.quiet = True
            raise BrokenPipeError

    return Stderr(stderr=True, quiet=quiet, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stylize {__version__}")
        raise typer.Exit()


def _quiet_libraries(debug: bool) -> None:
    """Model loading prints progress bars and advisories; a tool shows them only with --debug."""
    if debug:
        logging.basicConfig(level=logging.INFO)
        return
    import warnings

    import diffusers
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()  # its download retries would print per attempt
    warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _pick_device(device: Device) -> str:
    import torch

    if device == Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == Device.cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu")
    return device.value


def run(
    inputs: list[Path] = typer.Argument(
        ..., help="Video files, still images, numbered-image folders or folders of videos."
    ),
    style: Optional[str] = typer.Option(None, "--style", "-s", help="Style preset (see `stylize styles`)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Free-text instruction instead of a preset."),
    output: Optional[str] = typer.Option(
        None,
        "--output",
        "-o",
        metavar="<path>",
        help="Output folder, or the output file of a single input (.mp4, or a still's suffix).",
    ),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="Model preset or a folder of weights (default: the full model if its weights are here, else mini; "
        "see `stylize models`).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Frames per batch."),
    steps: int = typer.Option(1, "--steps", help="Denoising steps: 1, 2 or 4."),
    size: Optional[int] = typer.Option(
        None, "--size", help="Long side of the working resolution in pixels [default: 512; mini on a CPU 384]."
    ),
    crop: Crop = typer.Option(Crop.none, "--crop", help="'center': the paper's square centre crop."),
    device: Device = typer.Option(Device.auto, "--device", help="Where to run."),
    compile: Compile = typer.Option(
        Compile.auto,
        "--compile",
        help="Compile the GPU graphs: auto compiles when the clips are long enough to repay it.",
    ),
    te_every: int = typer.Option(1, "--te-every", help="Run the text encoder every M batches, reusing it between."),
    te_batch_one: bool = typer.Option(False, "--te-batch-one", help="Encode one frame per batch for the instruction."),
    static_prompt: bool = typer.Option(False, "--static-prompt", help="Encode the instruction once, without frames."),
    adapter: Optional[Path] = typer.Option(
        None, "--adapter", help="Temporal LLLite weights (.safetensors, released v3 layout) for steadier video."
    ),
    adapter_hooks: str = typer.Option("down_blocks", "--adapter-hooks", help="down_blocks, all, or block prefixes."),
    adapter_every: int = typer.Option(8, "--adapter-every", help="Refresh the adapter's conditioning every N batches."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Replace existing outputs (once the new file is complete)."),
    no_audio: bool = typer.Option(False, "--no-audio", help="Drop the audio."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into subfolders of folder inputs."),
    stills: bool = typer.Option(
        False, "--stills", help="Each image in a folder is its own still (not the folder one clip)."
    ),
    # the default is written out (escaped from rich markup, which would eat "[...]") because the
    # option's real default is None: "not given", which image folders take as 24
    fps: Optional[float] = typer.Option(None, "--fps", help="Frame rate of numbered-image folders. \\[default: 24]"),
    crf: int = typer.Option(18, "--crf", help="H.264 quality (0-51, lower is better)."),
    preset: str = typer.Option("medium", "--preset", help="x264 speed preset (ultrafast ... placebo)."),
    seed: int = typer.Option(0, "--seed", help="Noise seed."),
    gpus: Optional[str] = typer.Option(
        None,
        "--gpus",
        metavar="all|N|0,2",
        help="GPUs of this host, one worker process each (indices within CUDA_VISIBLE_DEVICES; one index as 3,); "
        "with more GPUs than clips, long clips are split across them. With --device cpu, N CPU worker processes "
        "(cores // N torch threads each: the wiring without GPUs). Default: one GPU, in this process.",
    ),
    ray_address: Optional[str] = typer.Option(
        None, "--ray", metavar="<address>",
        help="Run on a Ray cluster: its head's HOST:PORT, or 'auto' (RAY_ADDRESS, or one running here); "
        'needs `pip install "stylize\\[cluster]"`. Inputs, outputs and the model on storage every node shares.',
    ),
    ray_workers: Optional[int] = typer.Option(
        None, "--ray-workers", metavar="<n>",
        help="Ray workers (each loads the model once) \\[default: one per GPU of the cluster, else one per CPU; "
        "at most one per input].",
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON record per output on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and library logs."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Restyle videos: `stylize clip.mp4 --style oil` writes clip_oil.mp4 beside the input."""
    try:
        _run_reported({k: v for k, v in locals().items() if k != "version"}, debug)
    except BrokenPipeError:  # whoever read our output has gone (`| head -1`): stop quietly
        _silence_closed_streams()
        raise typer.Exit(EXIT_BROKEN_PIPE)


def _run_reported(options: dict, debug: bool) -> None:
    """`_run`, its errors turned into one line and an exit code."""
    try:
        with signals.handled():
            _run(**options)
    except StylizeError as e:
        _report_error(_console(), e, debug=debug)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:  # raised by code, not our handler (which raises Signalled)
        _console().print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED)
    except signals.Signalled as e:  # cleaned up; the exit code makes entry() die of the signal
        with contextlib.suppress(OSError):  # a hung-up terminal (SIGHUP) takes no more output
            _console().print(str(e))
        raise typer.Exit(128 + e.signum)
    except (typer.Exit, SystemExit, BrokenPipeError):
        raise
    except Exception as e:  # unexpected: one line, the traceback only with --debug
        _report_error(_console(), e, debug=debug)
        raise typer.Exit(1)


def _run(inputs, style, prompt, output, model, batch_size, steps, size, crop, device, compile, te_every, te_batch_one,
         static_prompt, adapter, adapter_hooks, adapter_every, yes, no_audio, recursive, stills, fps, crf, preset, seed,
         gpus, ray_address, ray_workers, as_json, quiet, debug) -> None:  # fmt: skip
    import dataclasses

    from .config import parse_gpus, run_options
    from .jobs import plan_jobs

    err = _console(quiet)
    # every check before anything heavy is imported
    opts = run_options(
        style=style, prompt=prompt, model=model, steps=steps, size=size, crop=crop.value, batch_size=batch_size,
        seed=seed, compile=compile.value, te_every=te_every, te_batch_one=te_batch_one, static_prompt=static_prompt,
        adapter=adapter, adapter_hooks=adapter_hooks, adapter_every=adapter_every, crf=crf, preset=preset,
        audio=not no_audio, fps=fps,
    )  # fmt: skip
    selection = parse_gpus(gpus)
    if gpus is not None and ray_address is not None:
        raise UsageError("--gpus and --ray: give one of them (on a cluster, Ray places one worker per GPU itself)")
    if ray_address is not None or ray_workers is not None:
        from .cluster import check_options

        check_options(ray_address, ray_workers)  # without the extra: one line, exit 2
    jobs = plan_jobs(inputs, opts.tag, output, recursive, stills)
    for notice in opts.notices:
        err.print(f"note: {notice}")

    todo = []
    for job in jobs:
        if job.dst.exists() and not yes:
            err.print(f"skip {job.src}: {job.dst} exists (use -y to replace it)")
        else:
            todo.append(job)
    failed = 0
    if todo:
        if all(job.still for job in todo):  # one frame each: padding it to a batch of 8 is 8x the work
            opts = dataclasses.replace(opts, pipeline=dataclasses.replace(opts.pipeline, batch_size=1))
        if ray_address is not None:
            failed = _run_cluster(todo, opts, ray_address, ray_workers, device.value, err, as_json, quiet, debug)
        else:
            picked = _pick_device(device)
            workers = selection.resolve(_visible(picked), picked) if selection is not None else (0,)
            if workers == (0,):  # one GPU (or the CPU) in this process: no workers at all
                failed = _run_jobs(todo, opts, picked, err, as_json, quiet, debug)
            else:
                failed = _run_workers(todo, opts, picked, workers, err, as_json, quiet, debug)
    summary = _summary(jobs, todo, failed)
    if summary:
        err.print(summary)
    if failed:
        raise typer.Exit(1)


def _summary(jobs, todo, failed: int) -> str | None:
    """The line after a run of several inputs: what was done, skipped and failed."""
    if len(jobs) < 2:
        return None
    if not todo:
        return f"nothing to do: all {len(jobs)} outputs exist (use -y to replace them)"
    stills = sum(job.still for job in todo)
    noun = "clip" if not stills else "image" if stills == len(todo) else "input"
    line = f"{len(todo) - failed} of {len(todo)} {noun}{'s' if len(todo) > 1 else ''} done"
    if failed:
        line += f", {failed} failed"
    if len(jobs) > len(todo):
        line += f"; {len(jobs) - len(todo)} skipped (output exists)"
    return line


def _run_jobs(jobs, opts, device, err, as_json, quiet, debug) -> int:
    """Load the stack once, stylize each input, keep going past a bad one; returns the failures."""
    from .config import use_persistent_compile_cache

    use_persistent_compile_cache()  # before torch is imported
    from .models import load_stack
    from .pipeline import build_stylizer, out_of_memory_is_one_line, run_job

    _quiet_libraries(debug)
    opts = opts.on_device(device)
    if device == "cpu" and opts.model.cpu_threads and not os.environ.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(opts.model.cpu_threads)
    loading = time.perf_counter()
    with err.status(f"loading model '{opts.model.name}' on {device}"):
        signals.pause_point("load")
        stack = load_stack(opts.model, device)
        clips = [job.src for job in jobs if not job.still]
        stylizer = build_stylizer(stack, opts.pipeline, opts.engine, clips, opts.output.fps)
    load_s = round(time.perf_counter() - loading, 2)
    failed = 0
    try:
        for job in jobs:
            try:
                with _progress(err, job.src.name, quiet) as on_progress, out_of_memory_is_one_line(stylizer.cfg):
                    stats = run_job(job, stylizer, opts.output, on_progress)
            except Exception as e:  # keep going past a bad clip; the summary and exit code say so
                failed += 1
                _report_error(err, e, job.src, debug)
                continue
            extra = {"model_load_s": load_s}
            if device == "cuda":  # the run's peak so far: a folder's grows with the shapes it met
                import torch

                extra["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            report(job, stats, extra, as_json, quiet)
    finally:
        stylizer.close()
    return failed


def report(job, stats, extra: dict, as_json: bool = False, quiet: bool = False) -> None:
    """One finished output on stdout, however it was run (this process, a worker of workers.py, a
    cluster): its --json record (RunStats, kind, status, then `extra`: model_load_s,
    peak_gpu_mem_gib, gpu or worker and node, ...; process_s_at_end added here) or its result line (`gpu` appended
    where there is one); nothing when quiet."""
    if as_json:
        since_start = time.perf_counter() - STARTED  # what a user waits: start-up, load, compile
        record = {**stats.as_dict(), "kind": "still" if job.still else "clip", "status": "ok"}
        record.update(model_load_s=extra.get("model_load_s"), process_s_at_end=round(since_start, 2))
        record.update({k: v for k, v in extra.items() if k != "model_load_s"})
        typer.echo(json.dumps(record))
    elif not quiet:
        line, gpu = _result_line(job, stats), extra.get("gpu")
        if isinstance(gpu, list):  # a clip split across workers (chunks.py)
            line += f" (gpus {','.join(map(str, gpu))})"
        elif gpu is not None:
            line += f" (gpu {gpu})"
        elif "worker" in extra:  # a Ray worker (cluster.py)
            line += f" (worker {extra['worker']} on {extra['node']})"
        typer.echo(line)


def _visible(device: str) -> int:
    """How many devices `--gpus` chooses among: CUDA's visible GPUs, or the CPU's cores."""
    if device == "cuda":
        import torch

        return torch.cuda.device_count()
    return os.cpu_count() or 1


def _run_workers(jobs, opts, device, gpus, err, as_json, quiet, debug) -> int:
    """The jobs over one worker process per GPU (workers.py), longest clip first, a clip split
    across workers when there are more of them than clips (chunks.py); each result reported as
    it completes. Returns the failures."""
    from .chunks import split_tasks
    from .workers import Events, Pool, longest_first

    opts = opts.on_device(device)
    clips = [job.src for job in jobs if not job.still]

    def failed(task, message, tb):
        _report_error(err, StylizeError(message), task.job.src)
        if debug and tb:
            err.print(tb, markup=False, highlight=False)

    with _worker_bars(err, gpus, quiet) as progress:
        events = Events(done=lambda task, stats, extra: report(task.job, stats, extra, as_json, quiet),
                        failed=failed, progress=progress)  # fmt: skip
        tasks, splits = split_tasks(longest_first(jobs, opts.output.fps), len(gpus), opts)
        return Pool(opts, device, gpus, events, clips, debug, splits).run(tasks)


class _worker_bars:
    """One rich progress bar per worker on stderr (its clip, frames, fps); a no-op when quiet or
    off a terminal, as `_progress`."""

    def __init__(self, console, gpus, quiet: bool):
        self.console, self.gpus, self.quiet = console, gpus, quiet

    def __enter__(self):
        self.shown = not self.quiet and self.console.is_interactive
        if not self.shown:
            return lambda gpu, task, p: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(
            TextColumn("gpu {task.fields[gpu]}"), TextColumn("{task.description}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[fps]:.1f} fps"), console=self.console, transient=True,
        )  # fmt: skip
        rows = {gpu: self.bar.add_task("loading", total=None, gpu=gpu, fps=0.0) for gpu in self.gpus}
        self.bar.start()

        def update(gpu, task, p):
            if task is None or isinstance(p, str):  # a worker's state: ready, died
                self.bar.update(rows[gpu], description=str(p), completed=0, total=None, fps=0.0)
                return
            name = task.job.src.name
            if task.chunk is not None:
                name += f" [part {task.chunk.index + 1}/{task.chunk.count}]"
            self.bar.update(rows[gpu], **_bar_row(p, name))

        return update

    def __exit__(self, *exc):
        if self.shown:
            self.bar.stop()
        return False


def _run_cluster(jobs, opts, address, workers, device, err, as_json, quiet, debug) -> int:
    """`_run_jobs` on a Ray cluster (cluster.py): the same lines and records, in the order the clips
    finish, each record with the worker and node that ran it; returns the failures."""
    from .cluster import connected, placement, run_on_cluster

    failed = 0
    with connected(address, debug) as ray:
        where = placement(ray, device, workers, len(jobs))
        what = f"{where.workers} Ray worker{'s' if where.workers > 1 else ''} ({where.device})"
        with err.status(f"0 of {len(jobs)} done on {what}") as status:
            for n, done in enumerate(run_on_cluster(ray, jobs, opts, where), 1):
                status.update(f"{n} of {len(jobs)} done on {what}")
                if done.error is not None:
                    failed += 1
                    _report_error(err, StylizeError(done.error), done.job.src)
                    continue
                extra = {"model_load_s": done.model_load_s, "worker": done.worker, "node": done.node}
                if done.peak_gpu_mem_gib is not None:
                    extra["peak_gpu_mem_gib"] = done.peak_gpu_mem_gib
                report(done.job, done.stats, extra, as_json, quiet)
    return failed


def _result_line(job, stats) -> str:
    if job.still:
        return f"{job.src} -> {job.dst}: still {stats.width}x{stats.height}, {stats.seconds * 1000:.0f} ms"
    return (
        f"{job.src} -> {job.dst}: {stats.frames} frames {stats.width}x{stats.height}, "
        f"{stats.fps:.1f} fps, latency p50 {stats.latency_p50_ms:.0f} ms, p95 {stats.latency_p95_ms:.0f} ms"
    )


def _silence_closed_streams() -> None:
    """Point stdout and stderr at /dev/null (nothing more is printed), so that the interpreter's
    last flush of what could not be written fails silently rather than printing 'Exception
    ignored ... BrokenPipeError'."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. a test runner's buffer)
            pass
    os.close(devnull)


class _progress:
    """A rich progress bar (frames, fps, ETA) on stderr for one clip; a no-op when quiet."""

    def __init__(self, console, name: str, quiet: bool):
        self.console, self.name, self.quiet = console, name, quiet

    def __enter__(self):
        # No bar off a terminal (a log file, a pipe, a test runner): it would show nothing there,
        # and rich ends a non-interactive bar with an empty line on stderr.
        self.shown = not self.quiet and self.console.is_interactive
        if not self.shown:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[fps]:.1f} fps"), TimeRemainingColumn(),
            console=self.console, transient=True,
        )  # fmt: skip
        self.task = self.bar.add_task(self.name, total=None, fps=0.0)
        self.bar.start()

        def update(p):
            self.bar.update(self.task, **_bar_row(p, self.name))

        return update

    def __exit__(self, *exc):
        if self.shown:
            self.bar.stop()
        return False


def _bar_row(p, name: str) -> dict:
    """A progress bar row's fields for a clip's `Progress` p: frames done of its total, the rate,
    and the clip's name with the status of a one-time step (a compile) when there is one."""
    fps = p.done / p.elapsed_s if p.elapsed_s else 0.0
    return {"completed": p.done, "total": p.total, "fps": fps, "description": f"{name} [{p.status}]" if p.status else name}


def _report_error(err, e: BaseException, src=None, debug: bool = False) -> None:
    where = f"{src}: " if src is not None and str(src) not in str(e) else ""
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    from rich.markup import escape  # a message's own brackets are text: `pip install "stylize[cluster]"`

    err.print(f"[red]error[/red]: {escape(where + message)}", markup=True, highlight=False, soft_wrap=True)
    if debug:
        err.print_exception()


def styles() -> None:
    """List the style presets, and the other names a model that knows only its styles (mini) takes."""
    from rich.console import Console
    from rich.table import Table

    from .config import list_presets, style_config

    table = Table("style", "prompt", "also", box=None)
    for name in list_presets("styles"):
        preset = style_config(name)
        table.add_row(name, preset.prompt, ", ".join(preset.aliases))
    Console().print(table)


def models() -> None:
    """List the model presets, whether each can run on this machine, and which a run without
    --model uses, and why."""
    from rich.console import Console
    from rich.table import Table

    from .config import FULL_MODEL_HINT, default_model, list_presets, model_config

    table = Table("model", "kind", "status", box=None)
    for name in list_presets("models"):
        cfg = model_config(name)
        table.add_row(name, cfg.kind, _availability(cfg))
    console = Console()
    console.print(table)
    try:
        chosen = default_model()
    except UsageError as e:  # STYLIZE_MODEL names nothing usable: a run without --model says the same
        console.print(f"\nwithout --model: error: {e}", soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"\nwithout --model: {chosen.config.name} ({chosen.why})", soft_wrap=True)
    if chosen.fallback:
        console.print(FULL_MODEL_HINT, soft_wrap=True)


def _availability(cfg) -> str:
    if cfg.kind == "tiny":
        return "available (random weights, built on first use)"
    if cfg.kind == "random":
        return "available (random weights at full size; for GPU benchmarks)"
    from .config import hub_cache_folder, missing_weights, packaged_folder

    shipped = packaged_folder(cfg.source)
    if shipped is not None:  # weights that ship inside the package (mini)
        if missing_weights(shipped) is None:
            return f"shipped in the package ({shipped})"
        return "not trained yet: scripts/train_mini.py trains it on a GPU machine and writes it into the package"
    source = Path(cfg.source or "").expanduser()
    if source.is_dir():
        return f"found at {source}"
    cached = hub_cache_folder(cfg)
    if cached is not None:
        return f"found in the Hugging Face cache ({cached})"
    return f"not found: `hf download {cfg.source} --revision {cfg.revision} --local-dir DIR`, then --model DIR"


run_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, epilog=EPILOG, context_settings=CONTEXT)
run_app.command(epilog=EPILOG, cls=_Command)(run)
sub_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, context_settings=CONTEXT)
sub_app.command("styles", cls=_Command)(styles)
sub_app.command("models", cls=_Command)(models)
SUBCOMMANDS = {"styles", "models"}


def entry() -> None:
    """The console script: `stylize styles|models` are subcommands; anything else is a run."""
    argv = sys.argv[1:]
    app = sub_app if argv and argv[0] in SUBCOMMANDS else run_app
    with signals.dying_of_signals():
        app(args=argv, prog_name="stylize")
