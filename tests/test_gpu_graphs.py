"""Graph replay of the eager steps (#14, optimize.graph_steps) equals plain eager on the GPU, in
the cases that catch a stale static input: consecutive batches of different frames, a prompt
change, adapter refreshes, and shapes A -> B -> A. Run on the device machine: `pytest -m gpu`."""

from __future__ import annotations

import time

import numpy as np
import pytest

from stylize.config import EngineConfig, PipelineConfig
from stylize.engine import Engine
from stylize.models import load_stack
from tests.test_engine import OIL, WATER, _clip, run

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_tiny(tiny_cfg, tiny_dir):
    return load_stack(tiny_cfg, "cuda")


def pair(stack, ecfg=None, batch=4, randomise=False):
    """(eager engine, graph-replay engine) of the same configuration."""
    ecfg = ecfg or EngineConfig(scene_cut=0)
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=batch)
    engines = [Engine(stack, cfg, ecfg), Engine(stack, cfg, ecfg)]
    if randomise:  # released adapter weights start with up = 0: make it act
        from tests.test_lllite import _randomise

        for e in engines:
            _randomise(e.steps.lllite, seed=1)
    engines[1].enable_graphs()
    return engines


def close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_batches_of_different_frames(cuda_tiny):
    eager, graphs = pair(cuda_tiny)
    frames = _clip(24, seed=3)
    t = time.perf_counter()
    graphs.prepare(frames.shape[1:3])
    prepare_s = time.perf_counter() - t
    close(run(eager, frames), run(graphs, frames))
    assert graphs.steps.denoise.replays >= 6 and graphs.steps.vae_decode.replays >= 6
    assert prepare_s < 5  # warm-up + capture of a tiny stack; the full one is timed by bench.py
    for e in (eager, graphs):
        e.close()


def test_after_a_prompt_change(cuda_tiny):
    eager, graphs = pair(cuda_tiny)
    frames = _clip(16, seed=4)
    outs = []
    for e in (eager, graphs):
        first = run(e, frames[:8])
        e.set_prompt(WATER)
        outs.append((first, run(e, frames[8:])))
        e.close()
    close(outs[0][0], outs[1][0])
    close(outs[0][1], outs[1][1])
    oil_again = run(pair(cuda_tiny)[0], frames[8:])
    assert not np.array_equal(outs[1][1], oil_again)  # the new prompt took effect (tiny: by a level or so)


def test_after_adapter_refreshes(cuda_tiny):
    ecfg = EngineConfig(adapter="random", adapter_refresh_every=2, scene_cut=0)
    eager, graphs = pair(cuda_tiny, ecfg, batch=2, randomise=True)
    frames = _clip(16, seed=5)  # 8 batches: refreshes at 0, 2, 4, 6
    close(run(eager, frames, bs=2), run(graphs, frames, bs=2))
    bare = run(
        Engine(cuda_tiny, PipelineConfig(prompt=OIL, size=64, batch_size=2), EngineConfig(scene_cut=0)), frames, bs=2
    )
    assert not np.array_equal(run(graphs, frames, bs=2), bare)  # the adapter acts (tiny: by a level or so)
    for e in (eager, graphs):
        e.close()


def test_across_shapes_a_b_a(cuda_tiny):
    ecfg = EngineConfig(adapter="random", adapter_refresh_every=2, scene_cut=0)
    eager, graphs = pair(cuda_tiny, ecfg, batch=2, randomise=True)
    clips = [_clip(8, 48, 80, seed=6), _clip(8, 64, 64, seed=7), _clip(8, 48, 80, seed=8)]
    for frames in clips:
        for e in (eager, graphs):
            e.prepare(frames.shape[1:3])
            e.reset()
        close(run(eager, frames, bs=2), run(graphs, frames, bs=2))
    assert len(graphs.steps.denoise.graphs) == 2  # A's graph was kept and replayed again
    for e in (eager, graphs):
        e.close()
