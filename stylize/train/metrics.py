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
    size = (label_width + len(picks) * (thumb_w + _GAP), header + len(rows) * (height + _GAP))
    sheet = Image.new("RGB", size, (32, 32, 32))
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


# -- warp error --------------------------------------------------------------------------------


def grey(frame_hwc_uint8: np.ndarray) -> np.ndarray:
    """One RGB frame (H, W, 3) uint8 → grey (H, W) uint8."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(frame_hwc_uint8), cv2.COLOR_RGB2GRAY)


def farneback(prev_grey: np.ndarray, next_grey: np.ndarray) -> np.ndarray:
    """Dense flow (H, W, 2) float32 (x, y) from `prev` to `next` (grey (H, W) uint8): the pixel at
    (y, x) of prev is at (y + f[..., 1], x + f[..., 0]) of next. OpenCV Farneback with the
    reference runtime's parameters (DESIGN §6: pyramid 0.5, 3 levels, window 15, 3 iterations,
    poly_n 5, sigma 1.2)."""
    import cv2

    return cv2.calcOpticalFlowFarneback(prev_grey, next_grey, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def _targets(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel p lands, p + flow(p): (map_x, map_y), (H, W) float32 each."""
    h, w = flow.shape[:2]
    ys, xs = np.indices((h, w), dtype=np.float32)
    return xs + flow[..., 0], ys + flow[..., 1]


def warp_back(image_next: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp of frame t+1 to t: `image_next` (H, W) or (H, W, C) sampled at p + flow(p)
    with `flow` (H, W, 2) from t to t+1; bilinear, replicated borders (cv2.remap). Same dtype
    as the image (pass float32 for unrounded values)."""
    import cv2

    map_x, map_y = _targets(flow)
    return cv2.remap(image_next, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def consistency_mask(flow_fwd: np.ndarray, flow_bwd: np.ndarray) -> np.ndarray:
    """(H, W) bool, True where the flow t→t+1 is reliable: the forward-backward check of Sundaram
    et al. 2010 as Ruder et al. 2016 use it, |f + b(p+f)|² < 0.01 (|f|² + |b(p+f)|²) + 0.5, with
    f = flow_fwd (t→t+1) and b = flow_bwd (t+1→t), both (H, W, 2) float32. Pixels whose p+f leaves
    the frame are unreliable too (there is nothing there to compare; the replicated border is not it)."""
    b = warp_back(flow_bwd, flow_fwd)  # b(p + f(p))
    lhs = np.sum((flow_fwd + b) ** 2, axis=-1)
    rhs = 0.01 * (np.sum(flow_fwd**2, axis=-1) + np.sum(b**2, axis=-1)) + 0.5
    h, w = flow_fwd.shape[:2]
    map_x, map_y = _targets(flow_fwd)
    inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    return (lhs < rhs) & inside


@dataclass
class InputFlows:
    """Flows between consecutive input frames, computed once per clip and shared by every
    candidate: flows (T-1, H, W, 2) float32 from t to t+1; masks (T-1, H, W) bool, True where reliable."""

    flows: np.ndarray
    masks: np.ndarray

    @property
    def reliable(self) -> float:
        """The share of pixels the masked εw counts."""
        return float(self.masks.mean()) if self.masks.size else math.nan


def input_flows(inputs: np.ndarray) -> InputFlows:
    """Farneback both ways between consecutive frames of `inputs` (T, H, W, 3) uint8 RGB."""
    greys = [grey(f) for f in inputs]
    t, h, w = len(inputs), *inputs.shape[1:3]
    flows = np.empty((max(t - 1, 0), h, w, 2), np.float32)
    masks = np.empty((max(t - 1, 0), h, w), bool)
    for i in range(t - 1):
        flows[i] = farneback(greys[i], greys[i + 1])
        masks[i] = consistency_mask(flows[i], farneback(greys[i + 1], greys[i]))
    return InputFlows(flows, masks)


class WarpError(NamedTuple):
    """εw on the 0-255 scale: masked (the target metric) and unmasked (the paper's way)."""

    masked: float
    unmasked: float


def warp_error(outputs: np.ndarray, inputs: np.ndarray | None = None, flows: InputFlows | None = None) -> WarpError:
    """εw of `outputs` (T, H, W, 3) uint8 RGB under the motion of `inputs` (same layout): for each
    t, output t+1 warped back to t by the input flow t→t+1, mean absolute difference from output t
    over pixels and channels, pooled over all pairs (masked: over reliable pixels only). Pass
    `flows` (from `input_flows(inputs)`) to share them between candidates. nan for one frame."""
    flows = flows if flows is not None else input_flows(inputs)
    assert flows.flows.shape[:3] == (len(outputs) - 1, *outputs.shape[1:3]), "outputs must match the input flows"
    total = masked_total = 0.0
    for t in range(len(outputs) - 1):
        warped = warp_back(outputs[t + 1].astype(np.float32), flows.flows[t])
        diff = np.abs(warped - outputs[t]).mean(axis=-1)  # (H, W)
        total += float(diff.sum())
        masked_total += float(diff[flows.masks[t]].sum())
    pixels, reliable = flows.masks.size, int(flows.masks.sum())
    return WarpError(masked_total / reliable if reliable else math.nan, total / pixels if pixels else math.nan)


# -- fidelity and sharpness --------------------------------------------------------------------


def psnr(candidate: np.ndarray, teacher: np.ndarray) -> float:
    """PSNR in dB (peak 255) of each frame of `candidate` against `teacher` ((T, H, W, 3) uint8
    RGB each), averaged over frames; inf if any frame is identical."""
    mse = ((candidate.astype(np.float64) - teacher) ** 2).reshape(len(candidate), -1).mean(axis=1)  # (T,)
    with np.errstate(divide="ignore"):
        return float(np.mean(10 * np.log10(255.0**2 / mse)))


def ssim(candidate: np.ndarray, teacher: np.ndarray) -> float:
    """SSIM (scikit-image's, 7x7 window, over the colour channels) of each frame against the
    teacher's ((T, H, W, 3) uint8 RGB each), averaged over frames; 1 for identical frames."""
    from skimage.metrics import structural_similarity

    if np.array_equal(candidate, teacher):  # the teacher itself: skip a second or two a clip
        return 1.0
    # float32 in: scikit-image then filters in float32, twice as fast as from uint8 (float64)
    values = [structural_similarity(c.astype(np.float32), t.astype(np.float32), channel_axis=-1, data_range=255)
              for c, t in zip(candidate, teacher)]  # fmt: skip
    return float(np.mean(values))


def sharpness(frames: np.ndarray) -> float:
    """Mean Sobel gradient magnitude (3x3, on grey 0-255) over the pixels of `frames` (T, H, W, 3)
    uint8 RGB."""
    import cv2

    total = 0.0
    for f in frames:
        g = grey(f).astype(np.float32)
        gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
        total += float(np.sqrt(gx**2 + gy**2).mean())
    return total / len(frames)


def sharpness_ratio(candidate: np.ndarray, teacher: np.ndarray) -> float:
    """The candidate's sharpness over the teacher's (frames (T, H, W, 3) uint8 RGB each)."""
    return sharpness(candidate) / sharpness(teacher)


def passes_sharpness_guard(ratio: float) -> bool:
    """Whether a candidate with this sharpness ratio keeps enough of its teacher's detail (blur
    lowers εw; it must not pass for stability)."""
    return ratio >= SHARPNESS_GUARD


# -- one clip, several candidates --------------------------------------------------------------

# the fields of each record `evaluate` returns (eval.py adds clip and style)
RECORD_FIELDS = (
    "candidate", "frames", "psnr", "ssim", "warp_error_masked", "warp_error_unmasked", "sharpness",
    "sharpness_ratio", "passes_sharpness_guard", "input_warp_error_masked", "input_warp_error_unmasked",
    "input_sharpness", "teacher_sharpness", "reliable_fraction",
)  # fmt: skip


def evaluate(clip_frames: np.ndarray, teacher_frames: np.ndarray, candidates: dict[str, np.ndarray],
             flows: InputFlows | None = None) -> list[dict]:  # fmt: skip
    """One record per candidate (fields RECORD_FIELDS) for a clip and its teacher's frames, all
    (T, H, W, 3) uint8 RGB at one size. PSNR is None where it is infinite (the teacher itself);
    the input's own εw and sharpness sit beside each candidate's as the reference point. Pass
    `flows` (input_flows(clip_frames)) to reuse them over several styles."""
    flows = flows if flows is not None else input_flows(clip_frames)
    own = warp_error(clip_frames, flows=flows)
    input_sharp, teacher_sharp = sharpness(clip_frames), sharpness(teacher_frames)
    records = []
    for name, frames in candidates.items():
        if frames.shape != clip_frames.shape:
            raise ValueError(f"candidate '{name}': frames {frames.shape}, the clip's are {clip_frames.shape}")
        we, sharp, p = warp_error(frames, flows=flows), sharpness(frames), psnr(frames, teacher_frames)
        records.append({
            "candidate": name, "frames": len(frames), "psnr": None if math.isinf(p) else p,
            "ssim": ssim(frames, teacher_frames), "warp_error_masked": we.masked, "warp_error_unmasked": we.unmasked,
            "sharpness": sharp, "sharpness_ratio": sharp / teacher_sharp,
            "passes_sharpness_guard": passes_sharpness_guard(sharp / teacher_sharp),
            "input_warp_error_masked": own.masked, "input_warp_error_unmasked": own.unmasked,
            "input_sharpness": input_sharp, "teacher_sharpness": teacher_sharp, "reliable_fraction": flows.reliable,
        })  # fmt: skip
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Per (style, candidate): the median over clips of each number in the records, the count of
    clips and of clips that pass the sharpness guard. `records` carry "style" and "candidate"."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["style"], r["candidate"]), []).append(r)
    rows = []
    for (style, candidate), rs in groups.items():
        row = {"style": style, "candidate": candidate, "clips": len(rs),
               "passing_sharpness_guard": sum(r["passes_sharpness_guard"] for r in rs)}  # fmt: skip
        for key in RECORD_FIELDS[2:]:
            if key != "passes_sharpness_guard":
                values = [r[key] for r in rs if r[key] is not None and not math.isnan(r[key])]
                row[key] = float(np.median(values)) if values else None
        rows.append(row)
    return rows
