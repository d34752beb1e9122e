#!/usr/bin/env python
"""Stylized video against its teacher: PSNR/SSIM, warp error εw, sharpness, and contact sheets.

    python scripts/eval.py ../shared/media/davis512sq/ --style all \
        --candidate teacher --candidate input --candidate 'out/{clip}_{style}.mp4' --candidate model:tiny \
        --json benchmarks/results/eval.json --table benchmarks/eval.md --sheet out/sheets/

Every source is resized to one evaluation size (--size: the long side, cv2.INTER_AREA) and the
teacher runs per frame on the resized input. Candidates: `teacher`, `input`, `model:PRESET`
(stylize run in process on the clip), `vae:PRESET` (the teacher's frames through that model's
VAE and back at its working size: the cap on what the model can reach), or a video file, or a pattern with {clip} and {style};
`NAME=SPEC` gives one a name. One JSON record per (clip, style, candidate), a median over clips
per (style, candidate), a markdown table, a sheet per (clip, style). Metrics: stylize/train/metrics.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stylize import video  # noqa: E402
from stylize.formats import VIDEO_SUFFIXES  # noqa: E402
from stylize.jobs import is_image_folder  # noqa: E402
from stylize.train import metrics  # noqa: E402


def find_clips(paths: list[Path]) -> list[Path]:
    """Video files and image-folder clips as given, and the videos and image folders inside other folders."""
    clips = []
    for p in paths:
        if not p.exists():
            sys.exit(f"eval.py: {p}: no such file or folder")
        if p.is_file() or is_image_folder(p):
            clips.append(p)
        else:
            clips += [c for c in sorted(p.iterdir()) if (c.is_file() and c.suffix.lower() in VIDEO_SUFFIXES)
                      or (c.is_dir() and is_image_folder(c))]  # fmt: skip
    return clips


def clip_name(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def eval_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) with the long side `size`, the aspect kept."""
    scale = size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize(frames_thwc: np.ndarray, hw: tuple[int, int], what: str) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 → (T, h, w, 3) uint8 (cv2.INTER_AREA); the aspect must match."""
    import cv2

    h, w = frames_thwc.shape[1:3]
    if abs(w / h - hw[1] / hw[0]) > 0.02 * hw[1] / hw[0]:
        sys.exit(f"eval.py: {what} is {w}x{h}, not the clip's aspect ({hw[1]}x{hw[0]}); was it cropped?")
    if (h, w) == hw:
        return frames_thwc
    return np.stack([cv2.resize(f, (hw[1], hw[0]), interpolation=cv2.INTER_AREA) for f in frames_thwc])


def read_frames(path: Path, limit: int | None, hw: tuple[int, int] | None = None, size: int = 512) -> np.ndarray:
    """The first `limit` frames (all when None) of a clip, (T, h, w, 3) uint8 RGB, resized batch by
    batch (bounded memory) to `hw`, or when None to the long side `size`."""
    out, n = [], 0
    batches = video.read_batches(path, 16)
    try:
        for batch in batches:
            hw = hw or eval_hw(*batch.frames.shape[1:3], size)
            out.append(resize(batch.frames[: None if limit is None else limit - n], hw, str(path)))
            n += len(out[-1])
            if limit is not None and n >= limit:
                break
    finally:
        batches.close()
    return np.concatenate(out)


def run_teacher(teacher, frames: np.ndarray, chunk: int = 16) -> np.ndarray:
    """The teacher per frame, a chunk of frames per call (bounded memory)."""
    out = np.concatenate([teacher(frames[i : i + chunk]) for i in range(0, len(frames), chunk)])
    assert out.shape == frames.shape and out.dtype == np.uint8, f"the teacher returned {out.shape} {out.dtype}"
    return out


def run_model(stylizer, clip: Path, limit: int, hw: tuple[int, int]) -> np.ndarray:
    """stylize's first `limit` frames of the clip in process (no video encoding between),
    resized to `hw`: (T, h, w, 3) uint8 RGB."""
    stylizer.reset()
    out, fed = [], 0
    batches = video.read_batches(video.probe(clip), stylizer.cfg.batch_size)
    try:
        for batch in batches:
            if fed + len(batch.frames) > limit:
                k = limit - fed
                batch = dataclasses.replace(
                    batch, frames=batch.frames[:k], pts=batch.pts[:k], decoded_at=batch.decoded_at[:k]
                )
            if len(batch.frames):
                fed += len(batch.frames)
                out += [b.frames for b in stylizer.feed(batch)]
            if fed >= limit:
                break
    finally:
        batches.close()
    out += [b.frames for b in stylizer.flush()]
    return np.concatenate([resize(f, hw, str(clip)) for f in out])


def vae_round_trip(stack, frames: np.ndarray, size: int, chunk: int = 8) -> np.ndarray:
    """The teacher's frames through the stack's VAE and back, at the model's working size (as
    stylize would run, `reference.geometry`), resized back to the evaluation size: what the model's
    output can reach at best, its VAE being the last thing it passes (#13's cap row)."""
    import torch

    from stylize.reference import geometry, latent_multiple, resize as resize_t, vae_decode, vae_encode

    h, w = frames.shape[1:3]
    work = geometry((h, w), size, latent_multiple(stack.unet)).work_hw
    out = []
    with torch.inference_mode():
        for i in range(0, len(frames), chunk):
            x = torch.from_numpy(frames[i : i + chunk]).to(stack.device).permute(0, 3, 1, 2).float() / 255
            y = vae_decode(stack.vae, vae_encode(stack.vae, resize_t(x, work).to(stack.dtype)))
            y = resize_t(y.float().clamp(0, 1), (h, w))
            out.append((y * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


class Sources:
    """Teachers and model stacks, each made once and reused over clips."""

    def __init__(self, args):
        self.args, self.teachers, self.stacks, self.stylizers = args, {}, {}, {}

    def teacher(self, style: str):
        if style not in self.teachers:
            given = self.args.teacher
            if given == "identity":  # tests and smoke runs: the input stands in for a teacher
                self.teachers[style] = lambda frames: frames
            elif given == "preset":
                from stylize.train.teachers import teacher_for_style

                self.teachers[style] = teacher_for_style(style, self.args.device)
            else:  # a teacher spec of its own, to try one before it goes into a preset
                from stylize.train.teachers import load_teacher

                self.teachers[style] = load_teacher(json.loads(given), self.args.device)
        return self.teachers[style]

    def stack(self, preset: str):
        from stylize.config import model_config
        from stylize.models import load_stack

        if preset not in self.stacks:
            self.stacks[preset] = load_stack(model_config(preset), self.args.device)
        return self.stacks[preset]

    def stylizer(self, preset: str, style: str):
        from stylize.config import PipelineConfig, style_config
        from stylize.pipeline import build_stylizer

        self.stack(preset)
        if (preset, style) not in self.stylizers:
            prompt, args = style_config(style).prompt, self.args
            cfg = PipelineConfig(prompt=prompt, size=args.size, batch_size=args.batch_size)
            self.stylizers[preset, style] = build_stylizer(self.stacks[preset], cfg)
        return self.stylizers[preset, style]


def parse_candidate(spec: str) -> tuple[str, str]:
    """'NAME=SPEC' or 'SPEC' → (name, spec)."""
    name, sep, rest = spec.partition("=")
    return (name, rest) if sep and name and "/" not in name else (spec, spec)


def candidate_frames(spec: str, clip: Path, style: str, frames: np.ndarray, teacher_frames: np.ndarray,
                     sources: Sources) -> np.ndarray:  # fmt: skip
    """A candidate's frames for the clip's (T, h, w, 3) uint8 `frames` at the evaluation size."""
    if spec == "input":
        return frames
    if spec == "teacher":
        return teacher_frames
    hw = frames.shape[1:3]
    if spec.startswith("model:"):
        return run_model(sources.stylizer(spec[6:], style), clip, len(frames), hw)
    if spec.startswith("vae:"):
        return vae_round_trip(sources.stack(spec[4:]), teacher_frames, sources.args.size)
    path = Path(spec.format(clip=clip_name(clip), style=style))
    if not path.exists():
        sys.exit(f"eval.py: candidate {path}: no such file (from '{spec}')")
    got = read_frames(path, len(frames), hw)
    if len(got) < len(frames):
        sys.exit(f"eval.py: candidate {path} has {len(got)} frames, the clip {len(frames)}")
    return got


def styles_of(given: list[str], identity: bool) -> list[str]:
    from stylize.config import list_presets, style_config

    names = [s.strip() for g in given for s in g.split(",") if s.strip()]
    if names == ["all"]:
        names = [n for n in list_presets("styles") if identity or style_config(n).teacher]
    return names


COLUMNS = (  # (heading, field, decimals) of the markdown table
    ("PSNR dB", "psnr", 2), ("SSIM", "ssim", 3), ("εw masked", "warp_error_masked", 2),
    ("εw unmasked", "warp_error_unmasked", 2), ("input εw masked", "input_warp_error_masked", 2),
    ("input εw unmasked", "input_warp_error_unmasked", 2), ("sharpness", "sharpness", 1),
    ("× teacher", "sharpness_ratio", 2),
)  # fmt: skip


def table(summary: list[dict], records: list[dict]) -> str:
    """Markdown: the median over clips per (style, candidate), then one row per record."""

    def row(first: list, values: dict, guard: str) -> str:
        cells = first + ["" if values[f] is None else f"{values[f]:.{d}f}" for _, f, d in COLUMNS] + [guard]
        return "| " + " | ".join(str(c) for c in cells) + " |\n"

    def head(third: str) -> str:
        names = ["style", "candidate", third] + [h for h, _, _ in COLUMNS] + ["guard ≥ 0.8"]
        return "| " + " | ".join(names) + " |\n" + "|---" * len(names) + "|\n"

    lines = ["## Median over clips\n\n", head("clips")]
    for s in summary:
        lines.append(row([s["style"], s["candidate"], s["clips"]], s, f"{s['passing_sharpness_guard']}/{s['clips']}"))
    if records:
        lines += ["\n## Per clip\n\n", head("clip")]
        for r in records:
            guard = "yes" if r["passes_sharpness_guard"] else "no"
            lines.append(row([r["style"], r["candidate"], r["clip"]], r, guard))
    return "".join(lines)


def rounded(obj):
    """Floats to 4 decimals, nan/inf to null, for a readable JSON."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else round(obj, 4)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


def sheet_path(sheet: Path, clip: Path, style: str, pairs: int) -> Path:
    if sheet.suffix.lower() == ".png":
        if pairs > 1:
            sys.exit("eval.py: --sheet FILE.png takes one clip and one style; give a folder for several")
        return sheet
    return sheet / f"{clip_name(clip)}_{style}.png"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clips", type=Path, nargs="+", help="video files, image-folder clips, or folders of them")
    ap.add_argument("--style", action="append", required=True,
                    help="a style preset (repeat, or a,b,c; 'all': every preset with a teacher)")
    ap.add_argument("--candidate", action="append", default=[],
                    help="teacher | input | model:PRESET | FILE or pattern with {clip}, {style}; NAME=SPEC names it")
    ap.add_argument("--size", type=int, default=512, help="long side of the evaluation size (default 512)")
    ap.add_argument("--frames", type=int, default=None, help="at most N frames per clip (default all)")
    ap.add_argument("--teacher", default="preset",
                    help="preset: the style's teacher (stylize.train.teachers); identity: the input itself (tests); "
                         'or a teacher spec in JSON, e.g. \'{"kind": "multistyle26", "index": 14}\'')
    ap.add_argument("--device", default="cpu", help="where model: candidates and neural teachers run (cpu, cuda)")
    ap.add_argument("--batch-size", type=int, default=8, help="batch size of model: candidates")
    ap.add_argument("--json", type=Path, help="write the records, the summary and how they were made")
    ap.add_argument("--table", type=Path, help="write a markdown table (median over clips, then per clip)")
    ap.add_argument("--sheet", type=Path,
                    help="a PNG (one clip, one style) or a folder of them: input | teacher | candidates")
    return ap.parse_args()  # fmt: skip


def evaluate_clip(clip: Path, styles: list[str], candidates: list[tuple[str, str]], sources: Sources,
                  args, pairs: int) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """(records, timings) of one clip over every style and candidate; writes its sheets."""
    started = time.perf_counter()
    frames = read_frames(clip, args.frames, size=args.size)
    flows = metrics.input_flows(frames)  # once per clip, shared by every style and candidate
    flow_s = time.perf_counter() - started
    records, timings = [], []
    for style in styles:
        t = time.perf_counter()
        teacher_frames = run_teacher(sources.teacher(style), frames)
        teacher_s = time.perf_counter() - t
        cands = {name: candidate_frames(spec, clip, style, frames, teacher_frames, sources)
                 for name, spec in candidates}  # fmt: skip
        records += [{"clip": clip_name(clip), "style": style, **r}
                    for r in metrics.evaluate(frames, teacher_frames, cands, flows)]  # fmt: skip
        if args.sheet:
            extra = [n for n, spec in candidates if spec not in ("input", "teacher")]
            rows, labels = [frames, teacher_frames] + [cands[n] for n in extra], ["input", f"teacher ({style})"] + extra
            metrics.contact_sheet(rows, labels).save(sheet_path(args.sheet, clip, style, pairs))
        seconds = time.perf_counter() - t
        timings.append({"clip": clip_name(clip), "style": style, "frames": len(frames), "flow_s": flow_s,
                        "teacher_s": teacher_s, "seconds": seconds})  # fmt: skip
        print(f"{clip_name(clip)} {style}: {len(frames)} frames {frames.shape[2]}x{frames.shape[1]}, "
              f"flows {flow_s:.1f} s, teacher {teacher_s:.1f} s, all {seconds:.1f} s", file=sys.stderr)  # fmt: skip
    return records, timings


def main() -> None:
    args = parse_args()
    candidates = [parse_candidate(c) for c in args.candidate or ["teacher", "input"]]
    clips, styles = find_clips(args.clips), styles_of(args.style, args.teacher == "identity")
    if not clips or not styles:
        sys.exit("eval.py: no clips or no styles to evaluate")
    if args.sheet and args.sheet.suffix.lower() != ".png":
        args.sheet.mkdir(parents=True, exist_ok=True)
    sources, records, timings = Sources(args), [], []
    for clip in clips:
        r, t = evaluate_clip(clip, styles, candidates, sources, args, len(clips) * len(styles))
        records, timings = records + r, timings + t
        summary = write_results(args, records, timings)  # after every clip: a killed run keeps what it did
    print(table(rounded(summary), []))


def write_results(args, records: list[dict], timings: list[dict]) -> list[dict]:
    summary = metrics.summarize(records)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    result = {"command": shlex.join(sys.argv), "date": now,
              "git_head": head or None, "size": args.size, "frames_limit": args.frames, "teacher": args.teacher,
              "sharpness_guard": metrics.SHARPNESS_GUARD, "records": records, "summary": summary,
              "timings": timings}  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rounded(result), indent=1, ensure_ascii=False) + "\n")
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table(rounded(summary), rounded(records)))
    return summary


if __name__ == "__main__":
    main()
