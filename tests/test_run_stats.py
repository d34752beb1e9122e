"""Where a clip's time goes (#14): stylize_video's RunStats break it into the probe, the one-time
prepare, the rate after the first two batches and the end (flush, encoder, remux)."""

from __future__ import annotations

import math

from stylize.config import PipelineConfig
from stylize.pipeline import OutputConfig, stylize_video
from stylize.reference import ReferenceStylizer
from tests.conftest import write_clip


def test_a_clip_reports_its_breakdown(tiny_stack, tmp_path):
    src = write_clip(tmp_path / "a.mp4", frames=20)
    stylizer = ReferenceStylizer(tiny_stack, PipelineConfig(prompt="oil", size=64, batch_size=4))
    stats = stylize_video(src, tmp_path / "b.mp4", stylizer, OutputConfig(preset="ultrafast"))
    assert stats.frames == 20
    for t in (stats.probe_s, stats.prepare_s, stats.flush_s):
        assert 0 <= t < stats.seconds + stats.first_output_s
    assert stats.steady_fps > 0 and math.isfinite(stats.steady_fps)
    record = stats.as_dict()
    assert {"probe_s", "prepare_s", "steady_fps", "flush_s"} <= set(record)
    # two batches or fewer: no steady state to speak of
    short = stylize_video(write_clip(tmp_path / "c.mp4", frames=6), tmp_path / "d.mp4", stylizer, OutputConfig())
    assert short.as_dict()["steady_fps"] is None
