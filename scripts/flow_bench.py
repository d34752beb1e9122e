#!/usr/bin/env python
"""Host cost of the adapter's optical flow: one refresh (a batch of frames against the previous
batch's last frame) with the engine's `flows`, by thread-pool size and OpenCV's own thread count.

    python scripts/flow_bench.py --clip parkour.mp4 --out flow.json

Each setting: median wall ms per refresh over --repeats (RGB frames made grey at the working size
on the workers, as in the engine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stylize import video  # noqa: E402
from stylize.flow import grey, start_flows, wait  # noqa: E402


def main() -> None:
    import cv2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    frames = np.concatenate([b.frames for b in video.read_batches(video.probe(args.clip), 64)])
    frames = frames[np.arange(args.batch * args.repeats + 8) % len(frames)]  # looped when short
    hw = (args.size, args.size)
    greys = [grey(f, hw) for f in frames]
    out = np.empty((args.batch, *hw, 2), np.float32)
    cores = os.cpu_count() or 1
    default_cv = cv2.getNumThreads()
    rows = []
    for cv_threads in (default_cv, 1):
        cv2.setNumThreads(cv_threads)
        for workers in sorted({1, 2, 4, 8, min(args.batch, cores), max(1, cores - 2)}):
            with ThreadPoolExecutor(max_workers=workers) as pool:
                wait(start_flows(pool, frames[8 : 8 + args.batch], greys[7], out))  # warm: per-thread DIS
                times = []
                for r in range(args.repeats):
                    cur = frames[8 + r * args.batch : 8 + (r + 1) * args.batch]
                    prev = greys[7 + r * args.batch]
                    t = time.perf_counter()
                    wait(start_flows(pool, cur, prev, out))
                    times.append((time.perf_counter() - t) * 1000)
            row = {"cv2_threads": cv_threads, "workers": workers, "ms_per_refresh": round(float(np.median(times)), 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    cv2.setNumThreads(default_cv)
    result = {"command": " ".join(sys.argv), "cores": cores, "cv2_default_threads": default_cv,
              "opencv": cv2.__version__, "batch": args.batch, "size": args.size, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
