#!/usr/bin/env python
"""`make demo`: stylize a short clip with the default model (no --model) and draw a contact sheet.

    python scripts/demo.py [--style oil] [--clip FILE]

The clip: --clip, else `../shared/media`'s skier when the shared folder is there, else (a user's
fresh clone) one made on the spot: a camera moving over data/demo/european-honey-bee.jpg (public
domain, John Severns; data/README.md), 48 frames at 384x288 with synthetic pan, zoom and roll
(stylize.train.motion). It runs the `stylize` command as a user would, so the default's one-line
notice shows, and writes out/demo/<clip>_<style>.mp4 and a contact sheet
out/demo/<clip>_<style>.png (input above, output below).

When the default model cannot run here (mini shipped without trained weights) it says so and runs
the tiny random model instead, to show the pipeline.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_CLIP = REPO.parent / "shared" / "media" / "tuneavideo_man-skiing_718x718_29.97fps_aac.mp4"
STILL = REPO / "data" / "demo" / "european-honey-bee.jpg"
OUT = REPO / "out" / "demo"


def synthetic_clip(path: Path) -> Path:
    """The shipped still under a moving camera, as an .mp4 (made once)."""
    if path.is_file():
        return path
    import cv2

    from stylize.train.motion import synthetic_clip as make, write_mp4

    still = cv2.cvtColor(cv2.imread(str(STILL)), cv2.COLOR_BGR2RGB)
    clip = make(still, frames=48, size=(288, 384), seed=0, moving_layer=False)
    return write_mp4(path, clip.frames, fps=24)


def frames(path: Path, n: int = 6):
    import numpy as np

    from stylize import video

    all_frames = np.concatenate([b.frames for b in video.read_batches(video.probe(path), 16)])
    return all_frames[np.linspace(0, len(all_frames) - 1, n).round().astype(int)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--style", default="oil")
    ap.add_argument("--clip", type=Path, default=None)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    clip = args.clip or (SHARED_CLIP if SHARED_CLIP.is_file() else synthetic_clip(OUT / "honey-bee.mp4"))
    dst = OUT / f"{clip.stem}_{args.style}.mp4"
    stylize = shutil.which("stylize", path=str(Path(sys.executable).parent)) or "stylize"
    command = [stylize, str(clip), "--style", args.style, "-o", str(dst), "-y"]
    print("==> " + " ".join(command[1:]), flush=True)
    run = subprocess.run(command)
    model = "the default model"
    if run.returncode != 0:
        print("==> the default model could not run here (see the line above): showing the pipeline with "
              "the tiny random model instead (--model tiny)", flush=True)  # fmt: skip
        run = subprocess.run([*command, "--model", "tiny"])
        model = "tiny (random weights)"
        if run.returncode != 0:
            return run.returncode
    from stylize.train.metrics import contact_sheet

    sheet = OUT / f"{clip.stem}_{args.style}.png"
    contact_sheet([frames(clip), frames(dst)], ["input", f"{args.style}, {model}"]).save(sheet)
    print(f"==> wrote {dst} and its contact sheet {sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
