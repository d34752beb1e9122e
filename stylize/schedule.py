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
    """Refresh on a clip's first batch, after `restart()` (a new prompt), at a scene cut, and
    every `period` batches; reuse in between."""

    def __init__(self, period: int):
        self.period = period
        self.since: int | None = None  # batches since the last refresh; None: the next one refreshes

    def restart(self) -> None:
        self.since = None

    def step(self, cut: bool) -> bool:
        """Advance one batch: True when this batch refreshes."""
        due = self.since is None or cut or self.since + 1 >= self.period
        self.since = 0 if due else self.since + 1
        return due

    @property
    def next_is_periodic(self) -> bool:
        """The next batch refreshes by the period (a cut aside); asks, changes nothing."""
        return self.since is not None and self.since + 1 >= self.period
