"""The model stack: presets, from_pretrained round trips, clear errors for missing weights."""

from __future__ import annotations

import shutil

import pytest
import torch

from stylize.config import model_config
from stylize.errors import ModelError
from stylize.models import load_stack


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_tiny_round_trip_every_component(tiny_cfg, tiny_dir, tiny_stack):
    """The tiny preset is saved with save_pretrained and loaded back with from_pretrained: the
    loaded modules equal the ones built from the seed, component by component."""
    from stylize.models.loading import build_random_components

    unet, vae, te, tok = build_random_components(tiny_cfg, "cpu", torch.float32, tokenizer_vocab=600)
    _same_weights(unet, tiny_stack.unet)
    _same_weights(vae, tiny_stack.vae)
    _same_weights(te.model, tiny_stack.text_encoder)  # the base model loads from the full checkpoint
    assert tok.get_vocab() == tiny_stack.tokenizer.get_vocab()
    assert type(tiny_stack.text_encoder).__name__ == "Qwen3VLModel"  # lm_head never loaded
    assert type(tiny_stack.unet).__name__ == "DreamLiteUNetModel"
    assert type(tiny_stack.vae).__name__ == "AutoencoderTiny"
    for sub in ("unet", "vae", "text_encoder"):
        assert list((tiny_dir / sub).glob("*.safetensors")), sub
        assert not list((tiny_dir / sub).glob("*.bin")), sub


def test_tiny_is_deterministic(tiny_cfg):
    from stylize.models.loading import build_random_components

    a = build_random_components(tiny_cfg, "cpu", torch.float32, tokenizer_vocab=600)[0]
    b = build_random_components(tiny_cfg, "cpu", torch.float32, tokenizer_vocab=600)[0]
    _same_weights(a, b)


def test_local_folder_loads_as_pretrained(tiny_dir):
    """`--model DIR` takes a folder in diffusers layout through the real-weights path."""
    cfg = model_config(str(tiny_dir))
    assert cfg.kind == "pretrained" and cfg.source == str(tiny_dir)
    cfg = model_config(str(tiny_dir), te_image_size=64)
    stack = load_stack(cfg)
    assert stack.unet.config.block_out_channels == [32, 64, 64] or tuple(stack.unet.config.block_out_channels) == (
        32,
        64,
        64,
    )


@pytest.mark.parametrize("missing", ["unet", "vae", "text_encoder", "tokenizer"])
def test_missing_component_names_it(tiny_dir, tmp_path, missing):
    root = tmp_path / "weights"
    shutil.copytree(tiny_dir, root)
    shutil.rmtree(root / missing)
    with pytest.raises(ModelError) as e:
        load_stack(model_config(str(root)))
    msg = str(e.value)
    assert missing in msg and str(root) in msg and "--model DIR" in msg and "\n" not in msg


def test_pickle_weights_are_refused(tiny_dir, tmp_path):
    """Safetensors only: a folder whose U-Net has only a pickle file is incomplete."""
    root = tmp_path / "weights"
    shutil.copytree(tiny_dir, root)
    for f in (root / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelError, match="safetensors"):
        load_stack(model_config(str(root)))


def test_missing_folder_and_unreachable_hub(tmp_path):
    with pytest.raises(ModelError, match="no folder"):
        load_stack(model_config("tiny", kind="pretrained", source=str(tmp_path / "nope")))
    # HF_HUB_OFFLINE is set by conftest: a hub id cannot be fetched and says how to supply it.
    with pytest.raises(ModelError, match="hf download"):
        load_stack(model_config("dreamlite-mobile"))


def test_random_full_has_the_paper_sizes():
    """The random-full preset builds the real shapes (DESIGN §2), checked on the meta device."""
    from diffusers import DreamLiteUNetModel
    from transformers import Qwen3VLConfig, Qwen3VLModel

    cfg = model_config("random-full")
    with torch.device("meta"):
        unet = DreamLiteUNetModel(**cfg.unet)
        te = Qwen3VLModel(Qwen3VLConfig(**cfg.text_encoder))
    assert sum(p.numel() for p in unet.parameters()) == 389_968_388
    assert sum(p.numel() for p in te.parameters()) == 2_127_532_032
    hooked = [
        n
        for n, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q"))
    ]
    assert len(hooked) == 108 and sum(n.startswith("down_blocks") for n in hooked) == 38


def test_presets_parse():
    from stylize.config import list_presets, style_config

    assert {"dreamlite-mobile", "random-full", "tiny"} <= set(list_presets("models"))
    assert {"oil", "watercolor", "sketch", "anime"} <= set(list_presets("styles"))
    assert style_config("oil").prompt == "transfer this to oil painting style, vibrant colors"


def test_stand_in_tokenizer_does_not_follow_the_style_presets(monkeypatch):
    """The random stacks' tokenizer is trained on fixed text: adding a style preset must not change
    the tiny model (it did, and a cached tiny stack then disagreed with a fresh build)."""
    import stylize.config as config
    from stylize.models.loading import build_tokenizer

    before = build_tokenizer(600).get_vocab()
    real = config.style_config
    monkeypatch.setattr(config, "list_presets", lambda kind: ["oil", "extra"])
    monkeypatch.setattr(
        config, "style_config", lambda name: real("oil") if name == "oil" else config.StyleConfig(name, "a brand new zebra stripes style")
    )
    assert build_tokenizer(600).get_vocab() == before
