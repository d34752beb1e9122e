"""One training step of `mini` (scripts/train_mini.py, which holds the plan and its arithmetic): the
stages, the components being trained, the losses, and each step's crops and targets on the device.

    m = Mini(cfg, tokenizer, seed, device)
    params = m.trainable(stage); optimizer = optimizer_for(params, device)
    plan, x, y = batches.get(step, total)          # crops and teacher outputs, (B, 3, S, S) in [0, 1]
    out = step_loss(stage, m, plan, x, y, generator)   # {"loss": ..., and what is logged}

The stages (DreamLite's edit mode, DESIGN §3): `vae` the TAESD round trip of crops and teacher
outputs; `latent` the U-Net's one-step edit in latent space, x_s = (1 - s) E(teacher) + s x_T,
input cat([x_s, E(crop)], width), target velocity x_T - E(teacher); `pixels` K=1 end to end,
decode(x_T - v) against the teacher's pixels. x_T is noise, or E(crop) itself for a model whose
config says `start: source` (mini, NOTES 36).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..models.text_encoder import tokenize_prompt
from ..reference import flow_start, resize, velocity
from . import data as train_data
from . import mini, mini_data


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the plan: its steps, samples a step at 256 px (fewer at larger crops, the same
    pixels), peak learning rate, and which components train."""

    name: str
    steps: int
    batch_256: int
    lr: float
    trains: tuple[str, ...]  # of "vae", "decoder", "unet", "text_encoder"
    sizes: tuple[int, ...] = (256, 384, 512)
    warmup: int = 500
    # Each sample (its crop and its teacher's output) serves `reuse` consecutive steps: a step
    # makes 1/reuse of its batch anew and takes the rest from the previous reuse - 1 steps, so the
    # teachers run on 1/reuse of the samples (two thirds of a vae step was the teachers, NOTES
    # 28). The crop side then holds for `side_every` steps (a batch has one side); the first
    # reuse - 1 steps after a side change have the smaller batches they have made so far.
    reuse: int = 1
    side_every: int = 1


SIGMA_ONE_SHARE = 0.75  # latent stage: samples at s = 1 (the K=1 path); the rest uniform in (0, 1]
SOBEL_WEIGHT = 0.5
LATENT_WEIGHT = 0.25  # pixels stage: the latent MSE that keeps the U-Net's output in the VAE's space


def stage_at(plan: tuple[Stage, ...], step: int) -> tuple[int, Stage, int]:
    """(index, stage, the stage's own step) of global `step`."""
    start = 0
    for i, stage in enumerate(plan):
        if step < start + stage.steps:
            return i, stage, step - start
        start += stage.steps
    raise IndexError(step)


def step_seed(seed: int, stage: int, step: int) -> int:
    """The seed of a step's noise and noise levels (the crops' plan draws from [seed, stage, step] too)."""
    return int(np.random.SeedSequence([seed, stage, step, 1]).generate_state(1, np.uint64)[0] >> 1)


def lr_at(stage: Stage, local: int) -> float:
    warm = min(stage.warmup, max(1, stage.steps // 10))
    if local < warm:
        return stage.lr * (local + 1) / warm
    progress = (local - warm) / max(1, stage.steps - warm)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------ model
class Mini:
    """The components being trained, on one device, and what trains in a stage."""

    def __init__(self, cfg, tokenizer, seed: int, device: torch.device):
        unet, vae, te = mini.build_mini_components(cfg, tokenizer, seed=seed)  # on the CPU: the same init anywhere
        self.cfg, self.tokenizer = cfg, tokenizer
        self.unet, self.vae, self.te_full = unet.to(device), vae.to(device), te.to(device)
        self.te = self.te_full.model  # Qwen3VLModel: what stylize runs (lm_head never)
        self.prompt_tokens: dict[str, object] = {}

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.te}

    def trainable(self, stage: Stage) -> dict[str, torch.nn.Parameter]:
        """The stage's parameters by name (`<component>.<name>`), and requires_grad set to match."""
        groups = {"unet": self.unet, "text_encoder": self.te, "vae": self.vae, "decoder": self.vae.decoder}
        chosen = {id(p) for g in stage.trains for p in groups[g].parameters()}
        params = {}
        for comp, module in self.modules.items():
            for name, p in module.named_parameters():
                p.requires_grad_(id(p) in chosen)
                if id(p) in chosen:
                    params[f"{comp}.{name}"] = p
        return params

    def tokens(self, prompt: str):
        """(PromptTokens, M-RoPE positions) of a prompt, made once."""
        if prompt not in self.prompt_tokens:
            t = tokenize_prompt(
                self.tokenizer, self.te.config, prompt, self.cfg.te_image_size, self.cfg.prompt_max_tokens
            )
            self.prompt_tokens[prompt] = (t, mini.prompt_positions(self.te, t))
        return self.prompt_tokens[prompt]


def optimizer_for(params: dict[str, torch.nn.Parameter], device: torch.device) -> torch.optim.AdamW:
    decay = [p for n, p in params.items() if p.ndim >= 2 and not n.startswith("vae.")]
    rest = [p for n, p in params.items() if not (p.ndim >= 2 and not n.startswith("vae."))]
    groups = [
        g for g in ({"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}) if g["params"]
    ]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, **fast)


# ----------------------------------------------------------------------------------------- losses
def sobel(x_bchw: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical Sobel responses of each channel, (B, 2C, H-2, W-2)."""
    k = x_bchw.new_tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 8
    kernels = torch.stack([k, k.t()])[:, None].repeat(x_bchw.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    return F.conv2d(x_bchw, kernels, groups=x_bchw.shape[1])


def pixel_loss(pred01: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
    """L1 plus the L1 of the Sobel gradients (sharpness: a blurred output pays for its lost edges)."""
    pred, target = pred01.float(), target01.float()
    return (pred - target).abs().mean() + SOBEL_WEIGHT * (sobel(pred) - sobel(target)).abs().mean()


def encode01(vae, x01: torch.Tensor) -> torch.Tensor:
    return vae.encode(x01 * 2 - 1).latents


def decode01(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents -> RGB float, [0, 1] where the decoder is right (unclamped, so gradients flow)."""
    return vae.decode(z).sample / 2 + 0.5


def step_loss(stage: Stage, m: Mini, plan, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> dict:
    """The stage's loss on one batch: crops x and teacher outputs y, (B, 3, S, S) float in [0, 1]."""
    b = x.shape[0]
    if stage.name == "vae":
        images = torch.cat([x, y])
        z = encode01(m.vae, images)
        loss = pixel_loss(decode01(m.vae, z), images)
        return {"loss": loss, "latent_rms": z.float().square().mean().sqrt().detach()}
    with torch.no_grad():
        source, target = encode01(m.vae, x), encode01(m.vae, y)
    states, mask = condition(m, plan, x)
    start = flow_start(m.cfg, source, lambda: _noise(source, gen))
    if stage.name == "latent":
        u = torch.rand(b, generator=gen, device=gen.device).to(x.device)
        one = torch.rand(b, generator=gen, device=gen.device).to(x.device) < SIGMA_ONE_SHARE
        sigma = torch.where(one, torch.ones_like(u), u.clamp_min(1e-3))
    else:
        sigma = torch.ones(b, device=x.device)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * target + sigma.view(-1, 1, 1, 1) * start
    v = velocity(m.unet, x_t, source, sigma * 1000, states, mask, _time_ids(x)).float()
    latent_mse = (v - (start - target).float()).square().mean()
    if stage.name == "latent":
        return {"loss": latent_mse}
    pix = pixel_loss(decode01(m.vae, start - v), y)
    return {"loss": pix + LATENT_WEIGHT * latent_mse, "pixel": pix.detach(), "latent": latent_mse.detach()}


def _noise(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=gen, device=gen.device).to(like.device)


def condition(m: Mini, plan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's states and mask for each sample's prompt, looking at its crop."""
    te_size = m.cfg.te_image_size
    tokens, positions = zip(*(m.tokens(p) for p in plan.prompts))
    frames = resize(x, (te_size, te_size))
    return mini.encode_prompts(m.te, list(tokens), frames, m.cfg.hidden_states, list(positions))


def _time_ids(x: torch.Tensor) -> torch.Tensor:
    s = x.shape[-1]
    return torch.tensor([[s, s]], device=x.device, dtype=x.dtype).expand(x.shape[0], -1)


@torch.no_grad()
def edit01(m: Mini, plan, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """mini's one-step edit of crops x (B, 3, S, S) in [0, 1], as stylize runs it: from x_T (sigma 1;
    the config's `start`) beside the source latent, one velocity, decoded; RGB float in [0, 1]."""
    source = encode01(m.vae, x)
    states, mask = condition(m, plan, x)
    start = flow_start(m.cfg, source, lambda: _noise(source, gen))
    sigma = torch.full((x.shape[0],), 1000.0, device=x.device)
    v = velocity(m.unet, start, source, sigma, states, mask, _time_ids(x))
    return decode01(m.vae, start - v).float().clamp(0, 1)



# ------------------------------------------------------------------------------------------- data
class Batches:
    """Each step's crops and targets on the device, the CPU-only teacher's samples made ahead."""

    def __init__(self, stills: list[np.ndarray], styles: list[str], plan: tuple[Stage, ...], seed: int,
                 device: torch.device, workers: int, ahead: int):  # fmt: skip
        self.plan, self.seed, self.device, self.ahead = plan, seed, device, ahead
        self.stills_hw = [s.shape[:2] for s in stills]
        self.prompts = {s: mini.style_prompts(s) for s in styles}
        self.teachers = {s: mini_data.torch_teacher(s, device) for s in styles}
        self.cpu_styles = [s for s, t in self.teachers.items() if t is None]
        self.workers = mini_data.AnimeWorkers(stills, self.cpu_styles, workers)
        self.stills = [torch.from_numpy(np.array(s)).to(device) for s in stills]  # (H, W, 3) uint8, writable copies
        self.plans: dict[int, mini_data.StepPlan] = {}
        self.made: dict[int, tuple] = {}  # step -> (plan, x, y) of the samples made at it, while reused
        self.submitted = -1

    def plan_of(self, step: int):
        """The samples made anew at `step` (all of its batch when its stage reuses none)."""
        if step not in self.plans:
            index, stage, local = stage_at(self.plan, step)
            sizes, batch_256 = stage.sizes, stage.batch_256
            if stage.side_every > 1:  # one side for the steps of a side period, drawn from its first
                first = step - local % stage.side_every
                sizes = (int(np.random.default_rng([self.seed, index, first, 2]).choice(stage.sizes)),)
            if stage.reuse > 1:
                side = sizes[0] if len(sizes) == 1 else None
                new = -(-mini_data.batch_for(side, batch_256) // stage.reuse) if side else None
                batch_256 = new * (side / 256) ** 2 if new else batch_256 / stage.reuse
            self.plans[step] = mini_data.plan_step(self.seed, index, step, self.stills_hw, self.prompts,
                                                   batch_256, sizes)  # fmt: skip
        return self.plans[step]

    def window(self, step: int) -> range:
        """The steps whose new samples `step` trains on: itself and up to reuse - 1 before it, in
        its stage and side period."""
        _, stage, local = stage_at(self.plan, step)
        start = max(step - (stage.reuse - 1), step - local % stage.side_every, step - local)
        return range(start, step + 1)

    def get(self, step: int, last: int) -> tuple[mini_data.StepPlan, torch.Tensor, torch.Tensor]:
        if self.cpu_styles:  # queue the CPU-only teacher's samples `ahead` steps early
            for s in range(max(self.window(step)[0], self.submitted + 1), min(last, step + self.ahead + 1)):
                self.workers.submit(s, self.plan_of(s))
                self.submitted = s
        window = self.window(step)
        for s in window:  # a resumed run makes the reused samples of the steps before it again
            if s not in self.made:
                self.made[s] = self._make(s)
        for s in [s for s in self.made if s < window[0]]:
            del self.made[s]
            self.plans.pop(s, None)
        parts = [self.made[s] for s in window]
        if len(parts) == 1:
            return parts[0]
        plans = [p for p, _, _ in parts]
        plan = mini_data.StepPlan(plans[0].side, sum((p.styles for p in plans), ()), sum((p.prompts for p in plans), ()),
                                  sum((p.boxes for p in plans), ()), np.concatenate([p.jitter for p in plans]))  # fmt: skip
        return plan, torch.cat([x for _, x, _ in parts]), torch.cat([y for _, _, y in parts])

    def _make(self, step: int):
        plan = self.plan_of(step)
        x = mini_data.gpu_crops(self.stills, plan)
        y = mini_data.targets(self.teachers, plan, x)
        if self.cpu_styles:
            for style, (inputs, outputs) in self.workers.take(step).items():
                idx = plan.indices(style)
                if idx:
                    x[idx] = train_data.to_tensor(inputs, self.device)
                    y[idx] = train_data.to_tensor(outputs, self.device)
        return plan, x, y

    def close(self) -> None:
        self.workers.close()
