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
original Linear and its adapters); the per-refresh conditioning lives in persistent buffers updated
in place (`copy_`), the multiplier is a buffer too ("off" is 0.0, never None), so U-Net + adapter
trace as one graph with no Python branch on values. Exact algebra: the embedding's share of `mid`
(W_emb·emb + b) is computed once per refresh, so each step only adds W_x·down(x) to it; and
W(x + U h) = W x + (W U) h folds every `up` into the host's GEMM, so the three attn1 hooks sit
beside a fused QKV projection as one wrapper.
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


class LLLiteLinear(nn.Module):
    """A hooked Linear and the adapters on its input: the output rows `rows[i]` of the host see
    `x + multiplier·up_i(mid_i(cat(emb_i, down_i(x))))`. A host with one adapter is a plain hooked
    Linear; a fused `to_qkv` (optimize.fuse_qkv) carries the attn1 q, k and v hooks, which share
    their input. Exact algebra makes it three GEMMs over the tokens (down, mid, host), whatever the
    number of adapters, instead of one per host plus three per adapter:

        h   = relu(share + W_mid·relu(W_down·x + b_down))    every adapter's down and mid at once
        out = [W | W·U]·[x ; m·h] + b + m·W·b_up              the host and every up in one GEMM

    with W_down stacked, W_mid block-diagonal and W·U placed at each adapter's rows. The derived
    weights are buffers (`derive`, at attach and whenever the weights change); `mid_share` (the
    embedding's share of mid, per refresh) and `multiplier` are buffers written in place, so a
    compiled graph reads fixed addresses and "off" is multiplier 0."""

    def __init__(self, base: nn.Linear, adapters: list[LLLiteModule], rows: list[slice], multiplier: torch.Tensor):
        super().__init__()
        self.base, self.adapters, self.rows = base, nn.ModuleList(adapters), rows
        self.register_buffer("multiplier", multiplier, persistent=False)  # shared by every hook
        self.register_buffer("mid_share", torch.zeros(0, device=base.weight.device), persistent=False)
        # one mid_share per shape seen, kept: a CUDA graph captured for a shape reads its buffer's
        # address, so coming back to that shape (A -> B -> A) must write the same buffer again
        self.shares: dict[tuple[int, ...], torch.Tensor] = {}
        self.derive()

    @torch.no_grad()
    def derive(self) -> None:
        """The stacked, block-diagonal and host-folded weights, from the current weights (in
        float32, stored in the host's dtype; in place once they exist)."""
        w = self.base.weight.float()  # (out, C)
        ups = [a.up[0] for a in self.adapters]
        folded = torch.zeros(w.shape[0], MLP * len(ups), device=w.device)  # W·U at each adapter's rows
        up_bias = torch.zeros(w.shape[0], device=w.device)  # W·b_up
        for i, (up, rows) in enumerate(zip(ups, self.rows)):
            folded[rows, i * MLP : (i + 1) * MLP] = w[rows] @ up.weight.float()
            up_bias[rows] = w[rows] @ up.bias.float()
        derived = {
            "down_w": torch.cat([a.down[0].weight for a in self.adapters]),  # (n·64, C)
            "down_b": torch.cat([a.down[0].bias for a in self.adapters]),
            "mid_w": torch.block_diag(*[a.mid[0].weight[:, COND_EMB:] for a in self.adapters]),  # (n·64, n·64)
            "host_w": torch.cat([w, folded], dim=1),  # (out, C + n·64)
            "up_bias": up_bias,
        }
        for name, value in derived.items():
            value = value.to(self.base.weight.dtype)
            if name in self._buffers and self._buffers[name].shape == value.shape:
                self._buffers[name].copy_(value)
            else:
                self.register_buffer(name, value, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.linear(x, self.down_w, self.down_b))  # (B, N, n·64)
        h = F.relu(self.mid_share.to(x.dtype) + F.linear(h, self.mid_w))
        m = self.multiplier.to(x.dtype)
        bias = m * self.up_bias if self.base.bias is None else self.base.bias + m * self.up_bias
        return F.linear(torch.cat([x, m * h], dim=-1), self.host_w, bias)  # (B, N, out)


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
        self.wrappers: list[LLLiteLinear] = []
        self.register_load_state_dict_post_hook(lambda module, keys: module.derive())

    def attach(self, unet) -> list[LLLiteLinear]:
        """Wrap each hooked Linear of `unet` (once, before compiling); where the U-Net's
        self-attention has a fused `to_qkv`, its q, k and v hooks share one wrapper on it.
        Returns the wrappers."""
        param = next(self.parameters())
        self.multiplier = torch.ones((), device=param.device, dtype=torch.float32)
        hosts: dict[str, list[tuple[str, slice]]] = {}
        for name in self.names:
            attn_path, _, proj = name.rpartition(".")
            attn = unet.get_submodule(attn_path)
            if hasattr(attn, "to_qkv") and proj in ("to_q", "to_k", "to_v"):
                q, kv = attn.to_q.out_features, attn.to_k.out_features
                rows = {"to_q": slice(0, q), "to_k": slice(q, q + kv), "to_v": slice(q + kv, q + 2 * kv)}[proj]
                hosts.setdefault(f"{attn_path}.to_qkv", []).append((name, rows))
            else:
                hosts.setdefault(name, []).append((name, slice(None)))
        self.wrappers, self.hosts = [], list(hosts)
        for host, hooks in hosts.items():
            parent_name, _, child = host.rpartition(".")
            parent = unet.get_submodule(parent_name)
            base = getattr(parent, child)
            if isinstance(base, LLLiteLinear):
                raise ModelError(f"{host} already has an adapter attached")
            adapters = [self.adapters[n.replace(".", "__")] for n, _ in hooks]
            wrapper = LLLiteLinear(base, adapters, [r for _, r in hooks], self.multiplier)
            wrapper.hook_names = [n for n, _ in hooks]
            setattr(parent, child, wrapper)
            self.wrappers.append(wrapper)
        return self.wrappers

    def detach(self, unet) -> None:
        """Put the original Linears back."""
        for host, wrapper in zip(self.hosts, self.wrappers):
            parent_name, _, child = host.rpartition(".")
            setattr(unet.get_submodule(parent_name), child, wrapper.base)
        self.wrappers = []

    def derive(self) -> None:
        """After the adapters' weights change (loading does this itself): rebuild the attached
        wrappers' derived weights, in place."""
        for wrapper in self.wrappers:
            wrapper.derive()

    def set_multiplier(self, value: float) -> None:
        self.multiplier.fill_(value)

    @torch.no_grad()
    def set_condition(self, cond01_bchw: torch.Tensor) -> None:
        """A refresh: conditioning images (B, 3, H, W) in [0, 1] at the working resolution →
        every wrapper's `mid_share` buffer, in place when its shape is unchanged.

        The hooks of one stride run as one grouped network (their convs stacked along the
        channels, `groups=n` after the first): the same arithmetic as n separate networks, in a
        handful of kernels instead of hundreds."""
        cond = cond01_bchw * 2 - 1  # the adapter's input range (as its training pipeline normalises)
        by_stride: dict[int, list[str]] = {}
        for name in self.names:
            by_stride.setdefault(self.adapters[name.replace(".", "__")].stride, []).append(name)
        shares = {}
        for names in by_stride.values():
            grouped = self._grouped_shares([self.adapters[n.replace(".", "__")] for n in names], cond)
            shares.update(zip(names, grouped))  # each (B, N, 64)
        for wrapper in self.wrappers:
            share = torch.cat([shares[n] for n in wrapper.hook_names], dim=-1)  # (B, N, n·64)
            kept = wrapper.shares.get(tuple(share.shape))
            if kept is None:  # a new batch size or geometry: a buffer of its own (and a new graph)
                kept = wrapper.shares[tuple(share.shape)] = share
            else:
                kept.copy_(share)
            wrapper.mid_share = kept

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
