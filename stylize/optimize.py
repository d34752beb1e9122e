"""Every speedup of the engine in one place: `optimize(stack, ecfg) -> Steps`, applied in a fixed
order, each behind its `EngineConfig` flag (learned from diffusion-fast's `optimize`):

1. the engine's own copy of the U-Net (the stack's stays stock: the reference path, diffusers'
   pipeline and other engines share it) whenever a later step changes its modules;
2. fused QKV: one projection GEMM per self-attention (`fuse_qkv`); RMSNorm as one `F.rms_norm`
   call (`fused_norms`: a fused kernel on CUDA where diffusers' and transformers' RMSNorm issue
   six elementwise ones, NOTES 25); on CUDA the engine's own TAESD in channels_last
   (`vae_channels_last`: decode 11.0 -> 7.4 ms a batch of 8 replayed, NOTES 25);
3. the temporal adapter attached to that copy (models/lllite.py; its conditioning schedule is the
   engine's, temporal.py);
4. the fast text encoder (fast_te.py) in place of the stock Qwen3-VL call;
5. compiling (`compile_steps`): one graph per step, CUDA graphs on both streams; or, without
   compiling, CUDA graphs captured from the eager steps (`graph_steps`): near the compiled speed
   from the first batch, for clips that a compile would not repay.

`Steps` is immutable: a policy change (compiling later, a counting wrapper in a test) is a whole
new `Steps` swapped in between batches (`Engine.use`).

Compiling swaps each step for `torch.compile(fullgraph=True, dynamic=False)`: one graph per step,
static shapes, a graph break or a recompile is an error in the tests rather than a silent slowdown.

- U-Net and TAESD decode run on the main stream: CUDA graphs ("reduce-overhead") replay them
  with one launch each, which is what a launch-bound U-Net needs.
- The text encoder and TAESD encode run on the side stream. CUDA-graph trees cannot take them
  (one memory pool per device, laid out for one stream's order: a side-stream replay would reuse
  memory the main stream's U-Net is still using), so they are compiled without CUDA graphs and
  then captured by hand (`StreamGraph`): one graph per step and shape, each with its own memory
  pool, replayed on the stream that calls it. Without this, the text encoder's ~1000 kernels are
  launched one by one from the feeding thread and its time follows how busy the host is.

Compile time is a user-facing cost (256 s for the U-Net alone on an H100). Inductor's on-disk
caches live in ~/.cache/stylize/inductor (`config.use_persistent_compile_cache`, set by the CLI
before torch is imported), and the portable cache artifacts of a finished warm-up
are saved per configuration (`save_artifacts`) and loaded before compiling (`load_artifacts`), so
the second run of the same shapes starts in seconds. `--compile auto` compiles when that pays.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._pytree import tree_map

from .config import EngineConfig
from .reference import euler, vae_decode, vae_encode, velocity

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
        "engine": [
            ecfg.cuda_graphs,
            ecfg.fast_te,
            ecfg.te_batch_one,
            ecfg.static_prompt,
            ecfg.te_bucket,
            ecfg.fuse_qkv,
            ecfg.fused_norms,
            ecfg.vae_channels_last,
        ],
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


@dataclass(frozen=True)
class Steps:
    """The GPU's work as small callables over plain modules, and the modules they run.

    denoise(x, source, t, states, mask, time_ids, dt) -> x + dt v (one Euler step of the U-Net's
    velocity v; dt a 0-d float32 tensor, so that a CUDA graph of it serves every step size);
    vae_encode(x01) -> latents;
    vae_decode(latents) -> y01; text(fast_te, frames) -> (states, mask) (the fast text encoder's
    call; the module is an argument so that a CUDA graph of it is keyed by its buffers)."""

    unet: torch.nn.Module  # the U-Net the engine runs (its own copy when it was changed)
    lllite: object | None  # the attached TemporalLLLite, or None
    fast_te: object | None  # the FastTextEncoder, or None (stock call or static prompt)
    denoise: Callable
    vae_encode: Callable
    vae_decode: Callable
    text: Callable
    compiled: bool = False
    graphs: bool = False  # the eager steps replayed as CUDA graphs (graph_steps)


def optimize(
    stack, ecfg: EngineConfig, compiled: bool = False, backend: str = "inductor", graphs: bool = False
) -> Steps:
    """Apply the engine's speedups to `stack` in their fixed order (see the module docstring);
    the stack itself is left as it was."""
    unet = stack.unet
    # 1. the engine's own U-Net copy: fusing and attaching change its modules
    if ecfg.fuse_qkv or ecfg.adapter or ecfg.fused_norms:
        unet = copy.deepcopy(unet)
    # 2. fused QKV, fused RMSNorm
    if ecfg.fuse_qkv:
        fuse_qkv(unet)
    if ecfg.fused_norms:
        fuse_rms_norms(unet)
    # 3. the temporal adapter, on that copy
    lllite = None
    if ecfg.adapter:
        from .temporal import attach_adapter

        lllite = attach_adapter(unet, stack, ecfg)
    # 4. the fast text encoder (a static prompt encodes the text once, with the stock call)
    fast_te = None
    if ecfg.fast_te and not ecfg.static_prompt:
        from .fast_te import FastTextEncoder

        fast_te = FastTextEncoder(
            stack.text_encoder, stack.config.te_image_size, stack.config.hidden_states, ecfg.te_bucket,
            fused_norms=ecfg.fused_norms,
        )
    vae = stack.vae
    if ecfg.vae_channels_last and stack.device.type == "cuda":  # its own copy: the stack's stays stock
        vae = copy.deepcopy(vae).to(memory_format=torch.channels_last)

    def denoise_step(x, source, t, states, mask, time_ids, dt):
        return euler(x, velocity(unet, x, source, t, states, mask, time_ids), dt)

    def vae_encode_step(x01):
        return vae_encode(vae, x01)

    def vae_decode_step(latents):
        return vae_decode(vae, latents)

    def text_step(fast_te, frames):
        return fast_te(frames)

    steps = Steps(unet, lllite, fast_te, denoise_step, vae_encode_step, vae_decode_step, text_step)
    # 5. compiled graphs, or CUDA graphs of the eager steps
    if compiled:
        steps = compile_steps(steps, stack.device, ecfg.cuda_graphs, backend, ecfg.side_graphs)
    elif graphs:
        steps = graph_steps(steps, stack.device, ecfg.side_graphs)
    return steps


def graph_steps(steps: Steps, device: torch.device, side_graphs: bool = True, keep: int = 3) -> Steps:
    """`steps` replayed as CUDA graphs captured from their eager code, nothing compiled: each step
    a `StreamGraph` (the first call of a shape runs eager and warms up, the second captures, later
    ones copy their inputs in and replay: one launch where the eager U-Net issues hundreds); the
    Euler update is inside the U-Net's graph (`Steps.denoise`, its step size a tensor input).
    `keep`: shapes whose graphs (and memory pools) each step keeps, the most recent. A no-op off
    CUDA."""
    if device.type != "cuda":
        return steps
    side = (lambda fn: StreamGraph(fn, keep)) if side_graphs else (lambda fn: fn)
    return dataclasses.replace(
        steps, denoise=StreamGraph(steps.denoise, keep), vae_decode=StreamGraph(steps.vae_decode, keep),
        vae_encode=side(steps.vae_encode), text=side(steps.text), graphs=True,
    )  # fmt: skip


def compile_steps(steps: Steps, device: torch.device, cuda_graphs: bool = True, backend: str = "inductor",
                  side_graphs: bool = True) -> Steps:  # fmt: skip
    """`steps` with each callable compiled: main-stream steps as CUDA graphs (reduce-overhead),
    side-stream steps replayed by `StreamGraph`."""
    on_cuda = device.type == "cuda"
    main_mode = "reduce-overhead" if (on_cuda and cuda_graphs and backend == "inductor") else None

    def comp(fn, mode=None):
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, mode=mode)

    def side(fn):
        return StreamGraph(comp(fn)) if (on_cuda and side_graphs) else comp(fn)

    return dataclasses.replace(
        steps, denoise=comp(steps.denoise, main_mode), vae_decode=comp(steps.vae_decode, main_mode),
        vae_encode=side(steps.vae_encode), text=side(steps.text), compiled=True,
    )  # fmt: skip


class StreamGraph:
    """`fn` (a compiled step: tensors and modules in, a tree of tensors out) replayed as a CUDA
    graph on the stream that calls it, with a memory pool of its own.

    Per call signature (input shapes, and each module argument's buffers, which a prompt change of
    another length re-creates): the first call runs `fn` as it is (it compiles, and warms up
    cuBLAS and the allocator); the second captures it on the current stream and replays; later
    calls copy their inputs into the graph's static ones and replay. The outputs are cloned on the
    calling stream, so a consumer on another stream never sees the next replay's writes. The few
    most recent signatures keep their graphs (a folder of clips of two sizes does not recapture).
    """

    def __init__(self, fn, keep: int = 4):
        self.fn, self.keep = fn, keep
        self.graphs: OrderedDict = OrderedDict()  # signature -> (graph, static inputs, static outputs, stream)
        self.seen: set = set()
        self.replays = 0
        self.free_streams: list = []  # capture streams of evicted graphs, for the next captures

    def __call__(self, *args):
        key = tuple(_signature(a) for a in args)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:
                self.seen.add(key)
                return self.fn(*args)
            entry = self.graphs[key] = self._capture(args)
            while len(self.graphs) > self.keep:
                _, (old, *_, stream) = self.graphs.popitem(last=False)
                del old  # destroyed before its stream captures again (see _capture)
                self.free_streams.append(stream)
        self.graphs.move_to_end(key)
        graph, static_in, static_out, _ = entry
        for dst, src in zip(static_in, args):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        self.replays += 1
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_out)

    def _capture(self, args):
        caller = torch.cuda.current_stream()
        static_in = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        # Capture needs a non-default stream (the engine's main stream is the default one); the
        # graph then replays on whichever stream calls it. cuBLAS keeps a workspace per stream it
        # runs on, so the streams are few and reused: a new stream per capture grew GPU memory by
        # ~30 MB a new shape until torch's pool of 32 streams came round (benchmarks/NOTES.md
        # item 27). And no two live graphs share one: torch versions that free a stream's
        # workspaces when a graph captured on it is destroyed would pull them from under another
        # live graph of that stream (pytorch/pytorch#193402). So at most keep + 1 streams a step.
        stream = self.free_streams.pop() if self.free_streams else torch.cuda.Stream(caller.device)
        stream.wait_stream(caller)  # the static inputs are written
        graph = torch.cuda.CUDAGraph()
        # thread_local: the collector and writer threads may touch CUDA while this thread captures
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            static_out = self.fn(*static_in)
        caller.wait_stream(stream)
        log.debug("captured a CUDA graph for %s", [_signature(a) for a in args])
        return graph, static_in, static_out, stream


def _signature(arg):
    if isinstance(arg, torch.Tensor):
        return ("tensor", tuple(arg.shape), tuple(arg.stride()), arg.dtype, arg.device)
    if isinstance(arg, torch.nn.Module):  # its buffers' addresses are baked into the graph
        return ("module", id(arg), tuple((b.data_ptr(), tuple(b.shape)) for b in arg.buffers()))
    return ("value", arg)


# ---------------------------------------------------------------------------------------------
# Fused RMSNorm: one kernel where the stock module issues six
# ---------------------------------------------------------------------------------------------


class FusedRMSNorm(torch.nn.Module):
    """diffusers' `RMSNorm` as one `F.rms_norm` call with the same weight, bias and eps (fp32
    inside, one rounding at the end where the stock one rounds before the weight). An input of
    another dtype than the weight goes through the stock module, whose promotion rules it keeps."""

    def __init__(self, norm):
        super().__init__()
        self.stock = [norm]  # not a submodule: the parameters below are its own, registered once
        self.dim, self.eps = tuple(norm.dim), norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and x.dtype != self.weight.dtype:
            return self.stock[0](x)
        y = torch.nn.functional.rms_norm(x, self.dim, self.weight, self.eps)
        return y + self.bias if self.bias is not None else y


def fuse_rms_norms(module: torch.nn.Module) -> int:
    """Swap every diffusers `RMSNorm` inside `module` for a `FusedRMSNorm`; returns how many."""
    from diffusers.models.normalization import RMSNorm

    swaps = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if isinstance(child, RMSNorm)]  # fmt: skip
    for parent, name, child in swaps:
        setattr(parent, name, FusedRMSNorm(child))
    return len(swaps)


# ---------------------------------------------------------------------------------------------
# Fused QKV: one projection GEMM per self-attention instead of three
# ---------------------------------------------------------------------------------------------


def fuse_qkv(unet) -> int:
    """Give each self-attention of the DreamLite U-Net one `to_qkv` projection (diffusers'
    `Attention.fuse_projections`) and the processor that uses it; returns how many. The same
    function, one GEMM where there were three reading the same input; the temporal adapter's
    three attn1 hooks then sit beside it as one wrapper (models/lllite.py). Changes `unet`."""
    from diffusers.models.attention_processor import Attention

    n = 0
    for attn in unet.modules():
        if isinstance(attn, Attention) and not attn.is_cross_attention and not hasattr(attn, "to_qkv"):
            attn.fuse_projections()
            attn.set_processor(_fused_processor_class()())
            n += 1
    return n


@functools.cache
def _fused_processor_class():
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.unets.unet_dreamlite import DreamLiteAttnProcessor2_0

    class FusedQKVAttnProcessor(DreamLiteAttnProcessor2_0):
        """diffusers' DreamLiteAttnProcessor2_0 (GQA/MQA with q/k norms) with q, k and v from
        `attn.to_qkv` in one GEMM; given encoder states (cross-attention) it is the stock one."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            if encoder_hidden_states is not None or attn.spatial_norm is not None or hidden_states.ndim != 3:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            residual = hidden_states
            batch_size, sequence_length, _ = hidden_states.shape  # (B, N, C)
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
                attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            qkv = attn.to_qkv(hidden_states)  # (B, N, heads·d + 2·kv_heads·d)
            kv_width = attn.to_k.out_features
            query, key, value = qkv.split([qkv.shape[-1] - 2 * kv_width, kv_width, kv_width], dim=-1)
            head_dim = query.shape[-1] // attn.heads
            kv_heads = kv_width // head_dim
            query = query.view(batch_size, -1, attn.heads, head_dim)  # (B, N, heads, d)
            key = key.view(batch_size, -1, kv_heads, head_dim)
            value = value.view(batch_size, -1, kv_heads, head_dim)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if kv_heads != attn.heads:  # GQA / MQA: repeat K/V heads up to the query heads
                repeat = attn.heads // kv_heads
                key = torch.repeat_interleave(key, repeat, dim=2, output_size=key.shape[2] * repeat)
                value = torch.repeat_interleave(value, repeat, dim=2, output_size=value.shape[2] * repeat)
            hidden_states = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )  # fmt: skip
            hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout
            if attn.residual_connection:
                hidden_states = hidden_states + residual
            return hidden_states / attn.rescale_output_factor

    return FusedQKVAttnProcessor
