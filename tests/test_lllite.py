"""The temporal LLLite adapter: layout, parity with a plain formulation, loading the released file."""

from __future__ import annotations

import copy

import pytest
import torch

from stylize.errors import ModelError
from stylize.models.lllite import TemporalLLLite, hook_names, load_lllite
from stylize.optimize import fuse_qkv


def _randomise(lllite: TemporalLLLite, seed: int = 0) -> None:
    """Non-zero weights everywhere (the real `up` starts at zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lllite.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lllite.derive()  # attached wrappers fold the new weights


def _inputs(unet, b=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(b, 4, h, 2 * w, generator=g)
    t = torch.full((b,), 1000.0)
    states = torch.randn(b, 6, cfg.encoder_hid_dim, generator=g)
    mask = torch.ones(b, 6, dtype=torch.long)
    time_ids = torch.tensor([[8.0 * w, 8.0 * h]]).expand(b, -1)
    cond01 = torch.rand(b, 3, 8 * h, 8 * w, generator=g)
    return x, t, states, mask, time_ids, cond01


def _unet_out(unet, x, t, states, mask, time_ids):
    return unet(x, t, encoder_hidden_states=states, encoder_attention_mask=mask,
                added_cond_kwargs={"time_ids": time_ids}, return_dict=False)[0]  # fmt: skip


def _plain(unet, lllite, cond01, multiplier, *args):
    """The obviously-correct formulation: a pre-hook on each host Linear adds
    multiplier·up(mid(cat(emb, down(x)))) to its input, the embedding zero-padded along the width."""
    hooks = []
    for name in lllite.names:
        ad = lllite.adapters[name.replace(".", "__")]
        emb = ad.conditioning1(cond01 * 2 - 1)  # (B, 32, h, w)
        emb = torch.cat([emb, torch.zeros_like(emb)], dim=3)  # [generated | source]
        emb = emb.flatten(2).transpose(1, 2)

        def hook(mod, a, ad=ad, emb=emb):
            x = a[0]
            return (x + multiplier * ad.up(ad.mid(torch.cat([emb, ad.down(x)], dim=-1))),)

        hooks.append(unet.get_submodule(name).register_forward_pre_hook(hook))
    try:
        return _unet_out(unet, *args)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-qkv", "separate-qkv"])
@pytest.mark.parametrize("subset", ["down_blocks", "all", ["mid_block", "up_blocks.0"]])
def test_compile_friendly_form_equals_plain_formulation(tiny_stack, subset, fused):
    unet = copy.deepcopy(tiny_stack.unet)
    host = copy.deepcopy(unet)  # the U-Net the adapter attaches to: with one to_qkv per self-attention, or stock
    if fused:
        assert fuse_qkv(host) > 0
    lllite = TemporalLLLite(host, subset)
    _randomise(lllite)
    x, t, states, mask, time_ids, cond01 = _inputs(unet)
    want = _plain(unet, lllite, cond01, 0.7, x, t, states, mask, time_ids)
    bare = _unet_out(unet, x, t, states, mask, time_ids)
    wrappers = lllite.attach(host)
    triples = sum(len(w.hook_names) == 3 for w in wrappers)
    assert triples == (sum(n.endswith("attn1.to_q") for n in lllite.names) if fused else 0)  # q, k, v: one wrapper
    lllite.set_multiplier(0.7)
    lllite.set_condition(cond01)
    got = _unet_out(host, x, t, states, mask, time_ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, bare, atol=1e-3)  # the adapter does something
    lllite.set_multiplier(0.0)  # "off" is multiplier 0: the bare U-Net
    torch.testing.assert_close(_unet_out(host, x, t, states, mask, time_ids), bare, rtol=1e-6, atol=1e-6)
    lllite.detach(host)
    torch.testing.assert_close(_unet_out(host, x, t, states, mask, time_ids), bare, rtol=1e-6, atol=1e-6)


def test_fused_qkv_is_the_same_unet(tiny_stack):
    unet = copy.deepcopy(tiny_stack.unet)
    x, t, states, mask, time_ids, _ = _inputs(unet)
    want = _unet_out(unet, x, t, states, mask, time_ids)
    n = fuse_qkv(unet)
    selfs = [m for m in unet.modules() if hasattr(m, "to_qkv")]
    assert n == len(selfs) > 0 and fuse_qkv(unet) == 0  # every self-attention, once
    torch.testing.assert_close(_unet_out(unet, x, t, states, mask, time_ids), want, rtol=1e-6, atol=1e-6)


def test_loading_weights_refolds_attached_wrappers(tiny_stack):
    stock = tiny_stack.unet
    unet = copy.deepcopy(stock)
    fuse_qkv(unet)
    x, t, states, mask, time_ids, cond01 = _inputs(unet)
    source = TemporalLLLite(unet, "all")
    _randomise(source, seed=5)
    target = TemporalLLLite(unet, "all")
    target.attach(unet)
    target.set_condition(cond01)
    before = _unet_out(unet, x, t, states, mask, time_ids)
    target.load_state_dict(source.state_dict())  # the folded W·U and stacked weights follow
    target.set_condition(cond01)
    after = _unet_out(unet, x, t, states, mask, time_ids)
    want = _plain(stock, source, cond01, 1.0, x, t, states, mask, time_ids)  # pre-hooks on the stock to_q/k/v
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def test_refresh_updates_buffers_in_place(tiny_stack):
    unet = copy.deepcopy(tiny_stack.unet)
    lllite = TemporalLLLite(unet)
    _randomise(lllite)
    wrappers = lllite.attach(unet)
    x, t, states, mask, time_ids, cond01 = _inputs(unet)
    lllite.set_condition(cond01)
    ptrs = [w.mid_share.data_ptr() for w in wrappers]
    a = _unet_out(unet, x, t, states, mask, time_ids)
    lllite.set_condition(torch.rand_like(cond01))
    assert [w.mid_share.data_ptr() for w in wrappers] == ptrs  # same addresses: graphs stay valid
    assert not torch.allclose(_unet_out(unet, x, t, states, mask, time_ids), a)


def test_hook_counts_and_the_released_parameter_count():
    from diffusers import DreamLiteUNetModel

    from stylize.config import model_config

    with torch.device("meta"):
        unet = DreamLiteUNetModel(**model_config("random-full").unet)
    assert len(hook_names(unet, "all")) == 108 and len(hook_names(unet, "down_blocks")) == 38
    full = TemporalLLLite(unet, "all")  # the parameters themselves are built on the CPU
    assert sum(p.numel() for p in full.parameters()) == 13_265_472
    with pytest.raises(ModelError, match="matches no"):
        hook_names(unet, ["nonexistent_block"])


def _released_file(tmp_path, unet, prefix="modules_dict.", seed=3):
    """A file in the released v3 layout for all hooks of `unet`."""
    from safetensors.torch import save_file

    full = TemporalLLLite(unet, "all")
    _randomise(full, seed)
    path = tmp_path / "temporal_lllite.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in full.adapters.state_dict().items()}, str(path))
    return path, full


@pytest.mark.parametrize("prefix", ["modules_dict.", ""])
def test_released_layout_loads_subset_and_reproduces_plain(tiny_stack, tmp_path, prefix):
    from safetensors import safe_open

    unet = copy.deepcopy(tiny_stack.unet)
    path, full = _released_file(tmp_path, unet, prefix)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert f"{prefix}down_blocks__0__attentions__0__transformer_blocks__0__attn2__to_q.conditioning1.0.weight" in keys
    assert any(k.endswith(".conditioning1.4.weight") for k in keys)  # stride-32 hooks have 3 convs
    loaded = load_lllite(path, unet, "down_blocks")
    assert set(loaded.adapters) == {n.replace(".", "__") for n in hook_names(unet, "down_blocks")}
    x, t, states, mask, time_ids, cond01 = _inputs(unet)
    # the plain formulation with the file's weights, on the same subset
    subset_plain = TemporalLLLite(unet, "down_blocks")
    weights = full.adapters.state_dict()
    subset_plain.adapters.load_state_dict({k: v for k, v in weights.items() if k.split(".")[0] in subset_plain.adapters})
    want = _plain(unet, subset_plain, cond01, 1.0, x, t, states, mask, time_ids)
    loaded.attach(unet)
    loaded.set_condition(cond01)
    torch.testing.assert_close(_unet_out(unet, x, t, states, mask, time_ids), want, rtol=1e-5, atol=1e-5)


def test_loader_refuses_mismatched_or_missing(tiny_stack, tmp_path):
    from safetensors.torch import load_file, save_file

    unet = copy.deepcopy(tiny_stack.unet)
    path, _ = _released_file(tmp_path, unet)
    state = load_file(str(path))
    bad_key = sorted(k for k in state if "down_blocks__0" in k and k.endswith("down.0.weight"))[0]
    state[bad_key] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelError, match=bad_key.removeprefix("modules_dict.").replace(".", r"\.")):
        load_lllite(tmp_path / "bad.safetensors", unet)
    del state[bad_key]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelError, match="no weights for"):
        load_lllite(tmp_path / "missing.safetensors", unet)
    with pytest.raises(ModelError, match="not found"):
        load_lllite(tmp_path / "nope.safetensors", unet)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelError, match="not a readable"):
        load_lllite(tmp_path / "junk.safetensors", unet)


def test_embedding_conditions_only_the_generated_half(tiny_stack):
    """The U-Net's tokens are [generated | source] along the width: a refresh conditions the left
    half only, the right half of every hook's share is mid's bias alone (a zero embedding)."""
    unet = copy.deepcopy(tiny_stack.unet)
    lllite = TemporalLLLite(unet, "down_blocks")
    _randomise(lllite)
    wrappers = lllite.attach(unet)
    lllite.set_condition(torch.rand(1, 3, 64, 64))  # stride 8 → an 8x8 embedding, tokens 8x16
    w = next(w for w in wrappers if w.adapters[0].stride == 8)
    share = w.mid_share[..., :64].reshape(1, 8, 16, 64)  # its first hook's share, (B, h, 2w, 64)
    bias = w.adapters[0].mid[0].bias
    torch.testing.assert_close(share[:, :, 8:], bias.expand(1, 8, 8, 64))
    assert not torch.allclose(share[:, :, :8], bias.expand(1, 8, 8, 64))
