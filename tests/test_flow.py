"""Optical flow and the backward warp the temporal adapter uses (stylize/flow.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("method", ["dis", "dis-fast", "farneback"])
def test_warp_follows_the_flow(method):
    from stylize.flow import flow_to_previous, warp

    rng = np.random.default_rng(0)
    import cv2

    base = cv2.GaussianBlur(rng.integers(0, 256, (64, 64), dtype=np.uint8), (0, 0), 2)
    previous, current = base[:, :-3], base[:, 3:]  # the scene moved 3 px to the left
    f = flow_to_previous(np.ascontiguousarray(current), np.ascontiguousarray(previous), method)
    assert np.median(f[8:-8, 8:-8, 0]) == pytest.approx(3, abs=0.5)
    prev_t = torch.from_numpy(previous.astype(np.float32))[None, None]
    warped = warp(prev_t, torch.from_numpy(f)[None])[0, 0].numpy()
    assert np.abs(warped[8:-8, 8:-12] - current[8:-8, 8:-12]).mean() < 4


