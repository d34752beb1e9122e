"""`mini`'s training checkpoints: one safetensors file of at most 16 MB (issue #13: it must come back
from the GPU machine, whose returned files are capped at 16 MiB, and travel to the next chunk).

What it holds, and why that fits:
- every weight in fp16 (`w.<component>.<name>`): the weights `mini` ships, ~15.5 MB at its ~7.7M
  parameters. They leave little room, so the optimiser's state is cut down:
- AdamW's second moment as one value per block of consecutive entries (`v.<param>`: the block's
  largest sqrt(v), bf16; the smallest block of 32, 64, ... that fits the budget). Restored, every
  entry takes its block's largest v: steps right after a resume are never larger than before it
  (no spike), only smaller for a while, until v's average (horizon 1/(1-beta2) = 1000 steps)
  settles again;
- no first moment: its horizon is 1/(1-beta1) = 10 steps, and a resume restarts it from zero;
- the step counts and everything else as JSON in the file's metadata (`mini`).

    save_checkpoint(path, modules, optimizer, params, meta)     # raises CheckpointTooLarge
    tensors, meta = load_checkpoint(path)
    restore_modules(modules, tensors); restore_optimizer(optimizer, params, tensors)
    restore_matching(modules, tensors)       # another config's checkpoint: what matches, for a warm start
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import StylizeError

CHECKPOINT_BUDGET = 16_000_000  # bytes, the whole file
BLOCKS = (32, 64, 128, 256, 1024)  # second-moment block sizes tried, finest first


class CheckpointTooLarge(StylizeError):
    """The checkpoint would not fit its budget even with the coarsest second-moment blocks."""


def weight_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """`w.<component>.<name>`: every entry of each module's state dict on the CPU, floats as fp16."""
    out = {}
    for comp, module in modules.items():
        for name, t in module.state_dict().items():
            t = t.detach().to("cpu")
            out[f"w.{comp}.{name}"] = (t.half() if t.is_floating_point() else t).contiguous()
    return out


def block_max_sqrt(v: torch.Tensor, block: int) -> torch.Tensor:
    """(ceil(n / block),) bf16: the largest sqrt(v) of each block of `block` consecutive entries."""
    flat = v.detach().float().flatten().clamp_min(0)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % block))
    return flat.view(-1, block).amax(1).sqrt().to(torch.bfloat16).cpu()


def moment_tensors(optimizer, params: dict[str, torch.nn.Parameter], block: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in params.items():
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        if "exp_avg_sq" in state:
            out[f"v.{name}"] = block_max_sqrt(state["exp_avg_sq"], block)
    return out


def _serialise(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"mini": json.dumps(meta, sort_keys=True)})


def checkpoint_bytes(modules, optimizer, params, meta: dict, budget: int = CHECKPOINT_BUDGET) -> tuple[bytes, int]:
    """The checkpoint file's bytes and the second-moment block used: the finest block that fits
    `budget`. Raises CheckpointTooLarge when even the weights and the coarsest blocks do not."""
    weights = weight_tensors(modules)
    for block in BLOCKS:
        data = _serialise({**weights, **moment_tensors(optimizer, params, block)}, {**meta, "v_block": block})
        if len(data) <= budget:
            return data, block
    raise CheckpointTooLarge(
        f"a checkpoint takes {len(data):,} bytes with second-moment blocks of {BLOCKS[-1]} "
        f"(weights alone {sum(t.numel() * t.element_size() for t in weights.values()):,}); the budget is "
        f"{budget:,}: make mini smaller (stylize/presets/models/mini.yaml)"
    )


def save_checkpoint(path: str | Path, modules, optimizer, params, meta: dict,
                    budget: int = CHECKPOINT_BUDGET) -> tuple[int, int]:  # fmt: skip
    """Write the checkpoint atomically (a partial file never replaces a good one); returns its size
    and the second-moment block it used."""
    data, block = checkpoint_bytes(modules, optimizer, params, meta, budget)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data), block


def load_checkpoint(path: str | Path, metadata_only: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["mini"])
        tensors = {} if metadata_only else {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return tensors, meta


def restore_modules(modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Copy the stored weights into the modules (any dtype and device; every entry must be there)."""
    for comp, module in modules.items():
        prefix = f"w.{comp}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        own = module.state_dict()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise StylizeError(f"checkpoint does not match {comp}: missing {missing[:3]}, unexpected {extra[:3]}")
    shapes = restore_matching(modules, tensors)["fresh"]  # every name is there: only a shape can differ
    if shapes:
        raise StylizeError(f"checkpoint does not match in shape: {shapes[:3]}")


def restore_matching(modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """A new model's warm start from another config's checkpoint: copy every stored weight whose
    name and shape match, leave the rest as initialised. Returns {"copied": [...], "fresh": [...]}
    (`<component>.<name>`), for the record."""
    copied, fresh = [], []
    with torch.no_grad():
        for comp, module in modules.items():
            for name, t in module.state_dict().items():
                stored = tensors.get(f"w.{comp}.{name}")
                if stored is not None and stored.shape == t.shape:
                    t.copy_(stored.to(t.dtype))
                    copied.append(f"{comp}.{name}")
                else:
                    fresh.append(f"{comp}.{name}")
    return {"copied": copied, "fresh": fresh}


NEW_BRANCH_OUTPUTS = re.compile(r"(attn1\.to_out\.0|attentions\.\d+\.proj_out)\.(weight|bias)$")


def zero_new_branches(modules: dict[str, torch.nn.Module], fresh: list[str]) -> list[str]:
    """After `restore_matching`: the last layer of each residual branch it left fresh (a
    self-attention's output, a new transformer block's proj_out) set to zero, as ControlNet starts
    its branches, so the branch grows from nothing instead of adding noise to what was learned.
    Returns the names zeroed."""
    zeroed = []
    with torch.no_grad():
        for name in fresh:
            comp, rest = name.split(".", 1)
            if NEW_BRANCH_OUTPUTS.search(rest):
                modules[comp].get_parameter(rest).zero_()
                zeroed.append(name)
    return zeroed


def restore_optimizer(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter],
                      tensors: dict[str, torch.Tensor], block: int, step: int) -> int:  # fmt: skip
    """Give AdamW the stored second moments (each entry its block's largest), a zero first moment
    and the step count `step`. Returns how many parameters had a stored moment."""
    restored = 0
    for name, p in params.items():
        key = f"v.{name}"
        if key not in tensors:
            continue
        sq = tensors[key].float().square().repeat_interleave(block)[: p.numel()].view_as(p).to(p.device)
        fused = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
        optimizer.state[p] = {
            "step": torch.tensor(float(step), dtype=torch.float32, device=p.device if fused else "cpu"),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            # in p's own memory format: fused AdamW walks the storage, so a channels_last p needs
            # channels_last moments
            "exp_avg_sq": torch.empty_like(p, memory_format=torch.preserve_format).copy_(sq),
        }
        restored += 1
    return restored
