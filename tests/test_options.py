"""Every option is checked before anything heavy: the checks themselves (config.run_options,
jobs.plan_jobs) and, in a subprocess, that a bad option imports no torch, diffusers,
transformers or av."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stylize.config import X264_PRESETS, model_config, run_options
from stylize.errors import UsageError
from stylize.jobs import plan_jobs

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "av")

# Runs `stylize.cli.entry()` once per argv given (as JSON) and prints, per run, the exit code and
# which heavy modules were imported by then.
WRAPPER = f"""
import json, sys
import stylize.cli
runs = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["stylize", *argv]
    try:
        stylize.cli.entry()
        code = 0
    except SystemExit as e:
        code = e.code
    runs.append([code, [m for m in {HEAVY!r} if m in sys.modules]])
print(json.dumps(runs))
"""


def test_bad_options_fail_before_any_heavy_import(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.write_bytes(b"")
    b.write_bytes(b"")
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"")
    common = [str(a), "--style", "oil", "--model", "tiny"]
    cases = [  # (argv, what the one error line says)
        (common + ["--preset", "bogus"], "not an x264 preset; choose one of ultrafast"),
        ([str(a), "--style", "oil", "--model", str(tmp_path / "weights")], f"no folder at {tmp_path / 'weights'}"),
        ([str(a), "--style", "oil", "--model", str(b)], "not a folder of weights"),
        ([str(a), str(b), "--style", "oil", "--model", "tiny", "-o", str(tmp_path / "out.mp4")], "cannot hold 2"),
        ([str(photo), "--style", "oil", "--model", "tiny", "-o", str(tmp_path / "photo.mp4")], "its own format"),
        (common + ["--crf", "99"], "--crf"),
        (common + ["--size", "10"], "--size"),
        (common + ["--batch-size", "0"], "--batch-size"),
        (common + ["--steps", "3"], "--steps"),
        (common + ["--fps", "0"], "--fps"),
        (common + ["--adapter", str(tmp_path / "none.safetensors")], "--adapter"),
        ([str(a), "--style", "nope", "--model", "tiny"], "unknown style"),
    ]
    before = sorted(tmp_path.iterdir())
    argvs = [argv for argv, _ in cases] + [["-h"]]
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, json.dumps(argvs)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == len(cases), out.stderr
    for (argv, needle), (code, heavy), line in zip(cases, runs, errors):
        assert code == 2 and needle in line, (argv, code, line)
        assert heavy == [], (argv, heavy)
    assert runs[-1] == [0, []]  # -h: the help, nothing heavy
    assert sorted(tmp_path.iterdir()) == before  # nothing created (no out.mp4/ folder either)


def test_preset_is_checked():
    for preset in X264_PRESETS:
        run_options(style="oil", prompt=None, model="tiny", preset=preset)
    with pytest.raises(UsageError, match="placebo"):
        run_options(style="oil", prompt=None, model="tiny", preset="bogus")


def test_model_resolution(tmp_path):
    """A preset name, a folder (real weights, the dreamlite-mobile preset pointed at it), or a
    usage error that names what was looked for."""
    assert model_config("tiny").kind == "tiny"
    cfg = model_config(str(tmp_path))
    assert cfg.kind == "pretrained" and cfg.source == str(tmp_path) and cfg.name == str(tmp_path)
    with pytest.raises(UsageError, match=f"no folder at {tmp_path / 'nope'}"):
        model_config(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="unknown model 'nope'.*tiny"):
        model_config("nope")


# ----------------------------------------------------------------------------- output paths


@pytest.fixture
def two(tmp_path):
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path / "a.mp4", tmp_path / "b.mp4"


def test_one_output_file_for_several_inputs_is_refused(two, tmp_path):
    for name in ("out.mp4", "out.png", "out.MOV"):
        with pytest.raises(UsageError, match="one file cannot hold 2 outputs"):
            plan_jobs(list(two), "oil", tmp_path / name)
        assert not (tmp_path / name).exists()
    # a folder given as such stays a folder, as before: no suffix, a trailing slash, a dotted name
    for given in (tmp_path / "out", f"{tmp_path}/out.d/", tmp_path / "results.v2"):
        jobs = plan_jobs(list(two), "oil", given)
        assert [j.dst.name for j in jobs] == ["a_oil.mp4", "b_oil.mp4"]
        assert all(j.dst.parent == Path(given) for j in jobs)
    assert plan_jobs([two[0]], "oil", f"{tmp_path}/one.d/")[0].dst == tmp_path / "one.d" / "a_oil.mp4"
    assert plan_jobs([two[0]], "oil", tmp_path / "x.mp4")[0].dst == tmp_path / "x.mp4"


def test_stills_are_planned_as_images(tmp_path):
    for name in ("photo.png", "shot.JPG", "scan.tif"):
        (tmp_path / name).write_bytes(b"")
    jobs = plan_jobs([tmp_path / "photo.png", tmp_path / "shot.JPG", tmp_path / "scan.tif"], "oil")
    assert [j.dst.name for j in jobs] == ["photo_oil.png", "shot_oil.JPG", "scan_oil.tif"]
    assert all(j.still for j in jobs)
    assert plan_jobs([tmp_path / "shot.JPG"], "oil", tmp_path / "out.jpeg")[0].dst.name == "out.jpeg"
    with pytest.raises(UsageError, match="own format.*\\.png"):
        plan_jobs([tmp_path / "photo.png"], "oil", tmp_path / "out.mp4")
    with pytest.raises(UsageError, match="input itself"):
        plan_jobs([tmp_path / "photo.png"], "oil", tmp_path / "photo.png")


def test_image_folder_is_one_clip_or_stills(tmp_path):
    seq = tmp_path / "seq"
    (seq / "sub").mkdir(parents=True)
    for name in ("00000.jpg", "00001.jpg", "sub/x.png"):
        (seq / name).write_bytes(b"")
    [job] = plan_jobs([seq], "oil")
    assert job.src == seq and job.dst == tmp_path / "seq_oil.mp4" and not job.still
    jobs = plan_jobs([seq], "oil", stills=True)
    assert [(j.src.name, j.dst.name, j.still) for j in jobs] == [
        ("00000.jpg", "00000_oil.jpg", True), ("00001.jpg", "00001_oil.jpg", True),
    ]  # fmt: skip
    assert jobs[0].dst.parent == seq
    (seq / "00000_oil.jpg").write_bytes(b"")  # a re-run never takes its own outputs as inputs
    assert len(plan_jobs([seq], "oil", stills=True)) == 2
    jobs = plan_jobs([seq], "oil", tmp_path / "out", recursive=True, stills=True)
    assert [j.dst.relative_to(tmp_path / "out").as_posix() for j in jobs] == [
        "00000_oil.jpg", "00001_oil.jpg", "sub/x_oil.png",
    ]  # fmt: skip
