"""The streaming engine on the CPU: same function as the reference, its schedules, its state,
and its compiled graphs (no graph breaks, no recompiles)."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from stylize.config import EngineConfig, PipelineConfig
from stylize.engine import Engine
from stylize.fast_te import FastTextEncoder
from stylize.models.text_encoder import encode, tokenize_prompt
from stylize.reference import ReferenceStylizer, geometry
from stylize.video import FrameBatch
from tests.conftest import write_clip

OIL = "transfer this to oil painting style, vibrant colors"
WATER = "transfer this to watercolor painting style"


def _clip(n=10, h=48, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def run(engine, frames, bs=4):
    out = []
    for s in range(0, len(frames), bs):
        chunk = frames[s : s + bs]
        out += engine.feed(FrameBatch(chunk, list(range(s, s + len(chunk))), [0.0] * len(chunk)))
    out += engine.flush()
    assert sum((b.pts for b in out), []) == list(range(len(frames)))  # every frame once, in order
    return np.concatenate([b.frames for b in out])


def count_text_calls(engine):
    calls = []
    text = engine.steps.text

    def counted(fast_te, frames):
        calls.append(frames.shape[0])
        return text(fast_te, frames)

    engine.use(dataclasses.replace(engine.steps, text=counted))  # a whole new Steps, swapped in
    return calls


@pytest.mark.parametrize("fast_te", [True, False])
def test_engine_equals_reference(tiny_stack, fast_te):
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=4)
    frames = _clip(10)  # two full batches and a padded one
    ref = ReferenceStylizer(tiny_stack, cfg).stylize(frames)
    got = run(Engine(tiny_stack, cfg, EngineConfig(fast_te=fast_te)), frames)
    assert got.shape == ref.shape and np.array_equal(got, ref)


@pytest.mark.parametrize("fused_norms", [False, True])
@pytest.mark.parametrize("hidden_states", ["post_norm", "pre_norm"])
def test_fast_text_encoder_equals_stock_call(tiny_stack, hidden_states, fused_norms):
    te = tiny_stack.text_encoder
    fast = FastTextEncoder(te, 64, hidden_states, bucket=16, fused_norms=fused_norms)
    for prompt in (OIL, WATER, "x"):
        tokens = tokenize_prompt(tiny_stack.tokenizer, te.config, prompt, 64, 64)
        fast.set_prompt(tokens)
        for b in (1, 3):
            x = torch.rand(b, 3, 64, 64)
            want, want_mask = encode(te, tokens, x, hidden_states)
            got, mask = fast(x)
            assert torch.equal(mask, want_mask)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_te_refresh_schedule(tiny_stack):
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    engine = Engine(tiny_stack, cfg, EngineConfig(te_refresh_every=3, scene_cut=0))
    calls = count_text_calls(engine)
    frames = np.repeat(_clip(1), 14, axis=0)  # one still scene: 7 batches
    run(engine, frames, bs=2)
    assert len(calls) == 3  # batches 0, 3, 6
    engine.reset()  # a new clip refreshes at once
    run(engine, frames[:2], bs=2)
    assert len(calls) == 4
    engine.set_prompt(WATER)  # a prompt change refreshes at once
    run(engine, frames[:4], bs=2)
    assert len(calls) == 5


def test_scene_cut_forces_refresh(tiny_stack):
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    engine = Engine(tiny_stack, cfg, EngineConfig(te_refresh_every=100))
    calls = count_text_calls(engine)
    dark = np.full((4, 48, 80, 3), 10, np.uint8)
    bright = np.full((4, 48, 80, 3), 240, np.uint8)
    run(engine, np.concatenate([dark, bright]), bs=2)  # batches: dark, dark, bright (cut), bright
    assert len(calls) == 2


def test_te_reuse_changes_output_by_design_and_refresh_restores_it(tiny_stack):
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    frames = _clip(4, seed=5)
    every = run(Engine(tiny_stack, cfg, EngineConfig(scene_cut=0)), frames, bs=2)
    reuse = run(Engine(tiny_stack, cfg, EngineConfig(te_refresh_every=2, scene_cut=0)), frames, bs=2)
    assert np.array_equal(every[:2], reuse[:2])  # the refreshed batch is identical
    assert not np.array_equal(every[2:], reuse[2:])  # the reusing batch is not


def test_te_batch_one(tiny_stack):
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=4)
    engine = Engine(tiny_stack, cfg, EngineConfig(te_batch_one=True))
    calls = count_text_calls(engine)
    still = np.repeat(_clip(1), 4, axis=0)
    got = run(engine, still)
    assert calls == [1]
    # with identical frames the representative frame's states are every frame's states
    assert np.array_equal(got, ReferenceStylizer(tiny_stack, cfg).stylize(still))


def test_static_prompt_encodes_text_once(tiny_stack, monkeypatch):
    import stylize.engine as engine_mod

    calls = []
    real = engine_mod.encode_text_only

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(engine_mod, "encode_text_only", counted)
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    engine = Engine(tiny_stack, cfg, EngineConfig(static_prompt=True))
    out = run(engine, _clip(6), bs=2)
    assert len(calls) == 1 and out.shape == (6, 48, 80, 3)


def test_nothing_leaks_between_clips(tiny_stack):
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2, fixed_noise=False)
    a, b = _clip(4, seed=1), _clip(6, h=40, w=40, seed=2)
    engine = Engine(tiny_stack, cfg, EngineConfig(te_refresh_every=4))
    first = run(engine, a, bs=2)
    engine.reset()
    run(engine, b, bs=2)
    engine.reset()
    again = run(engine, a, bs=2)
    assert np.array_equal(first, again)
    assert not engine.ready and engine.handback.unhandled == 0


def test_compiled_engine_no_graph_breaks_no_recompiles(tiny_stack):
    """Three-plus batches with a TE refresh, a TE reuse, a prompt change in the same length bucket
    and a new clip: each step compiles once (fullgraph) and never recompiles."""
    import torch._dynamo as dynamo

    dynamo.reset()
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    engine = Engine(tiny_stack, cfg, EngineConfig(te_refresh_every=2, scene_cut=0))
    engine.enable_compile(backend="aot_eager")
    oil_shape = engine.steps.fast_te.prompt_shape
    frames = _clip(6, seed=3)
    with dynamo.config.patch(error_on_recompile=True):
        compiled = run(engine, frames, bs=2)  # refresh, reuse, refresh
        engine.set_prompt(WATER)
        assert engine.steps.fast_te.prompt_shape == oil_shape  # same bucket: same static shapes
        run(engine, frames[:4], bs=2)
        engine.reset()
        run(engine, frames[:2], bs=2)
    eager = run(Engine(tiny_stack, cfg, EngineConfig(te_refresh_every=2, scene_cut=0)), frames, bs=2)
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 1
    dynamo.reset()


def test_output_hw_and_crop(tiny_stack):
    cfg = dataclasses.replace(PipelineConfig(prompt=OIL, size=64, batch_size=2), crop="center")
    engine = Engine(tiny_stack, cfg)
    assert engine.output_hw((48, 80)) == (48, 48)
    assert run(engine, _clip(3), bs=2).shape == (3, 48, 48, 3)


def test_stylize_video_through_the_engine_sink(tiny_stack, tmp_path):
    """stylize_video hands the engine a sink: batches reach the writer from the collector thread,
    in order, and the file equals the reference path's."""
    from stylize import video
    from stylize.pipeline import OutputConfig, stylize_video
    from tests.conftest import write_clip

    src = write_clip(tmp_path / "in.mp4", frames=11)
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=4)
    out = OutputConfig(crf=0, preset="ultrafast")
    engine = Engine(tiny_stack, cfg)
    stats = stylize_video(src, tmp_path / "engine.mp4", engine, out)
    assert engine.handback.unhandled == 0 and stats.frames == 11 and stats.latency_p50_ms > 0
    stylize_video(src, tmp_path / "ref.mp4", ReferenceStylizer(tiny_stack, cfg), out)
    a = np.concatenate([b.frames for b in video.read_batches(tmp_path / "engine.mp4", 16)])
    b = np.concatenate([b.frames for b in video.read_batches(tmp_path / "ref.mp4", 16)])
    assert np.array_equal(a, b)


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_feed_waits_while_in_flight_batches_are_not_handed_back(tiny_stack, in_flight):
    """Backpressure with a sink: `feed` returns (and the next batch is taken from the decoder)
    only while fewer than `in_flight` batches are issued and not yet handed back; each one more
    would add a batch period to every frame's latency."""
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    engine = Engine(tiny_stack, cfg, EngineConfig(in_flight=in_flight))
    release, got = threading.Semaphore(0), []

    def slow_sink(batch):  # hands a batch back only when the test releases it
        release.acquire()
        got.append(batch.pts)

    engine.reset(sink=slow_sink)
    frames = _clip(2 * (in_flight + 1))
    returned = []

    def feeder():
        for s in range(0, len(frames), 2):
            engine.feed(FrameBatch(frames[s : s + 2], [s, s + 1], [0.0, 0.0]))
            returned.append(s // 2)

    thread = threading.Thread(target=feeder, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        # batches 0 .. in_flight-1 are issued; feed of the last of them waits for batch 0's hand-off
        assert returned == list(range(in_flight - 1))
        release.release()
        time.sleep(1.0)
        assert returned == list(range(in_flight))
    finally:
        for _ in range(in_flight + 1):
            release.release()
        thread.join(10)
        engine.flush()
        engine.close()
    assert returned == list(range(in_flight + 1)) and len(got) == in_flight + 1


def test_sink_errors_reach_the_caller(tiny_stack):
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    engine = Engine(tiny_stack, cfg)

    def broken(batch):
        raise OSError("disk full")

    engine.reset(sink=broken)
    frames = _clip(4)
    with pytest.raises(OSError, match="disk full"):
        for s in (0, 2):
            engine.feed(FrameBatch(frames[s : s + 2], [s, s + 1], [0.0, 0.0]))
        engine.flush()
    engine.close()


# -- the temporal adapter in the engine ------------------------------------------------------


def record_refresh_kinds(engine) -> list[bool]:
    """Per adapter refresh: True when it conditioned on the input frames, False when it warped."""
    kinds, real_apply = [], engine.temporal.apply
    engine.temporal.apply = lambda prepared, x01: (kinds.append(isinstance(prepared, str)), real_apply(prepared, x01))
    return kinds


def _adapter_engine(stack, **kw):
    from tests.test_lllite import _randomise

    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    engine = Engine(stack, cfg, EngineConfig(adapter="random", scene_cut=0, **kw))
    _randomise(engine.steps.lllite, seed=1)  # released weights start with up = 0; make it act
    return engine


def test_adapter_multiplier_zero_is_the_bare_engine(tiny_stack):
    frames = _clip(6, seed=4)
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    bare = run(Engine(tiny_stack, cfg, EngineConfig(scene_cut=0)), frames, bs=2)
    off = run(_adapter_engine(tiny_stack, adapter_multiplier=0.0), frames, bs=2)
    on = run(_adapter_engine(tiny_stack), frames, bs=2)
    assert np.array_equal(off, bare)
    assert not np.array_equal(on, bare)
    assert tiny_stack.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q").__class__.__name__ == "Linear"


def test_adapter_refresh_schedule_and_flow_for_the_batch_that_uses_it(tiny_stack, monkeypatch):
    import stylize.temporal as temporal_mod

    seen = []
    real = temporal_mod.start_flows

    def recording(pool, frames, previous, out, crop=None, method="dis"):
        seen.append(([int(f.mean()) for f in frames], int(previous.mean())))
        return real(pool, frames, previous, out, crop, method)

    monkeypatch.setattr(temporal_mod, "start_flows", recording)
    engine = _adapter_engine(tiny_stack, adapter_refresh_every=2)
    conditions = record_refresh_kinds(engine)
    levels = np.arange(8) * 30 + 10  # each frame a distinct flat grey level
    frames = np.stack([np.full((48, 80, 3), v, np.uint8) for v in levels])
    run(engine, frames, bs=2)  # batches 0..3: refresh at 0 (input frames) and 2 (warped)
    assert conditions == [True, False]
    # batch 2's refresh used flow from batch 2's own frames (levels 130, 160) to batch 1's last (100)
    assert seen == [([130, 160], 100)]
    engine.reset()  # a new clip: the first batch conditions on its input frames again
    run(engine, frames[:2], bs=2)
    assert conditions == [True, False, True]
    engine.close()


def test_scene_cut_refreshes_adapter_with_input_frames(tiny_stack):
    from tests.test_lllite import _randomise

    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    engine = Engine(tiny_stack, cfg, EngineConfig(adapter="random", adapter_refresh_every=100))
    _randomise(engine.steps.lllite)
    kinds = record_refresh_kinds(engine)
    dark, bright = np.full((4, 48, 80, 3), 10, np.uint8), np.full((4, 48, 80, 3), 240, np.uint8)
    run(engine, np.concatenate([dark, bright]), bs=2)
    assert kinds == [True, True]  # the first batch and the cut, both from input frames


def test_compiled_engine_with_adapter_no_recompiles(tiny_stack):
    import torch._dynamo as dynamo

    dynamo.reset()
    engine = _adapter_engine(tiny_stack, adapter_refresh_every=2, te_refresh_every=2)
    engine.enable_compile(backend="aot_eager")
    frames = _clip(8, seed=6)
    with dynamo.config.patch(error_on_recompile=True):
        compiled = run(engine, frames, bs=2)  # adapter refreshes at batches 0 and 2, TE at 0 and 2
        engine.reset()
        run(engine, frames[:4], bs=2)
    eager = run(_adapter_engine(tiny_stack, adapter_refresh_every=2, te_refresh_every=2), frames, bs=2)
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 1
    dynamo.reset()


def test_flows_run_beside_the_feeding_thread(tiny_stack, monkeypatch):
    """`prepare` only starts the flows; the feeding thread collects them in `apply`, after issuing
    the batch's side-stream work, so a slow flow overlaps that work instead of preceding it."""
    import time

    import stylize.flow as flow_mod

    real = flow_mod.flow_to_previous

    def slow(current, previous, method="dis"):
        time.sleep(0.3)
        return real(current, previous, method)

    monkeypatch.setattr(flow_mod, "flow_to_previous", slow)
    engine = _adapter_engine(tiny_stack, adapter_refresh_every=1)
    frames = _clip(4, seed=2)
    run(engine, frames[:2], bs=2)  # the first batch conditions on its inputs: no flow
    geo = geometry(frames.shape[1:3], 64, engine.multiple)
    t = time.perf_counter()
    prepared = engine.temporal.prepare(frames[2:], geo, cut=False)
    assert time.perf_counter() - t < 0.15  # started, not waited for
    engine.temporal.apply(prepared, torch.rand(2, 3, *geo.work_hw))
    assert engine.temporal.flow_ms[-1] >= 300 and engine.temporal.flow_wait_ms[-1] <= engine.temporal.flow_ms[-1]
    engine.close()


def test_ring_buffers_give_the_same_output_with_adapter_and_scene_cuts(tiny_stack, tmp_path):
    """The decoder's pinned, batch-sized ring buffers (reused, a short batch padded in place) give
    exactly what batches of fresh arrays give, with the adapter's flows and reference frames
    reading them and a scene cut mid-clip; the ring is reused, not grown."""
    from tests.test_lllite import _randomise

    from stylize import video
    from stylize.engine import RING_SLOTS
    from stylize.writer import VideoWriter

    frames = np.concatenate([_clip(6, seed=7) // 4, 255 - _clip(7, seed=8) // 4])  # a cut between batches 2 and 3
    src = tmp_path / "cut.mp4"
    info = dataclasses.replace(video.probe(write_clip(tmp_path / "seed.mp4", frames=2, size=(80, 48))), frames=13)
    with VideoWriter(src, info, crf=0, preset="ultrafast", audio=False) as w:
        w.write(frames, [i * info.nominal_ticks for i in range(13)])
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=3)
    engine = Engine(tiny_stack, cfg, EngineConfig(adapter="random", adapter_refresh_every=2))
    _randomise(engine.steps.lllite)
    kinds = record_refresh_kinds(engine)

    def outputs(ring):
        engine.reset()
        got = []
        for batch in video.read_batches(src, 3, ring=ring):
            got += engine.feed(batch)
        got += engine.flush()
        return np.concatenate([b.frames for b in got])

    with_ring, without = outputs(engine.ring), outputs(None)
    assert kinds[:3] == [True, True, False]  # batch 0 and the cut at batch 2 refresh from input frames, 4 warps
    assert with_ring.shape == (13, 48, 80, 3) and np.array_equal(with_ring, without)
    assert engine.ring.made <= RING_SLOTS
    engine.close()


def test_failed_clips_do_not_keep_the_ring_slots(tiny_stack, tmp_path):
    """A clip that fails mid-way leaves its decoder's ring slots out; two such clips of one size
    used to leave none for the third, which then waited for ever (a folder on the GPU)."""
    from stylize.pipeline import OutputConfig, stylize_video

    engine = Engine(tiny_stack, PipelineConfig(prompt=OIL, size=64, batch_size=2), EngineConfig(fast_te=False))
    src = write_clip(tmp_path / "a.mp4", frames=12)
    steps, calls = engine.steps, []

    def failing(*args):  # the U-Net fails on a clip's second batch, inside feed
        calls.append(1)
        if len(calls) % 2 == 0:
            raise RuntimeError("a clip that fails in feed")
        return steps.denoise(*args)

    engine.use(dataclasses.replace(steps, denoise=failing))
    for n in range(2):
        calls.clear()
        with pytest.raises(RuntimeError):
            stylize_video(src, tmp_path / f"fail{n}.mp4", engine, OutputConfig(preset="ultrafast"))
    engine.use(steps)
    done = []
    worker = threading.Thread(
        target=lambda: done.append(stylize_video(src, tmp_path / "ok.mp4", engine, OutputConfig(preset="ultrafast"))),
        daemon=True,
    )
    worker.start()
    worker.join(60)
    assert done and done[0].frames == 12, "the third clip waited for ring slots"
    engine.close()


def test_source_start_flows_from_the_frames_own_latent(tiny_stack, monkeypatch):
    """`start: source` (mini): x_T is the source latent, so a zero velocity gives back the source
    latent, no seed changes the output, and the engine computes what the reference does."""
    import stylize.reference as reference_mod

    stack = dataclasses.replace(tiny_stack, config=dataclasses.replace(tiny_stack.config, start="source"))
    frames = _clip(6)

    def outputs(s, seed):
        cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2, fixed_noise=False, seed=seed)
        return ReferenceStylizer(s, cfg).stylize(frames)

    assert np.array_equal(outputs(stack, 1), outputs(stack, 2))
    assert not np.array_equal(outputs(tiny_stack, 1), outputs(tiny_stack, 2))  # noise: the seed matters
    cfg = PipelineConfig(prompt=OIL, size=64, batch_size=2)
    assert np.array_equal(run(Engine(stack, cfg, EngineConfig()), frames, bs=2), ReferenceStylizer(stack, cfg).stylize(frames))

    monkeypatch.setattr(reference_mod, "velocity", lambda unet, x, *a, **k: torch.zeros_like(x))
    x = torch.rand(2, 3, 48, 80)
    got = ReferenceStylizer(stack, cfg).denoise(x)
    assert torch.equal(got, reference_mod.vae_encode(stack.vae, x))
