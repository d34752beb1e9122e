#!/usr/bin/env python
"""Probe (#17, NOTES 30): the `--gpus` wiring on a host with one GPU. Two worker processes share
that GPU (each believes it has its own), so the spawn, queue, progress, split and join paths all
run on CUDA, though the speed-up of a second GPU cannot be measured here.

    python scripts/probes/workers_one_gpu.py OUT_DIR CLIP [CLIP ...] -- [stylize options]

Runs `stylize CLIPS -o OUT_DIR/one` in this process, then `--gpus 2` into OUT_DIR/two with both
workers on GPU 0, then the first clip alone with `--gpus 2` (split in two chunks, joined) into
OUT_DIR/split; prints a JSON line: wall seconds of each run and, per output, the frame count and
the largest absolute difference from the one-process output (0-255 RGB).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))  # stylize, from a checkout that is not installed


def child() -> None:
    """`stylize ARGS` with two visible "GPUs" that are both the one GPU 0."""
    from stylize import cli, workers

    visible = cli._visible
    cli._visible = lambda device: 2 if device == "cuda" else visible(device)
    real = workers.worker_env
    workers.worker_env = lambda gpu, device, visible=None: "0" if device == "cuda" else real(gpu, device, visible)
    sys.argv = ["stylize", *sys.argv[2:]]
    cli.entry()


def frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def run(args: list[str], shared: bool) -> float:
    """Wall seconds of `stylize ARGS` in a fresh process (shared: both workers on GPU 0)."""
    entry = [str(HERE), "--child"] if shared else ["-c", "import sys; from stylize.cli import entry; entry()"]
    t = time.perf_counter()
    subprocess.run([sys.executable, *entry, *args], check=True)
    return time.perf_counter() - t


def main() -> None:
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    split_at = rest.index("--") if "--" in rest else len(rest)
    clips, opts = rest[:split_at], rest[split_at + 1 :]
    result = {"wall_s": {}, "outputs": {}}
    result["wall_s"]["one"] = run([*clips, "-o", str(out / "one"), "-y", *opts], shared=False)
    result["wall_s"]["two"] = run([*clips, "-o", str(out / "two"), "-y", "--gpus", "2", *opts], shared=True)
    result["wall_s"]["split"] = run([clips[0], "-o", str(out / "split"), "-y", "--gpus", "2", *opts], shared=True)
    for run_name in ("two", "split"):
        for path in sorted((out / run_name).iterdir()):
            a, b = frames(out / "one" / path.name), frames(path)
            diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) if a.shape == b.shape else None
            result["outputs"][f"{run_name}/{path.name}"] = {"frames": len(b), "frames_one": len(a), "max_abs_diff": diff}
    print(json.dumps(result))


if __name__ == "__main__":
    child() if sys.argv[1:2] == ["--child"] else main()
