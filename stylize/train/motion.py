"""Synthetic video with exact optical flow, for training the temporal adapter on licence-clean stills.

A camera moves over a still: frame t shows the still through a homography G_t (frame pixel -> still
pixel), smooth in time (pan, zoom, roll and a little perspective, each a seeded quadratic path plus a
slow wobble). A moving layer, a cut-out of a second still (or of another part of the same one) with
its own smooth motion L_t (frame pixel -> patch pixel), is laid over it. Because every pixel's source
is known, the flow between consecutive frames is exact:

    background pixel p of frame t:  p' = G_{t+1}^-1 G_t p      layer pixel:  p' = L_{t+1}^-1 L_t p

The flow is `valid` where p's source lies inside its image, p' lies inside frame t+1, p is not
`occluded` (a background pixel that the layer covers at t+1), and neither end is within a pixel of
the layer's edge (bilinear sampling mixes the two surfaces there). All arrays are numpy, on the CPU.

    clip = synthetic_clip(still, frames=16, size=(256, 256), seed=0)
    clip.frames  (T, H, W, 3) uint8 RGB
    clip.flow    (T-1, H, W, 2) float32 (x, y), t -> t+1 on frame t's pixels:
                 frame t+1 sampled at p + flow(p) (cv2.remap) gives frame t where clip.valid
    clip.flow_back, clip.valid_back: t+1 -> t on frame t+1's pixels (stylize.flow's convention:
                 frame t sampled at p + flow_back(p) gives frame t+1)
    write_mp4("demo.mp4", clip.frames, fps=24)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Motion:
    """How far the camera and the layer move, per frame (at the output size)."""

    view: tuple[float, float] = (0.55, 0.85)  # the frame's share of the still's short side
    pan: float = 3.0  # px/frame, largest start speed of the camera
    zoom: float = 0.008  # log-scale/frame
    roll: float = 0.004  # rad/frame
    perspective: float = 2e-6  # 1/px per frame, drift of the homography's bottom row
    wobble: float = 1.0  # px, hand-held shake amplitude
    layer_speed: float = 5.0  # px/frame, largest speed of the moving layer
    layer_size: tuple[float, float] = (0.25, 0.45)  # its side, as a share of the frame's short side


@dataclass(frozen=True)
class SyntheticClip:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    flow: np.ndarray  # (T-1, H, W, 2) float32 (x, y), frame t -> t+1, on frame t's pixels
    valid: np.ndarray  # (T-1, H, W) bool, where frame t+1 warped back by `flow` equals frame t
    occluded: np.ndarray  # (T-1, H, W) bool, background of frame t hidden by the layer in t+1
    flow_back: np.ndarray  # (T-1, H, W, 2) float32, frame t+1 -> t, on frame t+1's pixels
    valid_back: np.ndarray  # (T-1, H, W) bool
    occluded_back: np.ndarray  # (T-1, H, W) bool, background of frame t+1 hidden by the layer in t
    layer: np.ndarray  # (T, H, W) bool, where the moving layer is in each frame
    homographies: np.ndarray  # (T, 3, 3) float64, G_t: frame pixel -> (resized) still pixel


# ------------------------------------------------------------------------------------ homographies
def _translate(x: float, y: float) -> np.ndarray:
    return np.array([[1, 0, x], [0, 1, y], [0, 0, 1]], np.float64)


def _similarity(scale: float, angle: float) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], np.float64)


def _path(rng: np.random.Generator, t: np.ndarray, speed: float, wobble: float) -> np.ndarray:
    """A smooth 1-D path over frames t: a random start speed, a gentle acceleration and a slow wobble."""
    v = rng.uniform(-speed, speed)
    a = rng.uniform(-1, 1) * speed / max(len(t), 1)
    amp, omega, phase = rng.uniform(0, wobble), rng.uniform(0.15, 0.5), rng.uniform(0, 2 * np.pi)
    return v * t + 0.5 * a * t**2 + amp * (np.sin(omega * t + phase) - np.sin(phase))


def camera_path(frames: int, size: tuple[int, int], still_hw: tuple[int, int], rng: np.random.Generator,
                motion: Motion = Motion()) -> np.ndarray:
    """(T, 3, 3) homographies G_t, frame pixel -> still pixel, for a still already resized so that
    one frame pixel is about one still pixel (scale 1 at t = 0)."""
    h, w = size
    t = np.arange(frames, dtype=np.float64)
    hs, ws = still_hw
    # start somewhere the view fits, then pan, zoom, roll and tilt smoothly from there
    cx = ws / 2 + rng.uniform(-1, 1) * max(0.0, (ws - w) / 2)
    cy = hs / 2 + rng.uniform(-1, 1) * max(0.0, (hs - h) / 2)
    px, py = _path(rng, t, motion.pan, motion.wobble), _path(rng, t, motion.pan, motion.wobble)
    zoom = np.exp(_path(rng, t, motion.zoom, 0.0))
    roll = _path(rng, t, motion.roll, 0.0)
    tilt_x, tilt_y = _path(rng, t, motion.perspective, 0.0), _path(rng, t, motion.perspective, 0.0)
    out = np.empty((frames, 3, 3))
    for i in range(frames):
        persp = np.array([[1, 0, 0], [0, 1, 0], [tilt_x[i], tilt_y[i], 1]], np.float64)
        out[i] = _translate(cx + px[i], cy + py[i]) @ _similarity(zoom[i], roll[i]) @ persp @ _translate(-w / 2, -h / 2)
    return out


def layer_path(frames: int, size: tuple[int, int], side: int, rng: np.random.Generator,
               motion: Motion = Motion()) -> np.ndarray:
    """(T, 3, 3) homographies L_t, frame pixel -> patch pixel, for a (side, side) patch that
    crosses the frame with its own speed, spin and growth."""
    h, w = size
    t = np.arange(frames, dtype=np.float64)
    x0, y0 = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    x, y = x0 + _path(rng, t, motion.layer_speed, 1.0), y0 + _path(rng, t, motion.layer_speed, 1.0)
    spin, grow = _path(rng, t, 0.02, 0.0), np.exp(_path(rng, t, 0.01, 0.0))
    place = [_translate(x[i], y[i]) @ _similarity(grow[i], spin[i]) @ _translate(-side / 2, -side / 2)
             for i in range(frames)]  # patch -> frame
    return np.stack([np.linalg.inv(m) for m in place])


# ------------------------------------------------------------------------------------------ render
def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Homography (3, 3) applied to points (..., 2) float64."""
    x, y = xy[..., 0], xy[..., 1]
    d = m[2, 0] * x + m[2, 1] * y + m[2, 2]
    return np.stack([(m[0, 0] * x + m[0, 1] * y + m[0, 2]) / d, (m[1, 0] * x + m[1, 1] * y + m[1, 2]) / d], -1)


def _warp(image: np.ndarray, m: np.ndarray, size: tuple[int, int], mirror: bool = True) -> np.ndarray:
    """image sampled (bilinear) at m p for every frame pixel p; outside it, mirrored or zero."""
    import cv2

    border = cv2.BORDER_REFLECT_101 if mirror else cv2.BORDER_CONSTANT
    return cv2.warpPerspective(image, m, (size[1], size[0]), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=border)


def _inside(xy: np.ndarray, w: int, h: int, margin: float) -> np.ndarray:
    x, y = xy[..., 0], xy[..., 1]
    return (x >= margin) & (x <= w - 1 - margin) & (y >= margin) & (y <= h - 1 - margin)


def _at(mask: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """mask (H, W) bool read at the nearest pixel of points xy (..., 2); False outside."""
    h, w = mask.shape
    xi, yi = np.rint(xy[..., 0]).astype(np.int64), np.rint(xy[..., 1]).astype(np.int64)
    ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    return ok & mask[yi.clip(0, h - 1), xi.clip(0, w - 1)]


def _pair_flow(grid, g_a, g_b, l_a, l_b, layer_a, layer_b, edge_a, edge_b, still_hw):
    """Flow a -> b on frame a's pixels, with its validity and occlusion (see the module docstring)."""
    h, w = layer_a.shape
    bg = _apply(np.linalg.inv(g_b) @ g_a, grid)  # where a background pixel of a lies in b
    target = bg
    if l_a is not None:
        target = np.where(layer_a[..., None], _apply(np.linalg.inv(l_b) @ l_a, grid), bg)
    source_ok = layer_a | _inside(_apply(g_a, grid), still_hw[1], still_hw[0], 1.0)
    occluded = ~layer_a & _at(layer_b, target)
    valid = source_ok & _inside(target, w, h, 0.0) & ~occluded & ~edge_a & ~_at(edge_b, target)
    return (target - grid).astype(np.float32), valid, occluded


def _blob(side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side) uint8 alpha: a random convex shape (0 or 255) filling most of the square."""
    import cv2

    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    radii = rng.uniform(0.3, 0.45, 9) * side
    pts = np.stack([side / 2 + radii * np.cos(angles), side / 2 + radii * np.sin(angles)], -1)
    alpha = np.zeros((side, side), np.uint8)
    cv2.fillConvexPoly(alpha, cv2.convexHull(pts.astype(np.int32)), 255)
    return alpha


def _fit_hw(still_hw: tuple[int, int], size: tuple[int, int], share: float) -> tuple[int, int]:
    """The size to resize a still to so that the frame's short side is `share` of its short side."""
    scale = min(size) / (share * min(still_hw))
    return max(size[0], round(still_hw[0] * scale)), max(size[1], round(still_hw[1] * scale))


@dataclass(frozen=True)
class Plan:
    """A clip's geometry, drawn from its seed: everything but the pixels (shared by both renderers)."""

    size: tuple[int, int]  # (H, W) of the frames
    back_hw: tuple[int, int]  # the still is resized to this, then G_t applies
    g: np.ndarray  # (T, 3, 3) camera homographies, frame pixel -> resized still pixel
    layer_hw: tuple[int, int] | None = None  # the layer's source is resized to this
    box: tuple[int, int, int] | None = None  # (top, left, side) of the patch in the resized source
    alpha: np.ndarray | None = None  # (side, side) uint8, 255 inside the cut-out
    l: np.ndarray | None = None  # (T, 3, 3) layer homographies, frame pixel -> patch pixel


def plan_clip(still_hw: tuple[int, int], frames: int = 16, size: tuple[int, int] = (256, 256), seed: int = 0,
              layer_hw: tuple[int, int] | None = None, moving_layer: bool = True, motion: Motion = Motion()) -> Plan:
    """The geometry of a clip over a still of `still_hw` (and a layer source of `layer_hw`; None:
    the still itself)."""
    rng = np.random.default_rng(seed)
    back_hw = _fit_hw(still_hw, size, rng.uniform(*motion.view))
    g = camera_path(frames, size, back_hw, rng, motion)
    if not moving_layer:
        return Plan(size, back_hw, g)
    side = max(8, round(rng.uniform(*motion.layer_size) * min(size)))
    src_hw = _fit_hw(layer_hw or still_hw, size, rng.uniform(*motion.view))
    box = (int(rng.integers(0, src_hw[0] - side + 1)), int(rng.integers(0, src_hw[1] - side + 1)), side)
    alpha = _blob(side, rng)
    return Plan(size, back_hw, g, src_hw, box, alpha, layer_path(frames, size, side, rng, motion))


def synthetic_clip(still: np.ndarray, frames: int = 16, size: tuple[int, int] = (256, 256), seed: int = 0,
                   layer: np.ndarray | None = None, moving_layer: bool = True,
                   motion: Motion = Motion()) -> SyntheticClip:
    """A clip of `frames` (H, W) = `size` frames: a camera moving over `still` (H', W', 3) uint8 RGB,
    and, if `moving_layer`, a cut-out of `layer` (another still; default: another part of `still`)
    moving over it. The same arguments and seed give the same clip."""
    import cv2

    def fit(image, hw):
        interp = cv2.INTER_AREA if hw[0] < image.shape[0] else cv2.INTER_CUBIC
        return cv2.resize(image, (hw[1], hw[0]), interpolation=interp)

    h, w = size
    layer_hw = None if layer is None else layer.shape[:2]
    plan = plan_clip(still.shape[:2], frames, size, seed, layer_hw, moving_layer, motion)
    back = fit(still, plan.back_hw)
    out = np.stack([_warp(back, plan.g[i], size) for i in range(frames)])
    layer_masks = edges = np.zeros((frames, h, w), bool)
    if plan.l is not None:
        top, left, side = plan.box
        patch = fit(layer if layer is not None else still, plan.layer_hw)[top : top + side, left : left + side]
        layer_masks = np.stack([_warp(plan.alpha, plan.l[i], size, mirror=False) >= 128 for i in range(frames)])
        ring = np.ones((3, 3), np.uint8)
        edges = np.stack([cv2.dilate(m.view(np.uint8), ring) != cv2.erode(m.view(np.uint8), ring) for m in layer_masks])
        layer_rgb = np.stack([_warp(patch, plan.l[i], size, mirror=False) for i in range(frames)])
        out = np.where(layer_masks[..., None], layer_rgb, out)

    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)), -1)  # (H, W, 2) x, y
    g, l = plan.g, plan.l if plan.l is not None else [None] * frames
    fwd = [_pair_flow(grid, g[t], g[t + 1], l[t], l[t + 1], layer_masks[t], layer_masks[t + 1], edges[t],
                      edges[t + 1], plan.back_hw) for t in range(frames - 1)]
    bwd = [_pair_flow(grid, g[t + 1], g[t], l[t + 1], l[t], layer_masks[t + 1], layer_masks[t], edges[t + 1],
                      edges[t], plan.back_hw) for t in range(frames - 1)]

    def stack(parts, k):
        empty = np.zeros((0, h, w, 2), np.float32) if k == 0 else np.zeros((0, h, w), bool)
        return np.stack([p[k] for p in parts]) if parts else empty

    return SyntheticClip(frames=np.ascontiguousarray(out), flow=stack(fwd, 0), valid=stack(fwd, 1),
                         occluded=stack(fwd, 2), flow_back=stack(bwd, 0), valid_back=stack(bwd, 1),
                         occluded_back=stack(bwd, 2), layer=layer_masks, homographies=g)


@dataclass(frozen=True)
class TorchClip:
    """synthetic_clip_torch's clip, on the still's device."""

    frames: object  # (T, 3, H, W) float32 RGB in [0, 1]
    flow: object  # (T-1, H, W, 2) float32 (x, y), t -> t+1 on frame t's pixels (as SyntheticClip)
    valid: object  # (T-1, H, W) bool
    occluded: object  # (T-1, H, W) bool
    flow_back: object  # (T-1, H, W, 2) float32, t+1 -> t on frame t+1's pixels
    valid_back: object  # (T-1, H, W) bool
    occluded_back: object  # (T-1, H, W) bool
    layer: object  # (T, H, W) bool


def synthetic_clip_torch(still, frames: int = 16, size: tuple[int, int] = (256, 256), seed: int = 0,
                         layer=None, moving_layer: bool = True, motion: Motion = Motion()) -> TorchClip:
    """synthetic_clip's clip (the same plan from the same seed) rendered with torch on the device of
    `still` (3, H', W') float in [0, 1] (and `layer`, another still, or None), for making clips on
    the fly on the GPU. Pixels differ from the numpy version's by resampling only (grid_sample and
    an antialiased resize against OpenCV's); flows and masks follow the same formulas."""
    import torch
    import torch.nn.functional as F

    dev, (h, w) = still.device, size
    plan = plan_clip(tuple(still.shape[1:]), frames, size, seed, None if layer is None else tuple(layer.shape[1:]),
                     moving_layer, motion)
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                            torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")

    def apply(m, x, y):  # homography (3, 3) or (N, 3, 3) numpy -> points
        m = torch.as_tensor(m, dtype=torch.float32, device=dev).reshape(-1, 3, 3)[:, :, :, None, None]
        d = m[:, 2, 0] * x + m[:, 2, 1] * y + m[:, 2, 2]
        return (m[:, 0, 0] * x + m[:, 0, 1] * y + m[:, 0, 2]) / d, (m[:, 1, 0] * x + m[:, 1, 1] * y + m[:, 1, 2]) / d

    def sample(image, ms, padding):  # image (C, h', w') at G p for each G of ms: (T, C, H, W)
        sx, sy = apply(ms, xs, ys)  # (T, H, W) each
        grid = torch.stack([2 * sx / (image.shape[2] - 1) - 1, 2 * sy / (image.shape[1] - 1) - 1], -1)
        return F.grid_sample(image[None].expand(len(ms), -1, -1, -1), grid, mode="bilinear",
                             padding_mode=padding, align_corners=True)

    def fit(image, hw):
        return F.interpolate(image[None].float(), size=hw, mode="bilinear", antialias=True, align_corners=False)[0]

    def inside(x, y, wd, ht, margin):
        return (x >= margin) & (x <= wd - 1 - margin) & (y >= margin) & (y <= ht - 1 - margin)

    def at(mask, x, y):  # (H, W) bool read at the nearest pixel; False outside
        xi, yi = torch.round(x).long(), torch.round(y).long()
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        return ok & mask[yi.clamp(0, h - 1), xi.clamp(0, w - 1)]

    out = sample(fit(still, plan.back_hw), plan.g, "reflection")  # (T, 3, H, W)
    masks = edges = torch.zeros((frames, h, w), dtype=torch.bool, device=dev)
    if plan.l is not None:
        top, left, side = plan.box
        patch = fit(layer if layer is not None else still, plan.layer_hw)[:, top : top + side, left : left + side]
        alpha = torch.as_tensor(plan.alpha, device=dev, dtype=torch.float32)[None] / 255
        masks = sample(alpha, plan.l, "zeros")[:, 0] >= 128 / 255
        m = masks.float()[:, None]
        edges = (F.max_pool2d(m, 3, 1, 1) != -F.max_pool2d(-m, 3, 1, 1))[:, 0]  # dilated != eroded
        out = torch.where(masks[:, None], sample(patch, plan.l, "zeros"), out)

    def pair(a, b):  # flow a -> b on frame a's pixels, its validity and occlusion (as _pair_flow)
        tx, ty = (v[0] for v in apply(np.linalg.inv(plan.g[b]) @ plan.g[a], xs, ys))
        if plan.l is not None:
            lx, ly = (v[0] for v in apply(np.linalg.inv(plan.l[b]) @ plan.l[a], xs, ys))
            tx, ty = torch.where(masks[a], lx, tx), torch.where(masks[a], ly, ty)
        sx, sy = (v[0] for v in apply(plan.g[a], xs, ys))
        source_ok = masks[a] | inside(sx, sy, plan.back_hw[1], plan.back_hw[0], 1.0)
        occluded = ~masks[a] & at(masks[b], tx, ty)
        valid = source_ok & inside(tx, ty, w, h, 0.0) & ~occluded & ~edges[a] & ~at(edges[b], tx, ty)
        return torch.stack([tx - xs, ty - ys], -1), valid, occluded

    fwd = [pair(t, t + 1) for t in range(frames - 1)]
    bwd = [pair(t + 1, t) for t in range(frames - 1)]

    def stack(parts, k):
        shape, dtype = ((0, h, w, 2), torch.float32) if k == 0 else ((0, h, w), torch.bool)
        empty = torch.zeros(shape, device=dev, dtype=dtype)
        return torch.stack([p[k] for p in parts]) if parts else empty

    return TorchClip(frames=out.clamp_(0, 1), flow=stack(fwd, 0), valid=stack(fwd, 1), occluded=stack(fwd, 2),
                     flow_back=stack(bwd, 0), valid_back=stack(bwd, 1), occluded_back=stack(bwd, 2), layer=masks)


def warp_back(image_next: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Frame t+1 (H, W[, C]) sampled at p + flow(p), flow (H, W, 2) from t to t+1 (cv2.remap, bilinear)."""
    import cv2

    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image_next, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def write_mp4(path: str | Path, frames_thwc_uint8: np.ndarray, fps: int = 24, crf: int = 18) -> Path:
    """Write frames (T, H, W, 3) uint8 RGB (H and W even) to an H.264 .mp4 with PyAV."""
    import av

    t, h, w, _ = frames_thwc_uint8.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 in yuv420p needs an even frame size, got {w}x{h}")
    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "medium"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames_thwc_uint8:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        out.mux(stream.encode())  # flush the encoder's delayed frames
    return path
