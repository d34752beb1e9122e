#!/usr/bin/env python
"""Two versions of stylize on the same bench rows, in one process, in interleaved rounds.

    python scripts/bench_ab.py --clip parkour.mp4 --old .carry/old --rows cf8,d8,e8 --rounds 3 --out ab.json

`--old DIR` holds an earlier tree whose package was renamed `stylize_old` (its imports too), with
its own scripts/bench.py; make it with:

    git archive REV stylize configs scripts/bench.py | tar x -C DIR && mv DIR/stylize DIR/stylize_old
    grep -rl stylize --include=*.py DIR | xargs sed -i -E 's/\\b(from|import) stylize(\\.| |$)/\\1 stylize_old\\2/g'

Each version builds each row's stylizer once with its own bench.make (the same engine options),
warms it up through its own stylize_video on a short clip (compiling when the row does), then every
round runs every row through each version's own stylize_video on the looped clip, old and new one
after the other: a machine's drift hits both alike. fps is the pipeline's wall-clock figure, as in
bench.py. Both versions share one model stack (the same weights) and the process's compile caches.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def load_bench(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", type=Path, required=True)
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--rows", default="cf8,d8,e8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=480)
    ap.add_argument("--versions", default="old,new", help="which to build (old,new); --rounds 0 only warms up")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="random-full")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (--model tiny)")
    args = ap.parse_args()
    cuda = args.device == "cuda"

    sys.path.insert(0, str(args.old.resolve()))  # stylize_old
    benches = {}
    for v in args.versions.split(","):
        path = (args.old / "scripts" / "bench.py") if v == "old" else (REPO / "scripts" / "bench.py")
        benches[v] = load_bench(path, f"bench_{v}")
    new = load_bench(REPO / "scripts" / "bench.py", "bench_driver")  # the clip, the stack
    stack = new.load_stack(new.model_config(args.model), args.device)
    prompt = new.style_config("oil").prompt
    tmp = Path(tempfile.mkdtemp(prefix="ab-"))
    clip = new.looped_clip(args.clip, args.frames, tmp)
    warm = new.looped_clip(args.clip, 24, tmp)
    result = {
        "what": "old vs new stylize, same rows, interleaved rounds in one process", "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model, "torch": torch.__version__, "command": " ".join(sys.argv),
        "commit": os.popen(f"git -C {REPO} rev-parse HEAD 2>/dev/null").read().strip() or None,
        "clip": str(args.clip), "frames": args.frames, "warmup_s": {}, "runs": [],
    }  # fmt: skip
    stylizers = {}
    for name in args.rows.split(","):
        for v, bench in benches.items():
            t = time.perf_counter()
            s = bench.make(stack, name, prompt)
            enc = bench.OutputConfig(crf=18, preset="veryfast", audio=False)
            bench.stylize_video(warm, tmp / f"warm_{v}_{name}.mp4", s, enc)
            result["warmup_s"][f"{v}:{name}"] = round(time.perf_counter() - t, 1)
            print(f"[{v}:{name}] warm-up {result['warmup_s'][f'{v}:{name}']} s", flush=True)
            stylizers[v, name] = (s, enc)
    for rnd in range(args.rounds):
        for name in args.rows.split(","):
            for v, bench in benches.items():
                s, enc = stylizers[v, name]
                if cuda:
                    torch.cuda.synchronize()
                stats = bench.stylize_video(clip, tmp / f"{v}_{name}.mp4", s, enc)
                run = {"version": v, "row": name, "round": rnd, "fps": round(stats.fps, 1),
                       "latency_p50_ms": round(stats.latency_p50_ms, 1), "latency_p95_ms": round(stats.latency_p95_ms, 1)}  # fmt: skip
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    medians = {}
    for name in args.rows.split(","):
        for v in benches:
            fps = [r["fps"] for r in result["runs"] if r["row"] == name and r["version"] == v]
            if fps:
                medians[f"{v}:{name}"] = round(float(np.median(fps)), 1)
        if f"old:{name}" in medians and f"new:{name}" in medians:
            medians[f"new/old:{name}"] = round(medians[f"new:{name}"] / medians[f"old:{name}"], 3)
    result["median_fps"] = medians
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(medians, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser("~/.cache/stylize/inductor"))
    main()
