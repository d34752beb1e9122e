"""The package works installed the normal way (a wheel), not only as the editable checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, write_clip


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A fresh venv holding only the wheel built from this checkout; it reaches the test venv's
    dependencies through a path entry (site-packages only: the editable install's own .pth is not
    processed there, so `stylize` must come from the wheel)."""
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(REPO)],
        capture_output=True, text=True,
    )  # fmt: skip
    wheels = list((root / "dist").glob("stylize-*.whl"))
    if built.returncode != 0 or not wheels:
        pytest.skip(f"a wheel cannot be built offline here: {built.stderr.strip()[-300:]}")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheels[0])],
        check=True, capture_output=True,
    )  # fmt: skip
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    Path(site, "test-venv-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": "", "PYTHONSAFEPATH": "1"}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_has_presets_and_runs_outside_the_checkout(wheel_venv, tmp_path):
    where = _run(wheel_venv, tmp_path, wheel_venv / "bin" / "python", "-c", "import stylize; print(stylize.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(wheel_venv), where.stdout

    styles = _run(wheel_venv, tmp_path, wheel_venv / "bin" / "stylize", "styles")
    assert styles.returncode == 0, styles.stderr
    assert "oil" in styles.stdout and "watercolor" in styles.stdout
    assert "tiny" in _run(wheel_venv, tmp_path, wheel_venv / "bin" / "stylize", "models").stdout

    clip = write_clip(tmp_path / "clip.mp4", frames=4)
    r = _run(wheel_venv, tmp_path, wheel_venv / "bin" / "stylize", clip.name, "--style", "oil", "--model", "tiny",
             "--size", "64", "--preset", "ultrafast", "--batch-size", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "clip_oil.mp4").is_file()
