"""What the probes share: one style's crops of the licence-clean stills (.data/crops) and its
teacher's outputs, made on the CPU as train_mini makes a step's (mini_data.plan_step)."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from stylize.train import data as train_data, mini, mini_data


class StyleSamples:
    """samples(seed, step, n) -> (plan, crops x, teacher outputs y): n crops of `side` px (B, 3, S, S)
    float in [0, 1], drawn as stage `stage`'s step `step` of a run seeded `seed` would draw them."""

    def __init__(self, style: str, stage: int = 0, side: int = 128):
        self.style, self.stage, self.side = style, stage, side
        stills = train_data.load_stills()
        self.hw = [s.shape[:2] for s in stills]
        self.stills = [torch.from_numpy(np.array(s)) for s in stills]
        self.teachers = {style: mini_data.torch_teacher(style, "cpu")}
        self.prompts = {style: mini.style_prompts(style)}

    def __call__(self, seed: int, step: int, n: int):
        p = mini_data.plan_step(seed, self.stage, step, self.hw, self.prompts, n * (self.side / 256) ** 2,
                                (self.side,))  # fmt: skip
        x = mini_data.gpu_crops(self.stills, p)
        return p, x, mini_data.targets(self.teachers, p, x)
