"""mini's training data (the manifest, its licences, train/eval apart), the still loader and the
synthetic clips with exact flow. Fast, on the CPU, with no network."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from stylize.train import data, motion

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
MANIFEST = json.loads((REPO / "data" / "manifest.json").read_text())
# The policy (data/README.md), written here too so that widening it takes a visible edit of a test.
ALLOWED = {"CC0-1.0", "public-domain", "CC-BY-2.0", "CC-BY-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0",
           "GPL-2.0-or-later", "LGPL-3.0"}
FORBIDDEN = re.compile(r"\bNC\b|non-?commercial|research|academic|personal use|no deriv|\bND\b", re.I)


# ------------------------------------------------------------------------------------------ manifest
def test_manifest_items_state_source_author_and_an_allowed_licence():
    items = MANIFEST["items"]
    assert len({it["id"] for it in items}) == len(items)
    assert set(MANIFEST["licences_allowed"]) <= ALLOWED
    for it in items:
        source = r"debian:[a-z0-9.+-]+=[0-9][\w.:+~-]*|pypi:[A-Za-z0-9_.-]+==[\w.]+"  # package and exact version
        assert re.fullmatch(source, it["source"]), it["id"]
        assert it["path"] and not it["path"].startswith("/") and "://" not in it["path"], it["id"]
        assert re.fullmatch(r"[0-9a-f]{64}", it["sha256"]), it["id"]
        assert it["author"].strip(), it["id"]
        assert it["licence"] in ALLOWED and it["licence"] == it["licences"][0]["id"], it["id"]
        for lic in it["licences"]:
            assert lic["id"] in ALLOWED and lic["stated"] and lic["where"], it["id"]
            assert not FORBIDDEN.search(json.dumps(lic)), (it["id"], lic)
        assert isinstance(it["colour_photo"], bool), it["id"]
        crop = it["crop"]
        assert crop["file"] == f"{it['id']}.jpg" and max(crop["width"], crop["height"]) <= 1024, it["id"]
        assert crop["bytes"] > 0 and re.fullmatch(r"[0-9a-f]{64}", crop["sha256"]), it["id"]


def test_manifest_counts_at_least_40_colour_photographs():
    items, counts = MANIFEST["items"], MANIFEST["counts"]
    assert counts["items"] == len(items)
    assert counts["colour_photographs"] == sum(it["colour_photo"] for it in items) >= 40
    assert sum(counts["by_licence"].values()) == len(items)
    assert counts["crop_bytes"] == sum(it["crop"]["bytes"] for it in items) < 64 * 2**20  # travels in one call


def test_train_and_eval_are_disjoint_by_source():
    train = data.read_list(REPO / "data" / "train.txt")
    evals = data.read_list(REPO / "data" / "eval.txt")
    assert sorted(train) == sorted(it["id"] for it in MANIFEST["items"])
    assert evals and len(set(evals)) == len(evals)
    provenance = json.dumps(MANIFEST["items"]).lower()
    assert "shared/media" not in provenance and "davis" not in provenance
    for clip in evals:  # no eval clip's name appears among the training items' sources
        assert Path(clip.rstrip("/")).stem.lower() not in provenance, clip
    if MEDIA.is_dir():
        assert all((MEDIA / clip).exists() for clip in evals)
        entries = json.loads((MEDIA / "manifest.json").read_text())
        repos = {e.get("repo") or e.get("src", {}).get("repo") for e in entries}
        assert not any(r and r.lower() in provenance for r in repos)
        media_sums = {line.split()[0] for line in (MEDIA / "SHA256SUMS").read_text().splitlines() if line.strip()}
        assert media_sums.isdisjoint(it["sha256"] for it in MANIFEST["items"])


def _prepare_data():
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_last_matching_copyright_stanza_governs_a_file():
    text = ("Files: *\nCopyright: 2014 Someone\nLicense: GPL-2+\n\n"
            "Files: nature/Aqua.jpg\n       nature/Wood.jpg\nCopyright: 2008, A. Person <a@b.c>\nLicense: GPL-2+\n\n"
            "Files: 16.04/seeding.jpg\nCopyright: C. Person, 2018\nLicense: CC0-1.0\n\n"
            "Files: debian/*\nCopyright: 2018, Packager\nLicense: Expat\n")
    prep = _prepare_data()
    wood = prep.dep5_stanza(text, "usr/share/backgrounds/mate/nature/Wood.jpg")
    assert wood["Copyright"] == "2008, A. Person <a@b.c>"
    assert prep.dep5_stanza(text, "usr/share/backgrounds/seeding.jpg")["License"] == "CC0-1.0"  # by file name
    assert prep.dep5_stanza(text, "usr/share/other.png")["License"] == "GPL-2+"  # debian/* does not match
    assert prep.copyright_names("2008, A. Person <a@b.c>\n2011-2014 B. Person") == "A. Person; B. Person"


# -------------------------------------------------------------------------------------------- loader
def _fake_prepared(tmp_path: Path) -> tuple[Path, Path]:
    """A manifest, a train list and three crops (one grey) in tmp_path, as prepare_data.py writes them."""
    from PIL import Image

    rng = np.random.default_rng(0)
    crops = tmp_path / "crops"
    crops.mkdir()
    items = []
    for i, (mode, hw) in enumerate([("RGB", (300, 400)), ("L", (200, 200)), ("RGB", (640, 360))]):
        shape = hw + ((3,) if mode == "RGB" else ())
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "JPEG", quality=90)
        (crops / f"s{i}.jpg").write_bytes(buf.getvalue())
        digest = hashlib.sha256(buf.getvalue()).hexdigest()
        items.append({"id": f"s{i}", "source": f"debian:pkg{i}=1.0", "path": f"usr/share/s{i}.jpg",
                      "author": f"Author {i}", "licence": "CC0-1.0", "crop": {"file": f"s{i}.jpg", "sha256": digest}})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"items": items}))
    (tmp_path / "train.txt").write_text("# comment\ns0\ns1\ns2\n")
    return crops, manifest


def test_loader_gives_seeded_identical_crops(tmp_path):
    crops, manifest = _fake_prepared(tmp_path)
    stills = data.load_stills(crops, manifest)
    assert [s.shape for s in stills] == [(300, 400, 3), (200, 200, 3), (640, 360, 3)]
    a, b = data.random_crops(stills, 4, seed=7, sizes=(64, 96)), data.random_crops(stills, 4, seed=7, sizes=(64, 96))
    for _ in range(3):
        x, y = next(a), next(b)
        assert x.dtype == np.uint8 and x.shape[0] == 4 and x.shape[1] == x.shape[2] in (64, 96) and x.shape[3] == 3
        np.testing.assert_array_equal(x, y)
    other = next(data.random_crops(stills, 4, seed=8, sizes=(64,)))
    assert not np.array_equal(other, next(data.random_crops(stills, 4, seed=7, sizes=(64,))))
    t = data.to_tensor(x)
    assert t.shape == (4, 3, x.shape[1], x.shape[2]) and t.dtype.is_floating_point
    assert 0 <= float(t.min()) <= float(t.max()) <= 1


def test_loader_names_the_script_when_crops_are_missing_or_changed(tmp_path):
    crops, manifest = _fake_prepared(tmp_path)
    (crops / "s1.jpg").write_bytes(b"changed")
    with pytest.raises(data.DataMissing, match="prepare_data.py"):
        data.load_stills(crops, manifest)
    (crops / "s1.jpg").unlink()
    with pytest.raises(data.DataMissing, match="scripts/prepare_data.py"):
        data.load_stills(crops, manifest)


def test_prepared_crops_match_the_manifest():
    if not data.CROPS.is_dir():
        pytest.skip(f"{data.CROPS} is not prepared (run scripts/prepare_data.py); a fresh clone has none")
    stills = data.load_stills()  # checks every sha256
    assert len(stills) == len(MANIFEST["items"])


# -------------------------------------------------------------------------------------- motion
def _texture(h: int, w: int, seed: int, green: bool = False) -> np.ndarray:
    """A smooth random colour texture (H, W, 3) uint8; its green channel is 0, or 255 if `green`."""
    import cv2

    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.uniform(0, 255, (h // 8, w // 8, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(cv2.GaussianBlur(img, (0, 0), 2.0), 0, 255).astype(np.uint8)
    img[..., 1] = 255 if green else 0
    return img


def _err(frame_t, frame_next, flow):
    return np.abs(motion.warp_back(frame_next.astype(np.float32), flow) - frame_t.astype(np.float32)).mean(-1)


def test_exact_flow_warps_the_next_frame_back():
    clip = motion.synthetic_clip(_texture(320, 480, 1), frames=6, size=(128, 160), seed=3, moving_layer=False)
    assert clip.frames.shape == (6, 128, 160, 3) and clip.flow.shape == (5, 128, 160, 2)
    for t in range(5):
        valid = clip.valid[t]
        assert valid.mean() > 0.8
        err = _err(clip.frames[t], clip.frames[t + 1], clip.flow[t])[valid].mean()
        zero = np.abs(clip.frames[t + 1].astype(np.float32) - clip.frames[t]).mean(-1)[valid].mean()
        assert err < 1.5 and err < 0.2 * zero, (t, err, zero)
        back = _err(clip.frames[t + 1], clip.frames[t], clip.flow_back[t])[clip.valid_back[t]].mean()
        assert back < 1.5, (t, back)


def test_moving_layer_is_marked_occluded_and_valid_where_it_should_be():
    back, layer = _texture(320, 480, 1), _texture(256, 256, 2, green=True)
    clip = motion.synthetic_clip(back, frames=6, size=(128, 160), seed=5, layer=layer)
    h, w = clip.frames.shape[1:3]
    ys, xs = np.mgrid[0:h, 0:w]
    for t in range(5):
        on_layer = clip.frames[t][..., 1] > 128  # the layer is the only green in the picture
        np.testing.assert_array_equal(clip.layer[t], on_layer)
        # occluded: background at t whose flow target shows the layer in frame t+1
        tx = np.rint(xs + clip.flow[t][..., 0]).astype(int)
        ty = np.rint(ys + clip.flow[t][..., 1]).astype(int)
        inside = (tx >= 0) & (tx < w) & (ty >= 0) & (ty < h)
        lands_on_layer = inside & (clip.frames[t + 1][ty.clip(0, h - 1), tx.clip(0, w - 1), 1] > 128)
        np.testing.assert_array_equal(clip.occluded[t], ~on_layer & lands_on_layer)
        assert not (clip.occluded[t] & clip.valid[t]).any()
        err = _err(clip.frames[t], clip.frames[t + 1], clip.flow[t])
        assert err[clip.valid[t] & on_layer].mean() < 1.5  # the layer's own flow is right
        assert err[clip.valid[t]].mean() < 1.5
        if clip.occluded[t].sum() > 20:
            assert err[clip.occluded[t]].mean() > 40  # there the next frame shows the layer instead
    assert clip.occluded.any() and clip.layer.any()


def test_same_seed_gives_the_same_clip():
    still = _texture(200, 300, 4)
    a, b = (motion.synthetic_clip(still, frames=4, size=(64, 96), seed=11) for _ in range(2))
    for name in ("frames", "flow", "valid", "occluded", "flow_back", "valid_back", "layer"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = motion.synthetic_clip(still, frames=4, size=(64, 96), seed=12)
    assert not np.array_equal(a.flow, c.flow)


def test_torch_clip_matches_the_numpy_one():
    import torch

    back, layer = _texture(320, 480, 1), _texture(256, 256, 2, green=True)
    a = motion.synthetic_clip(back, frames=4, size=(96, 128), seed=5, layer=layer)
    as_chw = lambda img: torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255  # (H, W, 3) -> (3, H, W)
    b = motion.synthetic_clip_torch(as_chw(back), frames=4, size=(96, 128), seed=5, layer=as_chw(layer))
    assert b.frames.shape == (4, 3, 96, 128)
    both = a.valid & b.valid.numpy()
    assert both.mean() > 0.8
    np.testing.assert_allclose(b.flow.numpy()[both], a.flow[both], atol=1e-3)
    for name in ("valid", "occluded", "valid_back", "layer"):
        assert (getattr(b, name).numpy() != getattr(a, name)).mean() < 2e-3, name
    assert np.abs(b.frames.permute(0, 2, 3, 1).numpy() * 255 - a.frames).mean() < 3


def test_write_mp4_round_trips(tmp_path):
    import av

    clip = motion.synthetic_clip(_texture(200, 300, 4), frames=5, size=(64, 96), seed=0)
    path = motion.write_mp4(tmp_path / "clip.mp4", clip.frames, fps=24)
    with av.open(str(path)) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (64, 96, 3)
    assert np.abs(frames[2].astype(int) - clip.frames[2]).mean() < 8
    with pytest.raises(ValueError, match="even"):
        motion.write_mp4(tmp_path / "odd.mp4", clip.frames[:, :63])
