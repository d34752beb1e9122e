"""The instruction encoder: DreamLite's edit template through Qwen3-VL (DESIGN §3, steps 1-2).

Inputs are built directly (no Qwen3VLProcessor, which wants torchvision): the prompt's token ids
are constant for a clip, and the frame's pixel values are patchified in torch exactly as the
stock Qwen2-VL image processor does, so the same code runs on the GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UsageError

# DreamLite's edit chat template and prompt decoration (diffusers pipeline_dreamlite_mobile.py).
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, "
    "texture, objects, background), then explain how the user's text instruction should alter "
    "or modify the image. Generate a new image that meets the user's requirements while maintaining "
    "consistency with the original input where appropriate.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_DECORATION = (
    "[Edit]: A diptych with two side-by-side images of the same scene. "
    "Compared to the right side, the left one has {}"
)
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # Qwen3-VL's image normalisation


def decorate(prompt: str) -> str:
    return EDIT_DECORATION.format(prompt)


def static_prefix(template: str = EDIT_TEMPLATE) -> str:
    """The part of the template that is the same for every frame and prompt and is dropped from
    the states: the system turn and the user header, up to the vision placeholder."""
    return template[: template.index("<|vision_start|>")]


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of one decorated prompt in the edit template, image placeholder expanded.

    input_ids: (L,) int64; mm_token_type_ids: (L,) 1 at image tokens, else 0;
    prefix_len: tokens of the static prefix (64 with Qwen's real vocabulary);
    max_len: the fixed length of the states after the prefix drop.
    """

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    prefix_len: int
    max_len: int

    @property
    def kept_len(self) -> int:
        return self.input_ids.numel() - self.prefix_len


def tokenize_prompt(tokenizer, te_config, prompt: str, te_image_size: int, prompt_max_tokens: int) -> PromptTokens:
    """Tokenize `prompt` once for a clip. The kept states have a fixed length: the image tokens
    with their two delimiters, then room for `prompt_max_tokens` instruction tokens."""
    vision = te_config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    if te_image_size % factor:
        raise UsageError(f"the text encoder's image size must be a multiple of {factor}, not {te_image_size}")
    n_image = (te_image_size // factor) ** 2
    text = EDIT_TEMPLATE.format(decorate(prompt)).replace("<|image_pad|>", "<|image_pad|>" * n_image)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    prefix_len = len(tokenizer(static_prefix(), add_special_tokens=False)["input_ids"])
    max_len = n_image + 2 + prompt_max_tokens
    if ids.numel() - prefix_len > max_len:
        raise UsageError(
            f"the prompt is too long: {ids.numel() - prefix_len - n_image - 2} tokens with the template, "
            f"{prompt_max_tokens} fit; shorten it"
        )
    mm = (ids == te_config.image_token_id).long()
    return PromptTokens(ids, mm, prefix_len, max_len)


def patchify(frames_bchw: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """Pixel values for Qwen-VL from square frames (B, 3, S, S) float in [0, 1], already at the
    encoder's image size. Returns (B·gh·gw, 3·temporal·patch²) in the stock image processor's
    layout: normalised, patches grouped by merge window, each image repeated `temporal` times.
    Capture-safe: the normalisation constants are Python numbers in the kernels, no tensor is made
    from host data inside the call (a CUDA graph capture would fail on that copy)."""
    b, c, h, w = frames_bchw.shape
    x = torch.stack([(frames_bchw[:, i] - m) / s for i, (m, s) in enumerate(zip(IMAGE_MEAN, IMAGE_STD))], dim=1)
    gh, gw = h // patch, w // patch
    x = x.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, m, m, C, P, P)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)  # (..., C, T, P, P)
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


@contextlib.contextmanager
def _capture_input(module: torch.nn.Module, into: list):
    """Record the input of `module` (the final norm: its input is the pre-norm hidden states)."""
    handle = module.register_forward_hook(lambda mod, args, out: into.append(args[0]))
    try:
        yield
    finally:
        handle.remove()


def encode(
    text_encoder,
    tokens: PromptTokens,
    frames_bchw: torch.Tensor,
    hidden_states: str = "post_norm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run Qwen3-VL on B frames (float in [0, 1], square at the encoder's image size) with one
    prompt. Returns (states (B, max_len, hidden) in the model's dtype, mask (B, max_len) int64):
    the last layer's states (pre- or post-final-norm) with the static prefix dropped, zero-padded
    to the fixed length; the mask marks the real tokens."""
    cfg = text_encoder.config
    vision = cfg.vision_config
    b, _, size, _ = frames_bchw.shape
    device = frames_bchw.device
    grid = size // vision.patch_size
    pixel_values = patchify(frames_bchw.float(), vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    input_ids = tokens.input_ids.to(device).expand(b, -1)
    states = _last_states(
        text_encoder, hidden_states, input_ids=input_ids,
        pixel_values=pixel_values.to(text_encoder.dtype),
        image_grid_thw=torch.tensor([[1, grid, grid]] * b, device=device),
        mm_token_type_ids=tokens.mm_token_type_ids.to(device).expand(b, -1),
    )  # fmt: skip
    return _fixed_length(states[:, tokens.prefix_len :], tokens.max_len)


def _last_states(text_encoder, hidden_states: str, input_ids: torch.Tensor, **inputs) -> torch.Tensor:
    """The last layer's states (B, L, hidden) of one stock call, before or after the final norm."""
    captured: list[torch.Tensor] = []
    capture = (
        _capture_input(text_encoder.language_model.norm, captured)
        if hidden_states == "pre_norm"
        else contextlib.nullcontext()
    )
    with capture:
        out = text_encoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False, **inputs)
    return captured[-1] if hidden_states == "pre_norm" else out.last_hidden_state


def _fixed_length(kept: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the kept states (B, n, hidden) to (B, max_len, hidden); the mask marks the n."""
    b, n = kept.shape[:2]
    mask = torch.zeros(b, max_len, dtype=torch.long, device=kept.device)
    mask[:, :n] = 1
    return F.pad(kept, (0, 0, 0, max_len - n)), mask


def encode_text_only(text_encoder, tokenizer, prompt: str, max_len: int, hidden_states: str = "post_norm"):
    """The static-prompt mode: the decorated instruction without the frame, encoded once.
    Returns (states (1, max_len, hidden), mask (1, max_len)) laid out as `encode`'s."""
    template = EDIT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "")
    ids = tokenizer(template.format(decorate(prompt)), add_special_tokens=False)["input_ids"]
    prefix_len = len(tokenizer(static_prefix(), add_special_tokens=False)["input_ids"])
    states = _last_states(text_encoder, hidden_states, torch.tensor([ids], device=text_encoder.device))
    return _fixed_length(states[:, prefix_len:][:, :max_len], max_len)
