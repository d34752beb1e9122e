"""The reference pipeline: parity with diffusers' DreamLiteMobilePipeline, and its own contracts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stylize.config import PipelineConfig
from stylize.models.text_encoder import encode, patchify, static_prefix, tokenize_prompt
from stylize.reference import ReferenceStylizer, geometry

PROMPT = "transfer this to oil painting style, vibrant colors"


class ImageOnlyProcessor:
    """The image half of Qwen3VLProcessor (whose video half needs torchvision): the stock image
    processor plus the tokenizer, returning every output the model needs."""

    def __init__(self, image_processor, tokenizer, image_token_id):
        self.image_processor, self.tokenizer, self.image_token_id = image_processor, tokenizer, image_token_id

    def __call__(self, text, images, padding=True, return_tensors="pt"):
        from transformers import BatchFeature

        img = self.image_processor(images=images, return_tensors=return_tensors)
        merge = self.image_processor.merge_size**2
        texts = [
            t.replace("<|image_pad|>", "<|image_pad|>" * (int(g.prod()) // merge))
            for t, g in zip(text, img["image_grid_thw"])
        ]
        tok = self.tokenizer(texts, padding=padding, return_tensors=return_tensors)
        mm = (tok["input_ids"] == self.image_token_id).long()
        return BatchFeature({**tok, **img, "mm_token_type_ids": mm})


def _stock_image_processor():
    import transformers

    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return cls(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": 32 * 32, "longest_edge": 4096 * 4096},
    )  # fmt: skip


def _frames(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    # smooth-ish content so resizes are meaningful
    base = rng.integers(0, 256, size=(n, h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)[:, :h, :w])


@pytest.mark.parametrize("steps", [1, 4])
def test_parity_with_stock_dreamlite_pipeline(tiny_dir, tiny_cfg, steps):
    """Our edit semantics are DreamLite's: with the TE image size 512, the prefix start index set
    to our tokenizer's prefix length and noise from a CPU generator, as the stock pipeline does,
    our output for a frame equals diffusers' DreamLiteMobilePipeline's."""
    from diffusers import AutoencoderTiny, DreamLiteMobilePipeline, DreamLiteUNetModel, FlowMatchEulerDiscreteScheduler
    from PIL import Image
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from stylize.models import load_stack

    te_full = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir / "text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    pipe = DreamLiteMobilePipeline(
        text_encoder=te_full,
        tokenizer=tok,
        processor=ImageOnlyProcessor(_stock_image_processor(), tok, te_full.config.image_token_id),
        vae=AutoencoderTiny.from_pretrained(tiny_dir / "vae"),
        unet=DreamLiteUNetModel.from_pretrained(tiny_dir / "unet"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_dir / "scheduler"),
    )
    pipe.set_progress_bar_config(disable=True)

    stack = load_stack(dataclasses.replace(tiny_cfg, te_image_size=512), "cpu")
    ours = ReferenceStylizer(stack, PipelineConfig(prompt=PROMPT, steps=steps, size=512, batch_size=1, seed=7))
    pipe.prompt_template_encode_edit_start_idx = ours.tokens.prefix_len

    frame = _frames(1, 512, 512)
    x01 = torch.from_numpy(frame).permute(0, 3, 1, 2).float() / 255
    for output_type, ours_fn in (("latent", ours.denoise), ("pt", ours.stylize_tensor)):
        stock = pipe(
            prompt=PROMPT, image=Image.fromarray(frame[0]), num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(7), output_type=output_type,
        ).images  # latents (1, 4, 64, 64), or RGB (1, 3, 512, 512) in [0, 1]  # fmt: skip
        ours.reset()
        mine = ours_fn(x01)
        assert mine.shape == stock.shape
        assert stock.std() > 0.01  # a real signal, not a clamped constant
        torch.testing.assert_close(mine, stock, rtol=0, atol=2e-5 * max(1.0, stock.abs().max().item()))


def test_patchify_matches_stock_image_processor():
    from PIL import Image

    frame = _frames(2, 64, 64)
    stock = _stock_image_processor()(images=[Image.fromarray(f) for f in frame], return_tensors="pt")
    x01 = torch.from_numpy(frame).permute(0, 3, 1, 2).float() / 255
    mine = patchify(x01, patch=16, merge=2, temporal=2)
    torch.testing.assert_close(mine, stock["pixel_values"].float(), rtol=0, atol=1e-6)
    assert stock["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]


def test_prefix_drop(tiny_stack):
    tok = tiny_stack.tokenizer
    tokens = tokenize_prompt(tok, tiny_stack.text_encoder.config, PROMPT, 64, 64)
    prefix_ids = tok(static_prefix(), add_special_tokens=False)["input_ids"]
    assert tokens.prefix_len == len(prefix_ids)
    assert tokens.input_ids[: tokens.prefix_len].tolist() == prefix_ids  # the prefix is a true prefix
    assert tokens.input_ids[tokens.prefix_len].item() == tok.convert_tokens_to_ids("<|vision_start|>")
    assert int(tokens.mm_token_type_ids.sum()) == (64 // 32) ** 2

    x01 = torch.rand(2, 3, 64, 64)
    states, mask = encode(tiny_stack.text_encoder, tokens, x01)
    assert states.shape == (2, tokens.max_len, tiny_stack.text_encoder.config.text_config.hidden_size)
    assert mask.sum(1).tolist() == [tokens.kept_len] * 2
    assert torch.all(states[:, tokens.kept_len :] == 0)
    # The kept states are the full sequence's states after the prefix.
    full = _direct_call(tiny_stack.text_encoder, tokens, x01).last_hidden_state
    torch.testing.assert_close(states[:, : tokens.kept_len], full[:, tokens.prefix_len :])


def _direct_call(te, tokens, x01, **kw):
    b = x01.shape[0]
    return te(
        input_ids=tokens.input_ids.expand(b, -1),
        attention_mask=torch.ones(b, tokens.input_ids.numel(), dtype=torch.long),
        pixel_values=patchify(x01, 16, 2, 2),
        image_grid_thw=torch.tensor([[1, 4, 4]] * b),
        mm_token_type_ids=tokens.mm_token_type_ids.expand(b, -1),
        **kw,
    )


def test_norm_switch(tiny_stack):
    """pre_norm and post_norm differ, and each equals a direct computation: post is the model's
    last_hidden_state, pre is what the final RMSNorm receives (norm(pre) == post)."""
    te = tiny_stack.text_encoder
    tokens = tokenize_prompt(tiny_stack.tokenizer, te.config, PROMPT, 64, 64)
    x01 = torch.rand(1, 3, 64, 64)
    post, _ = encode(te, tokens, x01, "post_norm")
    pre, _ = encode(te, tokens, x01, "pre_norm")
    n = tokens.kept_len
    assert not torch.allclose(pre[:, :n], post[:, :n])
    direct = _direct_call(te, tokens, x01)
    torch.testing.assert_close(post[:, :n], direct.last_hidden_state[:, tokens.prefix_len :])
    torch.testing.assert_close(te.language_model.norm(pre[:, :n]), post[:, :n])
    # pre-norm equals the last decoder layer's output: the same model with the final norm removed
    norm = te.language_model.norm
    try:
        te.language_model.norm = torch.nn.Identity()
        last_layer = _direct_call(te, tokens, x01).last_hidden_state
    finally:
        te.language_model.norm = norm
    torch.testing.assert_close(pre[:, :n], last_layer[:, tokens.prefix_len :])


def test_partial_batches_keep_every_frame(tiny_stack):
    """5 frames at batch size 4: one full batch and one padded; every frame comes back once, and
    each equals the frame stylized on its own (fixed noise, batch-independent math)."""
    frames = _frames(5, 64, 64, seed=3)
    batched = ReferenceStylizer(tiny_stack, PipelineConfig(prompt=PROMPT, size=64, batch_size=4)).stylize(frames)
    single = ReferenceStylizer(tiny_stack, PipelineConfig(prompt=PROMPT, size=64, batch_size=1)).stylize(frames)
    assert batched.shape == frames.shape and batched.dtype == np.uint8
    assert np.abs(batched.astype(int) - single.astype(int)).max() <= 1
    # distinct inputs give distinct outputs: nothing was duplicated or shifted
    assert not np.array_equal(batched[3], batched[4])


@pytest.mark.parametrize(
    "hw,crop,out_hw",
    [((37, 53), "none", (37, 53)), ((96, 54), "none", (96, 54)), ((48, 80), "center", (48, 48)), ((64, 64), "none", (64, 64))],
)
def test_resolution_round_trip(tiny_stack, hw, crop, out_hw):
    s = ReferenceStylizer(tiny_stack, PipelineConfig(prompt=PROMPT, size=64, batch_size=2, crop=crop))
    out = s.stylize(_frames(2, *hw))
    assert out.shape == (2, *out_hw, 3)


def test_geometry_keeps_aspect_and_rounds():
    g = geometry((480, 854), 512, 32)
    assert g.work_hw == (288, 512) and g.out_hw == (480, 854)
    g = geometry((960, 540), 512, 32)
    assert g.work_hw == (512, 288)
    g = geometry((718, 718), 512, 32)
    assert g.work_hw == (512, 512)
    g = geometry((480, 854), 512, 32, "center")
    assert g.work_hw == (512, 512) and g.crop == (0, 187, 480) and g.out_hw == (480, 480)
    for h, w in [(37, 53), (1080, 1920), (5, 400)]:
        wh, ww = geometry((h, w), 512, 32).work_hw
        assert wh % 32 == 0 and ww % 32 == 0 and wh >= 32 and ww >= 32


def test_steps_and_noise_modes(tiny_stack):
    frames = _frames(2, 64, 64)
    outs = {}
    for steps in (1, 2, 4):
        outs[steps] = ReferenceStylizer(tiny_stack, PipelineConfig(prompt=PROMPT, size=64, steps=steps)).stylize(frames)
    assert not np.array_equal(outs[1], outs[4])
    # the same seed gives the same output; reset() restarts the clip's noise
    s = ReferenceStylizer(tiny_stack, PipelineConfig(prompt=PROMPT, size=64, fixed_noise=False))
    a = s.stylize(frames)
    b = s.stylize(frames)
    s.reset()
    c = s.stylize(frames)
    assert np.array_equal(a, c) and not np.array_equal(a, b)


def test_patchify_makes_no_tensor_from_host_data():
    """Inside a CUDA graph capture nothing may be copied from the host: patchify's normalisation
    constants used to be made with new_tensor on every call (issue #14's first capture blocker)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from stylize.models.text_encoder import patchify

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        patchify(torch.rand(2, 3, 64, 64), 16, 2, 2)
    assert not [n for n in ops.names if "lift_fresh" in n or "_to_copy" in n], ops.names


def test_a_frames_noise_depends_only_on_the_seed_and_its_index(tiny_stack):
    """Per-frame noise (#17): the frames from 4 on, stylized as a clip that starts there, equal
    the whole clip's, engine and reference alike; frame 0's noise is the seed's own draw."""
    from stylize.config import EngineConfig
    from stylize.engine import Engine
    from stylize.reference import draw_noise, frame_seed
    from stylize.video import FrameBatch

    cfg = PipelineConfig(prompt=PROMPT, size=64, batch_size=2, fixed_noise=False)
    frames = _frames(8, 48, 64, seed=3)
    ref = ReferenceStylizer(tiny_stack, cfg)
    whole = ref.stylize(frames)
    ref.reset(first_frame=4)
    assert np.array_equal(ref.stylize(frames[4:]), whole[4:])
    engine = Engine(tiny_stack, cfg, EngineConfig(scene_cut=0))
    engine.reset(first_frame=4)
    got = [*engine.feed(FrameBatch(frames[4:6], [4, 5], [0.0] * 2)), *engine.feed(FrameBatch(frames[6:], [6, 7], [0.0] * 2))]
    assert np.array_equal(np.concatenate([b.frames for b in [*got, *engine.flush()]]), whole[4:])
    engine.close()
    x = draw_noise(torch.Generator(), {}, False, 7, 0, 1, tiny_stack, (4, 4))
    assert torch.equal(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(7)))
    assert len({frame_seed(7, i) % 2**32 for i in range(1000)}) == 1000
