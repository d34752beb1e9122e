"""Still images: written as images in their own format, upright, alpha kept, atomically."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stylize.cli import run_app
from stylize.config import PipelineConfig
from stylize.errors import OutputError
from stylize.reference import ReferenceStylizer
from stylize.stills import read_still, stylize_still, write_still

FAST = ["--model", "tiny", "--size", "64", "--preset", "ultrafast"]
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".bmp": "BMP"}


def invoke(*args):
    return CliRunner().invoke(run_app, [str(a) for a in args], catch_exceptions=False)


def picture(h: int = 40, w: int = 56) -> np.ndarray:
    """uint8 RGB (H, W, 3) gradients."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 90)], -1).astype(np.uint8)


def alpha(h: int = 40, w: int = 56) -> np.ndarray:
    """uint8 (H, W): a ramp with a fully transparent corner, so any change shows."""
    a = (np.arange(w)[None, :] * 4 + np.arange(h)[:, None]).astype(np.uint8)
    a[:8, :8] = 0
    return a


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One command over every case (one model load): each format, an EXIF-rotated JPEG, alpha in
    PNG, WebP and TIFF."""
    root = tmp_path_factory.mktemp("stills")
    for suffix in FORMATS:
        Image.fromarray(picture()).save(root / f"photo{suffix}")
    rotated = Image.fromarray(picture())
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: shown turned 90 degrees clockwise
    rotated.save(root / "rotated.jpg", exif=exif)
    for suffix in (".png", ".webp", ".tif"):
        Image.fromarray(np.dstack([picture(), alpha()]), "RGBA").save(root / f"alpha{suffix}")
    inputs = sorted(root.iterdir())
    before = {p: p.read_bytes() for p in inputs}
    r = invoke(*inputs, "--style", "oil", "--json", *FAST)
    return root, before, r


def test_each_format_writes_the_same_format(run):
    root, before, r = run
    assert r.exit_code == 0, r.output
    for suffix, fmt in FORMATS.items():
        with Image.open(root / f"photo_oil{suffix}") as out:
            assert out.format == fmt and out.size == (56, 40) and out.mode == "RGB"
    assert not list(root.glob("*.mp4")) and not list(root.glob(".*"))  # no video, no partial file
    assert all(p.read_bytes() == data for p, data in before.items())  # the inputs are untouched
    records = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(records) == len(before) and all(rec["kind"] == "still" and rec["frames"] == 1 for rec in records)
    assert f"{len(before)} of {len(before)} images done" in r.stderr


def test_exif_orientation_is_applied(run):
    root, _, _ = run
    with Image.open(root / "rotated_oil.jpg") as out:
        assert out.size == (40, 56)  # upright: the stored 56x40 turned a quarter
        assert out.getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize("suffix", [".png", ".webp", ".tif"])
def test_alpha_is_reattached_unchanged(run, suffix):
    root, _, _ = run
    with Image.open(root / f"alpha_oil{suffix}") as out:
        assert out.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(out.getchannel("A")), alpha())


def test_alpha_follows_the_centre_crop(tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(np.dstack([picture(), alpha()]), "RGBA").save(src)
    r = invoke(src, "--style", "oil", "--crop", "center", *FAST)
    assert r.exit_code == 0, r.output
    assert "still 40x40" in r.stdout
    with Image.open(tmp_path / "a_oil.png") as out:
        assert out.size == (40, 40)
        np.testing.assert_array_equal(np.asarray(out.getchannel("A")), alpha()[:, 8:48])


def test_stills_flag_makes_each_image_of_a_folder_a_still(tmp_path):
    seq = tmp_path / "seq"
    seq.mkdir()
    for i in range(3):
        Image.fromarray(picture() // (i + 1)).save(seq / f"{i:05d}.png")
    r = invoke(seq, "--style", "oil", "--stills", "-o", tmp_path / "out", *FAST)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000_oil.png", "00001_oil.png", "00002_oil.png"]
    r = invoke(seq, "--style", "oil", "--stills", "-o", tmp_path / "out", *FAST)  # all done: nothing to do
    assert r.exit_code == 0 and "nothing to do" in r.stderr


def test_still_is_the_frame_the_video_path_makes(tiny_stack, tmp_path):
    """stylize_still runs the one frame through the same stylizer as a clip's frames."""
    src = tmp_path / "p.png"
    Image.fromarray(picture()).save(src)
    stylizer = ReferenceStylizer(tiny_stack, PipelineConfig(prompt="oil painting", size=64, batch_size=1))
    stats = stylize_still(src, tmp_path / "p_oil.png", stylizer)
    assert (stats.frames, stats.width, stats.height) == (1, 56, 40)
    stylizer.reset()
    expected = stylizer.stylize(picture()[None])[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "p_oil.png")), expected)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    dst = tmp_path / "out.png"
    dst.write_bytes(b"old")

    def half_then_fail(self, fp, *a, **k):
        fp.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(OutputError, match="No space left"):
        write_still(dst, picture())
    assert dst.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_read_still_modes(tmp_path):
    """16-bit greyscale is scaled (not clipped) to 8 bits; a palette's transparency is alpha."""
    grey = (np.arange(56, dtype=np.uint16)[None, :].repeat(40, 0) * 1000).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    still = read_still(tmp_path / "g.png")
    assert still.rgb_hwc.shape == (40, 56, 3) and still.alpha_hw is None
    np.testing.assert_array_equal(still.rgb_hwc[0, :, 0], (np.arange(56) * 1000 // 257).astype(np.uint8))
    pal = Image.fromarray(picture()).convert("P")
    pal.save(tmp_path / "p.png", transparency=pal.getpixel((0, 0)))  # the top-left colour is transparent
    still = read_still(tmp_path / "p.png")
    assert still.alpha_hw is not None and still.alpha_hw[0, 0] == 0 and still.alpha_hw.max() == 255
