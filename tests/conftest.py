"""Shared fixtures: the tiny stack (built once per session into a temporary cache) and media paths."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest

# A test run started in the background of a non-interactive shell (`make test &`) inherits SIGINT
# ignored, one under `nohup` SIGHUP, and so would every process the tests start: the signal tests
# could not interrupt them, and stylize rightly keeps a signal ignored that it was started with.
# Give the session the dispositions a terminal gives (its children start with the defaults); the
# tests of an ignored signal set it themselves.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
for _sig in (signal.SIGTERM, signal.SIGHUP):
    if signal.getsignal(_sig) == signal.SIG_IGN:
        signal.signal(_sig, signal.SIG_DFL)

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"


def pytest_configure(config):
    # Keep test runs off the user's cache and quiet about model-loading progress bars; a model the
    # user's environment names (STYLIZE_MODEL, a Hugging Face cache) must not change what a test
    # without --model runs.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="stylize-test-hf-")
    os.environ.pop("STYLIZE_MODEL", None)


@pytest.fixture(scope="session", autouse=True)
def _stylize_cache(tmp_path_factory):
    old = os.environ.get("STYLIZE_CACHE")
    os.environ["STYLIZE_CACHE"] = str(tmp_path_factory.mktemp("stylize-cache"))
    yield
    if old is None:
        os.environ.pop("STYLIZE_CACHE", None)
    else:
        os.environ["STYLIZE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_cfg():
    from stylize.config import model_config

    return model_config("tiny")


@pytest.fixture(scope="session")
def tiny_dir(tiny_cfg, _stylize_cache):
    from stylize.models.loading import ensure_tiny

    return ensure_tiny(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_stack(tiny_cfg, tiny_dir):
    from stylize.models import load_stack

    return load_stack(tiny_cfg, "cpu")


@pytest.fixture(scope="session")
def media_dir():
    if not MEDIA.is_dir():
        pytest.skip(f"real clips not found: {MEDIA} is absent (clone shared/ beside the repo to run these)")
    return MEDIA


def write_clip(path: Path, frames: int = 10, size: tuple[int, int] = (64, 48), fps: int = 24, audio: bool = False) -> Path:
    """A small H.264 clip of moving gradients (optionally with a 440 Hz AAC tone) for CLI tests."""
    from fractions import Fraction

    import av
    import numpy as np

    w, h = size
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        a = out.add_stream("aac", rate=44100, layout="mono") if audio else None
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(frames):
            img = np.stack([(xx * 4 + i * 8) % 256, (yy * 4) % 256, np.full_like(xx, (i * 20) % 256)], -1)
            for p in vs.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
        if a is not None:
            n = int(44100 * frames / fps)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 44100)).astype(np.float32)[None]
            for start in range(0, n, 1024):
                frame = av.AudioFrame.from_ndarray(tone[:, start : start + 1024], format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 44100, start, Fraction(1, 44100)
                for p in a.encode(frame):
                    out.mux(p)
            for p in a.encode():
                out.mux(p)
    return path


@pytest.fixture
def clip(tmp_path):
    return write_clip(tmp_path / "clip.mp4")


def pytest_collection_modifyitems(config, items):
    """GPU tests run on the device machine only; elsewhere they skip with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
