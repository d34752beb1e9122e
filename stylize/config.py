"""Typed configuration: frozen dataclasses filled from the YAML presets shipped in the package
(stylize/presets/models/*.yaml, stylize/presets/styles/*.yaml), then from flags.

Library code only ever sees these objects, never typer or argparse. Every option is checked here,
as the objects are built (`run_options` builds them all for a run), before anything heavy is
imported: a bad flag costs no model load. Output paths are checked where they are planned
(jobs.plan_jobs), also before anything heavy.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import UsageError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


HiddenStates = Literal["pre_norm", "post_norm"]
ModelKind = Literal["pretrained", "random", "tiny"]
Start = Literal["noise", "source"]
# libx264's speed presets, fastest first (what `--preset` takes)
X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo",
)  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """Where the model stack comes from and how it is shaped.

    kind: "pretrained" loads weights from `source` (a local folder in diffusers layout with
    unet/, vae/, text_encoder/, tokenizer/ subfolders, or a hub id); "random" builds the classes
    at the sizes below with random weights (speed benchmarks); "tiny" builds them tiny from a fixed
    seed, saves them with save_pretrained into a cache folder and loads them back with
    from_pretrained (tests and smoke runs).
    """

    name: str
    kind: ModelKind = "pretrained"
    source: str | None = None
    revision: str | None = None
    dtype: str = "bfloat16"  # on CUDA; the CPU always runs float32
    te_image_size: int = 256  # side of the square frame the text encoder sees
    prompt_max_tokens: int = 64  # instruction tokens kept after the image tokens (fixed-length padding)
    hidden_states: HiddenStates = "post_norm"  # which last-layer states condition the U-Net
    # x_T, where the flow starts at sigma 1: "noise" (DreamLite: drawn from the seed) or "source"
    # (the frame's own latent: the U-Net's velocity is then source - edit, a change in place, and
    # nothing has to cross from the source half; mini, NOTES 36)
    start: Start = "noise"
    unet: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # the style presets a model was trained on (mini); a --prompt must name one of them (by its
    # name or an alias). None: the model follows any instruction (DreamLite)
    styles: list[str] | None = None
    cpu_size: int | None = None  # working long side on a CPU when --size is not given (else 512)
    cpu_threads: int | None = None  # torch threads on a CPU (None: torch's own choice)


@dataclass(frozen=True)
class StyleConfig:
    """A style preset: the instruction given to the edit model."""

    name: str
    prompt: str
    description: str = ""
    # the stylizer that teaches `mini` this style (stylize/train/teachers.py), e.g.
    # {"kind": "multistyle26", "index": 14}; None for a style no teacher renders
    teacher: dict[str, Any] | None = None
    # other ways of asking for it: mini is trained on them as prompts too, and a --prompt given to
    # a model that knows only its styles is matched against them (match_style)
    aliases: list[str] = field(default_factory=list)


DEFAULT_SIZE = 512  # the working long side unless --size or, on a CPU, the model's cpu_size says otherwise


@dataclass(frozen=True)
class PipelineConfig:
    """How frames are stylized.

    size: long side of the working resolution in pixels (sides rounded to multiples of 16, which
    the U-Net's latent grid of 1/8 with two downsamplings needs); crop "none" keeps the aspect
    ratio, "center" takes the paper's square centre crop of side `size`.
    """

    prompt: str
    steps: int = 1
    size: int = DEFAULT_SIZE
    crop: Literal["none", "center"] = "none"
    batch_size: int = 8
    seed: int = 0
    fixed_noise: bool = True  # the same noise pattern every frame (less flicker)

    def __post_init__(self) -> None:
        if self.steps not in (1, 2, 4):
            raise UsageError(f"--steps must be 1, 2 or 4 (the distilled schedules), not {self.steps}")
        if self.size < 64 or self.size > 2048:
            raise UsageError(f"--size must be between 64 and 2048 pixels, not {self.size}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {self.batch_size}")
        if not self.prompt.strip():
            raise UsageError("the prompt is empty: give --style NAME or --prompt TEXT")


@dataclass(frozen=True)
class EngineConfig:
    """The streaming engine's speedups (DESIGN §5). Each is on by default and can be turned off
    for an ablation; the schedule options change the output by design.

    te_refresh_every: run the text encoder every M batches and reuse its states in between;
    te_batch_one: encode one representative frame per batch and broadcast it;
    static_prompt: encode the instruction alone (no frame) once per clip;
    scene_cut: mean absolute difference (0-1) between thumbnails of consecutive frames above which
    a batch counts as a new scene and refreshes the text encoder (0 turns detection off).
    """

    side_stream: bool = True
    fast_te: bool = True
    fuse_qkv: bool = True  # one projection GEMM per self-attention (optimize.fuse_qkv)
    fused_norms: bool = True  # RMSNorm as one F.rms_norm call, U-Net and text encoder (optimize.fuse_rms_norms)
    vae_channels_last: bool = True  # on CUDA, the engine's TAESD in channels_last (no cuDNN layout transposes)
    compile: Literal["auto", "on", "off"] = "auto"
    # batches issued to the GPU and not yet handed back. Each one adds a batch period to every
    # frame's latency; 3 keeps the GPU busy: with 2, the next batch's side-stream work (text
    # encoder + TAESD encode, ~31 ms at B=8 on an H100) starts as the U-Net's current batch (~40 ms)
    # does and only just finishes in time (benchmarks/NOTES.md item 15)
    in_flight: int = 3
    cuda_graphs: bool = True  # compiled main-stream steps replay as CUDA graphs ("reduce-overhead")
    side_graphs: bool = True  # compiled side-stream steps replay as CUDA graphs of their own (optimize.StreamGraph)
    # --compile auto, when it does not compile: the eager steps replayed as CUDA graphs (optimize.graph_steps)
    graphs: bool = True
    te_refresh_every: int = 1
    te_batch_one: bool = False
    static_prompt: bool = False
    scene_cut: float = 0.3
    te_bucket: int = 16
    # the temporal adapter (DESIGN §4): a released-layout .safetensors file, "random" (random
    # weights: speed measurements only) or None (off); which hooks; its refresh period N in batches
    adapter: str | None = None
    adapter_hooks: str = "down_blocks"  # "down_blocks", "all", or comma-separated block prefixes
    adapter_refresh_every: int = 8
    adapter_multiplier: float = 1.0
    flow: Literal["dis", "dis-fast", "farneback"] = "dis"  # optical flow for the adapter's warp (flow.py)

    def __post_init__(self) -> None:
        if self.te_refresh_every < 1:
            raise UsageError(f"te_refresh_every must be at least 1, not {self.te_refresh_every}")
        if self.in_flight < 1:
            raise UsageError(f"in_flight must be at least 1, not {self.in_flight}")
        if self.adapter_refresh_every < 1:
            raise UsageError(f"the adapter refresh period must be at least 1, not {self.adapter_refresh_every}")

    @property
    def adapter_subset(self) -> str | list[str]:
        hooks = self.adapter_hooks
        return hooks if hooks in ("all", "down_blocks") else [h.strip() for h in hooks.split(",") if h.strip()]


@dataclass(frozen=True)
class OutputConfig:
    """How the output video is written and how an image-folder input is timed."""

    crf: int = 18
    preset: str = "medium"
    audio: bool = True
    fps: float | None = None  # frame rate of a numbered-image folder (default 24)
    realtime: bool = False  # decode no faster than the timestamps (a live source; for latency)

    def __post_init__(self) -> None:
        if not 0 <= self.crf <= 51:
            raise UsageError(f"--crf must be between 0 and 51, not {self.crf}")
        if self.preset not in X264_PRESETS:  # else libx264 refuses it only once the first clip opens
            raise UsageError(f"--preset {self.preset}: not an x264 preset; choose one of {', '.join(X264_PRESETS)}")
        if self.fps is not None and self.fps <= 0:
            raise UsageError(f"--fps must be positive, not {self.fps}")


@dataclass(frozen=True)
class RunOptions:
    """Everything one `stylize` run is configured by, checked (see `run_options`)."""

    model: ModelConfig
    pipeline: PipelineConfig
    engine: EngineConfig
    output: OutputConfig
    tag: str  # what output names carry: the style's name or the prompt's slug
    notices: tuple[str, ...] = ()  # one line each, for stderr: which model a default picked, a prompt matched
    size_given: bool = True  # False: the working size is the device's default (on_device)

    def on_device(self, device: str) -> RunOptions:
        """The options for `device`: a model's CPU working size when --size was not given."""
        if device != "cpu" or self.size_given or not self.model.cpu_size:
            return self
        pipeline = dataclasses.replace(self.pipeline, size=self.model.cpu_size)
        return dataclasses.replace(self, pipeline=pipeline, size_given=True)


def run_options(
    *, style: str | None, prompt: str | None, model: str | None, steps: int = 1, size: int | None = None,
    crop: str = "none", batch_size: int = 8, seed: int = 0, compile: str = "auto", te_every: int = 1,
    te_batch_one: bool = False, static_prompt: bool = False, adapter: str | os.PathLike | None = None,
    adapter_hooks: str = "down_blocks", adapter_every: int = 8, crf: int = 18, preset: str = "medium",
    audio: bool = True, fps: float | None = None,
) -> RunOptions:  # fmt: skip
    """Every option of a run, checked and typed (UsageError on the first bad one). Imports nothing
    heavy, so the CLI calls it before torch is loaded. `model` None: default_model() picks one;
    `size` None: DEFAULT_SIZE, or the model's cpu_size once the device is known (on_device)."""
    notices = []
    if model is None:
        chosen = default_model()
        cfg = chosen.config
        if chosen.fallback:
            notices.append(
                f"using '{cfg.name}', the small model shipped with stylize: {chosen.why}; for the full model "
                "set STYLIZE_MODEL=DIR (`stylize models` says how to get it)"
            )
    else:
        cfg = model_config(model)
    text, tag, matched = instruction(style, prompt, cfg)
    if matched:
        notices.append(matched)
    return RunOptions(
        model=cfg,
        pipeline=PipelineConfig(
            prompt=text, steps=steps, size=size or DEFAULT_SIZE, crop=crop, batch_size=batch_size, seed=seed
        ),
        engine=EngineConfig(
            compile=compile, te_refresh_every=te_every, te_batch_one=te_batch_one, static_prompt=static_prompt,
            adapter=adapter_file(adapter), adapter_hooks=adapter_hooks, adapter_refresh_every=adapter_every,
        ),
        output=OutputConfig(crf=crf, preset=preset, audio=audio, fps=fps),
        tag=tag,
        notices=tuple(notices),
        size_given=size is not None,
    )  # fmt: skip


def instruction(style: str | None, prompt: str | None, model: ModelConfig | None = None) -> tuple[str, str, str | None]:
    """(the prompt the model reads, the tag output names carry, a notice or None) from exactly
    one of a style preset's name or a free-text prompt. A model that knows only its styles
    (`model.styles`) takes a prompt only when it names one of them (match_style), and reads
    that style's own prompt."""
    if (style is None) == (prompt is None):
        raise UsageError("give exactly one of --style NAME or --prompt TEXT")
    known = model.styles if model is not None else None
    if style is not None:
        preset = style_config(style)
        if known is not None and style not in known:
            raise UsageError(f"model '{model.name}' was not trained on style '{style}'; its styles: {', '.join(known)}")
        return preset.prompt, style, None
    if known is None:
        return prompt, prompt_slug(prompt), None
    matched = match_style(prompt, known)
    if matched is None:
        raise UsageError(
            f"model '{model.name}' follows only the styles it was trained on, and --prompt {prompt!r} names none "
            f"of them: {', '.join(known)} (their other names: `stylize styles`); the full model follows "
            "free-form instructions"
        )
    return (
        style_config(matched).prompt,
        matched,
        f"--prompt {prompt!r} is the style '{matched}' for model '{model.name}'",
    )


def _words(text: str) -> str:
    """Lower-case words separated by single spaces (\"Make it an Oil-painting!\" -> \"make it an oil painting\")."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def match_style(prompt: str, styles: list[str]) -> str | None:
    """The one style of `styles` that `prompt` asks for: the prompt is the style's name, prompt or
    an alias (case, punctuation and spacing aside), or else contains exactly one style's name or
    alias as whole words ("turn it into a watercolour please" -> watercolor). None when it names
    none, or more than one."""
    words = _words(prompt)
    names = {s: {_words(n) for n in (s, style_config(s).prompt, *style_config(s).aliases)} for s in styles}
    exact = [s for s, ns in names.items() if words in ns]
    if exact:
        return exact[0]
    inside = [s for s, ns in names.items() if any(re.search(rf"\b{re.escape(n)}\b", words) for n in ns if n)]
    return inside[0] if len(inside) == 1 else None


def adapter_file(path: str | os.PathLike | None) -> str | None:
    """The `--adapter` file as EngineConfig takes it, checked to exist (None: no adapter)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"--adapter {path}: no such file; give the temporal LLLite .safetensors")
    return str(path)


PACKAGED = "package:"  # a model source inside the installed stylize package, e.g. "package:weights/mini"
FULL_MODEL = "dreamlite-mobile"  # what runs by default when its weights are on this machine
FALLBACK_MODEL = "mini"  # what runs by default otherwise
FULL_MODEL_HINT = (
    "For the full model (diffusion quality, free-form instructions) set STYLIZE_MODEL=DIR to its weights, "
    "or `hf download carlofkl/DreamLite-mobile --revision diffusers` (gated: request access first)"
)
# what a folder of weights in diffusers layout must hold: subfolder -> (what it is, file patterns)
WEIGHT_FILES = {
    "unet": ("DreamLite U-Net", ["config.json", "*.safetensors"]),
    "vae": ("TAESD (AutoencoderTiny)", ["config.json", "*.safetensors"]),
    "text_encoder": ("Qwen3-VL text encoder", ["config.json", "*.safetensors"]),
    "tokenizer": ("Qwen tokenizer", ["tokenizer_config.json"]),
}


def missing_weights(root: Path) -> str | None:
    """What the first missing part of a weights folder is (\"no *.safetensors in DIR/unet\"), or None."""
    if not root.is_dir():
        return f"no folder at {root}"
    for sub, (what, patterns) in WEIGHT_FILES.items():
        for pattern in patterns:
            if not any((root / sub).glob(pattern)):
                return f"{what} incomplete: no {pattern} in {root / sub}"
    return None


def hub_cache_folder(cfg: ModelConfig) -> Path | None:
    """The complete snapshot of `cfg`'s hub repository in the local Hugging Face cache, or None.
    Never touches the network (local_files_only)."""
    if not cfg.source or Path(cfg.source).expanduser().exists() or cfg.source.startswith(PACKAGED):
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(cfg.source, revision=cfg.revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or an unreadable cache: not there
        return None
    return folder if missing_weights(folder) is None else None


@dataclass(frozen=True)
class DefaultModel:
    """The stack a run without --model uses, and why."""

    config: ModelConfig
    why: str
    fallback: bool  # True: the full model's weights were not found, this is mini


def default_model() -> DefaultModel:
    """Offline, in order: the folder (or preset) STYLIZE_MODEL names; the full model in the
    Hugging Face cache; else mini. Never waits on the network."""
    named = os.environ.get("STYLIZE_MODEL")
    if named:
        try:
            return DefaultModel(model_config(named), f"STYLIZE_MODEL={named}", False)
        except UsageError as e:
            raise UsageError(f"STYLIZE_MODEL={named}: {e}") from None
    full = model_config(FULL_MODEL)
    cached = hub_cache_folder(full)
    if cached is not None:
        return DefaultModel(
            dataclasses.replace(full, source=str(cached)), f"found in the Hugging Face cache ({cached})", False
        )
    why = "the full DreamLite-mobile weights are not on this machine"
    return DefaultModel(model_config(FALLBACK_MODEL), why, True)


def packaged_folder(source: str | None) -> Path | None:
    """The folder a "package:<path>" source names inside the installed stylize package (found with
    importlib.resources, so it works from a wheel as from the checkout); None for other sources."""
    if not source or not source.startswith(PACKAGED):
        return None
    return Path(str(resources.files("stylize").joinpath(*source[len(PACKAGED) :].split("/"))))


def _preset(kind: str, name: str) -> Traversable:
    """The preset file `name` of `kind` ("models" or "styles"), shipped as package data."""
    return resources.files("stylize") / "presets" / kind / f"{name}.yaml"


def _load_yaml(path: Traversable) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping at the top level")
    return data


def _from_dict(cls, data: dict[str, Any], where: Traversable):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**data)


def list_presets(kind: str) -> list[str]:
    """Names of the presets shipped under stylize/presets/<kind>/ (kind: "models" or "styles")."""
    folder = resources.files("stylize") / "presets" / kind
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def model_config(name_or_dir: str, **overrides: Any) -> ModelConfig:
    """Resolve `--model`: the one place a model name becomes a ModelConfig (light: nothing is loaded).

    In order: a shipped preset's name (stylize/presets/models/NAME.yaml); a local folder of real
    weights in diffusers layout (the `dreamlite-mobile` preset pointed at it); else a UsageError
    that says what was looked for ("no folder at ..." for anything that looks like a path).
    """
    path = _preset("models", name_or_dir)
    if path.is_file():
        cfg = _from_dict(ModelConfig, {"name": name_or_dir, **_load_yaml(path)}, path)
    elif Path(name_or_dir).expanduser().is_dir():
        base = model_config("dreamlite-mobile")
        cfg = dataclasses.replace(base, name=name_or_dir, source=str(Path(name_or_dir).expanduser()))
    else:
        raise UsageError(_no_model(name_or_dir))
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _no_model(name: str) -> str:
    folder = Path(name).expanduser().absolute()
    download = "`hf download carlofkl/DreamLite-mobile --revision diffusers --local-dir DIR`, then --model DIR"
    if folder.exists():
        return f"--model {name}: is a file, not a folder of weights (unet/, vae/, text_encoder/, tokenizer/)"
    if _looks_like_path(name):
        return f"--model {name}: no folder at {folder}; download the weights with {download}"
    presets = ", ".join(list_presets("models"))
    return f"unknown model '{name}': give a preset ({presets}) or a folder of weights (no folder at {folder})"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~")) or "/" in name or os.sep in name


def style_config(name: str) -> StyleConfig:
    path = _preset("styles", name)
    if not path.is_file():
        raise UsageError(f"unknown style '{name}': choose one of {', '.join(list_presets('styles'))} or give --prompt")
    return _from_dict(StyleConfig, {"name": name, **_load_yaml(path)}, path)


def cache_dir() -> Path:
    """Where stylize keeps what it builds: the tiny stack, compiled graphs ($STYLIZE_CACHE, else
    ~/.cache/stylize)."""
    root = os.environ.get("STYLIZE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "stylize"
    )
    return Path(root)


def use_persistent_compile_cache() -> None:
    """Point inductor's on-disk caches into our cache folder (its default is under /tmp). Must run
    before torch's inductor first reads it: call it before importing torch."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


def prompt_slug(prompt: str, max_len: int = 32) -> str:
    """A short file-name-safe slug of a free-text prompt ("Make it a charcoal sketch!" -> "make-it-a-charcoal-sketch")."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"


@dataclass(frozen=True)
class GpuSelection:
    """`--gpus` as given, checked for syntax only (the visible count is known once the device is,
    `resolve`): "all", a count N (the first N), or indices ("0,2"; a single index as "3,")."""

    spec: str
    count: int | None = None  # N
    indices: tuple[int, ...] = ()  # given indices, relative to CUDA_VISIBLE_DEVICES

    def resolve(self, visible: int, device: str) -> tuple[int, ...]:
        """The worker indices (as the user gave them) among `visible` devices: GPUs on CUDA, CPU
        cores on the CPU (where each index is one CPU worker process). UsageError when they are
        not there."""
        what = "GPU" if device == "cuda" else "CPU core"
        if self.spec == "all":
            if device != "cuda":
                raise UsageError("--gpus all: no GPU is used on the CPU; give --gpus N for N CPU worker processes")
            return tuple(range(visible))
        if self.count is not None:
            if self.count > visible:
                raise UsageError(f"--gpus {self.spec}: only {visible} {what}{'s' if visible != 1 else ''} "
                                 f"visible; give at most {visible}")  # fmt: skip
            return tuple(range(self.count))
        unknown = [i for i in self.indices if i >= visible]
        if unknown:
            raise UsageError(f"--gpus {self.spec}: no {what} {unknown[0]}; the visible ones are 0-{visible - 1}"
                             + (" (indices count within CUDA_VISIBLE_DEVICES)" if device == "cuda" else ""))
        return self.indices


def parse_gpus(spec: str | None) -> GpuSelection | None:
    """`--gpus all|N|0,2` checked for syntax (UsageError); None when not given (one GPU, in process)."""
    if spec is None:
        return None
    text = spec.replace(" ", "")
    if text == "all":
        return GpuSelection("all")
    if re.fullmatch(r"\d+", text) and int(text) >= 1:
        return GpuSelection(text, count=int(text))
    if not re.fullmatch(r"\d+(,\d+)*,?", text) or "," not in text:
        raise UsageError(f"--gpus {spec}: expected all, a count of at least 1 (2) or indices (0,2; one index as 3,)")
    indices = tuple(int(p) for p in text.split(",") if p)
    if len(set(indices)) != len(indices):
        raise UsageError(f"--gpus {spec}: an index is given twice")
    return GpuSelection(text, indices=indices)
