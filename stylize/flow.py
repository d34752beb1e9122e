"""Dense optical flow on CPU threads and the backward warp on the GPU, for the temporal adapter's
conditioning image (DESIGN §4): the previous batch's last stylized frame, warped to each frame.

Flow between grey working-resolution input frames is OpenCV's DIS by default: on parkour at 512²
its "fast" preset took 4.7 ms a frame against Farneback's 49 ms (one core), with a lower warp
error (4.25 against 4.42 on the 0-255 scale; benchmarks/NOTES.md). We use its "ultrafast" preset:
over the ten DAVIS clips, for the 1-8 frame gaps a refresh spans (512², one core), it took 2.97 ms
a frame against 5.14 for "fast", at the same warp error (16.01 against 16.03; no flow: 31.91;
`scripts/flow_quality.py`, NOTES item 17); "fast" is kept as `method="dis-fast"`. Farneback with
the reference runtime's parameters (pyramid 0.5, 3 levels, window 15, 3 iterations, poly_n 5,
sigma 1.2) is kept as `method="farneback"`.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F


def grey(frame_hwc_uint8: np.ndarray, work_hw: tuple[int, int], crop=None) -> np.ndarray:
    """One RGB frame → grey uint8 (h, w) at the working resolution (after the centre crop)."""
    import cv2

    if crop is not None:
        top, left, side = crop
        frame_hwc_uint8 = frame_hwc_uint8[top : top + side, left : left + side]
    small = cv2.resize(frame_hwc_uint8, (work_hw[1], work_hw[0]), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)


_local = threading.local()  # one DIS object per thread: they hold state


def flow_to_previous(current: np.ndarray, previous: np.ndarray, method: str = "dis") -> np.ndarray:
    """Dense flow (h, w, 2) float32 from `current` to `previous` (grey uint8): the pixel at
    (y, x) of the current frame came from (y + f[..., 1], x + f[..., 0]) of the previous one."""
    import cv2

    if method == "farneback":
        return cv2.calcOpticalFlowFarneback(current, previous, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    preset = {"dis": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "dis-fast": cv2.DISOPTICAL_FLOW_PRESET_FAST}[method]
    engines = _local.__dict__.setdefault("dis", {})
    if method not in engines:
        engines[method] = cv2.DISOpticalFlow_create(preset)
    return engines[method].calc(current, previous, None)


def start_flows(pool: ThreadPoolExecutor, frames, previous: np.ndarray, out: np.ndarray, crop=None, method: str = "dis") -> list[Future]:
    """Start the flows from each RGB frame to `previous` (grey): one task per frame, in parallel
    (OpenCV releases the GIL), each making its frame grey at the working size and writing its
    flow into `out[i]` ((B, h, w, 2) float32: pinned memory, ready for the upload)."""
    work_hw = out.shape[1:3]

    def one(i: int) -> None:
        out[i] = flow_to_previous(grey(frames[i], work_hw, crop), previous, method)

    return [pool.submit(one, i) for i in range(len(frames))]


def wait(futures: list[Future]) -> None:
    """Until every started flow is written (re-raising a worker's error)."""
    for f in futures:
        f.result()


def flow_pool(batch_size: int) -> ThreadPoolExecutor:
    """Threads for the flows: one per frame, at most half the cores, with OpenCV's own threading
    off (one DIS per thread). Measured on the 16-core H100 host (benchmarks/NOTES.md): all cores
    gave the fastest refresh alone but starved the threads that feed the GPU and encode."""
    import cv2

    cv2.setNumThreads(1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    workers = max(1, min(batch_size, cores // 2))
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flow")


def warp(image_bchw: torch.Tensor, flow_bhw2: torch.Tensor) -> torch.Tensor:
    """Backward warp: sample `image` (1 or B, C, h, w) at each pixel + its flow, bilinear, with
    replicated borders. Returns (B, C, h, w)."""
    b, h, w, _ = flow_bhw2.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=flow_bhw2.device, dtype=torch.float32),
        torch.arange(w, device=flow_bhw2.device, dtype=torch.float32),
        indexing="ij",
    )
    x = (xs + flow_bhw2[..., 0]) / max(w - 1, 1) * 2 - 1  # to grid_sample's [-1, 1], align_corners
    y = (ys + flow_bhw2[..., 1]) / max(h - 1, 1) * 2 - 1
    grid = torch.stack([x, y], dim=-1)  # (B, h, w, 2)
    source = image_bchw.float().expand(b, -1, -1, -1)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=True)
