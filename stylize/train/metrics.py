"""How good a stylized clip is against its teacher (issue #12 §1, DESIGN §6), and a picture of it.

Frames everywhere are (T, H, W, 3) uint8 RGB, all at one evaluation size. Numbers:
- fidelity to the teacher: PSNR (dB, peak 255) and SSIM, averaged over frames;
- warp error εw on the 0-255 scale: Farneback flow between consecutive *input* frames, output t+1
  warped back to t, mean absolute difference; masked by forward-backward consistency (the target
  metric) and unmasked (the paper's way);
- sharpness: mean Sobel gradient magnitude, and its ratio to the teacher's, so that blur (which
  lowers εw) cannot pass for stability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

# the shipped model must keep at least this share of its teacher's sharpness
SHARPNESS_GUARD = 0.8


def contact_sheet(rows: Sequence[np.ndarray], labels: Sequence[str], columns: int = 6, height: int = 160,
                  label_width: int | None = None, font_size: int = 14):  # fmt: skip
    """A grid a person can look at: one row per source (input | teacher | candidates ...), one
    column per sampled frame (`columns` evenly spaced over the shortest row, frame numbers on
    top), thumbnails `height` px high (width from the first row's aspect; every row is resized to
    it), each row's label on the left in PIL's default font. `label_width` None: fits the labels.

    rows: frames (T, H, W, 3) uint8 RGB each. Returns an RGB PIL.Image of width
    label_width + columns * (thumb_w + GAP) and height header + len(rows) * (height + GAP)."""
    import cv2
    from PIL import Image, ImageDraw, ImageFont

    assert len(rows) == len(labels), "one label per row"
    font = ImageFont.load_default(size=font_size)
    t = min(len(r) for r in rows)
    picks = sample_indices(t, columns)
    first = rows[0][0]
    thumb_w = max(1, round(first.shape[1] * height / first.shape[0]))
    if label_width is None:
        label_width = 4 * _GAP + max(int(font.getlength(s)) for s in labels)
    header = font_size + 2 * _GAP
    sheet = Image.new("RGB", (label_width + len(picks) * (thumb_w + _GAP), header + len(rows) * (height + _GAP)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for c, i in enumerate(picks):
        draw.text((label_width + c * (thumb_w + _GAP), _GAP), f"frame {i}", fill=(200, 200, 200), font=font)
    for r, (frames, label) in enumerate(zip(rows, labels)):
        top = header + r * (height + _GAP)
        draw.text((2 * _GAP, top + height // 2), label, fill=(255, 255, 255), font=font, anchor="lm")
        for c, i in enumerate(picks):
            thumb = cv2.resize(np.ascontiguousarray(frames[i]), (thumb_w, height), interpolation=cv2.INTER_AREA)
            sheet.paste(Image.fromarray(thumb), (label_width + c * (thumb_w + _GAP), top))
    return sheet


_GAP = 4  # px between thumbnails, and the margin of the text


def sample_indices(t: int, n: int) -> list[int]:
    """Up to `n` evenly spaced frame indices over a clip of `t` frames, first and last included."""
    return sorted({round(i) for i in np.linspace(0, t - 1, min(n, t))})
