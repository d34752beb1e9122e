"""Build `mini`'s licence-clean training stills: data/manifest.json, data/train.txt, data/eval.txt and
the JPEG crops in .data/crops/ (git-ignored; about 15 MB, small enough to carry to the GPU machine).

Every still comes from a named package at an exact version: Debian packages (fetched with
`apt-get download NAME=VERSION`, read with `dpkg-deb --fsys-tarfile`) and PyPI wheels (fetched with
`pip download --no-deps NAME==VERSION`). Each item's author and licence are read from the package's
own statement (a Debian copyright stanza, a wallpaper's metadata, a docstring) and checked against
the licences allowed for shipping a derived model (data/README.md); a file with no such statement
is not in the table below. Source bytes are checked against the committed manifest's sha256, so a
rebuild either reproduces the same sources or stops.

    python scripts/prepare_data.py                      # fetch (cached), check, write crops + lists
    python scripts/prepare_data.py --cache DIR --out .data --media ../shared/media
    python scripts/prepare_data.py --update             # accept changed source bytes (new versions)

Evaluation clips (../shared/media, DAVIS included) are never read for training: their terms do not
cover shipping a model. They are only listed, by path, in data/eval.txt.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LONG_SIDE = 1024  # px, the crops' long side (never upscaled)
JPEG_QUALITY = 95

# Package versions (Debian bookworm; PyPI). A changed version changes the bytes: rerun with --update.
DEBIAN = {
    "mate-backgrounds": "1.26.0-1",
    "lomiri-wallpapers-16.04": "20.04.0-2",
    "lomiri-wallpapers-20.04": "20.04.0-2",
    "palapeli-data": "4:22.12.3-1",
    "plasma-workspace-wallpapers": "4:5.27.5-2",
}
PYPI = {"scikit-image": "0.26.0", "scikit-learn": "1.9.1"}

# The licence names as the packages state them -> SPDX-style ids. Every id here allows redistributing
# a model derived from the work (CC0, public domain, CC-BY, CC-BY-SA, (L)GPL). A name not in this
# table stops the build: nothing without a stated, allowed licence.
LICENCE_IDS = {
    "CC0-1.0": "CC0-1.0",
    "Public Domain": "public-domain",
    "CC-BY-2.0": "CC-BY-2.0",
    "CC-BY-4.0": "CC-BY-4.0",
    "CC-BY-SA-3.0": "CC-BY-SA-3.0",
    "CC-BY-SA-4.0": "CC-BY-SA-4.0",
    "GPL-2+": "GPL-2.0-or-later",
    "LGPLv3": "LGPL-3.0",
}
ALLOWED = sorted(set(LICENCE_IDS.values()))

# Which files, and what each is: "colour" = colour photograph, "grey" = greyscale photograph. Chosen
# by looking at every image of these packages: renders, drawings and procedural textures are left out
# (mate abstract/desktop, ukui-wallpapers, most of plasma), and so are files whose terms are unclear
# or not in the allowed set (skimage coins/ihc/moon/page: no licence stated; skimage text: no author;
# palapeli castle-maintenon and panther-chameleon: GFDL; gnome-backgrounds 43: its copyright file
# names none of the files it ships but adwaita*, a render).
MATE = "usr/share/backgrounds/mate/nature/"
LOMIRI = "usr/share/backgrounds/"
PALAPELI = "usr/share/palapeli/collection/"
PLASMA = "usr/share/wallpapers/"
DEB_ITEMS = [  # (package, path in the package, kind)
    *[("mate-backgrounds", f"{MATE}{n}.jpg", "colour") for n in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")],
    *[("lomiri-wallpapers-16.04", f"{LOMIRI}{n}.jpg", "colour") for n in (
        "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
        "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "analogpattern_by_Peter_Nerlich",
        "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich",
        "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt",
        "sunset_by_Aitzol_Berasategi")],
    ("lomiri-wallpapers-20.04", f"{LOMIRI}Kleiber_by_Lukas_Baubkus.jpg", "colour"),
    *[("palapeli-data", f"{PALAPELI}{n}.jpg", "colour") for n in (
        "cincinnati-bridge", "citrus-fruits", "european-honey-bee")],
    *[("plasma-workspace-wallpapers", f"{PLASMA}{n}/contents/images/2560x1600.jpg", kind) for n, kind in (
        ("BytheWater", "colour"), ("ColorfulCups", "colour"), ("DarkestHour", "colour"), ("EveningGlow", "colour"),
        ("FallenLeaf", "colour"), ("Kite", "colour"), ("OneStandsOut", "colour"), ("Path", "colour"),
        ("summer_1am", "colour"), ("ColdRipple", "grey"), ("Grey", "grey"))],
]
# PyPI items state their terms in prose: (package, path, kind, author, licence name, where, quote).
# The quote must appear (whitespace aside) in `where`, a file of the same wheel.
SKI = "skimage/data/"
SKI_DOC = "skimage/data/_fetchers.py"
NO_RESTRICTIONS_CC0 = "No copyright restrictions. CC0 by the photographer"
PYPI_ITEMS = [
    ("scikit-image", f"{SKI}astronaut.png", "colour", "NASA (NASA Great Images database)", "Public Domain", SKI_DOC,
     "No known copyright restrictions, released into the public domain."),
    ("scikit-image", f"{SKI}chelsea.png", "colour", "Stefan van der Walt", "CC0-1.0", SKI_DOC,
     "No copyright restrictions.  CC0 by the photographer (Stefan van der Walt)."),
    ("scikit-image", f"{SKI}coffee.png", "colour", "Rachel Michetti", "CC0-1.0", SKI_DOC,
     "No copyright restrictions.  CC0 by the photographer (Rachel Michetti)."),
    ("scikit-image", f"{SKI}rocket.jpg", "colour", "SpaceX", "Public Domain", SKI_DOC,
     "The image was captured by SpaceX and `released in the public domain"),
    ("scikit-image", f"{SKI}hubble_deep_field.jpg", "colour", "NASA (HubbleSite)", "Public Domain", SKI_DOC,
     "The image was captured by NASA and `may be freely used in the public domain"),
    ("scikit-image", f"{SKI}retina.jpg", "colour", "Mikael Häggström", "CC0-1.0", SKI_DOC,
     "This file is made available under the Creative Commons CC0 1.0 Universal Public Domain Dedication."),
    ("scikit-image", f"{SKI}camera.png", "grey", "Lav Varshney", "CC0-1.0", SKI_DOC,
     f"{NO_RESTRICTIONS_CC0} (Lav Varshney)."),
    ("scikit-image", f"{SKI}brick.png", "grey", "CC0Textures (Bricks25)", "CC0-1.0", SKI_DOC,
     "`CC0Textures <https://cc0textures.com/view.php?tex=Bricks25>`_ and licensed under the Creative Commons CC0"),
    ("scikit-image", f"{SKI}grass.png", "grey", "linolafett (DeviantArt, Grass-01)", "CC0-1.0", SKI_DOC,
     "`DeviantArt <https://www.deviantart.com/linolafett/art/Grass-01-434853879>`__ and licensed under the "
     "Creative Commons CC0 License."),
    ("scikit-image", f"{SKI}gravel.png", "grey", "CC0Textures (Gravel04)", "CC0-1.0", SKI_DOC,
     "`CC0Textures <https://cc0textures.com/view.php?tex=Gravel04>`__ and licensed under the Creative Commons CC0"),
    ("scikit-image", f"{SKI}clock_motion.png", "grey", "Stefan van der Walt", "Public Domain", SKI_DOC,
     "Released into the public domain by the photographer (Stefan van der Walt)."),
    # The README credits "danielbuechele" for both, but links flower.jpg to the Flickr user vultilion.
    ("scikit-learn", "sklearn/datasets/images/china.jpg", "colour", "danielbuechele (Flickr)", "CC-BY-2.0",
     "sklearn/datasets/images/README.txt",
     "Image: china.jpg Released under a creative commons license. [1] Attribution: Some rights reserved by "
     "danielbuechele [2]"),
    ("scikit-learn", "sklearn/datasets/images/flower.jpg", "colour",
     "as stated: danielbuechele; the linked Flickr page is vultilion's", "CC-BY-2.0",
     "sklearn/datasets/images/README.txt",
     "Image: flower.jpg Released under a creative commons license. [1] Attribution: Some rights reserved by "
     "danielbuechele [2]"),
]
CC_BY_2 = "[1] https://creativecommons.org/licenses/by/2.0/"  # README.txt's [1], for both images


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def squash(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------- fetch
def fetch_deb(name: str, version: str, cache: Path) -> Path:
    """The .deb of NAME=VERSION in `cache`, downloaded with apt-get if it is not there yet."""
    for deb in sorted(cache.glob(f"{name}_*.deb")):
        info = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True)
        if info.stdout.strip() == version:
            return deb
    subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=cache, check=True)
    return fetch_deb(name, version, cache)


def read_deb(deb: Path, paths: set[str]) -> dict[str, bytes]:
    """The files `paths` (without the leading ./) of a .deb's file system tree."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    found = {}
    with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name in paths and member.isfile():
                found[name] = tar.extractfile(member).read()
    proc.wait()
    missing = paths - found.keys()
    if missing:
        sys.exit(f"{deb.name}: not found in the package: {sorted(missing)}")
    return found


def fetch_wheel(name: str, version: str, cache: Path) -> Path:
    stem = name.replace("-", "_")
    wheels = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(cache), f"{name}=={version}"], check=True)
        wheels = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    return wheels[0]  # any platform's wheel: the data files are the same (checked by sha256)


# ---------------------------------------------------------------------------------- stated licences
def dep5_stanza(copyright_text: str, path: str) -> dict[str, str]:
    """The DEP-5 stanza that governs `path` (the last one whose Files: matches, as DEP-5 says).

    Files: patterns name source-tree paths; the package installs them elsewhere, so a pattern matches
    a suffix of the installed path, or (without wildcards) its file name."""
    def matches(pattern: str) -> bool:
        base = pattern.rsplit("/", 1)[-1]
        if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*/" + pattern):
            return True
        return not any(c in base for c in "*?[") and base == path.rsplit("/", 1)[-1]

    found = None
    for para in re.split(r"\n\s*\n", copyright_text):
        fields, key = {}, None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Files" in fields and any(matches(p) for p in fields["Files"].split()):
            found = fields
    if found is None:
        sys.exit(f"no copyright stanza covers {path}")
    return found


def copyright_names(text: str) -> str:
    """The names in a DEP-5 Copyright: field, without e-mail addresses or years."""
    names = []
    for line in text.splitlines():
        line = re.sub(r"<[^>]*>|\b\d{4}(\s*-\s*\d{4})?\b", "", line)
        names.append(squash(line).strip(" ,.´"))
    return "; ".join(n for n in names if n)


def deb_terms(package: str, path: str, files: dict[str, bytes]) -> tuple[str, list[dict]]:
    """(author, licences) of a file of a Debian package, each licence as stated and where."""
    doc = f"usr/share/doc/{package}/copyright"
    stanza = dep5_stanza(files[doc].decode(), path)
    files_field = squash(stanza["Files"])
    debian = {"stated": stanza["License"].splitlines()[0], "where": f"/{doc}, stanza 'Files: {files_field}'"}
    author = copyright_names(stanza["Copyright"])
    licences = [debian]
    if package == "plasma-workspace-wallpapers":  # the wallpaper's own metadata names its author and terms
        meta_path = path.split("/contents/")[0] + "/metadata.json"
        meta = json.loads(files[meta_path])["KPlugin"]
        author = ", ".join(a["Name"] for a in meta["Authors"])
        licences.insert(0, {"stated": meta["License"], "where": f"/{meta_path}, KPlugin.License"})
    if package == "palapeli-data":  # each puzzle's .desktop file names its photographer and terms
        desk_path = path.rsplit(".", 1)[0] + ".desktop"
        desk = dict(line.split("=", 1) for line in files[desk_path].decode().splitlines() if "=" in line)
        author = desk["X-KDE-PluginInfo-Author"]
        licences.insert(0, {"stated": desk["X-KDE-PluginInfo-License"],
                            "where": f"/{desk_path}, X-KDE-PluginInfo-License "
                                     f"(photo page: {desk['X-KDE-PluginInfo-Website'].rsplit('/', 1)[-1]})"})
    return author, licences


def licence_ids(licences: list[dict]) -> list[dict]:
    for lic in licences:
        if lic["stated"] not in LICENCE_IDS:
            sys.exit(f"licence {lic['stated']!r} ({lic['where']}) is not in the allowed set: add the item only "
                     "if its terms allow redistributing a derived model")
        lic["id"] = LICENCE_IDS[lic["stated"]]
    return licences


# ------------------------------------------------------------------------------------------- crops
def make_crop(data: bytes, kind: str) -> tuple[bytes, int, int]:
    """The still as a JPEG whose long side is at most LONG_SIDE px (RGB for colour, L for grey)."""
    from PIL import Image, ImageOps

    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (2 * LONG_SIDE, 2 * LONG_SIDE))  # JPEG: decode at a reduced DCT scale (fast, deterministic)
    im = ImageOps.exif_transpose(im).convert("L" if kind == "grey" else "RGB")
    scale = LONG_SIDE / max(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), im.width, im.height


def colourfulness(jpeg: bytes) -> float:
    """The 99th percentile of a crop's HSV saturation (0-255): a check that colour photos are colour
    (some strongly coloured pixels) and grey ones grey."""
    import numpy as np
    from PIL import Image

    hsv = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").convert("HSV"))
    return float(np.percentile(hsv[..., 1], 99))


def item_id(package: str, path: str) -> str:
    prefix = {"mate-backgrounds": "mate", "lomiri-wallpapers-16.04": "lomiri", "lomiri-wallpapers-20.04": "lomiri",
              "palapeli-data": "palapeli", "plasma-workspace-wallpapers": "plasma", "scikit-image": "skimage",
              "scikit-learn": "sklearn"}[package]
    stem = path.split("/contents/")[0].rsplit("/", 1)[-1] if "/contents/" in path else path.rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0].split("_by_")[0]
    return f"{prefix}-{stem.lower().replace('_', '-')}"


# ------------------------------------------------------------------------------------------- lists
def eval_list(media: Path) -> list[str]:
    """Every clip in shared/media (a video file, or a folder of frames), relative to it."""
    sys.path.insert(0, str(REPO))
    from stylize.formats import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    clips = []
    for p in sorted(media.rglob("*")):
        rel = p.relative_to(media).as_posix()
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
            clips.append(rel)
        elif p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()):
            clips.append(rel + "/")
    return clips


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "stylize" / "sources",
                    help="where the .deb and .whl files are kept (about 185 MB)")
    ap.add_argument("--out", type=Path, default=REPO / ".data", help="crops go to OUT/crops/")
    ap.add_argument("--media", type=Path, default=REPO.parent / "shared" / "media", help="the evaluation clips")
    ap.add_argument("--update", action="store_true", help="accept source bytes that differ from the manifest")
    args = ap.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    manifest_path = REPO / "data" / "manifest.json"
    old = {}
    if manifest_path.exists():
        old = {it["id"]: it for it in json.loads(manifest_path.read_text())["items"]}

    # read every needed file of every package once
    sources: dict[str, dict[str, bytes]] = {}
    for package, version in DEBIAN.items():
        wanted = {p for pkg, p, _ in DEB_ITEMS if pkg == package} | {f"usr/share/doc/{package}/copyright"}
        wanted |= {p.split("/contents/")[0] + "/metadata.json" for p in wanted if "/contents/" in p}
        wanted |= {p.rsplit(".", 1)[0] + ".desktop" for p in wanted if p.startswith(PALAPELI)}
        print(f"{package}={version}", file=sys.stderr)
        sources[package] = read_deb(fetch_deb(package, version, args.cache), wanted)
    for package, version in PYPI.items():
        print(f"{package}=={version}", file=sys.stderr)
        with zipfile.ZipFile(fetch_wheel(package, version, args.cache)) as whl:
            wanted = {i[1] for i in PYPI_ITEMS if i[0] == package} | {i[5] for i in PYPI_ITEMS if i[0] == package}
            sources[package] = {p: whl.read(p) for p in wanted}

    entries = []
    for package, path, kind in DEB_ITEMS:
        author, licences = deb_terms(package, path, sources[package])
        entries.append((package, f"debian:{package}={DEBIAN[package]}", path, kind, author, licences))
    for package, path, kind, author, stated, where, quote in PYPI_ITEMS:
        text = squash(sources[package][where].decode())
        quotes = (quote, CC_BY_2) if stated == "CC-BY-2.0" else (quote,)
        for q in quotes:
            if squash(q) not in text:
                sys.exit(f"{package} {where}: the licence statement for {path} is not there: {q!r}")
        entries.append((package, f"pypi:{package}=={PYPI[package]}", path, kind, author,
                        [{"stated": stated, "where": where, "quote": " ... ".join(squash(q) for q in quotes)}]))

    crops = args.out / "crops"
    crops.mkdir(parents=True, exist_ok=True)
    items = []
    for package, source, path, kind, author, licences in entries:
        data = sources[package][path]
        iid = item_id(package, path)
        if iid in old and old[iid]["sha256"] != sha256(data) and not args.update:
            sys.exit(f"{iid}: {source} {path} differs from the manifest's sha256 (rerun with --update to accept)")
        jpeg, w, h = make_crop(data, kind)
        sat = colourfulness(jpeg)
        if (kind == "colour" and sat < 40) or (kind == "grey" and sat > 10):  # mate-wood, the palest, is 55
            sys.exit(f"{iid}: marked {kind} but its saturation (99th percentile) is {sat:.0f}")
        (crops / f"{iid}.jpg").write_bytes(jpeg)
        lic = licence_ids(licences)
        items.append({
            "id": iid, "source": source, "path": path, "sha256": sha256(data), "author": author,
            "licence": lic[0]["id"], "licences": lic, "colour_photo": kind == "colour",
            "kind": "colour photograph" if kind == "colour" else "greyscale photograph",
            "crop": {"file": f"{iid}.jpg", "width": w, "height": h, "bytes": len(jpeg), "sha256": sha256(jpeg)},
        })
        print(f"  {iid:34s} {w}x{h} {len(jpeg) / 1e3:6.0f} kB  {lic[0]['id']}", file=sys.stderr)
    ids = [it["id"] for it in items]
    assert len(set(ids)) == len(ids), "duplicate ids"
    stale = {p.name for p in crops.glob("*.jpg")} - {it["crop"]["file"] for it in items}
    for name in stale:
        (crops / name).unlink()

    by_licence: dict[str, int] = {}
    for it in items:
        by_licence[it["licence"]] = by_licence.get(it["licence"], 0) + 1
    manifest = {
        "about": "mini's training stills: every item's source, author and licence as stated by its package. "
                 "See data/README.md; rebuilt by scripts/prepare_data.py.",
        "licences_allowed": ALLOWED,
        "crops": {"folder": ".data/crops", "long_side_max": LONG_SIDE, "jpeg_quality": JPEG_QUALITY},
        "counts": {"items": len(items), "colour_photographs": sum(it["colour_photo"] for it in items),
                   "by_licence": dict(sorted(by_licence.items())),
                   "crop_bytes": sum(it["crop"]["bytes"] for it in items)},
        "items": items,
    }
    manifest_path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    (REPO / "data" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    if args.media.is_dir():
        (REPO / "data" / "eval.txt").write_text("".join(f"{c}\n" for c in eval_list(args.media)))
    else:
        print(f"{args.media} not found: data/eval.txt left as it is", file=sys.stderr)
    c = manifest["counts"]
    print(f"{c['items']} items, {c['colour_photographs']} colour photographs, {c['crop_bytes'] / 1e6:.1f} MB "
          f"in {crops}", file=sys.stderr)


if __name__ == "__main__":
    main()
