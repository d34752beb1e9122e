"""mini's training groundwork (issue #13): the preset's sizes, its tokenizer, batched prompts, the
checkpoint budget, and scripts/train_mini.py run for a few CPU steps, resumed, exported and loaded."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.util
import json
import sys
import tomllib
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from stylize.config import PipelineConfig, model_config, style_config
from stylize.errors import ModelError
from stylize.models import load_stack
from stylize.models.loading import packaged_folder
from stylize.train import checkpoint as ckpt
from stylize.train import data as train_data
from stylize.train import mini, mini_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_mini():
    spec = importlib.util.spec_from_file_location("train_mini", REPO / "scripts" / "train_mini.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_mini"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("train_mini", None)


@pytest.fixture
def one_thread():
    """The script sets one torch thread on the CPU; give the rest of the session back its own."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_preset_fits_the_budget():
    """mini's components, built on the meta device: the same classes as the full stack, and every
    weight in fp16 within 20 MB."""
    cfg = model_config("mini")
    assert (
        cfg.kind == "pretrained" and packaged_folder(cfg.source) == Path(mini.__file__).parents[1] / "weights" / "mini"
    )
    tok = mini.build_mini_tokenizer()
    unet, vae, te = mini.build_mini_components(cfg, tok, device="meta")
    assert (type(unet).__name__, type(vae).__name__, type(te.model).__name__) == (
        "DreamLiteUNetModel", "AutoencoderTiny", "Qwen3VLModel")  # fmt: skip
    report = mini.sizes(unet, vae, te)
    assert report["total_params"] * 2 <= mini.FP16_BUDGET_BYTES, report


def test_untrained_preset_says_so():
    cfg = model_config("mini")
    if any(packaged_folder(cfg.source).glob("*/*.safetensors")):
        pytest.skip("mini's weights are in the package: the trained case is tested by loading it")
    with pytest.raises(ModelError, match="not trained yet"):
        load_stack(cfg)


def test_tokenizer_knows_every_style():
    """Deterministic; Qwen's special tokens are single tokens; each prompt and alias tokenizes
    back to itself in few tokens; any other text still tokenizes (bytes)."""
    a, b = mini.build_mini_tokenizer(), mini.build_mini_tokenizer()
    assert a.get_vocab() == b.get_vocab() and len(a) <= 1024
    for special in ("<|image_pad|>", "<|vision_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(a(special, add_special_tokens=False)["input_ids"]) == 1
    assert all(style_config(s).aliases for s in mini.mini_styles())
    for style in mini.mini_styles():
        for prompt in mini.style_prompts(style):
            ids = a(" " + prompt, add_special_tokens=False)["input_ids"]
            assert a.decode(ids) == " " + prompt and len(ids) <= len(prompt.split()) + 6, prompt
    assert a.decode(a("zebra stripes, über", add_special_tokens=False)["input_ids"]) == "zebra stripes, über"


def test_batched_prompts_equal_one_at_a_time(tiny_stack):
    """A training batch mixes prompts (right-padded, masked): each row equals `encode` on its own,
    with the stock call's positions or the ones read off it once per prompt."""
    from stylize.models.text_encoder import encode, tokenize_prompt

    te, tok = tiny_stack.text_encoder, tiny_stack.tokenizer
    prompts = ["make it an oil painting", "transfer this to a pencil sketch, black and white, fine hatching", "ink"]
    tokens = [tokenize_prompt(tok, te.config, p, 64, 64) for p in prompts]
    frames = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    positions = [mini.prompt_positions(te, t) for t in tokens]
    for hidden, pos in (("post_norm", None), ("pre_norm", None), ("post_norm", positions)):
        states, mask = mini.encode_prompts(te, tokens, frames, hidden, pos)
        for i, t in enumerate(tokens):
            one, one_mask = encode(te, t, frames[i : i + 1], hidden)
            torch.testing.assert_close(states[i : i + 1], one, rtol=0, atol=1e-5)
            assert torch.equal(mask[i : i + 1], one_mask)


def test_step_plan_is_pure_and_balanced():
    prompts = {s: mini.style_prompts(s) for s in ("oil", "sketch", "anime")}
    hw = [(640, 1024), (768, 512)]
    a = mini_data.plan_step(0, 1, 7, hw, prompts, batch_256=12, sizes=(256, 512))
    b = mini_data.plan_step(0, 1, 7, hw, prompts, batch_256=12, sizes=(256, 512))
    assert a.styles == b.styles and a.boxes == b.boxes and np.array_equal(a.jitter, b.jitter)
    assert mini_data.plan_step(0, 1, 8, hw, prompts, 12, (256, 512)).boxes != a.boxes
    assert len(a.styles) == mini_data.batch_for(a.side, 12)
    counts = [a.styles.count(s) for s in prompts]
    assert max(counts) - min(counts) <= 1
    for k, top, left, n, _ in a.boxes:
        assert 0 <= top <= hw[k][0] - n and 0 <= left <= hw[k][1] - n


def test_checkpoint_budget_and_restore(tmp_path):
    """The finest second-moment block that fits is used, a coarser one under a tighter budget,
    none fits below the weights themselves; restored moments bound the stored ones from above."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    params = {f"net.{n}": p for n, p in net.named_parameters()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(3):
        net(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    weights = sum(p.numel() for p in net.parameters()) * 2
    data, block = ckpt.checkpoint_bytes({"net": net}, opt, params, {"step": 3})
    assert block == ckpt.BLOCKS[0] and weights < len(data) < weights + 8_000
    _, coarse = ckpt.checkpoint_bytes({"net": net}, opt, params, {"step": 3}, budget=len(data) - 1)
    assert coarse > block
    with pytest.raises(ckpt.CheckpointTooLarge):
        ckpt.checkpoint_bytes({"net": net}, opt, params, {"step": 3}, budget=weights)

    size, block = ckpt.save_checkpoint(tmp_path / "c.safetensors", {"net": net}, opt, params, {"step": 3})
    assert size == (tmp_path / "c.safetensors").stat().st_size
    tensors, meta = ckpt.load_checkpoint(tmp_path / "c.safetensors")
    assert meta["step"] == 3 and meta["v_block"] == block
    twin = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    ckpt.restore_modules({"net": twin}, tensors)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a.half().float(), b, rtol=0, atol=0)  # fp16 weights
    twin_params = {f"net.{n}": p for n, p in twin.named_parameters()}
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    assert ckpt.restore_optimizer(opt2, twin_params, tensors, block, step=3) == len(params)
    for p, q in zip(net.parameters(), twin.parameters()):
        v, w = opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"]
        assert (w >= v * (1 - 2**-7)).all()  # each entry at least its own (bf16 rounding aside)
        assert not opt2.state[q]["exp_avg"].any()
    twin(torch.randn(8, 64)).square().mean().backward()
    opt2.step()  # the restored state is a working AdamW state


def test_restored_moments_take_a_channels_last_parameters_layout(tmp_path):
    """train_mini --channels-last: a conv weight in channels_last gets its second moment in the same
    layout, entry for entry (fused AdamW walks the storage; a contiguous moment beside a
    channels_last weight would pair the wrong entries)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3)
    params = {f"c.{n}": p for n, p in conv.named_parameters()}
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-3)
    conv(torch.randn(2, 8, 6, 6)).square().mean().backward()
    opt.step()
    tensors = {**ckpt.weight_tensors({"c": conv}), **ckpt.moment_tensors(opt, params, 32)}
    twin = torch.nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    twin_params = {f"c.{n}": p for n, p in twin.named_parameters()}
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    ckpt.restore_optimizer(opt2, twin_params, tensors, 32, step=1)
    w = opt2.state[twin.weight]["exp_avg_sq"]
    assert w.stride() == twin.weight.stride() != conv.weight.stride()
    expect = tensors["v.c.weight"].float().square().repeat_interleave(32)[: w.numel()].view_as(w)
    torch.testing.assert_close(w, expect)  # each logical entry its own block's value


def test_restore_matching_copies_what_fits_and_names_the_rest():
    """A warm start after a config change: weights whose name and shape match are copied, the others
    keep their initialisation and are named."""
    torch.manual_seed(0)
    old = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    new = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3), torch.nn.Linear(3, 1))
    fresh_1 = new[1].weight.detach().clone()
    which = ckpt.restore_matching({"n": new}, ckpt.weight_tensors({"n": old}))
    assert which == {"copied": ["n.0.weight", "n.0.bias"],
                     "fresh": ["n.1.weight", "n.1.bias", "n.2.weight", "n.2.bias"]}  # fmt: skip
    torch.testing.assert_close(new[0].weight, old[0].weight.half().float(), rtol=0, atol=0)
    assert torch.equal(new[1].weight, fresh_1)


def test_init_from_starts_a_new_run_from_another_checkpoint(train_mini, tmp_path, one_thread, monkeypatch, capsys):
    """--init-from: a new run (here with the VAE stage skipped, vae=0) takes the other checkpoint's
    weights where they fit, starts at step 0 of its own plan, and records where it came from."""
    from stylize.train import data as train_data
    from tests.test_data import _fake_prepared

    crops, manifest = _fake_prepared(tmp_path)
    real_stills, real_items = train_data.load_stills, train_data.train_items
    monkeypatch.setattr(train_data, "load_stills", lambda *a, **k: real_stills(crops, manifest, tmp_path / "train.txt"))
    monkeypatch.setattr(train_data, "train_items", lambda *a, **k: real_items(manifest, tmp_path / "train.txt"))
    common = ["--device", "cpu", "--size", "64", "--batch", "2", "--styles", "sketch,pixel-art", "--commit", "test"]
    first = tmp_path / "first.safetensors"
    assert train_mini.main([*common, "--plan", "vae=2,latent=1,pixels=1", "--steps", "2", "--out", str(first)]) == 0
    old, old_meta = ckpt.load_checkpoint(first)
    out = tmp_path / "warm.safetensors"
    argv = [*common, "--plan", "vae=0,latent=1,pixels=1", "--init-from", str(first), "--steps", "1", "--out", str(out)]
    assert train_mini.main(argv) == 0
    tensors, meta = ckpt.load_checkpoint(out)
    assert meta["step"] == 1 and meta["chunks"][-1]["start"] == 0
    assert meta["init_from"]["step"] == 2 and meta["init_from"]["fresh"] == []
    assert meta["init_from"]["file_sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert meta["plan"][0]["steps"] == 0 and "edit_psnr" in meta["chunks"][-1]  # straight into the latent stage
    # the latent stage leaves the VAE alone: it is the one warm-started from
    torch.testing.assert_close(tensors["w.vae.encoder.layers.0.weight"], old["w.vae.encoder.layers.0.weight"])


def test_warm_start_zeroes_the_new_branches(train_mini, tmp_path):
    """--init-from across a U-Net config change (self-attention added in the up path, as NOTES 34
    tried and NOTES 36 undid): what matches is copied, and each added
    residual branch's last layer starts at zero."""
    cfg, tok = model_config("mini"), mini.build_mini_tokenizer()
    removed = {**cfg.unet, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpRemoveSelfAttnBlock2DV1", "UpBlock2D"]}
    old = train_mini.Mini(dataclasses.replace(cfg, unet=removed), tok, 0, torch.device("cpu"))
    path = tmp_path / "old.safetensors"
    ckpt.save_checkpoint(path, old.modules, None, {}, {"step": 7, "config_sha256": "old"})
    new = train_mini.Mini(dataclasses.replace(cfg, unet={**cfg.unet, "up_block_types": ["CrossAttnUpBlock2D"] * 3}),
                          tok, 1, torch.device("cpu"))  # fmt: skip
    rec = train_mini.warm_start(new, path)
    assert rec["step"] == 7 and rec["copied"]["vae"] == len(new.vae.state_dict())
    assert rec["copied"]["text_encoder"] == len(new.te.state_dict())
    branch = "unet.up_blocks.{}.attentions.{}.transformer_blocks.0.attn1.to_out.0.{}"
    expect = {branch.format(b, a, w) for b in (1, 2) for a in (0, 1) for w in ("weight", "bias")}
    expect |= {f"unet.up_blocks.2.attentions.{a}.proj_out.{w}" for a in (0, 1) for w in ("weight", "bias")}
    assert set(rec["zeroed"]) == expect
    assert all(not new.unet.get_parameter(n.split(".", 1)[1]).any() for n in expect)
    torch.testing.assert_close(new.unet.conv_in.weight, old.unet.conv_in.weight.half().float(), rtol=0, atol=0)


def test_train_resume_export_load(train_mini, tmp_path, one_thread, monkeypatch, capsys):
    """Two steps, a checkpoint, a resume through the end of all three stages (a mid-stage resume
    restores the optimiser), an export in diffusers layout that load_stack reads as `mini`. On
    three made-up crops: a fresh clone (CI) has no prepared .data/."""
    from stylize.train import data as train_data
    from tests.test_data import _fake_prepared

    crops, manifest = _fake_prepared(tmp_path)
    real_stills, real_items = train_data.load_stills, train_data.train_items
    monkeypatch.setattr(train_data, "load_stills", lambda *a, **k: real_stills(crops, manifest, tmp_path / "train.txt"))
    monkeypatch.setattr(train_data, "train_items", lambda *a, **k: real_items(manifest, tmp_path / "train.txt"))
    common = ["--device", "cpu", "--size", "64", "--batch", "3", "--styles", "sketch,pixel-art,anime",
              "--plan", "vae=3,latent=1,pixels=1", "--commit", "test"]  # fmt: skip
    out = tmp_path / "ckpt.safetensors"
    assert train_mini.main([*common, "--steps", "2", "--out", str(out)]) == 0
    _, meta = ckpt.load_checkpoint(out)
    assert meta["step"] == 2 and meta["stage"] == 0 and meta["stage_step"] == 2
    assert out.stat().st_size <= ckpt.CHECKPOINT_BUDGET
    assert train_mini.main([*common, "--resume", str(out), "--out", str(out)]) == 0
    _, meta = ckpt.load_checkpoint(out)
    assert meta["step"] == 5 and [c["end"] for c in meta["chunks"]] == [2, 5]
    assert meta["data"]["ids"] and meta["seed"] == 0 and meta["chunks"][0]["commit"] == "test"
    held_out = meta["chunks"][-1]["edit_psnr"]  # the U-Net stages' held-out edit against the teachers
    assert set(held_out) == {"mean", "sketch", "pixel-art"} and all(np.isfinite(v) for v in held_out.values())
    assert "edit_psnr" not in meta["chunks"][0]  # the vae stage has no edit yet
    capsys.readouterr()
    assert train_mini.main([*common, "--resume", str(out), "--eval"]) == 0  # the same figures, on demand
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the same figures from the checkpoint's fp16 weights (training measured its fp32 ones)
    assert line["step"] == 5 and line["edit_psnr_256"] == pytest.approx(held_out, abs=0.05)

    folder = tmp_path / "mini"
    assert train_mini.main([*common, "--resume", str(out), "--export", str(folder)]) == 0
    assert mini.weights_bytes(folder) <= mini.FP16_BUDGET_BYTES
    assert not list(folder.rglob("*.bin")) and json.loads((folder / "mini.json").read_text())["step"] == 5
    notice = (folder / "NOTICE.md").read_text()  # every training still's author and licence
    for it in train_data.train_items():
        assert f"| {it['id']} | {it.get('author') or 'unknown'} |" in notice and it["licence"] in notice
    # every file of the export is package data, so a wheel built with weights in place ships them
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["stylize"]
    for f in folder.rglob("*"):
        if f.is_file():
            shipped = f"weights/mini/{f.relative_to(folder).as_posix()}"
            assert any(fnmatch.fnmatchcase(shipped, pat) for pat in patterns), shipped
    stack = load_stack(dataclasses.replace(model_config("mini"), source=str(folder)))
    tensors, _ = ckpt.load_checkpoint(out)
    torch.testing.assert_close(stack.unet.conv_in.weight, tensors["w.unet.conv_in.weight"].float(), rtol=0, atol=0)

    from stylize.reference import ReferenceStylizer

    frames = np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    styled = ReferenceStylizer(stack, PipelineConfig(prompt="make it pixel art", size=64, batch_size=2)).stylize(frames)
    assert styled.shape == frames.shape and styled.dtype == np.uint8


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image (the train extra) is absent")
def test_stored_style_vectors_match_scikit_image():
    """style_vectors.json (what the GPU machine uses, without scikit-image) is the predictor's output."""
    stored = json.loads(mini_data.STYLE_VECTORS.read_text())
    fresh = mini_data.make_style_vectors(["gravel"])
    assert fresh["gravel"]["pixels_sha256"] == stored["gravel"]["pixels_sha256"]
    np.testing.assert_allclose(fresh["gravel"]["vector"], stored["gravel"]["vector"], rtol=0, atol=1e-6)


def test_how_mini_is_run_does_not_change_its_identity(train_mini):
    """A checkpoint is matched to the model by the config's hash: the fields that say how it is
    run (its CPU size, threads, the styles the CLI lets through) are not part of it, so adding or
    changing them keeps checkpoints and shipped weights valid."""
    cfg = model_config("mini")
    same = dataclasses.replace(cfg, cpu_size=999, cpu_threads=7, styles=["oil"])
    assert train_mini.config_sha(cfg) == train_mini.config_sha(same)
    assert train_mini.config_sha(cfg) != train_mini.config_sha(dataclasses.replace(cfg, te_image_size=64))


def test_a_resume_may_replan_only_the_stages_still_to_come(train_mini):
    """Once the first stages' measured rates are known, the later stages' steps may change on a
    resume (`--plan`); a stage that has started may not."""
    plan = [dataclasses.asdict(s) for s in train_mini.plan_with("vae=100,latent=200,pixels=50", None, None)]
    longer_latent = [dataclasses.asdict(s) for s in train_mini.plan_with("vae=100,latent=900,pixels=50", None, None)]
    longer_vae = [dataclasses.asdict(s) for s in train_mini.plan_with("vae=400,latent=200,pixels=50", None, None)]
    assert train_mini.replans(plan, longer_latent, step=60)  # in the vae stage: latent has not started
    assert train_mini.replans(plan, longer_latent, step=100)  # latent's first step is still to come
    assert not train_mini.replans(plan, longer_latent, step=101)
    assert not train_mini.replans(plan, longer_vae, step=60)
    assert not train_mini.replans(plan, plan[:2], step=10)


def test_reused_samples_are_those_of_the_steps_before_and_a_resume_makes_them_again():
    """`Stage.reuse`: a step makes 1/reuse of its batch anew and trains on it with the samples of
    the reuse - 1 steps before it in its side period; a run resumed mid-way sees the same batch."""
    from stylize.train.mini_steps import Batches, Stage

    rng = np.random.default_rng(0)
    stills = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(3)]
    plan = (Stage("latent", 12, 8, 1e-3, ("unet",), sizes=(32, 64), warmup=1, reuse=4, side_every=6),)
    styles = ["sketch", "pixel-art"]
    run = Batches(stills, styles, plan, 0, torch.device("cpu"), workers=0, ahead=2)
    got = [run.get(s, 12) for s in range(12)]
    for s, (p, x, y) in enumerate(got):
        period = s - s % 6
        new = -(-mini_data.batch_for(p.side, 8) // 4)
        assert p.side == got[period][0].side and x.shape == y.shape == (len(p.styles), 3, p.side, p.side)
        assert len(p.styles) == new * min(4, s - period + 1)  # fewer just after a side change
        if s > period:  # the step before's samples, then the new ones
            before = got[s - 1][1]
            keep = len(p.styles) - new
            torch.testing.assert_close(x[:keep], before[-keep:], rtol=0, atol=0)
    assert {got[0][0].side, got[6][0].side} <= {32, 64}
    assert len(run.made) <= 4  # only the window is held
    resumed = Batches(stills, styles, plan, 0, torch.device("cpu"), workers=0, ahead=2)
    p, x, y = resumed.get(9, 12)
    assert p.prompts == got[9][0].prompts
    torch.testing.assert_close(x, got[9][1], rtol=0, atol=0)
    torch.testing.assert_close(y, got[9][2], rtol=0, atol=0)


def test_source_start_trains_the_change_from_the_frames_own_latent(train_mini, monkeypatch):
    """`start: source` (mini, NOTES 36): the flow runs from the crop's latent to the teacher's, so
    with a zero velocity the latent loss is |E(crop) - E(teacher)|^2 and the edit is the crop's
    round trip, whatever the generator; from noise the loss depends on the draw."""
    from stylize.train import mini_steps

    cfg, tok = model_config("mini"), mini.build_mini_tokenizer()
    assert cfg.start == "source"
    m = train_mini.Mini(cfg, tok, 0, torch.device("cpu"))
    monkeypatch.setattr(mini_steps, "velocity", lambda unet, x, *a, **k: torch.zeros_like(x))
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    plan = types.SimpleNamespace(prompts=[mini.style_prompts("oil")[0]] * 2)
    stage = mini_steps.Stage("latent", 10, 2, 1e-4, ("unet",))
    with torch.no_grad():
        want = (mini_steps.encode01(m.vae, x) - mini_steps.encode01(m.vae, y)).square().mean()
        for seed in (1, 2):
            got = mini_steps.step_loss(stage, m, plan, x, y, torch.Generator().manual_seed(seed))["loss"]
            torch.testing.assert_close(got, want)
        edit = mini_steps.edit01(m, plan, x, torch.Generator().manual_seed(3))
        torch.testing.assert_close(edit, mini_steps.decode01(m.vae, mini_steps.encode01(m.vae, x)).clamp(0, 1))
        m.cfg = dataclasses.replace(cfg, start="noise")
        a, b = (mini_steps.step_loss(stage, m, plan, x, y, torch.Generator().manual_seed(s))["loss"] for s in (1, 2))
        assert not torch.equal(a, b)
