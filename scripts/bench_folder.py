#!/usr/bin/env python
"""What a user waits for (#14): the `stylize` command on a folder of real clips of several
shapes, each run a fresh process from its start, cold (empty stylize and inductor caches) and warm.

    python3 scripts/bench_folder.py --clips CLIP... --derive-from CLIP --out $OUT/folder.json \
        [--model-dir /tmp/random-full] [--compile auto] [--device cuda] [--runs cold,warm]

The folder: the clips given (the issue's four public clips) plus three made in the command from
--derive-from, centre-cropped to 4:3, 2.39:1 and 3:4 (72 frames each), so that the run meets at
least five working shapes. The model: `random-full` saved once with save_pretrained into
--model-dir (safetensors, the real loading path; speed does not depend on the weights' values),
then loaded by `stylize --model DIR` as real weights are.

Reported, as JSON rows:
- `setup`: the seconds to build and save the folder of weights; `imports_s` (a fresh process
  importing the CLI's heavy libraries) and `load_s` (load_stack of that folder in a fresh
  process, after its imports);
- per clip, in this process: decode-only fps (PyAV, every frame) and encode-only fps (the CLI's
  x264 settings, crf 18 preset medium, at the clip's output size);
- per run (`given-cold`: the --clips alone, the issue's four-clip folder; `cold` and `warm`: all
  the clips): the folder's wall time from the command's start, the model load, and per clip its
  --json record (probe_s, prepare_s, first_output_s, steady_fps, flush_s, fps, latencies) and the
  peak GPU memory so far (peak_gpu_mem_gib, when the CLI reports it).
A CPU smoke run: `--device cpu --model tiny` (no --model-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ASPECTS = {"4x3": (4, 3), "2.39x1": (2.39, 1), "3x4": (3, 4)}


def derive(src: Path, folder: Path, frames: int = 72) -> list[Path]:
    """`src` centre-cropped to each aspect of ASPECTS (even sides), its first `frames` frames."""
    import numpy as np

    from stylize import video
    from stylize.writer import VideoWriter

    info = video.probe(src)
    got = []
    for batch in video.read_batches(info, 16):
        got.append(batch)
        if sum(len(b.pts) for b in got) >= frames:
            break
    all_frames = np.concatenate([b.frames for b in got])[:frames]
    pts = [p for b in got for p in b.pts][:frames]
    h, w = all_frames.shape[1:3]
    out = []
    for name, (aw, ah) in ASPECTS.items():
        ch, cw = (h, int(h * aw / ah)) if w * ah >= h * aw else (int(w * ah / aw), w)
        ch, cw = ch - ch % 2, cw - cw % 2
        y, x = (h - ch) // 2, (w - cw) // 2
        dst = folder / f"{src.stem}_{name}_{cw}x{ch}.mp4"
        cropped = dataclass_replace(info, width=cw, height=ch, display_width=cw, display_height=ch, rotation=0)
        with VideoWriter(dst, cropped, crf=12, preset="veryfast", audio=False) as writer:
            writer.write(np.ascontiguousarray(all_frames[:, y : y + ch, x : x + cw]), pts)
        out.append(dst)
    return out


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **{k: v for k, v in changes.items() if hasattr(obj, k)})


def codec_rates(clip: Path) -> dict:
    """Decode-only fps of the clip, and encode-only fps of its frames at its output size."""
    import numpy as np

    from stylize import video
    from stylize.writer import VideoWriter

    info = video.probe(clip)
    t = time.perf_counter()
    batches = list(video.read_batches(info, 16))
    decode_s = time.perf_counter() - t
    frames = np.concatenate([b.frames for b in batches])
    pts = [p for b in batches for p in b.pts]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with VideoWriter(Path(tmp) / "enc.mp4", info, crf=18, preset="medium", audio=False) as writer:
            for s in range(0, len(frames), 16):
                writer.write(frames[s : s + 16], pts[s : s + 16])
        encode_s = time.perf_counter() - t
    return {"clip": clip.name, "frames": len(frames), "size": [info.display_width, info.display_height],
            "decode_fps": round(len(frames) / decode_s, 1), "encode_fps": round(len(frames) / encode_s, 1)}  # fmt: skip


def save_random_full(folder: Path, device: str) -> float:
    """The random-full stack saved as a diffusers-layout folder of safetensors; seconds taken."""
    if (folder / "unet" / "config.json").is_file():
        return 0.0
    t = time.perf_counter()
    code = (
        "import sys; from stylize.config import model_config; from stylize.models import load_stack\n"
        f"s = load_stack(model_config('random-full'), {device!r}); d = sys.argv[1]\n"
        "s.unet.save_pretrained(d + '/unet'); s.vae.save_pretrained(d + '/vae')\n"
        "s.text_encoder.save_pretrained(d + '/text_encoder'); s.tokenizer.save_pretrained(d + '/tokenizer')\n"
        "s.scheduler.save_pretrained(d + '/scheduler')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, cwd=REPO)
    return time.perf_counter() - t


def fresh_process_times(model: str, device: str, env: dict) -> dict:
    """Imports, then load_stack of `model`, in a fresh process (seconds each)."""
    code = (
        "import time, json; t0 = time.perf_counter()\n"
        "import torch, diffusers, transformers, av, stylize.cli, stylize.models, stylize.engine\n"
        "t1 = time.perf_counter(); from stylize.config import model_config; from stylize.models import load_stack\n"
        f"s = load_stack(model_config({model!r}), {device!r})\n"
        f"torch.cuda.synchronize() if {device!r} == 'cuda' else None\n"
        "print(json.dumps({'imports_s': round(t1 - t0, 2), 'load_s': round(time.perf_counter() - t1, 2)}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_cli(folder: Path, out: Path, model: str, device: str, compile_: str, env: dict) -> dict:
    cmd = [sys.executable, "-m", "stylize", str(folder), "--model", model, "--device", device, "--style", "oil",
           "-o", str(out) + "/", "-y", "--json", "--compile", compile_]  # fmt: skip
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    records = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    return {"command": " ".join(["stylize", *cmd[3:]]), "exit": r.returncode, "wall_s": round(wall, 2),
            "stderr_tail": r.stderr.strip().splitlines()[-3:], "clips": records}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=Path, nargs="+", required=True)
    ap.add_argument("--derive-from", type=Path, default=None, help="a clip to crop to 4:3, 2.39:1 and 3:4")
    ap.add_argument("--model-dir", type=Path, default=None, help="where random-full is saved (and loaded from)")
    ap.add_argument("--model", default=None, help="instead of --model-dir: a preset (tiny, for a CPU smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", default="auto")
    ap.add_argument("--runs", default="given-cold,cold,warm",
                    help="given-cold: the --clips alone (the issue's four-clip folder), caches emptied; "
                    "cold: every clip, caches emptied; warm: every clip again")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    result: dict = {"what": "stylize FOLDER as a user runs it, each run a fresh process",
                    "command": "python3 scripts/bench_folder.py " + " ".join(sys.argv[1:]), "runs": []}  # fmt: skip

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, given = tmp / "folder", tmp / "given"  # every clip; the given clips alone (the four)
        folder.mkdir()
        given.mkdir()
        for clip in args.clips:
            (folder / clip.name).symlink_to(clip.resolve())
            (given / clip.name).symlink_to(clip.resolve())
        if args.derive_from:
            derive(args.derive_from, folder)
        clips = sorted(folder.iterdir())
        model = args.model or str(args.model_dir)
        setup = {"clips": [c.name for c in clips]}
        if args.model is None:
            setup["save_s"] = round(save_random_full(args.model_dir, args.device), 1)
        cache = tmp / "cache"
        env = {**os.environ, "STYLIZE_CACHE": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
        setup.update(fresh_process_times(model, args.device, env))
        result["setup"] = setup
        save()
        result["codec"] = [codec_rates(c) for c in clips]
        save()
        for run in args.runs.split(","):
            if run in ("cold", "given-cold") and cache.exists():
                import shutil

                shutil.rmtree(cache)
            inputs = given if run.startswith("given") else folder
            row = {"run": run, **run_cli(inputs, tmp / f"out-{run}", model, args.device, args.compile, env)}
            result["runs"].append(row)
            save()
            print(json.dumps({k: v for k, v in row.items() if k != "clips"}), flush=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
