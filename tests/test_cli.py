"""The `stylize` command through typer's CliRunner: options, naming, skip/replace, exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from stylize import video
from stylize.cli import run_app, sub_app
from tests.conftest import write_clip

FAST = ["--model", "tiny", "--size", "64", "--preset", "ultrafast", "--batch-size", "4"]


def invoke(*args, app=run_app):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_default_naming_beside_input(clip):
    r = invoke(clip, "--style", "oil", *FAST)
    assert r.exit_code == 0, r.output
    assert r.stderr == ""  # no stray blank line (rich ends a bar off a terminal with one)
    out = clip.with_name("clip_oil.mp4")
    info = video.probe(out)
    assert info.frames == 10 and (info.display_width, info.display_height) == (64, 48)
    line = r.stdout.strip().splitlines()[-1]
    assert "10 frames" in line and "fps" in line and "p50" in line and "p95" in line


def test_prompt_slug_and_output_folder(clip, tmp_path):
    r = invoke(clip, "--prompt", "Make it a charcoal sketch!", "-o", tmp_path / "new" / "dir/", *FAST)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "new" / "dir" / "clip_make-it-a-charcoal-sketch.mp4").is_file()


def test_output_file_for_single_input(clip, tmp_path):
    r = invoke(clip, "--style", "sketch", "-o", tmp_path / "exact.mp4", *FAST)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "exact.mp4").is_file()


def test_folder_of_videos_and_recursive(tmp_path):
    root = tmp_path / "clips"
    (root / "sub").mkdir(parents=True)
    write_clip(root / "a.mp4", frames=4)
    write_clip(root / "b.mov", frames=4)
    write_clip(root / "sub" / "c.mp4", frames=4)
    r = invoke(root, "--style", "anime", *FAST)
    assert r.exit_code == 0, r.output
    assert (root / "a_anime.mp4").is_file() and (root / "b_anime.mp4").is_file()
    assert not (root / "sub" / "c_anime.mp4").exists()
    # a re-run skips the done clips and never treats its own outputs as inputs
    r = invoke(root, "--style", "anime", "--recursive", *FAST)
    assert r.exit_code == 0, r.output
    assert (root / "sub" / "c_anime.mp4").is_file()
    assert not list(root.glob("*_anime_anime.mp4"))
    assert sum(ln.startswith("skip ") for ln in r.stderr.splitlines()) == 2
    assert "1 of 1 clip done; 2 skipped (output exists)" in r.stderr and "" not in r.stderr.splitlines()
    # a re-run with everything done says so, and loads no model
    r = invoke(root, "--style", "anime", "--recursive", *FAST)
    assert r.exit_code == 0 and "nothing to do: all 3 outputs exist" in r.stderr and "done" not in r.stderr
    # under -o DIR the subfolders are kept
    r = invoke(root, "--style", "anime", "--recursive", "-o", tmp_path / "out", *FAST)
    assert (tmp_path / "out" / "sub" / "c_anime.mp4").is_file() and (tmp_path / "out" / "a_anime.mp4").is_file()


def test_numbered_image_folder_is_one_clip(tmp_path):
    from PIL import Image

    seq = tmp_path / "seq"
    seq.mkdir()
    for i in range(6):
        Image.fromarray(np.full((40, 56, 3), i * 30, np.uint8)).save(seq / f"{i:05d}.jpg")
    r = invoke(seq, "--style", "oil", "--fps", "12", *FAST)
    assert r.exit_code == 0, r.output
    info = video.probe(tmp_path / "seq_oil.mp4")
    assert info.frames == 6 and float(info.fps) == pytest.approx(12)
    assert info.duration == pytest.approx(0.5, abs=0.09)


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".bmp", ".webp"])
def test_every_image_suffix_the_planner_takes_is_read(tmp_path, suffix):
    """jobs.py and video.py share one list of image suffixes: a folder of .tif frames is one clip
    (it used to be planned as a clip, then read as 'no images')."""
    from PIL import Image

    seq = tmp_path / "frames"
    seq.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 56, 3), i * 60, np.uint8)).save(seq / f"{i:03d}{suffix}")
    r = invoke(seq, "--style", "oil", *FAST)
    assert r.exit_code == 0, r.output
    assert video.probe(tmp_path / "frames_oil.mp4").frames == 3


def test_existing_output_is_skipped_then_replaced_with_yes(clip):
    out = clip.with_name("clip_oil.mp4")
    out.write_bytes(b"keep me")
    r = invoke(clip, "--style", "oil", *FAST)
    assert r.exit_code == 0 and out.read_bytes() == b"keep me"
    assert "skip" in r.stderr and str(out) in r.stderr.replace("\n", "")
    r = invoke(clip, "--style", "oil", "-y", *FAST)
    assert r.exit_code == 0, r.output
    assert video.probe(out).frames == 10


def test_one_output_file_for_several_inputs_is_a_usage_error(tmp_path):
    a = write_clip(tmp_path / "a.mp4", frames=2)
    b = write_clip(tmp_path / "b.mp4", frames=2)
    r = invoke(a, b, "--style", "oil", "-o", tmp_path / "out.mp4", *FAST)
    assert r.exit_code == 2 and "one file cannot hold 2 outputs" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]  # no out.mp4/ folder


def test_output_is_never_the_input(clip):
    before = clip.read_bytes()
    r = invoke(clip, "--style", "oil", "-o", clip, "-y", *FAST)
    assert r.exit_code == 2 and "input itself" in r.stderr
    assert clip.read_bytes() == before


def test_bad_clip_among_good_ones_exit_1(tmp_path):
    good = write_clip(tmp_path / "good.mp4", frames=4)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video")
    r = invoke(bad, good, "--style", "oil", *FAST)
    assert r.exit_code == 1
    assert (tmp_path / "good_oil.mp4").is_file() and not (tmp_path / "bad_oil.mp4").exists()
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "bad.mp4" in errors[0]
    assert "1 of 2 clips done" in r.stderr
    assert "Traceback" not in r.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "tiny"], "exactly one of"),
        (["--style", "oil", "--prompt", "x"], "exactly one of"),
        (["--style", "nope"], "unknown style"),
        (["--style", "oil", "--steps", "3"], "--steps"),
        (["--style", "oil", "--model", "no-such-model"], "unknown model"),
        (["--style", "oil", "--crf", "99"], "--crf"),
        (["--style", "oil", "--crop", "diagonal"], "diagonal"),
        (["--style", "oil", "--model", "tiny", "--preset", "bogus"], "not an x264 preset"),
        (["--style", "oil", "--model", "./no/such/weights"], "no folder at"),
    ],
)
def test_usage_errors_exit_2(clip, args, needle):
    r = invoke(clip, *args)
    assert r.exit_code == 2
    assert needle in r.output
    assert not clip.with_name("clip_oil.mp4").exists()


def test_missing_input_exit_2(tmp_path):
    r = invoke(tmp_path / "nope.mp4", "--style", "oil", *FAST)
    assert r.exit_code == 2 and "nope.mp4" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_interrupt_exits_130_and_leaves_nothing(clip, monkeypatch):
    from stylize.reference import ReferenceStylizer

    def boom(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(ReferenceStylizer, "feed", boom)
    r = invoke(clip, "--style", "oil", *FAST)
    assert r.exit_code == 130
    assert not clip.with_name("clip_oil.mp4").exists()
    assert [p.name for p in clip.parent.iterdir()] == ["clip.mp4"]  # no partial file left


def test_sigterm_exits_143_and_leaves_nothing(clip, monkeypatch):
    """SIGTERM cleans up as Ctrl-C does. The handler installed here first stands for the default
    (which would kill pytest): without the CLI's own, it turns the signal into a clip failure."""
    from stylize.reference import ReferenceStylizer

    def terminated_mid_clip(self, batch):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM was not raised on the main thread")

    def not_handled(signum, frame):
        raise RuntimeError("SIGTERM reached the fallback handler")

    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        monkeypatch.setattr(ReferenceStylizer, "feed", terminated_mid_clip)
        r = invoke(clip, "--style", "oil", *FAST)
        assert signal.getsignal(signal.SIGTERM) is not_handled  # the CLI's handler is gone again
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert r.exit_code == 143 and "terminated" in r.stderr
    assert [p.name for p in clip.parent.iterdir()] == ["clip.mp4"]  # no partial file left


def test_json_to_a_closed_pipe_ends_quietly(tmp_path):
    """`stylize ... --json | head -1`: the reader leaves after one record; the next record's write
    stops the run with 141 (128 + SIGPIPE, what a shell reports for a tool its pipe closed),
    with nothing on stderr: no traceback, no 'Exception ignored'."""
    a = write_clip(tmp_path / "a.mp4", frames=2)
    b = write_clip(tmp_path / "b.mp4", frames=2)
    cmd = [sys.executable, "-m", "stylize", a, b, "--style", "oil", "--json", *FAST]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()  # as `head -1` exits
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr
    assert json.loads(first)["status"] == "ok"
    assert stderr == ""


def test_closed_stderr_ends_quietly_too(clip, monkeypatch):
    """A notice into a closed stderr (`2>&1 | head -1`) stops the run like a closed stdout (141),
    not with rich's own exit 1."""
    from rich.console import Console

    def closed(self):
        raise BrokenPipeError

    clip.with_name("clip_oil.mp4").write_bytes(b"done")  # its skip notice is the first write
    monkeypatch.setattr(Console, "_write_buffer", closed)
    assert invoke(clip, "--style", "oil", *FAST).exit_code == 141


def test_help(tmp_path):
    """-h is --help; --fps shows its default; yes/no flags show no value placeholder."""
    long, short = invoke("--help"), invoke("-h")
    assert long.exit_code == 0 and short.exit_code == 0 and short.stdout == long.stdout
    text = re.sub(r"[\s│]+", " ", long.stdout)  # rich wraps the table at the terminal width
    assert "Frame rate of numbered-image folders. [default: 24]" in text
    assert "<bool>" not in text and "--yes -y Replace" in text and "--help -h Show" in text
    sub = invoke("styles", "-h", app=sub_app)
    assert sub.exit_code == 0 and "List the style presets" in sub.stdout and "<bool>" not in sub.stdout


def test_json_records_and_quiet(tmp_path):
    a = write_clip(tmp_path / "a.mp4", frames=5)
    b = write_clip(tmp_path / "b.mp4", frames=3)
    r = invoke(a, b, "--style", "oil", "--json", "-q", *FAST)
    assert r.exit_code == 0, r.output
    records = [json.loads(ln) for ln in r.stdout.strip().splitlines()]
    assert [rec["frames"] for rec in records] == [5, 3]
    for rec in records:
        assert rec["status"] == "ok" and rec["fps"] > 0 and rec["latency_p50_ms"] > 0 and rec["latency_p95_ms"] > 0
        assert rec["width"] == 64 and rec["height"] == 48
    assert r.stderr == ""
    r = invoke(a, "--style", "oil", "-q", "-y", *FAST)
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""


def test_audio_kept_or_dropped(tmp_path):
    src = write_clip(tmp_path / "tone.mp4", frames=12, audio=True)
    assert invoke(src, "--style", "oil", *FAST).exit_code == 0
    assert video.probe(tmp_path / "tone_oil.mp4").audio
    assert invoke(src, "--style", "oil", "--no-audio", "-o", tmp_path / "silent.mp4", *FAST).exit_code == 0
    assert not video.probe(tmp_path / "silent.mp4").audio


def test_model_options_change_the_output(clip, tmp_path):
    """--steps, --seed, --size, --batch-size, --crop and --device all reach the pipeline."""

    def frames(*extra, name):
        dst = tmp_path / f"{name}.mp4"
        r = invoke(clip, "--style", "oil", "-o", dst, "--device", "cpu", "--crf", "0", *FAST, *extra)
        assert r.exit_code == 0, r.output
        return np.concatenate([b.frames for b in video.read_batches(dst, 16)])

    base = frames(name="base")
    assert not np.array_equal(base, frames("--steps", "2", name="steps"))
    assert not np.array_equal(base, frames("--seed", "5", name="seed"))
    assert frames("--size", "96", name="size").shape == base.shape  # output keeps the input size
    assert np.abs(frames("--batch-size", "3", name="bs").astype(int) - base.astype(int)).mean() < 1.0
    assert frames("--crop", "center", name="crop").shape[1:3] == (48, 48)


def test_debug_shows_traceback(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"nope")
    r = invoke(bad, "--style", "oil", "--debug", *FAST)
    assert r.exit_code == 1 and "Traceback" in r.stderr


def test_styles_and_models_commands():
    r = invoke("styles", app=sub_app)
    assert r.exit_code == 0 and "oil" in r.stdout and "vibrant colors" in r.stdout
    r = invoke("models", app=sub_app)
    assert r.exit_code == 0 and "tiny" in r.stdout and "random-full" in r.stdout and "dreamlite-mobile" in r.stdout
    mini = next(ln for ln in r.stdout.splitlines() if ln.split()[:1] == ["mini"])
    assert "hf download" not in mini and ("not trained yet" in mini or "shipped in the package" in mini)


def test_version_and_help_are_instant():
    import subprocess
    import sys
    import time

    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "stylize", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("stylize ")
    assert time.perf_counter() - t < 10
    out = subprocess.run(
        [sys.executable, "-c", "import sys, stylize.cli; print('torch' in sys.modules)"], capture_output=True, text=True
    )
    assert out.stdout.strip() == "False"  # nothing heavy at import


def test_adapter_option(clip, tmp_path):
    from safetensors.torch import save_file

    from stylize.config import model_config
    from stylize.models import load_stack
    from stylize.models.lllite import TemporalLLLite

    unet = load_stack(model_config("tiny")).unet
    weights = tmp_path / "lllite.safetensors"
    save_file({f"modules_dict.{k}": v.contiguous() for k, v in TemporalLLLite(unet, "all").adapters.state_dict().items()}, str(weights))
    r = invoke(clip, "--style", "oil", "--adapter", weights, "--adapter-every", "2", "-o", tmp_path / "a.mp4", *FAST)
    assert r.exit_code == 0, r.output
    assert video.probe(tmp_path / "a.mp4").frames == 10
    r = invoke(clip, "--style", "oil", "--adapter", tmp_path / "missing.safetensors", *FAST)
    assert r.exit_code == 2 and "--adapter" in r.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    r = invoke(clip, "--style", "oil", "--adapter", bad, "-o", tmp_path / "b.mp4", *FAST)
    assert r.exit_code == 1 and "not a readable safetensors" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.media
def test_every_real_clip_goes_through_the_command(media_dir, tmp_path):
    """`stylize` on every clip in shared/media (tiny stack): a playable video with the input's
    frame count, timestamps, display size, upright orientation and audio tracks."""
    clips = sorted(p for p in media_dir.iterdir() if p.suffix in (".mp4", ".mov") or (p.is_dir() and p.name.startswith("davis_")))
    assert len(clips) >= 9
    r = invoke(*clips, "--style", "oil", "--json", "-q", "-o", tmp_path, *FAST)
    assert r.exit_code == 0, r.output
    records = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(records) == len(clips)
    for rec in records:
        src, dst = video.probe(rec["src"]), video.probe(rec["dst"])
        assert dst.frames == src.frames, rec["src"]
        assert (dst.display_width, dst.display_height) == (src.display_width, src.display_height), rec["src"]
        assert dst.rotation == 0
        assert [a.codec for a in dst.audio] == [a.codec for a in src.audio], rec["src"]
        t_src = [float(p * src.time_base) for b in video.read_batches(src, 64) for p in b.pts]
        t_dst = [float(p * dst.time_base) for b in video.read_batches(dst, 64) for p in b.pts]
        assert max(abs(a - b) for a, b in zip(t_src, t_dst)) < 0.002, rec["src"]


def test_unreachable_full_model_is_one_line(clip, monkeypatch):
    """The full model named, no weights here and no hub: one error line on stderr, no library
    warnings or retry chatter."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = invoke(clip, "--style", "oil", "--model", "dreamlite-mobile")
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--model DIR" in lines[0]
    assert "no network, and not in the local cache" in lines[0] and ".." not in lines[0]


def test_run_length_is_only_probed_for_compile_auto_on_cuda(clip, monkeypatch):
    import stylize.pipeline as pipeline

    def probing(*a, **k):
        raise AssertionError("probed every clip for a hint nobody uses")

    monkeypatch.setattr(pipeline, "_frames_in", probing)
    r = invoke(clip, "--style", "oil", "--device", "cpu", *FAST)
    assert r.exit_code == 0, r.output
