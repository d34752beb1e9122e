"""GPU checks (run on the device machine: `pytest -m gpu`): the engine's CUDA paths against the
reference, the fast text encoder against the stock call on the installed transformers, and the
compiled engine with CUDA graphs: no graph breaks, no recompiles."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stylize.config import EngineConfig, PipelineConfig, model_config
from stylize.engine import Engine
from stylize.fast_te import FastTextEncoder
from stylize.models import load_stack
from stylize.models.text_encoder import encode, tokenize_prompt
from stylize.reference import ReferenceStylizer
from tests.test_engine import OIL, WATER, _clip, run

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_tiny(tiny_cfg, tiny_dir):
    return load_stack(tiny_cfg, "cuda")


@pytest.fixture(scope="module")
def cuda_full():
    return load_stack(model_config("random-full"), "cuda")


def test_fast_te_matches_stock_call_on_cuda(cuda_tiny):
    te = cuda_tiny.text_encoder
    fast = FastTextEncoder(te, 64, "post_norm")
    for prompt in (OIL, WATER):
        tokens = tokenize_prompt(cuda_tiny.tokenizer, te.config, prompt, 64, 64)
        fast.set_prompt(tokens)
        x = torch.rand(4, 3, 64, 64, device="cuda")
        want, _ = encode(te, tokens, x)
        got, _ = fast(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_engine_with_streams_matches_reference_on_cuda(cuda_tiny):
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=4)
    frames = _clip(10)
    ref = ReferenceStylizer(cuda_tiny, cfg).stylize(frames)
    for ecfg in (EngineConfig(), EngineConfig(side_stream=False), EngineConfig(fast_te=False)):
        got = run(Engine(cuda_tiny, cfg, ecfg), frames)
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1, ecfg


def test_compiled_cuda_graphs_no_recompiles(cuda_tiny):
    import torch._dynamo as dynamo

    dynamo.reset()
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    engine = Engine(cuda_tiny, cfg, EngineConfig(te_refresh_every=2, scene_cut=0))
    engine.enable_compile()
    frames = _clip(6, seed=3)
    with dynamo.config.patch(error_on_recompile=True):
        compiled = run(engine, frames, bs=2)
        oil_states = engine.clip.states.clone()
        engine.set_prompt(WATER)  # same length bucket: the side graphs replay over the updated buffers
        water = run(engine, frames[:4], bs=2)
        water_states = engine.clip.states.clone()
        engine.reset()
        again = run(engine, frames[:2], bs=2)
    # the side-stream steps ran as CUDA graphs: captured on their second call, replayed after
    assert engine.steps.text.replays >= 2 and engine.steps.vae_encode.replays >= 5
    eager_engine = Engine(cuda_tiny, cfg, EngineConfig(te_refresh_every=2, scene_cut=0))
    eager = run(eager_engine, frames, bs=2)
    eager_engine.set_prompt(WATER)
    eager_water = run(eager_engine, frames[:4], bs=2)
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 2
    assert np.abs(water.astype(int) - eager_water.astype(int)).max() <= 2
    # the replayed text encoder read the new prompt (a tiny model's output barely shows it)
    torch.testing.assert_close(water_states, eager_engine.clip.states, rtol=1e-3, atol=1e-3)
    assert (water_states - oil_states).abs().max() > 1e-2
    assert np.abs(again.astype(int) - eager[:2].astype(int)).max() <= 2
    dynamo.reset()


def test_stream_graph_on_a_side_stream():
    """A step captured on a side stream replays there with fresh inputs, its results survive the
    next replay, in-place buffer updates are seen, and a re-created buffer means a new capture."""
    from stylize.optimize import StreamGraph

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.full((4,), 2.0, device="cuda"))

        def forward(self, x):
            return {"y": torch.relu(x * self.w) + 1, "sum": (x * self.w).sum(-1)}

    m = Scale()

    def step(mod, x):
        return mod(x)

    graphed = StreamGraph(step)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        xs = [torch.randn(3, 4, device="cuda") for _ in range(4)]
        outs = [graphed(m, x) for x in xs]
        assert len(graphed.graphs) == 1 and graphed.replays == 3
        m.w.copy_(torch.full((4,), -1.0, device="cuda"))  # in place: same graph, new values
        after = graphed(m, xs[0])
        m.register_buffer("w", torch.full((4,), 3.0, device="cuda"))  # a new buffer: a new signature
        fresh = [graphed(m, xs[0]) for _ in range(2)]
    torch.cuda.synchronize()
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out["y"], torch.relu(x * 2) + 1)
        torch.testing.assert_close(out["sum"], (x * 2).sum(-1))
    torch.testing.assert_close(after["y"], torch.relu(-xs[0]) + 1)
    for out in fresh:
        torch.testing.assert_close(out["y"], torch.relu(xs[0] * 3) + 1)
    assert len(graphed.graphs) == 2 and graphed.replays == 5


def test_stream_graph_memory_is_bounded_over_many_shapes():
    """Captures of ever new shapes, evicted beyond `keep`, do not grow GPU memory: a step's
    captures reuse its few streams (a new stream per capture grew it by cuBLAS's per-stream
    workspace until torch's pool of 32 streams came round again: the 110-clip run, NOTES 27)."""
    from stylize.optimize import StreamGraph

    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)

    def step(x):
        return torch.relu(x @ w)

    graphed = StreamGraph(step, keep=2)
    allocated = []
    for i in range(48):
        x = torch.randn(8 + i, 256, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):  # eager, capture, replay
            torch.testing.assert_close(graphed(x), step(x))
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert len(graphed.graphs) == 2
    assert allocated[-1] - allocated[8] < 4 * 2**20, [a // 2**20 for a in allocated]


def test_stream_graph_live_graphs_never_share_a_capture_stream():
    """Shapes A, B, C, A, D, B ... with keep=2: after every eviction the live graphs replay what
    eager gives, no two live graphs were captured on one stream (torch versions that free a
    stream's cuBLAS workspaces with a graph of it would break the other: pytorch/pytorch#193402),
    and the streams are reused (keep + 1 at most)."""
    from stylize.optimize import StreamGraph, _signature

    w = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)

    def step(x):
        return torch.relu(x @ w) @ w

    graphed = StreamGraph(step, keep=2)
    xs = {n: torch.randn(n, 512, device="cuda", dtype=torch.bfloat16) for n in (8, 16, 24, 32)}
    streams = set()
    for n in (8, 16, 24, 8, 32, 16, 8, 24, 32, 16, 8, 8, 24, 24, 32, 32):
        for _ in range(2):
            torch.testing.assert_close(graphed(xs[n]), step(xs[n]))
            for live in list(graphed.graphs.values()):  # every live graph, replayed directly
                live[0].replay()
            for x in xs.values():
                if (_signature(x),) in graphed.graphs:
                    torch.testing.assert_close(graphed(x), step(x))
        live_streams = [entry[-1] for entry in graphed.graphs.values()]
        assert len(set(live_streams)) == len(live_streams)
        streams.update(live_streams)
    torch.cuda.synchronize()
    assert len(graphed.graphs) == 2 and len(streams) <= 3


def test_full_size_fast_te_and_engine_in_bf16(cuda_full):
    """At the real shapes in bf16: the fast TE is as close to a float32 run of the stock model as
    the stock model's own bf16 run is (bf16 noise), and the engine agrees with the plain path."""
    import copy

    te = cuda_full.text_encoder
    tokens = tokenize_prompt(cuda_full.tokenizer, te.config, OIL, 256, 64)
    fast = FastTextEncoder(te, 256, "post_norm")
    fast.set_prompt(tokens)
    x = torch.rand(8, 3, 256, 256, device="cuda")
    stock, _ = encode(te, tokens, x)
    got, _ = fast(x)
    te32 = copy.deepcopy(te).float()
    exact, _ = encode(te32, tokens, x)
    del te32

    def rel(a):
        return float((a.float() - exact).norm() / exact.norm())

    assert rel(got) < 1.5 * rel(stock) + 1e-3, (rel(got), rel(stock))
    cfg = PipelineConfig(prompt=OIL, size=256, batch_size=8)
    frames = _clip(8, 256, 256)
    ref = ReferenceStylizer(cuda_full, cfg).stylize(frames)
    got = run(Engine(cuda_full, cfg, EngineConfig()), frames, bs=8)
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 2.0


def test_compiled_adapter_cuda_graphs_no_recompiles(cuda_tiny):
    """U-Net + adapter as one CUDA-graphed graph: conditioning refreshes write the buffers in
    place, so nothing recompiles; the output matches the eager engine."""
    import torch._dynamo as dynamo

    from tests.test_lllite import _randomise

    dynamo.reset()
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    ecfg = EngineConfig(adapter="random", adapter_refresh_every=2, te_refresh_every=2, scene_cut=0)
    engine = Engine(cuda_tiny, cfg, ecfg)
    _randomise(engine.steps.lllite)
    engine.enable_compile()
    frames = _clip(8, seed=6)
    with dynamo.config.patch(error_on_recompile=True):
        compiled = run(engine, frames, bs=2)
    # the side stream replays its CUDA graphs beside the U-Net's (the TE runs on batches 0 and 2)
    assert engine.steps.text.replays >= 1 and engine.steps.vae_encode.replays >= 3
    eager_engine = Engine(cuda_tiny, cfg, ecfg)
    eager_engine.steps.lllite.load_state_dict(engine.steps.lllite.state_dict())
    eager = run(eager_engine, frames, bs=2)
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 2
    dynamo.reset()


@pytest.mark.gpu
def test_out_of_memory_fails_that_clip_and_the_next_goes_on(tmp_path, tiny_dir, monkeypatch):
    """A real CUDA out-of-memory (issue #16), forced by a per-process memory fraction of what is
    held now plus 512 MiB: a.mp4, 4096x4096, needs ~1 GB for one batch's upload and its float copy
    and fails with one line naming what to lower and the peak; b.mp4, 64x48, is written after it;
    exit 1, no partial file, no retry (one feed per batch)."""
    import re

    from typer.testing import CliRunner

    from stylize import video
    from stylize.cli import run_app
    from tests.conftest import write_clip

    write_clip(tmp_path / "a.mp4", frames=4, size=(4096, 4096))
    write_clip(tmp_path / "b.mp4", frames=4)
    fed = []
    feed = Engine.feed

    def counted(self, batch):
        fed.append(len(batch.frames))
        return feed(self, batch)

    monkeypatch.setattr(Engine, "feed", counted)
    args = [str(tmp_path), "--style", "oil", "--model", "tiny", "--size", "64", "--batch-size", "4",
            "--device", "cuda", "--compile", "off", "--preset", "ultrafast"]  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 512 * 2**20) / total))
    try:
        r = CliRunner().invoke(run_app, args, catch_exceptions=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1, r.stderr
    said = re.fullmatch(r"error: (.+): out of GPU memory \(peak ([\d.]+) GiB allocated\): (.+)", errors[0])
    assert said and said[1] == str(tmp_path / "a.mp4"), errors[0]
    assert float(said[2]) > 0 and said[3] == "lower --batch-size (now 4) or --size (now 64)", errors[0]
    assert fed == [4, 4]  # a's first batch once, then b's
    assert video.probe(tmp_path / "b_oil.mp4").frames == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4", "b_oil.mp4"]
    assert "1 of 2 clips done, 1 failed" in r.stderr
