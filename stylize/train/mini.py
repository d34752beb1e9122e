"""`mini` (issue #13): its styles, its tokenizer, building its components and saving them.

    tok = build_mini_tokenizer()                         # byte-level BPE on mini's prompts + aliases
    unet, vae, te = build_mini_components(model_config("mini"), tok, seed=0)   # random-initialised
    save_mini(folder, unet, vae, te, tok, meta)           # diffusers layout, fp16 safetensors

`mini` is the full stack's classes at small sizes (stylize/presets/models/mini.yaml): one model for
every style preset that has a teacher, the style chosen by the prompt its Qwen3-VL reads beside the
frame. Its weights come only from GPU training (scripts/train_mini.py) and ship in the package
under stylize/weights/mini/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.loading import DEFAULT_SCHEDULER, QWEN_SPECIAL_TOKENS


def mini_styles() -> list[str]:
    """The style presets mini learns: every one with a teacher, in name order."""
    from ..config import list_presets, style_config

    return [name for name in list_presets("styles") if style_config(name).teacher]


def style_prompts(style: str) -> list[str]:
    """The prompts a training sample of `style` may carry: the preset's prompt first, then its
    aliases (the preset's `aliases:`)."""
    from ..config import style_config

    preset = style_config(style)
    return [preset.prompt, *preset.aliases]


def tokenizer_corpus() -> list[str]:
    """What mini's tokenizer is trained on: every prompt and alias of every style in DreamLite's
    edit template (so the template's own words are whole tokens too)."""
    from ..models.text_encoder import EDIT_TEMPLATE, decorate

    prompts = [p for style in mini_styles() for p in style_prompts(style)]
    return [EDIT_TEMPLATE.format(decorate(p)) for p in prompts]


def build_mini_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE (any text still tokenizes, byte by byte at worst) trained offline on
    `tokenizer_corpus()`, with Qwen's special tokens, wrapped as the stock Qwen2 tokenizer class
    (as `stylize.models.loading.build_tokenizer` makes the stand-in). Deterministic: the same
    presets and aliases give the same vocabulary."""
    from ..models.loading import train_bpe_tokenizer

    return train_bpe_tokenizer(tokenizer_corpus(), vocab_size - len(QWEN_SPECIAL_TOKENS))


def text_encoder_config(cfg, tokenizer):
    """The Qwen3VLConfig of the preset's `text_encoder:` sizes, with the tokenizer's vocabulary
    and special-token ids."""
    from transformers import Qwen3VLConfig

    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    ]}  # fmt: skip
    kwargs = json.loads(json.dumps(cfg.text_encoder))  # a deep copy
    kwargs.setdefault("text_config", {})["vocab_size"] = len(tokenizer)
    kwargs["text_config"]["pad_token_id"] = tokenizer.pad_token_id
    return Qwen3VLConfig(**kwargs, **ids)


def build_mini_components(cfg, tokenizer, seed: int = 0, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32):  # fmt: skip
    """(unet, vae, text_encoder as Qwen3VLForConditionalGeneration) at the preset's sizes,
    random-initialised from `seed`."""
    from diffusers import AutoencoderTiny, DreamLiteUNetModel
    from transformers import Qwen3VLForConditionalGeneration

    te_config = text_encoder_config(cfg, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        unet, vae = DreamLiteUNetModel(**cfg.unet), AutoencoderTiny(**cfg.vae)
        te = Qwen3VLForConditionalGeneration(te_config)
    if dtype != torch.float32:
        unet, vae, te = unet.to(dtype), vae.to(dtype), te.to(dtype)
    return unet, vae, te


def unique_parameters(module: torch.nn.Module) -> int:
    """Parameters stored once (tied weights, such as Qwen's embedding and lm_head, count once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def sizes(unet, vae, te) -> dict[str, Any]:
    """Parameter counts per component and what the weights take in fp16 (2 bytes each)."""
    counts = {
        "unet": unique_parameters(unet),
        "vae_encoder": unique_parameters(vae.encoder),
        "vae_decoder": unique_parameters(vae.decoder),
        "text_encoder_language": unique_parameters(te.model.language_model),
        "text_encoder_vision": unique_parameters(te.model.visual),
    }
    total = sum(counts.values())
    return {"params": counts, "total_params": total, "fp16_mb": round(total * 2 / 1e6, 2)}


FP16_BUDGET_BYTES = 20_000_000  # issue #13: the shipped weights, all of them, in fp16


def save_mini(folder: str | Path, unet, vae, te, tokenizer, meta: dict[str, Any] | None = None,
              dtype: torch.dtype = torch.float16) -> Path:  # fmt: skip
    """Write a loadable stack in diffusers layout (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/), weights as `dtype` safetensors only, `meta` (seed, steps, data, commit, ...) as
    mini.json beside them. Modules are copied, never cast in place."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        copy.deepcopy(module).to("cpu", dtype).save_pretrained(folder / name, safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER).save_pretrained(folder / "scheduler")
    if meta is not None:
        (folder / "mini.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return folder


def weights_bytes(folder: str | Path) -> int:
    """Bytes of every .safetensors file under `folder` (what the budget counts)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def prompt_positions(text_encoder, tokens) -> torch.Tensor | None:
    """The positions (P, 1, L) that the language model receives for one prompt with one frame
    (Qwen3-VL's M-RoPE rows), read off a stock call, as fast_te reads its static parts, so that
    any transformers version's layout comes back as it went in. Passed to `encode_prompts`, they
    spare each step the stock per-sample rope-index loop."""
    vision = text_encoder.config.vision_config
    side = vision.patch_size * vision.spatial_merge_size * round(int(tokens.mm_token_type_ids.sum()) ** 0.5)  # square
    captured: list[torch.Tensor] = []
    hook = text_encoder.language_model.register_forward_pre_hook(
        lambda m, a, kw: captured.append(kw.get("position_ids")), with_kwargs=True
    )
    try:
        with torch.no_grad():
            frame = torch.zeros(1, 3, side, side, device=text_encoder.device)
            encode_prompts(text_encoder, [tokens], frame)
    finally:
        hook.remove()
    return None if captured[-1] is None else captured[-1].detach()  # None: this version did not pass them


def encode_prompts(text_encoder, tokens: list, frames_bchw: torch.Tensor, hidden_states: str = "post_norm",
                   positions: list[torch.Tensor] | None = None):  # fmt: skip
    """`text_encoder.encode` for a batch whose frames each carry their own prompt (training mixes
    styles in a batch): the token ids right-padded to one length and masked. Attention is causal,
    so the real tokens never see the padding and each row equals `encode` of its own prompt (a
    test checks). tokens: one PromptTokens per frame, all of one prefix and fixed length; frames
    (B, 3, S, S) float in [0, 1] at the encoder's image size; positions: each prompt's
    `prompt_positions` (None: the stock call computes them). Returns (states (B, max_len, hidden),
    mask (B, max_len) int64) as `encode` does."""
    from ..models.text_encoder import patchify

    prefix, max_len = tokens[0].prefix_len, tokens[0].max_len
    assert all(t.prefix_len == prefix and t.max_len == max_len for t in tokens), "one template, one fixed length"
    cfg = text_encoder.config
    vision = cfg.vision_config
    b, _, size, _ = frames_bchw.shape
    device = frames_bchw.device
    lengths = torch.tensor([t.input_ids.numel() for t in tokens])
    longest = int(lengths.max())
    pad_id = cfg.text_config.pad_token_id or 0
    input_ids = torch.full((b, longest), pad_id, dtype=torch.long)
    mm = torch.zeros((b, longest), dtype=torch.long)
    for i, t in enumerate(tokens):
        input_ids[i, : t.input_ids.numel()] = t.input_ids
        mm[i, : t.input_ids.numel()] = t.mm_token_type_ids
    attention = (torch.arange(longest)[None] < lengths[:, None]).long()
    grid = size // vision.patch_size
    pixel_values = patchify(
        frames_bchw.float(), vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    )
    extra = {}
    if positions is not None and all(
        p is not None for p in positions
    ):  # (P, 1, L_i) each -> (P, B, longest); the padding's positions are masked out
        extra["position_ids"] = torch.cat([F.pad(p, (0, longest - p.shape[-1])) for p in positions], dim=1).to(device)
    captured: list[torch.Tensor] = []
    hook = None
    if hidden_states == "pre_norm":  # the final norm's input, as text_encoder.encode takes it
        hook = text_encoder.language_model.norm.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    try:
        out = text_encoder(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False,
            pixel_values=pixel_values.to(text_encoder.dtype),
            image_grid_thw=torch.tensor([[1, grid, grid]] * b, device=device),
            mm_token_type_ids=mm.to(device), **extra,
        )  # fmt: skip
    finally:
        if hook is not None:
            hook.remove()
    states = captured[-1] if hook is not None else out.last_hidden_state  # (B, longest, hidden)
    kept = states[:, prefix : prefix + max_len]
    kept = F.pad(kept, (0, 0, 0, max_len - kept.shape[1]))  # (B, max_len, hidden)
    mask = (torch.arange(max_len)[None] < (lengths - prefix)[:, None]).long().to(device)
    return kept * mask[..., None].to(kept.dtype), mask
