"""The temporal adapter's conditioning schedule, per clip (DESIGN §4).

At a refresh (a clip's first batch, every N batches, a scene cut) each frame of the batch gets a
conditioning image: the previous batch's last stylized frame warped to it by optical flow between
the previous batch's last *input* frame and this frame; after a cut or at the start of a clip, the
input frame itself. The flow is computed on CPU threads for the batch that uses it (the reference
runtime's off-by-one is a known bug), the warp on the GPU; between refreshes the adapter keeps
its buffers.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .config import EngineConfig
from .flow import flow_pool, grey, start_flows, wait, warp
from .models.lllite import TemporalLLLite, load_lllite
from .schedule import RefreshSchedule

INPUT = "input"  # a refresh conditioned on the input frames themselves


def attach_adapter(unet, stack, ecfg: EngineConfig) -> TemporalLLLite:
    """The adapter of `ecfg`, attached to `unet` (the engine's own copy of the stack's U-Net)."""
    if ecfg.adapter == "random":  # random weights: speed measurements only
        lllite = TemporalLLLite(unet, ecfg.adapter_subset)
    else:
        lllite = load_lllite(ecfg.adapter, unet, ecfg.adapter_subset)
    lllite.to(stack.device, stack.dtype)
    lllite.attach(unet)
    lllite.set_multiplier(ecfg.adapter_multiplier)
    return lllite


class TemporalConditioner:
    """Host side (`prepare`: is a refresh due, and its flows) and device side (`apply`: warp and
    write the adapter's buffers) of the conditioning refresh; `remember` keeps what the next
    refresh warps. `reset` starts a clip."""

    def __init__(self, lllite: TemporalLLLite, ecfg: EngineConfig, device: torch.device):
        self.lllite, self.ecfg, self.device = lllite, ecfg, device
        self.pool: ThreadPoolExecutor | None = None  # flow threads, made on first use
        self.flow_host: torch.Tensor | None = None  # the flows on the host, (B, h, w, 2)
        self.uploaded: torch.cuda.Event | None = None  # the last upload from flow_host is done
        self.flow_ms: list[float] = []  # per flow refresh, from its start to its last flow (benchmarks)
        self.flow_wait_ms: list[float] = []  # of which the feeding thread waited (the rest overlapped)
        self.reset()

    def reset(self, start: int = 0) -> None:
        """A new clip, or a chunk of one that starts at batch `start` (its refresh grid)."""
        self.schedule = RefreshSchedule(self.ecfg.adapter_refresh_every, start)
        self.prev_out: torch.Tensor | None = None  # the last stylized frame (1, 3, h, w) in [0, 1]
        self.prev_grey: np.ndarray | None = None  # the last input frame, grey, working resolution

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def prepare(self, frames: np.ndarray, geo, cut: bool):
        """For the batch about to run: None (no refresh), INPUT, or its flows, started on the flow
        threads (from each of its frames to the previous batch's last input frame); `apply`
        collects them, after the batch's side-stream work has been issued."""
        if not self.schedule.step(cut):
            return None
        if self.prev_out is None or cut:
            return INPUT
        if self.pool is None:
            self.pool = flow_pool(len(frames))
        out = self._flow_buffer((len(frames), *geo.work_hw, 2))
        started = time.perf_counter()
        return started, out, start_flows(self.pool, frames, self.prev_grey, out.numpy(), geo.crop, self.ecfg.flow)

    def apply(self, prepared, x01: torch.Tensor) -> None:
        """On the current (main) stream, before the U-Net: conditioning images into the buffers."""
        if prepared is INPUT:
            cond = x01
        else:
            started, host, futures = prepared
            waited = time.perf_counter()
            wait(futures)
            done = time.perf_counter()
            self.flow_ms.append((done - started) * 1000)
            self.flow_wait_ms.append((done - waited) * 1000)
            flow = host.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                self.uploaded = torch.cuda.Event()
                self.uploaded.record()
            cond = warp(self.prev_out, flow).clamp(0, 1)
        self.lllite.set_condition(cond)

    def _flow_buffer(self, shape) -> torch.Tensor:
        """The host buffer the flow threads write into: pinned on CUDA, reused from refresh to
        refresh once the last upload from it has finished."""
        if self.flow_host is None or tuple(self.flow_host.shape) != shape:
            self.flow_host = torch.empty(shape, dtype=torch.float32, pin_memory=self.device.type == "cuda")
        elif self.uploaded is not None:
            self.uploaded.synchronize()  # long done: the upload was issued a batch or more ago
        return self.flow_host

    def remember(self, last_out01: torch.Tensor, last_frame: np.ndarray, geo) -> None:
        """Keep this batch's last output (1, 3, h, w) and input frame when the next batch's
        refresh is due by the period (a refresh after a cut uses its input frames): the grey
        conversion runs on the feeding thread, so only where it is needed."""
        if not self.schedule.next_is_periodic:
            return
        self.prev_out = last_out01.clone()  # clone: CUDA-graph outputs are overwritten by the next replay
        self.prev_grey = grey(last_frame, geo.work_hw, geo.crop)
