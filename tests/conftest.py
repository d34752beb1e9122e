"""Shared fixtures: the tiny stack (built once per session into a temporary cache) and media paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"


def pytest_configure(config):
    # Keep test runs off the user's cache and quiet about model-loading progress bars.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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
