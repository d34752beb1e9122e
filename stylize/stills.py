"""Still images: `photo.png` in, the stylized `photo_oil.png` out, in the input's format.

- Read with Pillow, EXIF orientation applied: the pixels are turned upright and the output carries
  no orientation tag (nor the rest of the EXIF block); an ICC profile is kept. Greyscale, palette,
  CMYK and 16-bit pictures are stylized as 8-bit RGB; an animated or multi-page file, its first frame.
- An alpha channel (RGBA, LA, PA, or a palette's or greyscale's transparent colour) is set aside and
  reattached to the stylized RGB unchanged (cut to the same centred square under `--crop center`).
- Written in the format its suffix names, through a hidden temporary file beside it that is
  renamed onto it once complete, like the video writer: a failed or interrupted write leaves
  nothing, and the input is never written to.

`stylize_still` is the still counterpart of `pipeline.stylize_video`: one frame through the same
`Stylizer`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError, OutputError
from .partial import partial_path, remove_predecessors
from .pipeline import Progress, RunStats, Stylizer
from .video import IMAGE_ERRORS, FrameBatch

JPEG_QUALITY = 95  # also WebP's (lossy; its alpha plane is always stored losslessly)


@dataclass(frozen=True)
class Still:
    """A still image as stylize reads it: uint8 RGB (H, W, 3) upright, its uint8 alpha (H, W) or
    None, and the ICC profile to write back (or None)."""

    rgb_hwc: np.ndarray
    alpha_hw: np.ndarray | None
    icc_profile: bytes | None


def read_still(path: str | os.PathLike) -> Still:
    """The first frame of an image file, EXIF orientation applied; InputError if unreadable."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            icc = img.info.get("icc_profile")
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16"):  # 16-bit greyscale: convert("L") would clip, not scale
                img = Image.fromarray((np.asarray(img, np.uint32) // 257).astype(np.uint8))
            if "A" in img.getbands() or "transparency" in img.info:
                rgba = img.convert("RGBA")
                return Still(np.array(rgba.convert("RGB")), np.array(rgba.getchannel("A")), icc)
            return Still(np.array(img.convert("RGB")), None, icc)  # np.array: writable (torch wants it)
    except IMAGE_ERRORS as exc:
        raise InputError(f"{path}: cannot read this image ({exc}); replace or remove it") from exc


def write_still(dst: str | os.PathLike, rgb_hwc: np.ndarray, alpha_hw: np.ndarray | None = None,
                icc_profile: bytes | None = None) -> None:  # fmt: skip
    """Write uint8 RGB (H, W, 3), with an alpha channel when given, in the format `dst`'s suffix
    names; `dst` appears only once the file is complete."""
    dst = Path(dst)
    fmt = Image.registered_extensions().get(dst.suffix.lower())
    if fmt is None:
        raise OutputError(f"{dst}: not an image suffix this tool writes; change the name")
    img = Image.fromarray(np.ascontiguousarray(rgb_hwc), "RGB")
    if alpha_hw is not None:
        img.putalpha(Image.fromarray(np.ascontiguousarray(alpha_hw), "L"))
    options: dict = {"quality": JPEG_QUALITY} if fmt in ("JPEG", "WEBP") else {}
    if icc_profile and fmt != "BMP":
        options["icc_profile"] = icc_profile
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_predecessors(dst)
    tmp = partial_path(dst)
    try:
        with open(tmp, "wb") as handle:
            img.save(handle, format=fmt, **options)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dst)
    except OSError as exc:
        raise OutputError(f"{dst}: writing failed ({exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename; else the partial file


def center_crop(a_hw: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The centred (h, w) window of a (H, W) array: where `--crop center` takes its square from."""
    top, left = (a_hw.shape[0] - hw[0]) // 2, (a_hw.shape[1] - hw[1]) // 2
    return a_hw[top : top + hw[0], left : left + hw[1]]


def stylize_still(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    stylizer: Stylizer,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunStats:
    """Stylize the image at `src` into `dst` (the same format); `dst` appears only once complete."""
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if dst.exists() and os.path.samefile(src, dst):
        raise OutputError(f"{dst}: is the input itself; choose another output path")
    still = read_still(src)
    in_hw = still.rgb_hwc.shape[:2]
    status = (lambda s: on_progress(Progress(0, 1, 0.0, s))) if on_progress else None
    stylizer.prepare(in_hw, status)  # compile, when the stylizer does, for this size
    stylizer.reset()  # no sink: feed and flush hand the frame back
    decoded = time.perf_counter()
    batch = FrameBatch(still.rgb_hwc[None], [0], [decoded])
    done = [*stylizer.feed(batch), *stylizer.flush()]
    rgb = np.array(done[0].frames[0])  # a copy: the engine reuses its output buffers
    finished = time.perf_counter()
    alpha = None if still.alpha_hw is None else center_crop(still.alpha_hw, rgb.shape[:2])
    write_still(dst, rgb, alpha, still.icc_profile)
    seconds = finished - decoded
    if on_progress:
        on_progress(Progress(1, 1, seconds))
    return RunStats(
        src=str(src), dst=str(dst), frames=1, seconds=seconds, fps=1 / seconds if seconds else 0.0,
        latency_p50_ms=seconds * 1000, latency_p95_ms=seconds * 1000, width=rgb.shape[1], height=rgb.shape[0],
        first_output_s=finished - started,
    )  # fmt: skip
