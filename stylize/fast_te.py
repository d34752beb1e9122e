"""Qwen3-VL as the engine runs it: the same function as the stock call, minus its waste.

For a fixed image grid and one prompt at a time (DESIGN §5):
- everything that depends only on the grid or the prompt is computed once, off the hot path:
  the vision position embeddings and rotary angles, the text rotary angles (M-RoPE), the token
  embeddings and the attention mask: no `.tolist()` on the grid, no host sync in the forward;
- the vision tower attends all B images as one batch (same grid), not image by image;
- the 64-token chat-template prefix is identical for every frame: its keys and values are computed
  once and every frame attends to them;
- the instruction is right-padded to a multiple of `bucket` tokens (causal attention: real tokens
  never see the padding), so prompts of similar length share one static shape;
- `lm_head` never runs.

The module reads the stock model's weights; it owns no parameters. Every prompt-dependent tensor
is a buffer updated in place (`copy_`), so a compiled or CUDA-graphed forward survives a prompt
change of the same bucket without recompiling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models.text_encoder import PromptTokens, patchify


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, L, d) → (B, kv_heads·groups, L, d), as transformers' repeat_kv."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


class FastTextEncoder(torch.nn.Module):
    """`forward(frames_bchw)` → (states (B, max_len, hidden), mask (B, max_len)), equal to
    `text_encoder.encode` on the same frames (float in [0, 1], square at `te_image_size`)."""

    def __init__(self, te, te_image_size: int, hidden_states: str = "post_norm", bucket: int = 16,
                 fused_norms: bool = False):  # fmt: skip
        super().__init__()
        self.fused_norms = fused_norms  # the text layers' RMSNorms as one F.rms_norm call each
        self.te = [te]  # a list: read the stock model's weights without registering it as a submodule
        self.hidden_states, self.bucket = hidden_states, bucket
        vision = te.config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.grid = te_image_size // self.patch
        self.n_patches = self.grid**2  # vision tokens per frame before the merge
        self.n_image = self.n_patches // self.merge**2  # image tokens per frame in the text
        self.deepstack = list(vision.deepstack_visual_indexes)
        text = te.config.text_config
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.groups = text.num_attention_heads // text.num_key_value_heads
        self.prompt_shape: tuple[int, int] | None = None  # (prefix_len, rest_len) of the current buffers

    @property
    def model(self):
        return self.te[0]

    # -- set-up, once per prompt (host work is fine here) -------------------------------------

    @torch.no_grad()
    def set_prompt(self, tokens: PromptTokens) -> None:
        """Make the prompt-dependent buffers; in place when the shape is unchanged."""
        te, dev = self.model, self.model.device
        p = tokens.prefix_len
        rest = tokens.kept_len
        rest_len = min(tokens.max_len, -(-rest // self.bucket) * self.bucket)  # right-padded length
        pad_id = te.config.text_config.pad_token_id or 0
        ids = F.pad(tokens.input_ids, (0, p + rest_len - tokens.input_ids.numel()), value=pad_id).to(dev)
        mm = F.pad(tokens.mm_token_type_ids, (0, ids.numel() - tokens.mm_token_type_ids.numel())).to(dev)
        cos, sin, vis_pos, vis_cos, vis_sin = self._capture_static(ids, mm)
        embeds = te.language_model.embed_tokens(ids[None])  # (1, P + L, hidden)
        image_at = int(torch.nonzero(mm)[0, 0]) - p  # first image token, within the rest
        prefix_kv = self._prefix_kv(embeds[:, :p], cos[:, :p], sin[:, :p])
        # the rest attends to the whole prefix and causally to itself
        causal = torch.ones(rest_len, rest_len, dtype=torch.bool, device=dev).tril()
        mask = torch.cat([torch.ones(rest_len, p, dtype=torch.bool, device=dev), causal], dim=1)
        kept = torch.zeros(tokens.max_len, dtype=torch.long, device=dev)
        kept[:rest] = 1
        new = {
            "rest_embeds": embeds[:, p:], "cos": cos[:, p:], "sin": sin[:, p:], "attn_mask": mask,
            "kept": kept, "vis_pos": vis_pos, "vis_cos": vis_cos, "vis_sin": vis_sin,
            **{f"k{i}": k for i, (k, _) in enumerate(prefix_kv)}, **{f"v{i}": v for i, (_, v) in enumerate(prefix_kv)},
        }  # fmt: skip
        same = self.prompt_shape == (p, rest_len) and getattr(self, "image_at", None) == image_at
        for name, value in new.items():
            if same:
                getattr(self, name).copy_(value)  # same addresses: compiled graphs and CUDA graphs stay valid
            else:
                self.register_buffer(name, value.contiguous(), persistent=False)
        self.prompt_shape, self.image_at, self.max_len = (p, rest_len), image_at, tokens.max_len

    def _capture_static(self, ids, mm):
        """Run the stock model once on one blank frame and record what it derives from the grid and
        the token layout: the text rotary angles (M-RoPE positions included) and the vision tower's
        position embeddings and rotary angles. Version-independent: read off the call itself."""
        te = self.model
        got: dict = {}

        def record(name, value):
            got.setdefault(name, value)  # a pre-hook that returns None leaves the call unchanged

        hooks = [
            te.language_model.layers[0].register_forward_pre_hook(
                lambda m, a, kw: record("text", kw["position_embeddings"]), with_kwargs=True
            ),
            te.visual.blocks[0].register_forward_pre_hook(
                lambda m, a, kw: record("vision", (a[0] if a else kw["hidden_states"], kw["position_embeddings"])),
                with_kwargs=True,
            ),
            # zero patch embeddings: block 0 then receives exactly the position embeddings
            te.visual.patch_embed.register_forward_hook(lambda m, a, out: torch.zeros_like(out)),
        ]
        try:
            blank = torch.zeros(1, 3, self.grid * self.patch, self.grid * self.patch, device=ids.device)
            te(
                input_ids=ids[None], attention_mask=torch.ones_like(ids[None]),
                pixel_values=patchify(blank, self.patch, self.merge, self.temporal).to(te.dtype),
                image_grid_thw=torch.tensor([[1, self.grid, self.grid]], device=ids.device),
                mm_token_type_ids=mm[None], use_cache=False,
            )  # fmt: skip
        finally:
            for h in hooks:
                h.remove()
        cos, sin = got["text"]  # (1, P + L, head_dim)
        vis_pos, (vis_cos, vis_sin) = got["vision"]  # (N, C), (N, head_dim_v)
        return cos, sin, vis_pos, vis_cos, vis_sin

    def _prefix_kv(self, embeds, cos, sin):
        """Keys and values of the static prefix at every layer, (1, kv_heads, P, d) each."""
        kvs, h = [], embeds
        p = embeds.shape[1]
        mask = torch.ones(p, p, dtype=torch.bool, device=embeds.device).tril()
        for layer in self.model.language_model.layers:
            h, kv = self._text_layer(layer, h, cos, sin, mask, None)
            kvs.append(kv)
        return kvs

    # -- the forward: tensors in, tensors out, no host sync ------------------------------------

    def forward(self, frames_bchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        te = self.model
        b = frames_bchw.shape[0]
        pixels = patchify(frames_bchw.float(), self.patch, self.merge, self.temporal).to(te.dtype)
        image, deepstack = self._vision(pixels, b)  # (B, n_image, hidden), [(B, n_image, hidden)]
        h = self.rest_embeds.expand(b, -1, -1)
        s, e = self.image_at, self.image_at + self.n_image
        h = torch.cat([h[:, :s], image.to(h.dtype), h[:, e:]], dim=1)
        for i, layer in enumerate(te.language_model.layers):
            past = (getattr(self, f"k{i}"), getattr(self, f"v{i}"))
            h, _ = self._text_layer(layer, h, self.cos, self.sin, self.attn_mask, past)
            if i < len(deepstack):  # DeepStack: vision features added after the first layers
                h = torch.cat([h[:, :s], h[:, s:e] + deepstack[i].to(h.dtype), h[:, e:]], dim=1)
        if self.hidden_states == "post_norm":
            h = self._norm(te.language_model.norm, h)
        kept = self.kept[: h.shape[1]].to(h.dtype)[None, :, None]
        states = F.pad(h * kept, (0, 0, 0, self.max_len - h.shape[1]))  # padding zeroed, fixed length
        return states, self.kept.expand(b, -1)

    def _vision(self, pixels: torch.Tensor, b: int):
        visual = self.model.visual
        x = visual.patch_embed(pixels).view(b, self.n_patches, -1) + self.vis_pos  # (B, N, C)
        deepstack = []
        for i, blk in enumerate(visual.blocks):
            x = x + self._vision_attention(blk.attn, blk.norm1(x))
            x = x + blk.mlp(blk.norm2(x))
            if i in self.deepstack:
                merger = visual.deepstack_merger_list[self.deepstack.index(i)]
                deepstack.append(merger(x.reshape(b * self.n_patches, -1)).view(b, self.n_image, -1))
        return visual.merger(x.reshape(b * self.n_patches, -1)).view(b, self.n_image, -1), deepstack

    def _vision_attention(self, attn, x: torch.Tensor) -> torch.Tensor:
        """All B images attend at once (same grid): one SDPA call instead of one per image."""
        b, n, c = x.shape
        q, k, v = attn.qkv(x).view(b, n, 3, attn.num_heads, -1).unbind(2)  # (B, N, heads, d)
        cos, sin = self.vis_cos[:, None].float(), self.vis_sin[:, None].float()  # (N, 1, d)
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(v.dtype)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return attn.proj(o.transpose(1, 2).reshape(b, n, c))

    def _text_layer(self, layer, h, cos, sin, mask, past):
        """One Qwen3 decoder layer over the rest of the sequence, attending to `past` (the prefix's
        keys and values) first. Returns the new hidden states and this call's (k, v)."""
        attn = layer.self_attn
        b, n, _ = h.shape
        x = self._norm(layer.input_layernorm, h)
        q = self._norm(attn.q_norm, attn.q_proj(x).view(b, n, -1, self.head_dim)).transpose(1, 2)  # (B, heads, L, d)
        k = self._norm(attn.k_norm, attn.k_proj(x).view(b, n, -1, self.head_dim)).transpose(1, 2)  # (B, kv, L, d)
        v = attn.v_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        c, s = cos[:, None], sin[:, None]  # (1, 1, L, d)
        q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        kv = (k, v)
        if past is not None:
            k = torch.cat([past[0].expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([past[1].expand(b, -1, -1, -1), v], dim=2)
        o = F.scaled_dot_product_attention(q, _repeat_kv(k, self.groups), _repeat_kv(v, self.groups), attn_mask=mask)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))
        h = h + layer.mlp(self._norm(layer.post_attention_layernorm, h))
        return h, kv

    def _norm(self, norm, x: torch.Tensor) -> torch.Tensor:
        """A Qwen3 RMSNorm: the module itself, or with `fused_norms` one F.rms_norm call with its
        weight (fp32 inside; the module rounds to the input dtype before the weight)."""
        if not self.fused_norms or x.dtype != norm.weight.dtype:
            return norm(x)
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
