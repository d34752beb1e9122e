"""When per-clip work is redone: the refresh rule (one class, used for the text encoder's period M
and the adapter's period N) and the scene-cut test both are fed each batch."""

from __future__ import annotations

import numpy as np


def thumbnail(frame_hwc_uint8: np.ndarray) -> np.ndarray:
    """A ~32-pixel grey thumbnail in [0, 1] for cheap scene-cut detection on the host."""
    h, w = frame_hwc_uint8.shape[:2]
    step = max(1, max(h, w) // 32)
    return frame_hwc_uint8[::step, ::step].mean(axis=-1, dtype=np.float32) / 255


def scene_cut(prev_thumb: np.ndarray | None, cur_thumb: np.ndarray, threshold: float) -> bool:
    """A new scene: the mean absolute difference (0-1) between the thumbnails of the previous
    batch's last frame and this batch's first is above `threshold` (0: detection off)."""
    return (
        threshold > 0
        and prev_thumb is not None
        and prev_thumb.shape == cur_thumb.shape
        and float(np.abs(cur_thumb - prev_thumb).mean()) > threshold
    )


class RefreshSchedule:
    """Refresh on a clip's first batch, after `restart()` (a new prompt), at a scene cut, and on
    every batch whose index in the clip is a multiple of `period`; reuse in between. The periodic
    refreshes stay on that grid whatever the cuts did (a cut adds a refresh, it does not move the
    grid), so a chunk of a split clip that starts at batch `start` (chunks.py) refreshes where the
    whole clip's run would, without seeing the cuts before it."""

    def __init__(self, period: int, start: int = 0):
        self.period = period
        self.index = start  # the clip's index of the next batch
        self.fresh = True  # the next batch refreshes: the clip's (or chunk's) first, or after restart

    def restart(self) -> None:
        self.fresh = True

    def step(self, cut: bool) -> bool:
        """Advance one batch: True when this batch refreshes."""
        due = self.fresh or cut or self.index % self.period == 0
        self.fresh = False
        self.index += 1
        return due

    @property
    def next_is_periodic(self) -> bool:
        """The next batch refreshes by the period (a cut aside); asks, changes nothing."""
        return not self.fresh and self.index % self.period == 0
