#!/usr/bin/env python
"""Run the `stylize` command on real clips and check what it wrote against the input: frame count,
timestamps, display size and orientation, audio. Also times cold and warm starts (compile cache).

    python scripts/cli_check.py --out result.json -- CLIP... [stylize options]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stylize import video  # noqa: E402


def pts_seconds(path: Path) -> list[float]:
    info = video.probe(path)
    return [float(p * info.time_base) for b in video.read_batches(info, 64) for p in b.pts]


def check(src: Path, dst: Path) -> dict:
    a, b = video.probe(src), video.probe(dst)
    ta, tb = pts_seconds(src), pts_seconds(dst)
    return {
        "src": src.name, "frames": [a.frames, b.frames], "display": [[a.display_width, a.display_height],
        [b.display_width, b.display_height]], "rotation_out": b.rotation,
        "max_pts_error_s": max(abs(x - y) for x, y in zip(ta, tb)) if len(ta) == len(tb) else None,
        "audio": [[t.codec for t in a.audio], [t.codec for t in b.audio]],
        "ok": a.frames == b.frames and (a.display_width, a.display_height) == (b.display_width, b.display_height)
        and b.rotation == 0 and len(a.audio) == len(b.audio) and len(ta) == len(tb)
        and max(abs(x - y) for x, y in zip(ta, tb)) < 0.002,
    }  # fmt: skip


def run(args: list[str]) -> tuple[list[dict], float]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "stylize", *args, "--json"], capture_output=True, text=True)
    took = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"stylize failed ({out.returncode}): {out.stderr[-2000:]}")
    return [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")], took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--twice", action="store_true", help="run again to time a warm start")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    clips = [Path(a) for a in rest if Path(a).exists()]
    options = [a for a in rest if not Path(a).exists()]
    result = {"command": " ".join(sys.argv), "runs": []}
    for attempt in range(2 if args.twice else 1):
        folder = Path(tempfile.mkdtemp())
        records, took = run([*map(str, clips), *options, "-o", str(folder)])
        checks = [check(Path(r["src"]), Path(r["dst"])) for r in records]
        result["runs"].append({"attempt": attempt, "process_s": round(took, 1), "records": records, "checks": checks})
        print(json.dumps(result["runs"][-1]), flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
