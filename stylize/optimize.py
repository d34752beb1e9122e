"""Compiling the engine's steps, and keeping what compiling costs off the user's next run.

Each step is a small pure function over plain modules (`engine._Steps`); compiling swaps it for
`torch.compile(fullgraph=True, dynamic=False)`: one graph per step, static shapes, a graph break
or a recompile is an error in the tests rather than a silent slowdown.

- U-Net and TAESD decode run on the main stream: CUDA graphs ("reduce-overhead") replay them
  with one launch each, which is what a launch-bound U-Net needs.
- The text encoder and TAESD encode run on the side stream: compiled without CUDA graphs, because
  CUDA-graph trees own their memory pool and replay per stream; fused kernels are most of the gain.

Compile time is a user-facing cost (256 s for the U-Net alone on an H100). Inductor's on-disk
caches live in ~/.cache/stylize/inductor (`config.use_persistent_compile_cache`, set by the CLI
before torch is imported), and the portable cache artifacts of a finished warm-up
are saved per configuration (`save_artifacts`) and loaded before compiling (`load_artifacts`), so
the second run of the same shapes starts in seconds. `--compile auto` compiles when that pays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# `--compile auto` compiles when the frames saved repay the compile. Measured on the H100 at B=8
# (benchmarks/NOTES.md): eager ~52 fps, compiled ~150 fps, so compiling saves ~13 ms a frame; the
# CLI's first output came after 189 s cold and 41 s warm, which pay after ~15k and ~3k frames.
AUTO_MIN_FRAMES_COLD = 15_000
AUTO_MIN_FRAMES_WARM = 3_000


def cache_root() -> Path:
    from .config import cache_dir

    return cache_dir()


def config_key(stack, cfg, ecfg, work_hw) -> str:
    """What a compiled graph depends on: library versions, GPU, model shapes, batch and geometry."""
    payload = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(stack.device) if stack.device.type == "cuda" else "cpu",
        "model": [stack.config.unet, stack.config.text_encoder, stack.config.vae, stack.config.te_image_size],
        "dtype": str(stack.dtype),
        "batch": cfg.batch_size,
        "steps": cfg.steps,
        "work_hw": list(work_hw),
        "engine": [ecfg.cuda_graphs, ecfg.fast_te, ecfg.te_batch_one, ecfg.static_prompt, ecfg.te_bucket],
        # the adapter changes the U-Net's graph (its weights' values do not): which hooks it wraps
        "adapter": ecfg.adapter_subset if ecfg.adapter else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def artifacts_path(key: str) -> Path:
    return cache_root() / "compiled" / f"{key}.bin"


def load_artifacts(key: str) -> bool:
    """Load saved portable cache artifacts for this configuration; True when there were some."""
    path = artifacts_path(key)
    if not path.is_file():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
        return True
    except Exception as e:  # a stale or foreign cache only costs a cold compile
        log.warning("ignoring compile cache %s: %s", path, e)
        return False


def save_artifacts(key: str) -> Path | None:
    """Save the portable cache artifacts of what has compiled so far (atomically)."""
    saved = torch.compiler.save_cache_artifacts()
    if not saved:
        return None
    data, _info = saved
    path = artifacts_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".partial-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def should_compile(mode: str, device: torch.device, frames: int | None, warm: bool) -> bool:
    """`--compile auto|on|off`: auto compiles on CUDA when the clip is long enough to repay it."""
    if mode != "auto":
        return mode == "on"
    if device.type != "cuda":
        return False
    frames = frames or 0
    return frames >= (AUTO_MIN_FRAMES_WARM if warm else AUTO_MIN_FRAMES_COLD)


def compile_steps(steps, cuda_graphs: bool = True, backend: str = "inductor") -> None:
    """Swap each of the engine's steps for its compiled version (in place)."""
    on_cuda = steps.stack.device.type == "cuda"
    main_mode = "reduce-overhead" if (on_cuda and cuda_graphs and backend == "inductor") else None

    def comp(fn, mode=None):
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, mode=mode)

    steps.velocity = comp(steps.velocity, main_mode)
    steps.vae_decode = comp(steps.vae_decode, main_mode)
    steps.vae_encode = comp(steps.vae_encode)
    steps.text = comp(steps.text)
    steps.compiled = True
