"""Loading the model stack: real weights (local folder or hub id), random full size, or tiny.

All three build the same stock classes (DESIGN §2): diffusers `DreamLiteUNetModel` and
`AutoencoderTiny`, transformers `Qwen3VLModel` (the base model: `lm_head` never runs) with its
tokenizer. Weights are safetensors only and `trust_remote_code` is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import WEIGHT_FILES, ModelConfig, missing_weights, packaged_folder
from ..errors import ModelError

log = logging.getLogger(__name__)

# The scheduler DreamLite ships (FlowMatch Euler with resolution-dependent shift); used when a
# weights folder has no scheduler/ of its own.
DEFAULT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.16,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


@dataclass
class ModelStack:
    """The loaded components, on one device. Plain modules: compile, streams and dtype policy live
    in the engine."""

    unet: Any  # diffusers DreamLiteUNetModel
    vae: Any  # diffusers AutoencoderTiny
    text_encoder: Any  # transformers Qwen3VLModel
    tokenizer: Any  # a Qwen2 tokenizer
    scheduler: Any  # diffusers FlowMatchEulerDiscreteScheduler
    config: ModelConfig

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """bf16 (or the preset's dtype) on CUDA; float32 on the CPU, where bf16 matmuls are slow."""
    if device.type != "cuda":
        return torch.float32
    return getattr(torch, cfg.dtype)


def load_stack(cfg: ModelConfig, device: str | torch.device = "cpu") -> ModelStack:
    """Build or load the stack that `cfg` describes, on `device`, in eval mode."""
    device = torch.device(device)
    dtype = resolve_dtype(cfg, device)
    if cfg.kind == "pretrained":
        stack = _load_pretrained(cfg, cfg.source, device, dtype)
    elif cfg.kind == "tiny":
        stack = _load_pretrained(cfg, str(ensure_tiny(cfg)), device, dtype)
    elif cfg.kind == "random":
        stack = _build_random(cfg, device, dtype)
    else:
        raise ModelError(f"model preset '{cfg.name}': unknown kind '{cfg.kind}' (pretrained, random or tiny)")
    for module in (stack.unet, stack.vae, stack.text_encoder):
        module.eval().requires_grad_(False)
    return stack


# ---------------------------------------------------------------------------------------------
# Real weights
# ---------------------------------------------------------------------------------------------

DOWNLOAD_HOW = (
    "download the weights with `hf download carlofkl/DreamLite-mobile --revision diffusers --local-dir DIR` "
    "(gated: request access first) and pass `--model DIR`"
)


def _check_local(root: Path, cfg: ModelConfig) -> None:
    """One clear message for the first missing or incomplete component of a local folder."""
    missing = missing_weights(root)
    if missing:
        raise ModelError(f"model '{cfg.name}': {missing} (safetensors weights only); {DOWNLOAD_HOW}")


def hub_snapshot(cfg: ModelConfig) -> Path:
    """The weights of `cfg`'s hub repository as a local folder: the Hugging Face cache's copy,
    downloaded first if the network allows (huggingface_hub.snapshot_download). One line for each
    way it fails: no network and not cached, gated, not found."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = [f"{sub}/*" for sub in (*WEIGHT_FILES, "scheduler")]
    try:
        folder = Path(snapshot_download(cfg.source, revision=cfg.revision, allow_patterns=patterns))
    except GatedRepoError:
        raise ModelError(
            f"model '{cfg.name}': {cfg.source} is gated: request access on huggingface.co, log in with "
            "`hf auth login`, and run again (or pass --model DIR with a downloaded copy)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(f"model '{cfg.name}': no repository {cfg.source} on the hub (or no access to it)") from None
    except LocalEntryNotFoundError:  # offline, or the hub unreachable, and nothing in the cache
        raise ModelError(
            f"model '{cfg.name}': no network, and not in the local cache; {DOWNLOAD_HOW}, or set STYLIZE_MODEL=DIR"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model '{cfg.name}': could not download {cfg.source}: {first}") from None
    return folder


def _load_pretrained(cfg: ModelConfig, source: str | None, device, dtype) -> ModelStack:
    from diffusers import AutoencoderTiny, DreamLiteUNetModel, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, Qwen3VLModel

    if not source:
        raise ModelError(f"model '{cfg.name}' names no source folder or hub id")
    packaged = packaged_folder(source)
    if packaged is not None:  # weights shipped in the package (mini): they exist once trained
        if not any(packaged.glob("*/*.safetensors")):
            raise ModelError(
                f"model '{cfg.name}' is not trained yet: no weights in {packaged} (scripts/train_mini.py "
                "writes them on the GPU machine); meanwhile use --model tiny, or --model DIR with the full weights"
            )
        source = str(packaged)
    local = Path(source).expanduser()
    if not (local.exists() or source.startswith((".", "/", "~"))):  # a hub id: its copy in the HF cache
        local = hub_snapshot(cfg)
    _check_local(local, cfg)
    source = str(local)

    def load(what: str, fn, **kwargs):
        try:
            return fn(source, **kwargs)
        except (OSError, ValueError) as e:  # unreadable files, non-safetensors weights
            first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
            raise ModelError(f"model '{cfg.name}': could not load the {what} from {source}: {first}") from e

    unet = load("U-Net", DreamLiteUNetModel.from_pretrained, subfolder="unet", torch_dtype=dtype, use_safetensors=True)
    vae = load("VAE", AutoencoderTiny.from_pretrained, subfolder="vae", torch_dtype=dtype, use_safetensors=True)
    te = load("text encoder", Qwen3VLModel.from_pretrained, subfolder="text_encoder", dtype=dtype, use_safetensors=True)
    tok = load("tokenizer", AutoTokenizer.from_pretrained, subfolder="tokenizer")
    if not (local / "scheduler").is_dir():
        scheduler = FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER)
    else:
        scheduler = load("scheduler", FlowMatchEulerDiscreteScheduler.from_pretrained, subfolder="scheduler")
    return ModelStack(unet.to(device), vae.to(device), te.to(device), tok, scheduler, cfg)


# ---------------------------------------------------------------------------------------------
# Random weights at any size (the `random` and `tiny` presets)
# ---------------------------------------------------------------------------------------------


def build_tokenizer(vocab_size: int = 2000):
    """A byte-level BPE tokenizer trained offline on DreamLite's templates and our style prompts,
    with Qwen's special tokens, wrapped as the stock Qwen2 tokenizer class. It stands in for Qwen's
    real tokenizer, which cannot be downloaded here; sequence lengths come out close to the real ones.
    """
    from .text_encoder import EDIT_TEMPLATE, decorate

    corpus = [EDIT_TEMPLATE.format(decorate(p)) for p in _style_prompts()] * 4
    return train_bpe_tokenizer(corpus, vocab_size)


def train_bpe_tokenizer(corpus: list[str], bpe_vocab_size: int):
    """A byte-level BPE trained on `corpus` (`bpe_vocab_size` tokens before Qwen's special ones are
    added), wrapped as the stock Qwen2 tokenizer class."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    return tok


# The stand-in tokenizer's training text: fixed, so that the random stacks built from it (tiny,
# random-full) stay the same when a style preset is added or reworded.
TOKENIZER_PROMPTS = (
    "transfer this to anime style, clean line art, flat cel shading",
    "transfer this to a charcoal drawing, heavy strokes, smudged shadows",
    "transfer this to oil painting style, vibrant colors",
    "transfer this to pixel art style, 16-bit palette, crisp pixels",
    "transfer this to a pencil sketch, black and white, fine hatching",
    "transfer this to watercolor painting style, soft washes of color on paper",
    "make it a charcoal sketch",
)


def _style_prompts() -> list[str]:
    return list(TOKENIZER_PROMPTS)


def build_random_components(cfg: ModelConfig, device, dtype, tokenizer_vocab: int = 2000):
    """(unet, vae, text_encoder as Qwen3VLForConditionalGeneration, tokenizer), random-initialised
    from cfg.seed under the preset's configs."""
    from diffusers import AutoencoderTiny, DreamLiteUNetModel
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = build_tokenizer(tokenizer_vocab)
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    ]}  # fmt: skip
    te_kwargs = json.loads(json.dumps(cfg.text_encoder))  # a deep copy
    te_kwargs.setdefault("text_config", {}).setdefault("vocab_size", len(tok))
    te_kwargs["text_config"]["pad_token_id"] = tok.pad_token_id
    te_config = Qwen3VLConfig(**te_kwargs, **ids)

    torch.manual_seed(cfg.seed)
    with torch.device(device):
        unet = DreamLiteUNetModel(**cfg.unet).to(dtype)
        vae = AutoencoderTiny(**cfg.vae).to(dtype)
        te = Qwen3VLForConditionalGeneration(te_config).to(dtype)
    return unet, vae, te, tok


def _build_random(cfg: ModelConfig, device, dtype) -> ModelStack:
    from diffusers import FlowMatchEulerDiscreteScheduler

    unet, vae, te, tok = build_random_components(cfg, device, dtype)
    return ModelStack(unet, vae, te.model, tok, FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER), cfg)


def tiny_cache_dir() -> Path:
    from ..config import cache_dir

    return cache_dir()


def ensure_tiny(cfg: ModelConfig) -> Path:
    """Save the tiny stack once (keyed by its config) in the cache and return the folder, laid out
    as a real DreamLite-mobile download: unet/, vae/, text_encoder/ (the full
    Qwen3VLForConditionalGeneration, as the real repo has it), tokenizer/, scheduler/."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    key = json.dumps(
        {k: v for k, v in asdict(cfg).items() if k in ("unet", "text_encoder", "vae", "seed")}, sort_keys=True
    )
    folder = tiny_cache_dir() / f"tiny-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (folder / "complete").exists():
        return folder
    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    unet, vae, te, tok = build_random_components(cfg, "cpu", torch.float32, tokenizer_vocab=600)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    te.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tok.save_pretrained(tmp / "tokenizer")
    FlowMatchEulerDiscreteScheduler(**DEFAULT_SCHEDULER).save_pretrained(tmp / "scheduler")
    (tmp / "complete").write_text("ok\n")
    try:
        os.replace(tmp, folder)  # atomic; a concurrent writer may have won the race, which is fine
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder
