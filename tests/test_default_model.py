"""Which model a run without --model uses (#13): STYLIZE_MODEL, else the full model in the Hugging
Face cache, else mini with a one-line notice, never the network; the full model named explicitly
without a network; mini's prompt rule; the CPU working size."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stylize.cli import run_app, sub_app
from stylize.config import default_model, match_style, model_config, run_options, style_config
from stylize.errors import ModelError, UsageError

REPO = Path(__file__).resolve().parents[1]
MINI_STYLES = model_config("mini").styles


def invoke(*args, app=run_app):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test's own (read when snapshot_download runs)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("STYLIZE_MODEL", raising=False)
    return cache


def cache_full_model(cache: Path, weights: Path) -> Path:
    """`weights` as the Hugging Face cache holds a download of the full model's revision."""
    cfg = model_config("dreamlite-mobile")
    repo = cache / f"models--{cfg.source.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(weights, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / cfg.revision).write_text("0" * 40)
    return snapshot


# ------------------------------------------------------------------------------ the prompt rule
@pytest.mark.parametrize(
    ("prompt", "style"),
    [
        ("make it an oil painting", "oil"),
        ("Make it an Oil-Painting!", "oil"),
        ("oil", "oil"),
        ("transfer this to oil painting style, vibrant colors", "oil"),
        ("turn it into a watercolour, please", "watercolor"),
        ("in the style of Van Gogh", "starry-night"),
        ("pixel art", "pixel-art"),
        ("oil and watercolor", None),  # two styles: not a guess
        ("a cyberpunk city at night", None),
        ("boil the kettle", None),  # whole words only
    ],
)
def test_a_prompt_matches_a_style_by_name_prompt_or_alias(prompt, style):
    assert match_style(prompt, MINI_STYLES) == style


def test_mini_knows_every_style_with_a_teacher():
    from stylize.train import mini

    assert MINI_STYLES == mini.mini_styles()
    assert all(style_config(s).aliases for s in MINI_STYLES)


def test_mini_reads_a_matched_prompt_as_its_style():
    opts = run_options(style=None, prompt="make it an oil painting", model="mini")
    assert opts.pipeline.prompt == style_config("oil").prompt and opts.tag == "oil"
    assert any("'oil'" in n for n in opts.notices)
    # a model that follows any instruction reads the prompt as given
    opts = run_options(style=None, prompt="make it an oil painting", model="tiny")
    assert opts.pipeline.prompt == "make it an oil painting" and not opts.notices


def test_a_prompt_mini_was_not_trained_on_exits_2_listing_its_styles(clip):
    with pytest.raises(UsageError) as e:
        run_options(style=None, prompt="a cyberpunk city at night", model="mini")
    assert all(s in str(e.value) for s in MINI_STYLES)
    r = invoke(clip, "--prompt", "a cyberpunk city at night", "--model", "mini")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "oil" in lines[0] and "watercolor" in lines[0]


# --------------------------------------------------------------------------------- the default
def test_no_full_weights_means_mini_with_a_notice(hub_cache):
    chosen = default_model()
    assert chosen.config.name == "mini" and chosen.fallback
    opts = run_options(style="oil", prompt=None, model=None)
    assert opts.model.name == "mini"
    (notice,) = opts.notices
    assert "mini" in notice and "STYLIZE_MODEL" in notice and "\n" not in notice


def test_stylize_model_names_the_weights(hub_cache, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STYLIZE_MODEL", str(tiny_dir))
    opts = run_options(style="oil", prompt=None, model=None)
    assert opts.model.source == str(tiny_dir) and not opts.notices
    monkeypatch.setenv("STYLIZE_MODEL", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="STYLIZE_MODEL="):
        run_options(style="oil", prompt=None, model=None)
    r = invoke("models", app=sub_app)  # the listing still shows, then says what is wrong
    assert r.exit_code == 2 and "tiny" in r.stdout and "STYLIZE_MODEL=" in r.stdout


def test_the_full_model_in_the_hub_cache_is_the_default(hub_cache, tiny_dir):
    snapshot = cache_full_model(hub_cache, tiny_dir)
    chosen = default_model()
    assert chosen.config.name == "dreamlite-mobile" and not chosen.fallback
    assert chosen.config.source == str(snapshot) and "Hugging Face cache" in chosen.why
    r = invoke("models", app=sub_app)
    assert r.exit_code == 0 and "without --model: dreamlite-mobile" in " ".join(r.stdout.split())
    # an incomplete download is not the full model
    shutil.rmtree(snapshot / "unet")
    assert default_model().config.name == "mini"
    r = invoke("models", app=sub_app)
    assert "without --model: mini" in " ".join(r.stdout.split())


def test_the_full_model_named_loads_from_the_hub_cache(hub_cache, tiny_dir):
    """`--model dreamlite-mobile` finds the cached copy through huggingface_hub (offline here)."""
    from stylize.models import load_stack

    cache_full_model(hub_cache, tiny_dir)
    stack = load_stack(model_config("dreamlite-mobile", te_image_size=64))
    assert tuple(stack.unet.config.block_out_channels) == (32, 64, 64)


def test_the_full_model_named_without_a_network_says_so(clip, tmp_path):
    """The hub unreachable (a closed port), nothing cached: one line, quickly, exit 1."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "STYLIZE_MODEL")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_ETAG_TIMEOUT="5")
    t = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "stylize", str(clip), "--style", "oil", "--model", "dreamlite-mobile"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and "no network, and not in the local cache" in lines[0], r.stderr
    assert time.monotonic() - t < 60
    assert not list(clip.parent.glob("*_oil*"))


def test_offline_in_process_is_the_same_line(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from stylize.models import load_stack

    with pytest.raises(ModelError, match="no network, and not in the local cache"):
        load_stack(model_config("dreamlite-mobile"))


# --------------------------------------------------------------------------- the CPU work size
def test_mini_works_at_its_cpu_size_unless_told():
    opts = run_options(style="oil", prompt=None, model="mini")
    assert opts.on_device("cpu").pipeline.size == 384
    assert opts.on_device("cuda").pipeline.size == 512
    assert run_options(style="oil", prompt=None, model="mini", size=512).on_device("cpu").pipeline.size == 512
    assert run_options(style="oil", prompt=None, model="tiny").on_device("cpu").pipeline.size == 512
