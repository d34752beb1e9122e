"""What one training step of `mini` sees: a seeded plan of crops, styles and prompts, the crops cut
on the training device, and the teachers' targets made there too (scripts/train_mini.py).

    plan = plan_step(seed, stage, step, stills_hw, styles, batch_256, sizes)   # pure: (seed, stage, step)
    x = gpu_crops(stills, plan)                          # (B, 3, S, S) float in [0, 1], 8-bit levels
    y = targets(teachers, plan, x, anime)                # the teacher of each sample's style, same layout

Every random choice of a step comes from `np.random.default_rng([seed, stage, step])`, so a resumed
run sees the same samples as an uninterrupted one, whichever process makes them.

The teachers run as their torch forms on the training device, except `cv2.stylization` (anime),
which has none: `AnimeWorkers` makes its samples (crop, jitter, teacher) in CPU processes ahead of
the step that needs them, from the same plan. The arbitrary-style teachers take their style vector
from `style_vectors.json` (made once here with scikit-image, which the GPU machine lacks).
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

STYLE_VECTORS = Path(__file__).with_name("style_vectors.json")
JITTER = (0.12, 0.12, 0.25)  # largest brightness, contrast and saturation change (a share)


# -- the plan of one step -------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """One step's samples. boxes: (still, top, left, side in the still, mirrored) per sample;
    jitter: (B, 3) brightness, contrast, saturation factors."""

    side: int
    styles: tuple[str, ...]
    prompts: tuple[str, ...]
    boxes: tuple[tuple[int, int, int, int, bool], ...]
    jitter: np.ndarray

    def indices(self, style: str) -> list[int]:
        return [i for i, s in enumerate(self.styles) if s == style]


def batch_for(side: int, batch_256: int) -> int:
    """Samples in a step of crops of `side`: the same pixels as `batch_256` crops of 256."""
    return max(1, round(batch_256 * (256 / side) ** 2))


def plan_step(seed: int, stage: int, step: int, stills_hw: Sequence[tuple[int, int]],
              style_prompts: dict[str, list[str]], batch_256: int, sizes: Sequence[int],
              min_scale: float = 0.25) -> StepPlan:  # fmt: skip
    """The samples of `step`: a crop side from `sizes`, the styles in turn from a random start
    (each style equally often), a random prompt of the style (its preset's prompt half the time,
    else an alias), random squares of random stills as `data.random_crop` draws them."""
    rng = np.random.default_rng([seed, stage, step])
    side = int(rng.choice(sizes))
    b = batch_for(side, batch_256)
    names = sorted(style_prompts)
    start = int(rng.integers(len(names)))
    styles = tuple(names[(start + i) % len(names)] for i in range(b))
    prompts = []
    for s in styles:
        options = style_prompts[s]
        prompts.append(
            options[0] if len(options) == 1 or rng.random() < 0.5 else options[int(rng.integers(1, len(options)))]
        )
    boxes = []
    for _ in range(b):
        k = int(rng.integers(len(stills_hw)))
        h, w = stills_hw[k]
        short = min(h, w)
        n = max(16, min(short, round(short * rng.uniform(min_scale, 1.0))))
        boxes.append((k, int(rng.integers(0, h - n + 1)), int(rng.integers(0, w - n + 1)), n, bool(rng.random() < 0.5)))
    jitter = 1 + rng.uniform(-1, 1, (b, 3)) * np.asarray(JITTER)
    return StepPlan(side, styles, tuple(prompts), tuple(boxes), jitter.astype(np.float32))


def jitter_colours(x_bchw: torch.Tensor, factors_b3: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast (about each image's mean) and saturation (about its luma) changes of
    float RGB in [0, 1], rounded to 8-bit levels as decoded video is."""
    bright, contrast, sat = (factors_b3[:, i].view(-1, 1, 1, 1).to(x_bchw) for i in range(3))
    mean = x_bchw.mean((1, 2, 3), keepdim=True)
    x = ((x_bchw - mean) * contrast + mean) * bright
    luma = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (luma + (x - luma) * sat).clamp(0, 1)
    return torch.round(x * 255) / 255


def crop_one(still_hwc: torch.Tensor, box, side: int) -> torch.Tensor:
    """One sample's square from a still (H, W, 3) uint8 tensor -> (3, side, side) float in [0, 1]
    (antialiased bilinear when shrinking, bicubic when enlarging), mirrored if the box says so."""
    _, top, left, n, flip = box
    x = still_hwc[top : top + n, left : left + n].permute(2, 0, 1)[None].float() / 255  # (1, 3, n, n)
    if n != side:
        mode = "bilinear" if n > side else "bicubic"
        x = F.interpolate(x, size=(side, side), mode=mode, antialias=n > side, align_corners=False)
    x = x.clamp(0, 1)[0]
    return x.flip(-1) if flip else x


def gpu_crops(stills: Sequence[torch.Tensor], plan: StepPlan) -> torch.Tensor:
    """The plan's crops, cut from stills already on the training device, colour-jittered:
    (B, 3, S, S) float in [0, 1] on 8-bit levels."""
    x = torch.stack([crop_one(stills[box[0]], box, plan.side) for box in plan.boxes])
    return jitter_colours(x, torch.from_numpy(plan.jitter).to(x.device))


# -- the arbitrary-style teachers without scikit-image --------------------------------------------


def make_style_vectors(names: Sequence[str] = ("coffee", "gravel")) -> dict[str, Any]:
    """The arbitrary network's style vector (float predictor) of each scikit-image still, with
    the sha256 of the still's pixels: run here (scikit-image present), written to style_vectors.json."""
    from .nets import StylePredictor, load_graph
    from .teachers import style_input, style_still

    predictor = StylePredictor(load_graph("arbitrary_predict"), quantized=False).eval()
    out = {}
    for name in names:
        still = style_still(name)
        with torch.inference_mode():
            vec = predictor(torch.from_numpy(style_input(still)))  # (1, 100)
        out[name] = {"pixels_sha256": hashlib.sha256(still.tobytes()).hexdigest(),
                     "vector": [float(v) for v in vec.flatten()]}  # fmt: skip
    return out


def style_vector(name: str) -> torch.Tensor:
    """(1, 100) float32, the stored style vector of scikit-image's still `name`."""
    table = {k: v for k, v in json.loads(STYLE_VECTORS.read_text()).items() if isinstance(v, dict)}
    if name not in table:
        raise KeyError(f"no stored style vector for {name!r} in {STYLE_VECTORS}; known: {', '.join(table)}")
    return torch.tensor(table[name]["vector"], dtype=torch.float32).view(1, -1)


def _arbitrary_stored(style_image: str, size: int | None, int8: bool):
    """teachers.ArbitraryTeacher with its style vector from style_vectors.json instead of
    running the predictor on a scikit-image still (same forward, same transformer)."""
    from torch import nn

    from .nets import StyleTransformer, load_graph
    from .teachers import ArbitraryTeacher

    if int8:
        raise ValueError("style_vectors.json holds the float predictor's vectors; int8 teachers need scikit-image")
    teacher = ArbitraryTeacher.__new__(ArbitraryTeacher)
    nn.Module.__init__(teacher)  # the fields ArbitraryTeacher.__init__ sets, minus the predictor run
    teacher.register_buffer("style", style_vector(style_image))
    teacher.net = StyleTransformer(load_graph("arbitrary_transform"), quantized=False)
    teacher.size = size
    return teacher


def torch_teacher(style: str, device) -> torch.nn.Module | None:
    """The torch form of `style`'s teacher on `device` in eval mode, None for a CPU-only one."""
    from ..config import style_config
    from .teachers import _DEFAULTS, load_teacher

    spec = dict(style_config(style).teacher)
    if spec["kind"] == "stylization":
        return None
    if spec["kind"] == "arbitrary":
        params = {**_DEFAULTS["arbitrary"], **{k: v for k, v in spec.items() if k != "kind"}}
        return _arbitrary_stored(**params).to(device).eval().requires_grad_(False)
    return load_teacher(spec, str(device)).torch_module()


@torch.no_grad()
def targets(teachers: dict[str, torch.nn.Module | None], plan: StepPlan, x_bchw: torch.Tensor) -> torch.Tensor:
    """Each sample's teacher output (B, 3, S, S) float in [0, 1], in fp32 with TF32 off (the
    teachers match their CPU calls within a level so, data/teachers.md); CPU-only styles are left
    as zeros for the caller to fill (AnimeWorkers)."""
    y = torch.zeros_like(x_bchw)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for style, module in teachers.items():
            idx = plan.indices(style)
            if idx and module is not None:
                y[idx] = module(x_bchw[idx].float()).clamp(0, 1)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return y


# -- the CPU-only teacher, ahead of time in worker processes --------------------------------------


def cpu_samples(stills_hwc: Sequence[np.ndarray], plan: StepPlan, style: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (n, S, S, 3) uint8, for the plan's samples of a CPU-only style:
    cut, resized and jittered on the CPU, then the teacher's OpenCV call."""
    import cv2

    from ..config import style_config
    from .teachers import load_teacher

    teacher = load_teacher(style_config(style).teacher)
    idx = plan.indices(style)
    if not idx:
        empty = np.zeros((0, plan.side, plan.side, 3), np.uint8)
        return empty, empty
    crops = []
    for i in idx:
        k, top, left, n, flip = plan.boxes[i]
        c = stills_hwc[k][top : top + n, left : left + n]
        c = cv2.resize(c, (plan.side, plan.side), interpolation=cv2.INTER_AREA if n >= plan.side else cv2.INTER_CUBIC)
        crops.append(c[:, ::-1] if flip else c)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(crops))).permute(0, 3, 1, 2).float() / 255
    x = jitter_colours(x, torch.from_numpy(plan.jitter[idx]))
    inputs = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return inputs, teacher(np.ascontiguousarray(inputs))


_WORKER: dict[str, Any] = {}


def _worker_init(stills_hwc: list[np.ndarray]) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    _WORKER["stills"] = stills_hwc


def _worker_task(plan: StepPlan, style: str):
    return cpu_samples(_WORKER["stills"], plan, style)


class AnimeWorkers:
    """The CPU-only teachers' samples for upcoming steps, made by `workers` processes (0: in this
    process, when asked). `submit(step, plan)` queues a step (call it `ahead` steps early),
    `take(step)` returns its (inputs, targets) per CPU-only style, in submission order."""

    def __init__(self, stills_hwc: list[np.ndarray], styles: Sequence[str], workers: int):
        self.styles, self.stills = list(styles), stills_hwc
        self.pending: collections.OrderedDict[int, dict] = collections.OrderedDict()
        # forkserver: the training process may already hold CUDA and threads, which fork must not copy
        self.pool = (multiprocessing.get_context("forkserver").Pool(workers, _worker_init, (stills_hwc,))
                     if workers and self.styles else None)  # fmt: skip

    def submit(self, step: int, plan: StepPlan) -> None:
        if self.pool is None:
            self.pending[step] = {s: (plan, s) for s in self.styles}
        else:
            self.pending[step] = {s: self.pool.apply_async(_worker_task, (plan, s)) for s in self.styles}

    def take(self, step: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        jobs = self.pending.pop(step)
        if self.pool is None:
            return {s: cpu_samples(self.stills, *job) for s, job in jobs.items()}
        return {s: job.get(timeout=600) for s, job in jobs.items()}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
