#!/usr/bin/env python
"""Speed and accuracy of the adapter's optical-flow choices on real clips (CPU, one OpenCV thread).

    python scripts/flow_quality.py --out flow-quality.json ../shared/media/davis512sq/*.mp4

For each clip, as a refresh sees it: the flow from each of 8 frames to the frame before them (gaps
of 1 to 8 frames), at the working size (512²), in groups starting every 16 frames. Reported per
method: median ms per frame and the warp error (the previous input frame warped by the flow to the
current one, mean absolute difference on 0-255), with "none" as the no-flow baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stylize import video  # noqa: E402
from stylize.flow import grey, warp  # noqa: E402


def methods():
    import cv2

    def dis(preset, scale=1):
        engine = cv2.DISOpticalFlow_create(preset)

        def calc(current, previous):
            if scale == 1:
                return engine.calc(current, previous, None)
            h, w = current.shape
            small = (w // scale, h // scale)
            f = engine.calc(cv2.resize(current, small, interpolation=cv2.INTER_AREA),
                            cv2.resize(previous, small, interpolation=cv2.INTER_AREA), None)  # fmt: skip
            return cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR) * scale

        return calc

    return {
        "dis-ultrafast": dis(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST),
        "dis-fast": dis(cv2.DISOPTICAL_FLOW_PRESET_FAST),
        "dis-fast-half": dis(cv2.DISOPTICAL_FLOW_PRESET_FAST, 2),
        "dis-medium-half": dis(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM, 2),
        "none": lambda current, previous: np.zeros((*current.shape, 2), np.float32),
    }


def warp_error(previous_rgb: np.ndarray, current_rgb: np.ndarray, flow: np.ndarray) -> float:
    image = torch.from_numpy(previous_rgb).permute(2, 0, 1)[None].float()
    warped = warp(image, torch.from_numpy(flow)[None])[0].permute(1, 2, 0).numpy()
    return float(np.abs(warped - current_rgb.astype(np.float32)).mean())


def main() -> None:
    import cv2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clips", type=Path, nargs="+")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    hw = (args.size, args.size)
    result = {"command": " ".join(sys.argv), "opencv": cv2.__version__, "cpu": platform.processor() or platform.machine(),
              "size": args.size, "clips": {}}  # fmt: skip
    for clip in args.clips:
        frames = np.concatenate([b.frames for b in video.read_batches(video.probe(clip), 64)])
        frames = np.stack([cv2.resize(f, hw, interpolation=cv2.INTER_AREA) for f in frames])
        rows = {}
        for name, calc in methods().items():
            times, errors = [], []
            for start in range(0, len(frames) - 16, 16):
                previous = frames[start + 7]
                previous_grey = grey(previous, hw)
                for k in range(8, 16):
                    current = frames[start + k]
                    t = time.perf_counter()
                    flow = calc(grey(current, hw), previous_grey)
                    times.append((time.perf_counter() - t) * 1000)
                    errors.append(warp_error(previous, current, flow))
            rows[name] = {"ms_per_frame": round(float(np.median(times)), 2), "warp_error": round(float(np.mean(errors)), 2),
                          "pairs": len(errors)}  # fmt: skip
        result["clips"][clip.stem] = rows
        print(clip.stem, json.dumps(rows), flush=True)
    names = list(methods())
    result["mean"] = {
        n: {k: round(float(np.mean([c[n][k] for c in result["clips"].values()])), 2) for k in ("ms_per_frame", "warp_error")}
        for n in names
    }
    print("mean", json.dumps(result["mean"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
