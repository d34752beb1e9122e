"""Out of GPU memory during a clip, simulated on the CPU (the real one is in test_gpu.py): one line
naming what to lower, that clip failed (exit 1), the next clip written, no partial file, no retry."""

from __future__ import annotations

import re

import torch
from typer.testing import CliRunner

from stylize import video
from stylize.cli import run_app
from stylize.config import PipelineConfig
from stylize.pipeline import out_of_memory_message
from stylize.reference import ReferenceStylizer
from tests.conftest import write_clip

FAST = ["--style", "oil", "--model", "tiny", "--size", "64", "--preset", "ultrafast", "--batch-size", "4",
        "--device", "cpu"]  # fmt: skip
TORCH_SAYS = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which ..."


def test_out_of_memory_fails_that_clip_and_the_next_goes_on(tmp_path, monkeypatch):
    a = write_clip(tmp_path / "a.mp4", frames=4)
    write_clip(tmp_path / "b.mp4", frames=4)
    batches = []
    denoise = ReferenceStylizer.denoise

    def short_of_memory(self, x01_bchw):  # the allocator fails in a's first batch only
        batches.append(len(x01_bchw))
        if len(batches) == 1:
            raise torch.OutOfMemoryError(TORCH_SAYS)
        return denoise(self, x01_bchw)

    monkeypatch.setattr(ReferenceStylizer, "denoise", short_of_memory)
    r = CliRunner().invoke(run_app, [str(tmp_path), *FAST], catch_exceptions=False)
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1, r.stderr
    # (a peak only where this process has used CUDA: on a GPU machine, other tests may have)
    said = re.fullmatch(r"error: (.+): out of GPU memory( \(peak [\d.]+ GiB allocated\))?: (.+)", errors[0])
    assert said and said[1] == str(a) and said[3] == "lower --batch-size (now 4) or --size (now 64)", errors[0]
    assert batches == [4, 4]  # a's batch once (no retry at a smaller batch or size), then b's
    assert video.probe(tmp_path / "b_oil.mp4").frames == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4", "b_oil.mp4"]  # no partial of a
    assert "1 of 2 clips done, 1 failed" in r.stderr


def test_out_of_memory_message():
    cfg = PipelineConfig(prompt="x", size=512, batch_size=8)
    assert out_of_memory_message(cfg, 3 * 2**30 + 2**27) == (
        "out of GPU memory (peak 3.12 GiB allocated): lower --batch-size (now 8) or --size (now 512)"
    )
    still = PipelineConfig(prompt="x", size=1024, batch_size=1)  # a run of stills: no batch to lower
    assert out_of_memory_message(still, None) == "out of GPU memory: lower --size (now 1024)"


def test_each_clip_hands_its_freed_heap_back_failed_or_not(tmp_path, monkeypatch):
    """After every clip, the one that ran out of memory too, glibc's freed pages go back to the OS
    (pipeline.return_freed_heap): a folder's RSS then stays flat (NOTES 35)."""
    from stylize import pipeline

    write_clip(tmp_path / "a.mp4", frames=4)
    write_clip(tmp_path / "b.mp4", frames=4)
    trims = []
    monkeypatch.setattr(pipeline, "_libc_trim", lambda: trims.append)
    denoise = ReferenceStylizer.denoise
    calls = []

    def first_short_of_memory(self, x01_bchw):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError(TORCH_SAYS)
        return denoise(self, x01_bchw)

    monkeypatch.setattr(ReferenceStylizer, "denoise", first_short_of_memory)
    r = CliRunner().invoke(run_app, [str(tmp_path), *FAST], catch_exceptions=False)
    assert r.exit_code == 1 and video.probe(tmp_path / "b_oil.mp4").frames == 4
    assert trims == [0, 0]  # malloc_trim(0) once a clip


def test_return_freed_heap_is_safe_without_glibc(monkeypatch):
    from stylize import pipeline

    monkeypatch.setattr(pipeline, "_libc_trim", lambda: None)
    pipeline.return_freed_heap()  # nothing to call, nothing raised
