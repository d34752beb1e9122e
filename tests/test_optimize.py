"""optimize.py: the compile-cache key and what decides whether a side-stream CUDA graph replays."""

from __future__ import annotations

import types

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


def test_stream_graph_gives_each_live_graph_its_own_capture_stream(monkeypatch):
    """StreamGraph's bookkeeping with CUDA stood in for: no two live graphs were captured on one
    stream (pytorch/pytorch#193402: a destroyed graph may take its stream's cuBLAS workspaces
    with it), an evicted graph's stream is taken again, so a step never has more than keep + 1
    (each stream keeps a cuBLAS workspace: NOTES 27). The replays themselves are GPU tests."""
    import contextlib

    from stylize import optimize

    made = []

    class Stream:
        def __init__(self, device=None):
            made.append(self)

        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(device=None, wait_stream=lambda s: None))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda *a, **k: contextlib.nullcontext())
    graphed = optimize.StreamGraph(lambda x: x * 2, keep=2)
    for n in (1, 2, 3, 1, 4, 2, 5, 6, 1, 7, 8, 2, 3):
        for _ in range(3):  # eager, capture, replay
            graphed(torch.zeros(n))
        live = [entry[-1] for entry in graphed.graphs.values()]
        assert len(set(map(id, live))) == len(live) == min(2, len(live))
    assert len(made) == 3 and len(graphed.graphs) == 2


def test_graph_steps_are_a_no_op_off_cuda(tiny_stack):
    from stylize.optimize import graph_steps, optimize

    steps = optimize(tiny_stack, EngineConfig())
    assert graph_steps(steps, torch.device("cpu")) is steps and not steps.graphs


def test_compile_auto_replays_eager_graphs_unless_it_compiles(monkeypatch, tmp_path):
    """--compile auto on CUDA: graph replay for clips a compile would not repay, compiled for
    long ones; off: plain eager; on: compiled. (The engine is a stand-in: no GPU here.)"""
    import types

    import stylize.engine
    from stylize import pipeline

    made = []

    class FakeEngine:
        def __init__(self, stack, cfg, ecfg):
            self.policy = "eager"
            made.append(self)

        def enable_compile(self):
            self.policy = "compiled"

        def enable_graphs(self):
            self.policy = "graphs"

    monkeypatch.setattr(stylize.engine, "Engine", FakeEngine)
    stack = types.SimpleNamespace(device=torch.device("cuda"))
    cfg = PipelineConfig(prompt=OIL)
    for mode, frames, want in [("auto", 100, "graphs"), ("auto", 10**6, "compiled"), ("off", 100, "eager"),
                               ("on", 100, "compiled")]:  # fmt: skip
        monkeypatch.setattr(pipeline, "_frames_in", lambda clips, fps, n=frames: n)
        monkeypatch.setattr(pipeline, "_any_warm_cache", lambda: False)
        engine = pipeline.build_stylizer(stack, cfg, EngineConfig(compile=mode), [tmp_path / "a.mp4"])
        assert engine.policy == want, (mode, frames)
    engine = pipeline.build_stylizer(stack, cfg, EngineConfig(compile="auto", graphs=False), [tmp_path / "a.mp4"])
    assert engine.policy == "eager"


def test_adapter_keeps_one_share_buffer_per_shape(tiny_stack):
    """A -> B -> A: the refresh for A writes the buffer A's first refresh made (a CUDA graph
    captured for A reads that address), not a new one."""
    from stylize.optimize import optimize

    steps = optimize(tiny_stack, EngineConfig(adapter="random"))
    lllite = steps.lllite
    wrapper = lllite.wrappers[0]
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 96)
    lllite.set_condition(a)
    first = wrapper.mid_share.data_ptr()
    lllite.set_condition(b)
    assert wrapper.mid_share.data_ptr() != first
    lllite.set_condition(a * 0.5)
    assert wrapper.mid_share.data_ptr() == first
    again = wrapper.mid_share.clone()
    lllite.set_condition(a)
    assert not torch.equal(wrapper.mid_share, again)  # written in place with the new condition


def test_fused_rms_norms_are_the_same_function(tiny_stack):
    """Every diffusers RMSNorm of the engine's U-Net copy becomes one F.rms_norm call (#14: one
    kernel on CUDA for six); the velocity is unchanged, the stack's own U-Net keeps its modules."""
    import copy

    from diffusers.models.normalization import RMSNorm

    from stylize.optimize import FusedRMSNorm, fuse_rms_norms
    from stylize.reference import velocity

    unet = copy.deepcopy(tiny_stack.unet)
    n = sum(isinstance(m, RMSNorm) for m in unet.modules())
    assert n and fuse_rms_norms(unet) == n
    assert not any(isinstance(m, RMSNorm) for m in unet.modules())
    assert sum(isinstance(m, FusedRMSNorm) for m in unet.modules()) == n
    assert any(isinstance(m, RMSNorm) for m in tiny_stack.unet.modules())
    g = torch.Generator().manual_seed(0)
    x, source = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    states = torch.randn(2, 7, tiny_stack.unet.config.encoder_hid_dim, generator=g)
    args = (x, source, torch.full((2,), 1000.0), states, torch.ones(2, 7, dtype=torch.long), torch.tensor([[64, 64]] * 2))
    with torch.no_grad():
        torch.testing.assert_close(velocity(unet, *args), velocity(tiny_stack.unet, *args), rtol=1e-5, atol=1e-5)
    # state dicts line up: the adapter and the compile cache see the same parameters
    assert unet.state_dict().keys() == tiny_stack.unet.state_dict().keys()
