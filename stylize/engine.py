"""The streaming engine: the reference math, batched and overlapped on the GPU (DESIGN §5).

    engine = Engine(stack, PipelineConfig(...), EngineConfig(...))
    engine.reset()                      # a new clip: nothing carries over
    for batch in decoded_batches:
        for ready in engine.feed(batch):    # FrameBatch in, finished FrameBatches out
            encode(ready)
    for ready in engine.flush(): encode(ready)

Batch n goes through two CUDA streams:
- side stream: upload of the pinned uint8 frames, resize and normalise, the text encoder (when a
  refresh is due) and TAESD encode; it ends with the event `ready`;
- main stream: waits for `ready`, runs the U-Net steps and TAESD decode, resizes to the output size
  and copies the uint8 result into pinned host memory; it ends with the event `done`.
`feed(n+1)` issues batch n+1's side work while the GPU still runs batch n's U-Net, and hands back
batch n once its `done` event has fired: the only wait on the host, on work issued a call earlier.
No device-wide synchronize, no `.item()`/`.tolist()`/`.cpu()` in the loop. On the CPU the same
code runs with no streams (the tests check it against the reference path).

With a sink (`start_sink`, the CLI's path) a collector thread hands batches back as their `done`
events fire, and `feed` returns only while fewer than `EngineConfig.in_flight` batches are issued
and not handed back: the next batch is taken from the decoder no earlier than the GPU can start
on it, since every batch held anywhere adds a batch period to each frame's latency.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, replace

import numpy as np
import torch

from .config import EngineConfig, PipelineConfig
from .models import ModelStack
from .models.text_encoder import encode, encode_text_only, tokenize_prompt
from .reference import (
    draw_noise,
    euler,
    flow_sigmas,
    geometry,
    resize,
    to_output,
    to_working,
    vae_decode,
    vae_encode,
    velocity,
)

log = logging.getLogger(__name__)


def thumbnail(frame_hwc_uint8: np.ndarray) -> np.ndarray:
    """A ~32-pixel grey thumbnail in [0, 1] for cheap scene-cut detection on the host."""
    h, w = frame_hwc_uint8.shape[:2]
    step = max(1, max(h, w) // 32)
    return frame_hwc_uint8[::step, ::step].mean(axis=-1, dtype=np.float32) / 255


@dataclass
class _Pending:
    """A batch on the GPU: its frames' metadata, the pinned host tensor its output lands in, and
    the event that fires when it is there."""

    batch: object  # the FrameBatch it came from
    real: int  # frames before padding
    out: torch.Tensor  # (B, H', W', 3) uint8, pinned on CUDA
    done: torch.cuda.Event | None


class Engine:
    """Stateful per clip (`reset`); one prompt at a time (`set_prompt`)."""

    def __init__(self, stack: ModelStack, cfg: PipelineConfig, ecfg: EngineConfig = EngineConfig()):
        self.stack, self.cfg, self.ecfg = stack, cfg, ecfg
        self.device = stack.device
        self.cuda = self.device.type == "cuda"
        self.main = torch.cuda.current_stream(self.device) if self.cuda else None
        self.side = torch.cuda.Stream(self.device) if (self.cuda and ecfg.side_stream) else None
        self.multiple = 8 * 2 ** (len(stack.unet.config.block_out_channels) - 1)
        self.lllite = self.temporal = None
        unet = stack.unet
        if ecfg.fuse_qkv or ecfg.adapter:  # these change the U-Net's modules: the engine's own copy
            unet = copy.deepcopy(unet)
        if ecfg.fuse_qkv:
            from .optimize import fuse_qkv

            fuse_qkv(unet)
        if ecfg.adapter:
            from .temporal import TemporalConditioner, attach_adapter

            self.lllite = attach_adapter(unet, stack, ecfg)
            self.temporal = TemporalConditioner(self.lllite, ecfg, self.device)
        self.steps = _Steps(stack, unet)  # the callables the GPU runs; `optimize` may compile them
        self.fast_te = None
        if ecfg.fast_te and not ecfg.static_prompt:
            from .fast_te import FastTextEncoder

            self.fast_te = FastTextEncoder(
                stack.text_encoder, stack.config.te_image_size, stack.config.hidden_states, ecfg.te_bucket
            )
        self.compile_keys: dict = {}  # work_hw -> compile-cache key, once its warm-up has been saved
        self.timeline: list | None = None  # set to [] to record (batch, stage, stream, start, end) events
        self.sink = None
        self.set_prompt(cfg.prompt)
        self.reset()

    def close(self) -> None:
        """Release the flow threads."""
        if self.temporal is not None:
            self.temporal.close()

    @property
    def flow_ms(self) -> list[float]:
        return self.temporal.flow_ms if self.temporal is not None else []

    def enable_compile(self, backend: str = "inductor") -> None:
        """Compile the steps (optimize.py); compiled graphs are cached across runs per geometry."""
        from .optimize import compile_steps

        compile_steps(self.steps, self.ecfg.cuda_graphs, backend, self.ecfg.side_graphs)

    @property
    def compiled(self) -> bool:
        return getattr(self.steps, "compiled", False)

    def warming_up(self, in_hw) -> bool:
        """True when the next batch of this size will compile (a one-time step per geometry)."""
        return self.compiled and geometry(in_hw, self.cfg.size, self.multiple, self.cfg.crop).work_hw not in self.compile_keys

    # -- per-clip and per-prompt state ------------------------------------------------------------

    def reset(self) -> None:
        """A new clip: the schedule restarts, the noise is redrawn from the seed, nothing is pending."""
        self.generator = torch.Generator(self.device).manual_seed(self.cfg.seed)
        self.noise_cache: dict = {}
        self.batches_since_refresh: int | None = None  # None: the next batch refreshes
        self.states = self.mask = None
        self.last_thumb: np.ndarray | None = None
        self.cut = False  # the current batch starts a new scene
        if self.temporal is not None:
            self.temporal.reset()
        self.pending: deque[_Pending] = deque()
        self.fed = 0  # batches fed in this clip

    def set_prompt(self, prompt: str) -> None:
        """Change the instruction; the next batch refreshes the text encoder."""
        stack = self.stack
        if self.side is not None:  # the side stream may still read the old prompt's buffers
            torch.cuda.current_stream(self.device).wait_stream(self.side)
        self.cfg = replace(self.cfg, prompt=prompt)
        self.tokens = tokenize_prompt(
            stack.tokenizer, stack.text_encoder.config, prompt, stack.config.te_image_size, stack.config.prompt_max_tokens
        )
        if self.fast_te is not None:
            self.fast_te.set_prompt(self.tokens)
        self.static_states = None
        self.batches_since_refresh = None
        self.side_waits = True

    def output_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        return geometry(in_hw, self.cfg.size, self.multiple, self.cfg.crop).out_hw

    # -- the loop -------------------------------------------------------------------------------

    @torch.no_grad()
    def feed(self, batch) -> list:
        """Queue a decoded FrameBatch; return the FrameBatches whose output is ready, in order."""
        frames = batch.frames
        real, bs = len(frames), self.cfg.batch_size
        if real < bs:  # static shapes: pad a short batch by repeating its last frame, trim later
            frames = np.concatenate([frames, np.repeat(frames[-1:], bs - real, axis=0)])
        refresh = self._refresh_due(batch.frames)
        geo = geometry(frames.shape[1:3], self.cfg.size, self.multiple, self.cfg.crop)
        warm_up = self.compiled and geo.work_hw not in self.compile_keys
        if warm_up:
            from . import optimize

            key = optimize.config_key(self.stack, self.cfg, self.ecfg, geo.work_hw)
            had_cache = optimize.load_artifacts(key)  # a saved warm-up turns the compile into cache hits
        host = torch.from_numpy(np.ascontiguousarray(frames))
        if self.cuda:
            host = host.pin_memory()
        conditioning = self.temporal.prepare(frames, geo, self.cut) if self.temporal is not None else None

        side = self.side or self.main
        with self._on(self.side):
            if self.side is not None and self.side_waits:
                # once after a prompt change: the text encoder's buffers were written on the main stream
                self.side.wait_stream(self.main)
                self.side_waits = False
            with self._stage("prep", side):
                x = host.to(self.device, non_blocking=True)  # (B, H, W, 3) uint8
                x01 = to_working(x, geo)  # (B, 3, h, w) in [0, 1]
            if refresh:
                with self._stage("te", side):
                    self.states, self.mask = self._encode_text(x01)
            with self._stage("vae_enc", side):
                source = self.steps.vae_encode(x01)  # (B, 4, h/8, w/8)
            states, mask = self.states, self.mask
            inputs_ready = self._record(self.side)

        with self._on(self.main):
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs are dead
            if inputs_ready is not None:
                self.main.wait_event(inputs_ready)  # batch n's inputs are complete before the U-Net reads them
                for t in (source, states, mask, x01):
                    t.record_stream(self.main)  # allocated on the side stream, used here: keep alive
            if conditioning is not None:
                with self._stage("adapter", self.main):
                    self.temporal.apply(conditioning, x01)
            with self._stage("unet", self.main):
                latents = self._denoise(source, states, mask, geo)
            with self._stage("vae_dec", self.main):
                y01 = self.steps.vae_decode(latents)
            if self.temporal is not None:  # the next refresh warps this batch's last output
                self.temporal.remember(y01[real - 1 : real], batch.frames[-1], geo)
            with self._stage("out", self.main):
                y = to_output(y01, geo)  # (B, H', W', 3) uint8
                out = torch.empty(y.shape, dtype=torch.uint8, pin_memory=self.cuda)
                out.copy_(y, non_blocking=self.cuda)
            pending = _Pending(batch, real, out, self._record(self.main))
        self.fed += 1
        if self.sink is not None:
            self._raise_sink_error()
            with self.handed_back:
                self.unreturned += 1
            self.handoff.put(pending)
            with self.handed_back:  # backpressure: the next batch is taken from the decoder only now
                self.handed_back.wait_for(lambda: self.unreturned < self.ecfg.in_flight)
            ready = []
        else:
            self.pending.append(pending)
            ready = self._collect(keep=0 if warm_up else self.ecfg.in_flight - 1)
        if warm_up:
            from . import optimize

            if self.sink is not None:
                self.flush()  # the warm-up batch compiled and ran
            self.compile_keys[geo.work_hw] = key
            if not had_cache:
                optimize.save_artifacts(key)
        return ready

    def flush(self) -> list:
        """Everything still on the GPU, in order (with a sink: wait until it has had them)."""
        if self.sink is not None:
            self.handoff.join()
            self._raise_sink_error()
            return []
        return self._collect(keep=0)

    # -- handing batches back from a collector thread ------------------------------------------

    def start_sink(self, sink) -> None:
        """From now on hand each finished FrameBatch to `sink(batch)`, in order, from a collector
        thread as soon as its GPU work is done: no waiting for the next `feed`, which a live source
        would feel as a whole batch of extra latency. `feed` and `flush` then return []."""
        self.sink, self.sink_error = sink, None
        self.handoff: queue.Queue = queue.Queue()  # bounded by `in_flight`
        self.unreturned = 0  # batches issued and not yet handed to the sink (at most ecfg.in_flight)
        self.handed_back = threading.Condition()
        self.collector = threading.Thread(target=self._collect_loop, name="engine-collector", daemon=True)
        self.collector.start()

    def stop_sink(self) -> None:
        if self.sink is None:
            return
        self.handoff.put(None)
        self.collector.join()
        self.sink = None
        self._raise_sink_error()

    def _collect_loop(self) -> None:
        while (p := self.handoff.get()) is not None:
            try:
                if self.sink_error is None:
                    if p.done is not None:
                        p.done.synchronize()  # this batch only; the GPU keeps running the next ones
                    self.sink(replace(p.batch, frames=p.out.numpy()[: p.real]))
            except BaseException as e:  # noqa: BLE001 - re-raised on the feeding thread
                self.sink_error = e
            finally:
                with self.handed_back:
                    self.unreturned -= 1
                    self.handed_back.notify()
                self.handoff.task_done()
        self.handoff.task_done()

    def _raise_sink_error(self) -> None:
        if self.sink_error is not None:
            error, self.sink_error = self.sink_error, None
            raise error

    def _collect(self, keep: int) -> list:
        """Hand back finished batches: those already done, then wait for the older ones so at
        most `keep` remain queued (the wait is on work issued a call earlier)."""
        ready = []
        while self.pending and (len(self.pending) > keep or _fired(self.pending[0].done)):
            p = self.pending.popleft()
            if p.done is not None:
                p.done.synchronize()
            ready.append(replace(p.batch, frames=p.out.numpy()[: p.real]))
        return ready

    # -- the pieces -----------------------------------------------------------------------------

    def _refresh_due(self, frames: np.ndarray) -> bool:
        """Host-side schedule: a new clip or prompt, every M batches, or a scene cut."""
        first = thumbnail(frames[0])
        cut = (
            self.ecfg.scene_cut > 0
            and self.last_thumb is not None
            and first.shape == self.last_thumb.shape
            and float(np.abs(first - self.last_thumb).mean()) > self.ecfg.scene_cut
        )
        self.last_thumb = thumbnail(frames[-1])
        self.cut = cut
        n = self.batches_since_refresh
        due = n is None or cut or n + 1 >= self.ecfg.te_refresh_every
        self.batches_since_refresh = 0 if due else n + 1
        if cut:
            log.debug("scene cut: refreshing the text encoder")
        return due

    def _encode_text(self, x01: torch.Tensor):
        stack, b = self.stack, x01.shape[0]
        if self.ecfg.static_prompt:
            if self.static_states is None:
                self.static_states = encode_text_only(
                    stack.text_encoder, stack.tokenizer, self.cfg.prompt, self.tokens.max_len, stack.config.hidden_states
                )
            states, mask = self.static_states
            # contiguous: the U-Net graph then has the same input strides (no recompile) in every mode
            return states.expand(b, -1, -1).contiguous(), mask.expand(b, -1).contiguous()
        te_size = stack.config.te_image_size
        frames = resize(x01[b // 2 : b // 2 + 1] if self.ecfg.te_batch_one else x01, (te_size, te_size))
        if self.fast_te is not None:
            states, mask = self.steps.text(self.fast_te, frames)
        else:
            states, mask = encode(stack.text_encoder, self.tokens, frames, stack.config.hidden_states)
        return states.expand(b, -1, -1).contiguous(), mask.expand(b, -1).contiguous()

    def _denoise(self, source, states, mask, geo) -> torch.Tensor:
        b, dtype = source.shape[0], self.stack.dtype
        latent_hw = tuple(source.shape[-2:])
        x = draw_noise(self.generator, self.noise_cache, self.cfg.fixed_noise, b, self.stack, latent_hw)
        time_ids = self.steps.time_ids(geo.work_hw, b, dtype)
        sigmas = self.steps.sigmas(self.cfg.steps, latent_hw)
        for (sigma, sigma_next), t in zip(zip(sigmas[:-1], sigmas[1:]), self.steps.timesteps(sigmas, b, dtype)):
            x = euler(x, self.steps.velocity(x, source, t, states.to(dtype), mask, time_ids), sigma_next - sigma)
        return x

    @contextlib.contextmanager
    def _stage(self, name: str, stream):
        """Bracket a stage with timing events when a timeline is being recorded (benchmarks)."""
        if self.timeline is None or stream is None:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self.timeline.append((self.fed, name, "main" if stream == self.main else "side", start, end))

    def _on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _record(self, stream):
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event


def _fired(event) -> bool:
    return event is None or event.query()


class _Steps:
    """The GPU's work as small callables over the plain modules. `optimize.compile_steps` swaps
    each for its compiled version; the engine never knows which it runs."""

    def __init__(self, stack: ModelStack, unet=None):
        self.stack = stack
        self.unet = unet if unet is not None else stack.unet
        self._sigmas: dict = {}
        self._timesteps: dict = {}

    def sigmas(self, steps: int, latent_hw) -> list[float]:
        key = (steps, latent_hw)
        if key not in self._sigmas:
            self._sigmas[key] = flow_sigmas(self.stack.scheduler, steps, latent_hw)
        return self._sigmas[key]

    def timesteps(self, sigmas: list[float], b: int, dtype) -> list[torch.Tensor]:
        """Per-step timestep vectors (B,), made once and kept on the device."""
        key = (tuple(sigmas), b, dtype)
        if key not in self._timesteps:
            self._timesteps[key] = [
                torch.full((b,), s * 1000, dtype=dtype, device=self.stack.device) for s in sigmas[:-1]
            ]
        return self._timesteps[key]

    def time_ids(self, work_hw, b: int, dtype) -> torch.Tensor:
        """DreamLite's size conditioning [[W, H]] per frame (B, 2), made once per geometry."""
        key = (work_hw, b, dtype)
        if key not in self._timesteps:
            h, w = work_hw
            self._timesteps[key] = torch.tensor([[w, h]], dtype=dtype, device=self.stack.device).expand(b, -1)
        return self._timesteps[key]

    def velocity(self, x, source, t, states, mask, time_ids):
        return velocity(self.unet, x, source, t, states, mask, time_ids)

    def vae_encode(self, x01):
        return vae_encode(self.stack.vae, x01)

    def vae_decode(self, latents):
        return vae_decode(self.stack.vae, latents)

    def text(self, fast_te, frames):
        return fast_te(frames)
