"""optimize.py: the compile-cache key and what decides whether a side-stream CUDA graph replays."""

from __future__ import annotations

import torch

from stylize.config import EngineConfig, PipelineConfig
from tests.test_engine import OIL


def test_compile_cache_key_tells_adapter_graphs_apart(tiny_stack):
    """The adapter wraps the U-Net's projections: its compiled graphs must not be taken for the
    plain engine's (nor one hook subset's for another's)."""
    from stylize.optimize import config_key

    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    plain = config_key(tiny_stack, cfg, EngineConfig(), (64, 64))
    down = config_key(tiny_stack, cfg, EngineConfig(adapter="w.safetensors"), (64, 64))
    every = config_key(tiny_stack, cfg, EngineConfig(adapter="w.safetensors", adapter_hooks="all"), (64, 64))
    assert len({plain, down, every}) == 3
    assert down == config_key(tiny_stack, cfg, EngineConfig(adapter="other.safetensors"), (64, 64))


def test_stream_graph_signature_follows_shapes_and_buffer_addresses():
    """What decides whether a side-stream CUDA graph can replay (optimize.StreamGraph): input
    shapes, and the addresses of a module argument's buffers (copied in place: same graph;
    re-created for a prompt of another length: a new capture). Replay itself is a GPU test."""
    from stylize.optimize import _signature

    m = torch.nn.Module()
    m.register_buffer("w", torch.zeros(4))
    x = torch.zeros(4, 4)
    before = (_signature(m), _signature(x))
    m.w.copy_(torch.ones(4))
    assert (_signature(m), _signature(torch.ones(4, 4))) == before
    assert _signature(torch.zeros(3, 4)) != before[1]
    assert _signature(x.t()) != before[1]  # same shape, other strides
    m.register_buffer("w", torch.zeros(4))
    assert _signature(m) != before[0]


