"""Temporal ControlNet-LLLite, compile-friendly (DESIGN §4).

One small adapter per hooked Linear of the U-Net's transformer blocks (attn1 to_q/to_k/to_v and
attn2 to_q: 108 in DreamLite-mobile, 38 of them in down_blocks), in the released v3 layout:

    conditioning1: a CNN from the conditioning image to a (32, h, w) embedding, by total stride
                   8: conv 3→16 k4s4, ReLU, conv 16→32 k2s2
                   16: conv 3→16 k4s4, ReLU, conv 16→32 k4s4
                   32: conv 3→16 k4s4, ReLU, conv 16→16 k4s4, ReLU, conv 16→32 k2s2
    down.0: Linear(C→64) + ReLU;  mid.0: Linear(32+64→64) + ReLU on cat(emb, down(x));
    up.0:   Linear(64→C), zero-initialised;  the host Linear sees x + multiplier·up(mid(...)).

The U-Net's input is width-concatenated [generated | source], so the embedding is zero-padded
along the width: only the generated half is conditioned.

Compile-friendly form: the host Linear is wrapped (`LLLiteLinear`, a plain module holding the
original Linear and its adapter); the per-refresh conditioning lives in persistent buffers updated
in place (`copy_`), the multiplier is a buffer too ("off" is 0.0, never None), so U-Net + adapter
trace as one graph with no Python branch on values. Exact algebra: the embedding's share of `mid`
(W_emb·emb + b) is computed once per refresh, so each step only adds W_x·down(x) to it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

HOOK_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")
COND_EMB, MLP = 32, 64


def hook_names(unet, subset: str | list[str] = "down_blocks") -> list[str]:
    """The hooked Linears' module paths; `subset` is "all", "down_blocks", or block prefixes."""
    prefixes = None if subset == "all" else ([subset] if isinstance(subset, str) else list(subset))
    names = [
        n
        for n, m in unet.named_modules()
        if isinstance(m, nn.Linear | LLLiteLinear) and n.endswith(HOOK_SUFFIXES) and ".base" not in n
    ]
    if prefixes is not None:
        names = [n for n in names if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes)]
    if not names:
        raise ModelError(f"adapter hook subset {subset!r} matches no attention projection of the U-Net")
    return names


def block_level(name: str, levels: int) -> int:
    """Resolution level of a hooked Linear's block: 0 at the latent size, 1 at half, ..."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return levels - 1
    return levels - 1 - int(parts[1])  # up_blocks


def _conditioning(stride: int) -> nn.Sequential:
    if stride == 8:
        layers = [nn.Conv2d(3, 16, 4, 4), nn.ReLU(), nn.Conv2d(16, COND_EMB, 2, 2)]
    elif stride == 16:
        layers = [nn.Conv2d(3, 16, 4, 4), nn.ReLU(), nn.Conv2d(16, COND_EMB, 4, 4)]
    elif stride == 32:
        layers = [nn.Conv2d(3, 16, 4, 4), nn.ReLU(), nn.Conv2d(16, 16, 4, 4), nn.ReLU(), nn.Conv2d(16, COND_EMB, 2, 2)]
    else:
        raise ModelError(f"LLLite has no conditioning network for a total stride of {stride}")
    return nn.Sequential(*layers)


class LLLiteModule(nn.Module):
    """One adapter: the released v3 sub-layers under their released names."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conditioning1 = _conditioning(stride)
        self.down = nn.Sequential(nn.Linear(channels, MLP), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(COND_EMB + MLP, MLP), nn.ReLU())
        self.up = nn.Sequential(nn.Linear(MLP, channels))
        nn.init.zeros_(self.up[0].weight)
        nn.init.zeros_(self.up[0].bias)

    def embed(self, cond_bchw: torch.Tensor) -> torch.Tensor:
        """Conditioning images (B, 3, H, W) in [-1, 1] at the working resolution → the embedding
        laid out like the block's tokens, (B, h·2w, 32) with (h, w) = (H, W) / stride, the right
        (source) half of the width zero."""
        emb = self.conditioning1(cond_bchw)  # (B, 32, h', w')
        emb = F.pad(emb, (0, emb.shape[-1]))  # width-concat: zeros for the source half
        return emb.flatten(2).transpose(1, 2)  # (B, h'·2w', 32), row-major like the tokens

    def mid_share(self, emb: torch.Tensor) -> torch.Tensor:
        """The embedding's part of `mid` plus its bias: W[:, :32]·emb + b, (B, N, 64)."""
        w, b = self.mid[0].weight, self.mid[0].bias
        return F.linear(emb, w[:, :COND_EMB], b)

    def delta(self, x: torch.Tensor, mid_share: torch.Tensor) -> torch.Tensor:
        """up(mid(cat(emb, down(x)))) with the embedding's share precomputed."""
        h = self.down(x)
        h = F.relu(mid_share + F.linear(h, self.mid[0].weight[:, COND_EMB:]))
        return self.up(h)


class LLLiteLinear(nn.Module):
    """A hooked Linear: `base(x + multiplier · adapter(x))`. `mid_share` and `multiplier` are
    buffers written in place between calls (compiled graphs read their fixed addresses)."""

    def __init__(self, base: nn.Linear, adapter: LLLiteModule, multiplier: torch.Tensor):
        super().__init__()
        self.base, self.adapter = base, adapter
        self.register_buffer("multiplier", multiplier, persistent=False)  # shared by every hook
        self.register_buffer("mid_share", torch.zeros(0, device=base.weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.adapter.delta(x, self.mid_share.to(x.dtype))
        return self.base(x + self.multiplier.to(x.dtype) * delta)


class TemporalLLLite(nn.Module):
    """The adapters of one U-Net, keyed by the released names (path with '.' → '__')."""

    def __init__(self, unet, subset: str | list[str] = "down_blocks"):
        super().__init__()
        self.subset = subset
        levels = len(unet.config.block_out_channels)
        self.names = hook_names(unet, subset)
        modules = dict(unet.named_modules())
        self.adapters = nn.ModuleDict(
            {
                n.replace(".", "__"): LLLiteModule(modules[n].in_features, 8 * 2 ** block_level(n, levels))
                for n in self.names
            }
        )

    def attach(self, unet) -> list[LLLiteLinear]:
        """Wrap each hooked Linear of `unet` (once, before compiling). Returns the wrappers."""
        param = next(self.parameters())
        self.multiplier = torch.ones((), device=param.device, dtype=torch.float32)
        self.wrappers = []
        for name in self.names:
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name)
            base = getattr(parent, child)
            if isinstance(base, LLLiteLinear):
                raise ModelError(f"{name} already has an adapter attached")
            wrapper = LLLiteLinear(base, self.adapters[name.replace(".", "__")], self.multiplier)
            setattr(parent, child, wrapper)
            self.wrappers.append(wrapper)
        return self.wrappers

    def detach(self, unet) -> None:
        """Put the original Linears back."""
        for name, wrapper in zip(self.names, self.wrappers):
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name), child, wrapper.base)
        self.wrappers = []

    def set_multiplier(self, value: float) -> None:
        self.multiplier.fill_(value)

    @torch.no_grad()
    def set_condition(self, cond01_bchw: torch.Tensor) -> None:
        """A refresh: conditioning images (B, 3, H, W) in [0, 1] at the working resolution →
        every hook's `mid_share` buffer, in place when its shape is unchanged.

        The hooks of one stride run as one grouped network (their convs stacked along the
        channels, `groups=n` after the first): the same arithmetic as n separate networks, in a
        handful of kernels instead of hundreds."""
        cond = cond01_bchw * 2 - 1  # the adapter's input range (as its training pipeline normalises)
        for stride, wrappers in self._by_stride().items():
            shares = self._grouped_shares([w.adapter for w in wrappers], cond)  # (n, B, N, 64)
            for wrapper, share in zip(wrappers, shares):
                if wrapper.mid_share.shape == share.shape:
                    wrapper.mid_share.copy_(share)
                else:  # a new batch size or geometry: a new buffer (and, compiled, a new graph)
                    wrapper.mid_share = share.contiguous()

    def _by_stride(self) -> dict[int, list[LLLiteLinear]]:
        groups: dict[int, list[LLLiteLinear]] = {}
        for w in self.wrappers:
            groups.setdefault(w.adapter.stride, []).append(w)
        return groups

    @staticmethod
    def _grouped_shares(adapters: list[LLLiteModule], cond: torch.Tensor) -> torch.Tensor:
        n = len(adapters)
        x = cond.to(adapters[0].down[0].weight.dtype)
        convs = [[m for m in a.conditioning1 if isinstance(m, nn.Conv2d)] for a in adapters]
        for i in range(len(convs[0])):
            layer = [c[i] for c in convs]
            weight = torch.cat([c.weight for c in layer])  # (n·out, in, k, k)
            bias = torch.cat([c.bias for c in layer])
            x = F.conv2d(x, weight, bias, stride=layer[0].stride, groups=1 if i == 0 else n)
            if i < len(convs[0]) - 1:
                x = F.relu(x)
        b, _, h, w = x.shape
        emb = F.pad(x.view(b, n, COND_EMB, h, w), (0, w))  # width-concat: zeros for the source half
        emb = emb.flatten(3)  # (B, n, 32, h·2w)
        mid_w = torch.stack([a.mid[0].weight[:, :COND_EMB] for a in adapters])  # (n, 64, 32)
        mid_b = torch.stack([a.mid[0].bias for a in adapters])  # (n, 64)
        share = torch.einsum("bnct,noc->nbto", emb, mid_w) + mid_b[:, None, None, :]
        return share  # (n, B, h·2w, 64)


# ---------------------------------------------------------------------------------------------
# Loading the released layout
# ---------------------------------------------------------------------------------------------


def load_lllite(path: str | Path, unet, subset: str | list[str] = "down_blocks", strict: bool = True) -> TemporalLLLite:
    """Read a released temporal-LLLite safetensors file (keys `<linear path '.'→'__'>.<sub-layer>`,
    optionally prefixed `modules_dict.`) for the hooks in `subset` only. A missing key or a shape
    that does not match refuses the file, naming the first bad key."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"adapter weights not found: {path}; pass the .safetensors file of the temporal LLLite")
    try:
        raw = load_file(str(path))
    except Exception as e:  # not a safetensors file
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from e
    state = {k.removeprefix("modules_dict."): v for k, v in raw.items()}
    lllite = TemporalLLLite(unet, subset)
    own = lllite.adapters.state_dict()
    for key, want in own.items():
        got = state.get(key)
        if got is None:
            raise ModelError(f"{path}: no weights for {key} (the file does not hold this hook)")
        if tuple(got.shape) != tuple(want.shape):
            raise ModelError(f"{path}: {key} has shape {tuple(got.shape)}, this U-Net needs {tuple(want.shape)}")
    lllite.adapters.load_state_dict({k: state[k] for k in own}, strict=True)
    return lllite
