"""The streaming engine: the reference math, batched and overlapped on the GPU (DESIGN §5).

    engine = Engine(stack, PipelineConfig(...), EngineConfig(...))   # optimize(): the speedups
    engine.prepare(in_hw)               # one-time per frame size: compile warm-up, cache files
    engine.reset(sink)                  # a new clip: nothing carries over
    for batch in decoded_batches:
        engine.feed(batch)              # issues its GPU work; finished batches go to sink(batch)
    engine.flush()                      # wait until the sink has had everything

`feed` only issues GPU work. Batch n goes through two CUDA streams:
- side stream: upload of the pinned uint8 frames, resize and normalise, the text encoder (when a
  refresh is due) and TAESD encode; it ends with the event `ready`;
- main stream: waits for `ready`, runs the adapter's refresh, the U-Net steps and TAESD decode,
  resizes to the output size and copies the uint8 result into pinned host memory; it ends with
  the event `done`.
`feed(n+1)` issues batch n+1's side work while the GPU still runs batch n's U-Net. No
device-wide synchronize, no `.item()`/`.tolist()`/`.cpu()` in the loop.

Batches come back through one hand-back thread (`threads.Pipe`): it waits for each batch's
`done` event, in order, and hands it to the sink (without one, `feed`/`flush` return them).
`feed` returns only while fewer than `EngineConfig.in_flight` batches are issued and not handed
back: the next batch is taken from the decoder no earlier than the GPU can start on it, since
every batch held anywhere adds a batch period to each frame's latency. On the CPU the same code
runs with no streams (the tests check it against the reference path).

Per-clip state lives in small objects: `_Clip` (noise, the text encoder's `RefreshSchedule`, the
last thumbnail for scene cuts, the reused text states) and the adapter's `TemporalConditioner`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .buffers import HostRing
from .config import EngineConfig, PipelineConfig
from .models import ModelStack
from .models.text_encoder import encode, encode_text_only
from .optimize import Steps, compile_steps, graph_steps, optimize
from .reference import (
    draw_noise,
    flow_sigmas,
    flow_start,
    geometry,
    latent_multiple,
    pad_batch,
    prompt_tokens,
    resize,
    to_output,
    to_working,
)
from .schedule import RefreshSchedule, scene_cut, thumbnail
from .threads import Pipe

log = logging.getLogger(__name__)

RING_SLOTS = 4  # decoder's batch being filled + one decoded ahead + the one being fed, and a spare


@dataclass
class _Pending:
    """A batch on the GPU: its frames' metadata, the pinned host tensor its output lands in, and
    the event that fires when it is there."""

    batch: object  # the FrameBatch it came from
    real: int  # frames before padding
    out: torch.Tensor  # (B, H', W', 3) uint8, pinned on CUDA
    done: torch.cuda.Event | None


@dataclass
class _Clip:
    """What one clip carries from batch to batch (`Engine.reset` starts a new one)."""

    generator: torch.Generator
    te: RefreshSchedule
    noise: dict = field(default_factory=dict)  # latent hw -> the fixed noise pattern
    last_thumb: np.ndarray | None = None  # the previous batch's last frame (scene cuts)
    states: torch.Tensor | None = None  # the text encoder's last output, reused between refreshes
    mask: torch.Tensor | None = None
    fed: int = 0  # batches fed
    frame: int = 0  # the clip's index of the next frame (its noise: reference.draw_noise)


class Engine:
    """Stateful per clip (`reset`); one prompt at a time (`set_prompt`)."""

    def __init__(self, stack: ModelStack, cfg: PipelineConfig, ecfg: EngineConfig = EngineConfig(),
                 steps: Steps | None = None):  # fmt: skip
        self.stack, self.cfg, self.ecfg = stack, cfg, ecfg
        self.device = stack.device
        self.cuda = self.device.type == "cuda"
        self.main = torch.cuda.current_stream(self.device) if self.cuda else None
        self.side = torch.cuda.Stream(self.device) if (self.cuda and ecfg.side_stream) else None
        self.multiple = latent_multiple(stack.unet)
        self.steps = steps if steps is not None else optimize(stack, ecfg)
        self.temporal = None
        if self.steps.lllite is not None:
            from .temporal import TemporalConditioner

            self.temporal = TemporalConditioner(self.steps.lllite, ecfg, self.device)
        self.ring = HostRing(RING_SLOTS, pin=self.cuda)  # the decoder fills these (video.read_batches)
        self.constants = _Constants(stack)
        self.prepared: dict = {}  # work_hw -> compile-cache key, once its warm-up has run
        self.timeline: list | None = None  # (batch, stage, stream, start, end) while recording
        self.sink: Callable | None = None
        self.ready: deque = deque()  # handed back, waiting for `feed`/`flush` to return them (no sink)
        self.dropping = False
        # the one way batches come back; its thread holds the engine until `close`
        self.handback = Pipe(self._hand_back, "engine-hand-back", limit=ecfg.in_flight)
        self.reset()
        self.set_prompt(cfg.prompt)

    def close(self) -> None:
        """End the hand-back thread and release the flow threads (call it when done)."""
        self.handback.close(discard=True)
        if self.temporal is not None:
            self.temporal.close()

    # -- policy: which steps run, one-time work per frame size ---------------------------------

    def use(self, steps: Steps) -> None:
        """Run `steps` from the next batch on (e.g. compiled ones): the one place steps change."""
        self._drain()
        self.steps = steps

    def enable_compile(self, backend: str = "inductor") -> None:
        """Compile the steps (optimize.py); compiled graphs are cached across runs per geometry."""
        e = self.ecfg
        self.use(compile_steps(self.steps, self.device, e.cuda_graphs, backend, e.side_graphs))

    def enable_graphs(self) -> None:
        """Replay the eager steps as CUDA graphs (optimize.graph_steps): no compile, captured per
        shape in `prepare` in well under a second."""
        self.use(graph_steps(self.steps, self.device, self.ecfg.side_graphs))

    @property
    def compiled(self) -> bool:
        return self.steps.compiled

    @property
    def graphed(self) -> bool:
        """Compiled with CUDA graphs, or the eager steps as CUDA graphs: `prepare` has work to do."""
        return self.steps.compiled or self.steps.graphs

    def prepare(self, in_hw: tuple[int, int], status: Callable[[str], None] | None = None) -> None:
        """Before a clip's first batch: compile (or load from the cache) and capture the graphs of
        this frame size by running two batches of blank frames, then save what compiling made
        (once per configuration and size, off the hot loop). Ends with `reset()`: call `reset(sink)`
        after it. With the eager steps as CUDA graphs the same two batches warm up and capture."""
        geo = geometry(in_hw, self.cfg.size, self.multiple, self.cfg.crop)
        if not self.graphed or geo.work_hw in self.prepared:
            return
        from . import optimize as opt
        from .video import FrameBatch

        key = opt.config_key(self.stack, self.cfg, self.ecfg, geo.work_hw)
        had_cache = True
        if self.compiled:
            if status is not None:
                status("compiling (one-time, cached)")
            had_cache = opt.load_artifacts(key)  # a saved warm-up turns the compile into cache hits
        blank = np.zeros((self.cfg.batch_size, *in_hw, 3), np.uint8)
        self.reset()
        for n in range(2):  # the first call compiles, the second captures the side-stream graphs
            self.feed(FrameBatch(blank, list(range(n * len(blank), (n + 1) * len(blank))), [0.0] * len(blank)))
        self.flush()
        self.prepared[geo.work_hw] = key
        if not had_cache:
            opt.save_artifacts(key)
        self.reset()

    # -- per-clip and per-prompt state ------------------------------------------------------------

    def reset(self, sink: Callable | None = None, first_frame: int = 0) -> None:
        """A new clip: the schedules restart, the noise is redrawn from the seed, and anything still
        in flight from the last clip is dropped. With a `sink`, each finished FrameBatch goes to
        `sink(batch)`, in order, from the hand-back thread as soon as its GPU work is done (no
        waiting for the next `feed`: a live source would feel that as a batch of latency), and
        `feed`/`flush` return []. `first_frame`: the clip's index of the first frame to come, a
        multiple of the batch size (a chunk of a split clip, chunks.py): the schedules' grid and
        the noise are the whole clip's from there."""
        assert first_frame % self.cfg.batch_size == 0, "a chunk starts on a batch boundary"
        start = first_frame // self.cfg.batch_size
        self._drain()
        self.ready.clear()
        self.ring.new_clip()  # the last clip's decoder may have left with slots (a failed clip)
        self.sink = sink
        te = RefreshSchedule(self.ecfg.te_refresh_every, start)
        self.clip = _Clip(torch.Generator(self.device), te, frame=first_frame)
        if self.temporal is not None:
            self.temporal.reset(start)

    def set_prompt(self, prompt: str) -> None:
        """Change the instruction; the next batch refreshes the text encoder."""
        if self.side is not None:  # the side stream may still read the old prompt's buffers
            torch.cuda.current_stream(self.device).wait_stream(self.side)
        self.cfg = replace(self.cfg, prompt=prompt)
        self.tokens = prompt_tokens(self.stack, prompt)
        if self.steps.fast_te is not None:
            self.steps.fast_te.set_prompt(self.tokens)
        self.static_states = None
        self.clip.te.restart()
        self.side_waits = True

    def output_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        return geometry(in_hw, self.cfg.size, self.multiple, self.cfg.crop).out_hw

    def start_timeline(self) -> list:
        """Record (batch, stage, stream, start event, end event) per stage until `stop_timeline`."""
        self.timeline = []
        return self.timeline

    def stop_timeline(self) -> None:
        self.timeline = None

    # -- the loop -------------------------------------------------------------------------------

    @torch.no_grad()
    def feed(self, batch) -> list:
        """Issue a decoded FrameBatch's GPU work; return the batches handed back since (none with
        a sink). Waits while `in_flight` batches are issued and not yet handed back."""
        clip, real = self.clip, len(batch.frames)
        host = self._host_frames(batch)  # (B, H, W, 3) uint8, pinned on CUDA, padded
        first = thumbnail(batch.frames[0])
        cut = scene_cut(clip.last_thumb, first, self.ecfg.scene_cut)
        clip.last_thumb = thumbnail(batch.frames[-1])
        if cut:
            log.debug("scene cut: refreshing the text encoder")
        te_due = clip.te.step(cut)
        geo = geometry(host.shape[1:3], self.cfg.size, self.multiple, self.cfg.crop)
        # the adapter's flows start on CPU threads now and are collected on the main stream below
        conditioning = self.temporal.prepare(host.numpy(), geo, cut) if self.temporal is not None else None

        x01, source, uploaded, inputs_ready = self._side_work(host, geo, te_due)
        pending = self._main_work(batch, real, geo, x01, source, inputs_ready, conditioning)
        batch.release(after=uploaded)  # the ring slot: the flows are collected, the upload issued
        clip.fed += 1
        self.handback.put(pending)  # backpressure: returns once fewer than in_flight are unreturned
        return self._take_ready()

    def flush(self) -> list:
        """Wait until every batch fed has been handed back; return them (with a sink: [])."""
        self.handback.join()
        return self._take_ready()

    def _side_work(self, host, geo, te_due: bool):
        """Upload, working resolution, text encoder (when due) and TAESD encode, on the side
        stream; the event `inputs_ready` ends it (None without CUDA streams)."""
        side = self.side or self.main
        with self._on(self.side):
            if self.side is not None and self.side_waits:
                # once after a prompt change: the text encoder's buffers were written on the main stream
                self.side.wait_stream(self.main)
                self.side_waits = False
            with self._stage("prep", side):
                x = host.to(self.device, non_blocking=True)  # (B, H, W, 3) uint8
                uploaded = self._record(side)  # the host buffer may be refilled after this
                x01 = to_working(x, geo)  # (B, 3, h, w) in [0, 1]
            if te_due:
                with self._stage("te", side):
                    self.clip.states, self.clip.mask = self._encode_text(x01)
            with self._stage("vae_enc", side):
                source = self.steps.vae_encode(x01)  # (B, 4, h/8, w/8)
            inputs_ready = self._record(self.side)
        return x01, source, uploaded, inputs_ready

    def _main_work(self, batch, real, geo, x01, source, inputs_ready, conditioning) -> _Pending:
        """Adapter refresh, U-Net steps, TAESD decode and the copy out, on the main stream."""
        states, mask = self.clip.states, self.clip.mask
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
            return _Pending(batch, real, out, self._record(self.main))

    # -- handing batches back ------------------------------------------------------------------

    def _hand_back(self, p: _Pending) -> None:
        """On the hand-back thread, in order: wait for this batch only (the GPU keeps running the
        next ones), then give it to the sink."""
        if self.dropping:
            return
        if p.done is not None:
            p.done.synchronize()
        done = replace(p.batch, frames=p.out.numpy()[: p.real], slot=None)
        if self.sink is not None:
            self.sink(done)
        else:
            self.ready.append(done)

    def _take_ready(self) -> list:
        ready = []
        while self.ready:
            ready.append(self.ready.popleft())
        return ready

    def _drain(self) -> None:
        """Drop whatever is still in flight, and the error of a clip that already failed."""
        self.dropping = True
        try:
            self.handback.join()
        except Exception as e:  # noqa: BLE001 - that clip's failure reached its caller already
            log.debug("dropped with the last clip: %s", e)
        finally:
            self.dropping = False

    # -- the pieces -----------------------------------------------------------------------------

    def _host_frames(self, batch) -> torch.Tensor:
        """The batch as a (B, H, W, 3) uint8 host tensor: its ring slot (pinned, padded by the
        decoder) when it has one of the batch size, else padded and pinned here (tests, benchmarks
        feeding arrays)."""
        slot = batch.slot
        if slot is not None and slot.array.shape[0] == self.cfg.batch_size:
            return slot.tensor
        host = torch.from_numpy(np.ascontiguousarray(pad_batch(batch.frames, self.cfg.batch_size)))
        return host.pin_memory() if self.cuda else host

    def _encode_text(self, x01: torch.Tensor):
        stack, b = self.stack, x01.shape[0]
        if self.ecfg.static_prompt:
            if self.static_states is None:
                self.static_states = encode_text_only(
                    stack.text_encoder,
                    stack.tokenizer,
                    self.cfg.prompt,
                    self.tokens.max_len,
                    stack.config.hidden_states,
                )
            states, mask = self.static_states
            # contiguous: the U-Net graph then has the same input strides (no recompile) in every mode
            return states.expand(b, -1, -1).contiguous(), mask.expand(b, -1).contiguous()
        te_size = stack.config.te_image_size
        frames = resize(x01[b // 2 : b // 2 + 1] if self.ecfg.te_batch_one else x01, (te_size, te_size))
        if self.steps.fast_te is not None:
            states, mask = self.steps.text(self.steps.fast_te, frames)
        else:
            states, mask = encode(stack.text_encoder, self.tokens, frames, stack.config.hidden_states)
        return states.expand(b, -1, -1).contiguous(), mask.expand(b, -1).contiguous()

    def _denoise(self, source, states, mask, geo) -> torch.Tensor:
        b, dtype = source.shape[0], self.stack.dtype
        latent_hw = tuple(source.shape[-2:])
        clip, cfg = self.clip, self.cfg
        x = flow_start(self.stack.config, source, lambda: draw_noise(
            clip.generator, clip.noise, cfg.fixed_noise, cfg.seed, clip.frame, b, self.stack, latent_hw))
        clip.frame += b
        c = self.constants
        time_ids = c.time_ids(geo.work_hw, b, dtype)
        sigmas = c.sigmas(self.cfg.steps, latent_hw)
        for t, dt in zip(c.timesteps(sigmas, b, dtype), c.step_sizes(sigmas)):
            x = self.steps.denoise(x, source, t, states.to(dtype), mask, time_ids, dt)
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
        self.timeline.append((self.clip.fed, name, "main" if stream == self.main else "side", start, end))

    def _on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _record(self, stream):
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    @property
    def flow_ms(self) -> list[float]:
        return self.temporal.flow_ms if self.temporal is not None else []


class _Constants:
    """Per-geometry constants on the device, made once: the schedule's sigmas, the timestep
    vectors and DreamLite's size conditioning."""

    def __init__(self, stack: ModelStack):
        self.stack = stack
        self.cache: dict = {}

    def sigmas(self, steps: int, latent_hw) -> list[float]:
        key = ("sigmas", steps, latent_hw)
        if key not in self.cache:
            self.cache[key] = flow_sigmas(self.stack.scheduler, steps, latent_hw)
        return self.cache[key]

    def timesteps(self, sigmas: list[float], b: int, dtype) -> list[torch.Tensor]:
        """Per-step timestep vectors (B,)."""
        key = ("t", tuple(sigmas), b, dtype)
        if key not in self.cache:
            self.cache[key] = [torch.full((b,), s * 1000, dtype=dtype, device=self.stack.device) for s in sigmas[:-1]]
        return self.cache[key]

    def step_sizes(self, sigmas: list[float]) -> list[torch.Tensor]:
        """The Euler steps' sizes sigma_next - sigma as 0-d float32 tensors (inputs of the graphed
        U-Net step; the value is the same float32 a Python scalar would give the kernel)."""
        key = ("dt", tuple(sigmas))
        if key not in self.cache:
            self.cache[key] = [torch.tensor(b - a, dtype=torch.float32, device=self.stack.device)
                               for a, b in zip(sigmas[:-1], sigmas[1:])]  # fmt: skip
        return self.cache[key]

    def time_ids(self, work_hw, b: int, dtype) -> torch.Tensor:
        """DreamLite's size conditioning [[W, H]] per frame (B, 2)."""
        key = ("time_ids", work_hw, b, dtype)
        if key not in self.cache:
            h, w = work_hw
            self.cache[key] = torch.tensor([[w, h]], dtype=dtype, device=self.stack.device).expand(b, -1)
        return self.cache[key]
