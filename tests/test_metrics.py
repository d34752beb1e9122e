"""The quality yardstick (stylize/train/metrics.py, scripts/eval.py) on small synthetic clips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stylize.train import metrics

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"


def texture(rng, h: int, w: int, sigma: float = 1.5) -> np.ndarray:
    """A colour texture (h, w, 3) uint8 with detail at every position (Farneback can lock on)."""
    import cv2

    img = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), sigma)
    return ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)


def moving(dx: int, dy: int, t: int = 6, hw=(96, 96), grain: float = 0.0, seed: int = 0) -> np.ndarray:
    """(t, h, w, 3) uint8: a texture whose content moves by (dx, dy) px a frame (a window sliding
    over a larger image), plus fresh per-frame noise of std `grain` (flicker a blur hides)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    big = texture(rng, h + 40, w + 40)
    y0, x0 = 20, 20
    frames = np.stack([big[y0 - i * dy : y0 - i * dy + h, x0 - i * dx : x0 - i * dx + w] for i in range(t)])
    noisy = frames + rng.normal(0, grain, frames.shape) if grain else frames
    return np.clip(noisy, 0, 255).astype(np.uint8)


def blurred(frames: np.ndarray) -> np.ndarray:
    import cv2

    return np.stack([cv2.GaussianBlur(f, (9, 9), 0) for f in frames])


def posterize(frames: np.ndarray) -> np.ndarray:
    """A stand-in teacher: frames (T, H, W, 3) uint8 → the same, four levels a channel."""
    return (frames // 64 * 64 + 32).astype(np.uint8)


def test_known_shift_is_recovered():
    dx, dy = 2, 1
    clip = moving(dx, dy)
    flows = metrics.input_flows(clip)
    interior = flows.flows[:, 16:-16, 16:-16].reshape(-1, 2)
    np.testing.assert_allclose(interior.mean(0), [dx, dy], atol=0.05)
    assert np.abs(interior - [dx, dy]).max() < 0.25
    assert flows.masks[:, :, -1].mean() < 0.1, "content that leaves the frame is unreliable"
    we = metrics.warp_error(clip, clip)
    assert we.masked < 0.3 and we.unmasked < 1.5, we  # only the strip entering the frame is new


def test_consistency_mask_marks_occlusion():
    # an object (rows 20-39, columns 10-29) moves 8 px right over a still background
    fwd = np.zeros((64, 64, 2), np.float32)
    bwd = np.zeros((64, 64, 2), np.float32)
    fwd[20:40, 10:30, 0] = 8
    bwd[20:40, 18:38, 0] = -8
    mask = metrics.consistency_mask(fwd, bwd)
    assert not mask[20:40, 30:38].any(), "background the object covers at t+1 is occluded"
    assert mask[20:40, 10:30].all() and mask[:16].all() and mask[44:].all()


def test_clip_against_itself_is_its_own_input_warp_error():
    clip = moving(2, 1, grain=6)
    (rec,) = metrics.evaluate(clip, posterize(clip), {"input": clip})
    own = metrics.warp_error(clip, clip)
    assert rec["warp_error_masked"] == rec["input_warp_error_masked"] == own.masked
    assert rec["warp_error_unmasked"] == rec["input_warp_error_unmasked"] == own.unmasked
    assert own.masked > 1, "the grain flickers"


def test_blur_fakes_stability_and_fails_the_sharpness_guard():
    clip = moving(2, 1, grain=6)
    records = metrics.evaluate(clip, clip, {"input": clip, "blur": blurred(clip)})
    same, blur = records
    assert same["passes_sharpness_guard"] and same["sharpness_ratio"] == 1.0
    assert blur["warp_error_masked"] < 0.5 * blur["input_warp_error_masked"]
    assert blur["sharpness_ratio"] < metrics.SHARPNESS_GUARD and not blur["passes_sharpness_guard"]
    assert not metrics.passes_sharpness_guard(0.79) and metrics.passes_sharpness_guard(0.8)


def test_records_have_the_documented_fields():
    clip = moving(1, 0, t=4, hw=(48, 64))
    teacher = posterize(clip)
    records = metrics.evaluate(clip, teacher, {"teacher": teacher, "input": clip})
    assert [tuple(r) for r in records] == [metrics.RECORD_FIELDS] * 2
    by_name = {r["candidate"]: r for r in records}
    assert by_name["teacher"]["psnr"] is None and by_name["teacher"]["ssim"] == 1.0
    assert 0 < by_name["input"]["psnr"] < 60 and 0 < by_name["input"]["ssim"] < 1
    json.dumps(records, allow_nan=False)
    rows = metrics.summarize([{"clip": c, "style": "oil", **r} for c in ("a", "b") for r in records])
    assert [(r["candidate"], r["clips"]) for r in rows] == [("teacher", 2), ("input", 2)]
    assert rows[1]["psnr"] == pytest.approx(by_name["input"]["psnr"]) and rows[0]["psnr"] is None


def test_contact_sheet_grid():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    rows = [np.broadcast_to(np.array(c, np.uint8), (10, 64, 96, 3)) for c in colours]
    sheet = metrics.contact_sheet(rows, ["input", "teacher", "candidate"], columns=4, height=40, label_width=50)
    gap, header, thumb_w = 4, 14 + 8, 60
    assert sheet.size == (50 + 4 * (thumb_w + gap), header + 3 * (40 + gap))
    for r, colour in enumerate(colours):
        for c in range(4):
            assert sheet.getpixel((50 + c * (thumb_w + gap) + 30, header + r * (40 + gap) + 20)) == colour
    assert metrics.sample_indices(10, 4) == [0, 3, 6, 9]


def write_mp4(path: Path, frames: np.ndarray) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24, options={"preset": "ultrafast", "crf": "10"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode())
    return path


def test_eval_script_end_to_end(tmp_path):
    clip = moving(2, 1, t=8, hw=(64, 64), grain=4)
    write_mp4(tmp_path / "shift.mp4", clip)
    write_mp4(tmp_path / "shift_blur.mp4", blurred(clip))
    out = tmp_path / "eval.json"
    cmd = [sys.executable, str(REPO / "scripts" / "eval.py"), str(tmp_path / "shift.mp4"), "--style", "oil",
           "--teacher", "identity", "--size", "64", "--candidate", "teacher", "--candidate", "input",
           "--candidate", f"blur={tmp_path}/{{clip}}_blur.mp4", "--candidate", "cap=vae:tiny", "--json", str(out),
           "--table", str(tmp_path / "eval.md"), "--sheet", str(tmp_path / "sheet.png")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert {"command", "date", "git_head", "records", "summary"} <= set(result)
    records = {r["candidate"]: r for r in result["records"]}
    assert set(records) == {"teacher", "input", "blur", "cap"}
    # the VAE cap row: the teacher's frames through tiny's (random) VAE and back, scored like any candidate
    assert records["cap"]["frames"] == 8 and records["cap"]["psnr"] is not None
    assert set(records["blur"]) == {"clip", "style", *metrics.RECORD_FIELDS}
    assert records["blur"]["clip"] == "shift" and records["blur"]["frames"] == 8
    assert records["input"]["psnr"] is None  # the identity teacher is the input
    assert not records["blur"]["passes_sharpness_guard"]
    assert "| oil | blur | 1 |" in (tmp_path / "eval.md").read_text()
    from PIL import Image

    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.height == 14 + 8 + 4 * (160 + 4)  # input | teacher | blur | cap, thumbnails 160 px high


@pytest.mark.media
def test_blur_on_a_real_clip():
    path = MEDIA / "davis512sq" / "blackswan.mp4"
    if not path.is_file():
        pytest.skip(f"real clips not found: {path} is absent (clone shared/ beside the repo to run this)")
    import cv2

    from stylize import video

    frames = next(iter(video.read_batches(path, 6))).frames
    clip = np.stack([cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA) for f in frames])
    input_rec, blur = metrics.evaluate(clip, clip, {"input": clip, "blur": blurred(clip)})
    assert blur["warp_error_masked"] < 0.6 * input_rec["warp_error_masked"]
    assert not blur["passes_sharpness_guard"]
