"""Contact sheets of candidate teachers, to choose each style's teacher by looking (issue #12 §2).

    python scripts/teacher_choices.py                 # candidates on DAVIS frames -> out/teachers/<group>.png
    python scripts/teacher_choices.py --group oil     # one group
    python scripts/teacher_choices.py --stills        # each preset's teacher on scikit-image stills
                                                      #   -> benchmarks/teachers/<preset>.png (committed)
    python scripts/teacher_choices.py --group oil --warp 12   # + flicker: εw (masked, 0-255) and
                                                      #   sharpness of each candidate on 12 frames a clip
    python scripts/teacher_choices.py --time --threads 1      # each preset's teacher: ms a 512x512 frame
    python scripts/teacher_choices.py --time --stills --device cuda   # the same on the GPU, on the stills

A sheet: the input row, then one row per candidate, over frames of a few clips. Sheets from
../shared/media go under out/ only (that media is for evaluation, never committed); the stills
(astronaut, chelsea, coffee: public domain / CC0 as stated in skimage/data/_fetchers.py) are
licence-clean and their sheets are committed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stylize.config import list_presets, style_config  # noqa: E402
from stylize.train.metrics import contact_sheet  # noqa: E402
from stylize.train.teachers import load_teacher, style_still  # noqa: E402

MEDIA = REPO.parent / "shared" / "media" / "davis512sq"
CLIPS = ["blackswan", "bmx-trees", "camel", "kite-surf", "parkour", "dance-twirl"]
STILLS = ["astronaut", "chelsea", "coffee"]

M = "multistyle26"
A = "arbitrary"
GROUPS: dict[str, list[dict]] = {
    "oil": [{"kind": M, "index": 10}, {"kind": M, "index": 0},
            {"kind": A, "style_image": "coffee"}, {"kind": A, "style_image": "coffee", "size": None}],
    "watercolor": [{"kind": M, "index": 14}, {"kind": M, "index": 8}],
    "sketch": [{"kind": "dodge", "sigma": s} for s in (4.0, 8.0, 16.0)],
    "charcoal": [{"kind": A, "style_image": "gravel"}, {"kind": A, "style_image": "gravel", "size": None}],
    "anime": [{"kind": "stylization"}, {"kind": "stylization", "sigma_s": 60.0, "sigma_r": 0.3}],
    "pixel-art": [{"kind": "pixel_art", "palette": p, "cell": c} for p, c in
                  (("rgb222", 8), ("rgb333", 8), ("pico8", 8), ("rgb222", 4))],
    "new": [{"kind": M, "index": i} for i in (9, 15, 19, 2)],  # mosaic, stained-glass, starry-night, ink
}  # fmt: skip


def decode(name: str, limit: int | None = None) -> np.ndarray:
    """The first `limit` frames (all: None) of a DAVIS clip, (T, 512, 512, 3) uint8 RGB (PyAV)."""
    import av

    with av.open(str(MEDIA / f"{name}.mp4")) as f:
        frames = []
        for fr in f.decode(video=0):
            frames.append(fr.to_ndarray(format="rgb24"))
            if len(frames) == limit:
                break
    return np.stack(frames)


def clip_frames(names: list[str], per_clip: int) -> np.ndarray:
    """`per_clip` evenly spaced frames of each DAVIS clip, (T, 512, 512, 3) uint8 RGB."""
    out = []
    for name in names:
        frames = decode(name)
        out += [frames[i] for i in np.linspace(0, len(frames) - 1, per_clip + 2).round().astype(int)[1:-1]]
    return np.stack(out)


def warp_table(specs: list[dict], clips: list[str], n: int) -> None:
    """Flicker of each candidate: εw masked (0-255) on the first `n` frames of each clip, next to
    the input's own, and sharpness (mean Sobel magnitude), printed as a table."""
    from stylize.train.metrics import input_flows, sharpness, warp_error

    clips_frames = {c: decode(c, n) for c in clips}
    flows = {c: input_flows(f) for c, f in clips_frames.items()}
    print("| candidate | " + " | ".join(f"εw {c}" for c in clips) + " | sharpness |")
    print("|---" * (len(clips) + 2) + "|")
    for spec in [None, *specs]:
        teacher = load_teacher(spec) if spec else (lambda f: f)
        outs = {c: teacher(f) for c, f in clips_frames.items()}
        errs = " | ".join(f"{warp_error(outs[c], flows=flows[c]).masked:.2f}" for c in clips)
        sharp = np.mean([sharpness(o) for o in outs.values()])
        print(f"| {teacher.name if spec else 'input'} | {errs} | {sharp:.1f} |", flush=True)


def square_stills(side: int = 512) -> np.ndarray:
    """The licence-clean stills, centre-cropped square and resized to `side`, (3, side, side, 3)."""
    import cv2

    out = []
    for name in STILLS:
        im = style_still(name)
        h, w = im.shape[:2]
        s = min(h, w)
        im = im[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        out.append(cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def save_small(sheet, path: Path, limit: int = 300_000) -> None:
    """Save a committed sheet as PNG: full colour if it fits in `limit` bytes, else with a
    256-colour palette (about a third of the size)."""
    sheet.save(path, optimize=True)
    if path.stat().st_size > limit:
        sheet.quantize(256).save(path, optimize=True)


def rows_for(specs: list[dict], frames: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    rows, labels = [frames], ["input"]
    for spec in specs:
        teacher = load_teacher(spec)
        t = time.perf_counter()
        rows.append(teacher(frames))
        print(f"  {teacher.name}: {(time.perf_counter() - t) / len(frames) * 1e3:.0f} ms/frame", file=sys.stderr)
        labels.append(teacher.name.replace(" style_image=", " ").replace(" int8=False", ""))
    return rows, labels


def _ms(fn, batch, repeats: int, sync: bool) -> float:
    """Median wall-clock ms per frame of fn(batch), after a warm-up call."""
    import torch

    with torch.inference_mode():
        fn(batch)
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize() if sync else None
            t = time.perf_counter()
            fn(batch)
            torch.cuda.synchronize() if sync else None
            times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3 / len(batch)


def time_table(frames: np.ndarray, device: str, repeats: int = 3) -> None:
    """Each preset's teacher: ms per frame, printed as a table. On the CPU: its call, one frame at
    a time. On CUDA: its torch form (fp32, TF32 off) on a batch of one and of 16 (`frames`
    repeated); a CPU-only teacher's call on the CPU."""
    import torch

    torch.backends.cudnn.allow_tf32 = False  # the teacher in fp32: TF32 moves outputs by up to 4/255
    gpu = device != "cpu"
    if gpu:
        frames = np.concatenate([frames] * -(-16 // len(frames)))[:16]
    print(f"| preset | teacher | ms / frame{f' | ms / frame, batch of {len(frames)}' if gpu else ''} |")
    print("|---|---|---|" + ("---|" if gpu else ""))
    for name in list_presets("styles"):
        teacher = load_teacher(style_config(name).teacher, device)
        if gpu and not teacher.cpu_only:
            x = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float() / 255
            cells = [_ms(teacher.torch_module(), b, repeats, True) for b in (x[:1], x)]
        else:
            per_frame = [_ms(teacher, f[None], repeats, False) for f in frames[:3]]
            cells = [float(np.median(per_frame))] + ([np.nan] if gpu else [])
        where = " (CPU only)" if teacher.cpu_only else ""
        print(f"| {name} | {teacher.name}{where} | " + " | ".join("–" if np.isnan(c) else f"{c:.2f}" for c in cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", action="append", choices=list(GROUPS), help="candidate group(s) (default: all)")
    ap.add_argument("--stills", action="store_true", help="each preset's teacher on the stills -> benchmarks/teachers/")
    ap.add_argument("--per-clip", type=int, default=1, help="frames taken from each clip")
    ap.add_argument("--height", type=int, default=200, help="thumbnail height in the sheet")
    ap.add_argument("--warp", type=int, metavar="FRAMES", help="also print each candidate's εw on FRAMES frames")
    ap.add_argument("--warp-clips", default="parkour,blackswan", help="the clips --warp measures (comma-separated)")
    ap.add_argument("--time", action="store_true", help="time each preset's teacher on 512x512 frames")
    ap.add_argument("--threads", type=int, help="torch threads (on a shared CPU, 1 is often fastest)")
    ap.add_argument("--device", default="cpu", help="where --time runs the torch teachers (cpu, cuda)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if args.time:
        time_table(square_stills() if args.stills else clip_frames(CLIPS[:2], 1), args.device)
        return

    if args.stills:
        frames, folder = square_stills(), REPO / "benchmarks" / "teachers"
        folder.mkdir(parents=True, exist_ok=True)
        for name in list_presets("styles"):
            spec = style_config(name).teacher
            if spec:
                print(name, file=sys.stderr)
                rows, labels = rows_for([spec], frames)
                path = folder / f"{name}.png"
                save_small(contact_sheet(rows, labels, columns=len(frames), height=args.height), path)
                print(f"{path} ({path.stat().st_size // 1024} KB)")
        return

    frames, folder = clip_frames(CLIPS, args.per_clip), REPO / "out" / "teachers"
    folder.mkdir(parents=True, exist_ok=True)
    for group in args.group or list(GROUPS):
        print(group, file=sys.stderr)
        rows, labels = rows_for(GROUPS[group], frames)
        path = folder / f"{group}.png"
        contact_sheet(rows, labels, columns=len(frames), height=args.height).save(path)
        print(path)
        if args.warp:
            warp_table(GROUPS[group], args.warp_clips.split(","), args.warp)


if __name__ == "__main__":
    main()
