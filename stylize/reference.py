"""The plain reference path: DreamLite edit mode, one batch at a time, no streams, no compile.

Every fast path is checked against this (DESIGN §3):
instruction → Qwen3-VL on the frame → TAESD encode → U-Net on cat([x_t, source], width) → K
flow-matching Euler steps → TAESD decode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .config import PipelineConfig
from .models import ModelStack
from .models.text_encoder import PromptTokens, encode, tokenize_prompt


@dataclass(frozen=True)
class Geometry:
    """Where a frame of the input goes: an optional centre crop (top, left, side), then a resize to
    the working resolution (height, width), multiples of `multiple`."""

    in_hw: tuple[int, int]
    crop: tuple[int, int, int] | None
    work_hw: tuple[int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        """Frames come back at the input size (at the crop's size in centre-crop mode)."""
        return (self.crop[2], self.crop[2]) if self.crop else self.in_hw


def geometry(in_hw: tuple[int, int], size: int, multiple: int, crop: str = "none") -> Geometry:
    """Working resolution with the long side `size`, aspect kept, both sides rounded to the nearest
    multiple of `multiple` (what the U-Net accepts); or a centre square crop resized to size²."""
    h, w = in_hw
    if crop == "center":
        side = min(h, w)
        s = max(multiple, round(size / multiple) * multiple)
        return Geometry(in_hw, ((h - side) // 2, (w - side) // 2, side), (s, s))
    scale = size / max(h, w)
    wh = max(multiple, round(h * scale / multiple) * multiple)
    ww = max(multiple, round(w * scale / multiple) * multiple)
    return Geometry(in_hw, None, (wh, ww))


def latent_multiple(unet) -> int:
    """What the working sides must be multiples of: the VAE's ×8, then the U-Net's downsamplings."""
    return 8 * 2 ** (len(unet.config.block_out_channels) - 1)


def pad_batch(frames_bhwc: np.ndarray, batch_size: int) -> np.ndarray:
    """Static shapes: a short batch padded by repeating its last frame (trimmed after)."""
    real = len(frames_bhwc)
    if real >= batch_size:
        return frames_bhwc
    return np.concatenate([frames_bhwc, np.repeat(frames_bhwc[-1:], batch_size - real, axis=0)])


def prompt_tokens(stack, prompt: str) -> PromptTokens:
    """The instruction tokenised as the stack's text encoder reads it (fixed-length padding)."""
    cfg = stack.config
    return tokenize_prompt(stack.tokenizer, stack.text_encoder.config, prompt, cfg.te_image_size, cfg.prompt_max_tokens)


def resize(x_bchw: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased when shrinking; a no-op at the same size."""
    if tuple(x_bchw.shape[-2:]) == tuple(hw):
        return x_bchw
    return F.interpolate(x_bchw, size=hw, mode="bicubic", antialias=True, align_corners=False)


def flow_sigmas(scheduler, steps: int, latent_hw: tuple[int, int]) -> list[float]:
    """The K+1 sigmas (last 0) of DreamLite's FlowMatch Euler schedule: linspace(1, 1/K, K)
    shifted by mu from the un-concatenated latent's h·w/4 (K=4 at 512²: t ≈ 1000, 850, 653, 385)."""
    c = scheduler.config
    seq = latent_hw[0] * latent_hw[1] // 4
    m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    mu = seq * m + (c.base_shift - m * c.base_image_seq_len)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist(), mu=mu, device="cpu")
    return [float(s) for s in scheduler.sigmas]


def to_working(frames_bhwc_uint8: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """uint8 RGB (B, H, W, 3) → float in [0, 1] (B, 3, h, w) at the working resolution."""
    x = frames_bhwc_uint8.permute(0, 3, 1, 2).float() / 255
    if geo.crop:
        top, left, side = geo.crop
        x = x[:, :, top : top + side, left : left + side]
    return resize(x, geo.work_hw)


def to_output(y01_bchw: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """float in [0, 1] (B, 3, h, w) → uint8 RGB (B, H', W', 3) at the output size."""
    y = resize(y01_bchw, geo.out_hw)
    return (y * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def vae_encode(vae, x01_bchw: torch.Tensor) -> torch.Tensor:
    """TAESD encode of pixels in [-1, 1] (as DreamLite): (B, 3, H, W) → latents (B, 4, H/8, W/8)."""
    return vae.encode((x01_bchw * 2 - 1).to(vae.dtype)).latents


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, 4, h, w) → RGB (B, 3, 8h, 8w) float in [0, 1]."""
    shift = getattr(vae.config, "shift_factor", 0.0) or 0.0
    image = vae.decode(latents / vae.config.scaling_factor + shift).sample
    return (image.float() / 2 + 0.5).clamp(0, 1)


def velocity(unet, x, source, t, states, mask, time_ids) -> torch.Tensor:
    """One U-Net call in DreamLite edit mode: input cat([x_t, source], width) (B, 4, h, 2w), the
    prediction's left half is the velocity of the generated image (B, 4, h, w)."""
    out = unet(
        torch.cat([x, source], dim=3),
        timestep=t,
        encoder_hidden_states=states,
        encoder_attention_mask=mask,
        added_cond_kwargs={"time_ids": time_ids},
        return_dict=False,
    )[0]
    return out[..., : x.shape[-1]]


def euler(x: torch.Tensor, v: torch.Tensor, dt: float) -> torch.Tensor:
    """Flow-matching Euler step in float32 (as the scheduler does); K=1 gives x0 = noise − v."""
    return (x.float() + dt * v.float()).to(x.dtype)


FRAME_SEED_STRIDE = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, odd: distinct in the low 32 bits too


def frame_seed(seed: int, index: int) -> int:
    """The seed of frame `index`'s noise: frame 0 draws what the stock pipeline draws for `seed`;
    the stride keeps frames apart in the 32 bits a CPU generator (mt19937) reads."""
    return (seed + index * FRAME_SEED_STRIDE) % 2**64


def draw_noise(generator, cache: dict, fixed: bool, seed: int, first: int, b: int, stack, latent_hw) -> torch.Tensor:
    """x_T: (B, 4, h, w) for frames first .. first+B-1 of a clip. Each frame's noise is drawn from
    its own seed (`frame_seed(seed, index)`, `generator` re-seeded), so it depends only on the seed
    and the frame's index: a chunk of a split clip (chunks.py) draws what the whole clip's run
    draws. Fixed noise repeats frame 0's pattern on every frame (kept in `cache` per latent size)."""
    shape = (1, stack.unet.config.in_channels, *latent_hw)

    def frame(index: int) -> torch.Tensor:
        generator.manual_seed(frame_seed(seed, index))
        return torch.randn(shape, generator=generator, device=stack.device, dtype=stack.dtype)

    if not fixed:
        return torch.cat([frame(first + j) for j in range(b)])
    if latent_hw not in cache:
        cache[latent_hw] = frame(0)
    return cache[latent_hw].expand(b, -1, -1, -1)


def flow_start(model_cfg, source: torch.Tensor, noise) -> torch.Tensor:
    """x_T, where the flow starts (sigma 1): `noise()` (DreamLite), or for a model whose config says
    `start: source` a copy of the source latent itself, the same every run (no seed, no noise).
    The one place this is decided: the reference path, the engine and mini's training call it."""
    if model_cfg.start == "source":
        return source.clone()
    return noise()


class ReferenceStylizer:
    """Stylizes batches of frames of one clip. Per-clip state (prompt tokens, fixed noise) is
    rebuilt by `reset`; `stylize` takes any number of frames and pads a short batch to the batch
    size (static shapes), trimming the padding from the result."""

    def __init__(self, stack: ModelStack, cfg: PipelineConfig):
        self.stack, self.cfg = stack, cfg
        self.multiple = latent_multiple(stack.unet)
        self.tokens: PromptTokens = prompt_tokens(stack, cfg.prompt)
        self.ring = None  # frames come as they are; a short batch is padded here
        self.reset()

    def reset(self, sink=None, first_frame: int = 0) -> None:
        """Start a new clip: the same seed gives the same noise. With a `sink`, each stylized
        FrameBatch goes to `sink(batch)` and `feed` returns nothing. `first_frame`: the clip's
        index of the first frame to come (a chunk of a split clip starts later), for its noise."""
        self.generator = torch.Generator(self.stack.device)
        self.noise_cache: dict = {}
        self.frame = first_frame  # the clip's index of the next frame stylized
        self.sink = sink

    def prepare(self, in_hw: tuple[int, int], status=None) -> None:
        """Nothing to get ready: the plain path compiles nothing."""

    def close(self) -> None:
        """Nothing to release."""

    # -- the per-frame math ------------------------------------------------------------------

    def noise(self, b: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The next `b` frames' noise (B, 4, h, w)."""
        cfg = self.cfg
        x = draw_noise(self.generator, self.noise_cache, cfg.fixed_noise, cfg.seed, self.frame, b, self.stack, latent_hw)
        self.frame += b
        return x

    @torch.no_grad()
    def stylize_tensor(self, x01_bchw: torch.Tensor) -> torch.Tensor:
        """Frames at the working resolution, float in [0, 1], (B, 3, H, W) → stylized, same layout."""
        return self.decode(self.denoise(x01_bchw))

    @torch.no_grad()
    def denoise(self, x01_bchw: torch.Tensor) -> torch.Tensor:
        """Frames (B, 3, H, W) float in [0, 1] → edited latents x0 (B, 4, H/8, W/8)."""
        stack, dtype = self.stack, self.stack.dtype
        b, _, h, w = x01_bchw.shape
        te_size = stack.config.te_image_size
        states, mask = encode(
            stack.text_encoder, self.tokens, resize(x01_bchw, (te_size, te_size)), stack.config.hidden_states
        )
        source = vae_encode(stack.vae, x01_bchw)
        latent_hw = tuple(source.shape[-2:])
        x = flow_start(stack.config, source, lambda: self.noise(b, latent_hw))
        sigmas = flow_sigmas(stack.scheduler, self.cfg.steps, latent_hw)
        time_ids = torch.tensor([[w, h]], device=x.device, dtype=dtype).expand(b, -1)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((b,), sigma * 1000, device=x.device, dtype=dtype)
            x = euler(x, velocity(stack.unet, x, source, t, states.to(dtype), mask, time_ids), sigma_next - sigma)
        return x

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) → RGB (B, 3, 8h, 8w) float in [0, 1]."""
        return vae_decode(self.stack.vae, latents)

    # -- frames in, frames out ---------------------------------------------------------------

    def output_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """The size of the frames that come back for frames of size `in_hw`."""
        return geometry(in_hw, self.cfg.size, self.multiple, self.cfg.crop).out_hw

    def feed(self, batch):
        """Stylize a decoded FrameBatch; returns the batches ready for the encoder (here: this one,
        or nothing with a sink, which has had it)."""
        done = replace(batch, frames=self.stylize(batch.frames), slot=None)
        batch.release()
        if self.sink is not None:
            self.sink(done)
            return []
        return [done]

    def flush(self):
        """Nothing is held back on the sequential path."""
        return []

    def stylize(self, frames_bhwc_uint8: np.ndarray) -> np.ndarray:
        """uint8 RGB (B, H, W, 3) → uint8 RGB (B, H', W', 3) at the output size (the input size,
        or the crop's in centre-crop mode). Any B: split into batches of the batch size, the last
        padded by repeating its final frame and trimmed after."""
        n = len(frames_bhwc_uint8)
        bs = self.cfg.batch_size
        outs = []
        for start in range(0, n, bs):
            chunk = frames_bhwc_uint8[start : start + bs]
            outs.append(self._stylize_batch(pad_batch(chunk, bs))[: len(chunk)])
        return np.concatenate(outs) if outs else frames_bhwc_uint8[:0]

    def _stylize_batch(self, frames_bhwc_uint8: np.ndarray) -> np.ndarray:
        geo = geometry(frames_bhwc_uint8.shape[1:3], self.cfg.size, self.multiple, self.cfg.crop)
        x = torch.from_numpy(np.ascontiguousarray(frames_bhwc_uint8)).to(self.stack.device)
        return to_output(self.stylize_tensor(to_working(x, geo)), geo).cpu().numpy()  # (B, H', W', 3)
