"""Attention mixer of the hybrids: mamba_ssm's MHA (mamba2attn-*) and the GQA attention of transformers'
GraniteMoeHybrid, Bamba and NemotronH, in one form, through PyTorch's scaled_dot_product_attention (SDPA) on
every device.

Shapes: b batch, w slots (the tokens the layer kept, in their original order), h query heads of e dims, c = kv
heads, g = h / c query heads per kv head.

    qkv = in_proj(x);  qkv = conv(qkv)  (mamba_ssm's d_conv: causal depthwise over the kept tokens, no activation)
    q, k, v = split(qkv);  q, k = rope(q, k, position)  (the first rotary_dim dims of each head; NoPE: none)
    out = out_proj(softmax(q k^T * scale, causal) v)

Pruning: the layer runs on the tokens it kept, queries and keys alike, so a token dropped below is never a key
here (model.py prunes between layers; the prefill never computes a dropped token's key). Each kept token keeps its
original position for RoPE (ctx.positions minus the row's left padding: transformers' position_ids of a
left-padded batch). The prefill runs SDPA causal on each row's contiguous real slots (the flash kernel on CUDA: an
unpadded batch in one call, a padded one row by row, so no (w, w) mask is ever built). The decode state (KVState)
holds the kept tokens' keys and values, left-aligned in a static buffer with per-row lengths; a step appends its
token at each row's length and attends over the row's entries (SDPA with a length mask, the query heads of one kv
head as its query rows; or, Backends.attention_decode "matmul", two batched matmuls, which parallelise over the
cache's length where SDPA's masked kernel parallelises over rows and heads only: benchmarks/gpu_hybrid.py times
both), in place, so the decode runtime replays it from a CUDA graph.

SnapKV's criterion ("snapkv", pruning.py): the attention the row's last `window` queries (at least the protected
tail; SNAPKV_WINDOW by default, as SnapKV's observation window) pay each key, summed over those queries, max-pooled
over neighbouring keys (SNAPKV_POOL, so a key's neighbours stay with it), then the max over heads (as Simba's
score takes the max over channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backends import Backends
from .kernels import causal_conv_silu, causal_conv_update_silu
from .layers import KVState, Mixer, MixerContext, MixerOutput, ModelConfig

SNAPKV_WINDOW = 32  # SnapKV's observation window: the last queries whose attention ranks the keys
SNAPKV_POOL = 5  # keys max-pooled over this many neighbours (SnapKV clusters its selection the same way)


def rope_frequencies(rotary_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def rope(x: torch.Tensor, position: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x (..., heads, e) rotated at position (...) on its first 2 * len(inv_freq) dims, rotate-half convention
    (transformers' apply_rotary_pos_emb, flash_attn's RotaryEmbedding with interleaved=False)."""
    half = inv_freq.shape[0]
    angle = position.unsqueeze(-1).float() * inv_freq  # (..., half)
    cos, sin = angle.cos().unsqueeze(-2), angle.sin().unsqueeze(-2)  # over heads
    x1, x2, rest = x[..., :half].float(), x[..., half : 2 * half].float(), x[..., 2 * half :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


def row_spans(real: torch.Tensor) -> list[tuple[int, int]]:
    """(first, end) of each row's real slots, which are contiguous (the padding sits on one side of a row)."""
    n = real.sum(1)
    first = torch.where(n > 0, real.int().argmax(1), 0)
    return [(f, f + k) for f, k in zip(first.tolist(), n.tolist())]


class AttentionMixer(Mixer):
    """d_in: the width of its input where it is not d_model (Zamba2's shared attention reads [stream; embeddings])."""

    def __init__(self, cfg: ModelConfig, d_in: int = 0):
        super().__init__()
        h, c, e = cfg.attn_heads, cfg.attn_kv_heads, cfg.attn_head_dim
        self.heads, self.kv_heads, self.head_dim = h, c, e
        self.qkv_dim = (h + 2 * c) * e
        # the softmax scale; Falcon-H1 scales the keys (key_multiplier), which is the same as scaling q.k
        self.scale = (cfg.attn_scale or e**-0.5) * cfg.key_multiplier
        self.d_conv = cfg.attn_conv
        self.in_proj = nn.Linear(d_in or cfg.d_model, self.qkv_dim, bias=cfg.attn_qkv_bias)
        # mamba_ssm's MHA conv: nn.Conv1d's default bias
        self.conv1d = nn.Conv1d(self.qkv_dim, self.qkv_dim, self.d_conv, groups=self.qkv_dim) if self.d_conv else None
        self.out_proj = nn.Linear(h * e, cfg.d_model, bias=cfg.attn_out_bias)
        self.rotary_dim, self.rope_theta = cfg.rotary_dim, cfg.rope_theta
        self._freqs: dict[torch.device, torch.Tensor] = {}  # RoPE frequencies per device (not a buffer: no state)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._freqs:
            self._freqs[device] = rope_frequencies(self.rotary_dim, self.rope_theta, device)
        return self._freqs[device]

    def _split(self, qkv: torch.Tensor):
        """q (..., h, e), k and v (..., c, e) of qkv (..., qkv_dim)."""
        h, c, e = self.heads, self.kv_heads, self.head_dim
        q, k, v = qkv.split([h * e, c * e, c * e], dim=-1)
        return q.unflatten(-1, (h, e)), k.unflatten(-1, (c, e)), v.unflatten(-1, (c, e))

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)

    @staticmethod
    def _adapted(qkv: torch.Tensor, hidden: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
        """qkv plus a use's adapter term of hidden (Zamba2's LoRA on q, k and v; shared.py) where given."""
        return qkv if adapter is None else qkv + adapter(hidden)

    def forward(self, hidden: torch.Tensor, ctx: MixerContext, adapter: nn.Module | None = None) -> MixerOutput:
        """hidden (b, w, d_model) on the layer's kept tokens; ctx.mask marks the real slots (padding on one side of
        each row), ctx.positions their positions in the input row. adapter: _adapted's."""
        b, w, _ = hidden.shape
        m = None if ctx.mask is None else ctx.mask.unsqueeze(-1).to(hidden.dtype)
        x = hidden if m is None else hidden * m
        qkv = self._adapted(self.in_proj(x), x, adapter)
        if m is not None:  # zero inputs on the padding, as the conv's own padding of an unpadded row (qkv bias)
            qkv = qkv * m
        conv_state = None
        if self.conv1d is not None:
            if ctx.want_state:  # the last k-1 conv inputs, zero-padded on the left as the conv pads the row
                k1 = self.d_conv - 1
                conv_state = F.pad(qkv[:, -k1:].transpose(1, 2), (max(0, k1 - w), 0)).contiguous()
            qkv = causal_conv_silu(qkv.transpose(1, 2), self._conv_weight(), self.conv1d.bias, None).transpose(1, 2)
        q, k, v = self._split(qkv)
        position = ctx.positions if ctx.positions is not None else torch.arange(w, device=hidden.device).expand(b, w)
        if ctx.offset is not None:
            position = (position - ctx.offset[:, None]).clamp_min(0)
        if self.rotary_dim:
            freq = self.inv_freq(hidden.device)
            q, k = rope(q, position, freq), rope(k, position, freq)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, heads, w, e)
        o = self._attend(q, k, v, ctx.mask)
        out = self.out_proj(o.transpose(1, 2).flatten(2))
        real = ctx.mask if ctx.mask is not None else torch.ones(b, w, dtype=torch.bool, device=hidden.device)
        score = None
        if ctx.score == "snapkv":
            score = snapkv_score(q, k, real, ctx.last, max(ctx.window, SNAPKV_WINDOW), self.scale)
        elif ctx.score is not None:
            raise ValueError(f"an attention layer computes the 'snapkv' score, not {ctx.score!r}")
        state = self._prefill_state(k, v, real, ctx.mask is not None, position, conv_state) if ctx.want_state else None
        return MixerOutput(out, score, state)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Causal attention of the real slots (padding slots' outputs are zero)."""
        gqa = self.kv_heads != self.heads
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        o = torch.zeros_like(q)
        for row, (first, end) in enumerate(row_spans(mask)):  # the host reads the spans: an eager prefill
            if end > first:
                o[row : row + 1, :, first:end] = F.scaled_dot_product_attention(
                    q[row : row + 1, :, first:end], k[row : row + 1, :, first:end], v[row : row + 1, :, first:end],
                    is_causal=True, scale=self.scale, enable_gqa=gqa,
                )  # fmt: skip
        return o

    def _prefill_state(self, k, v, real, padded: bool, position, conv_state) -> KVState:
        """The kept tokens' keys and values left-aligned (the real slots first, in order), with per-row lengths."""
        if padded:
            order = torch.sort((~real).int(), dim=1, stable=True).indices  # real slots first, in order
            idx = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            k, v = k.gather(2, idx), v.gather(2, idx)
        length = real.sum(1)
        nxt = torch.where(real, position, -1).amax(1) + 1
        return KVState(k.contiguous(), v.contiguous(), length, nxt, conv_state)

    def zero_state(self, batch: int, device, dtype: torch.dtype, capacity: int = 0) -> KVState:
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        conv = None if self.conv1d is None else torch.zeros(batch, self.qkv_dim, self.d_conv - 1, device=device, dtype=dtype)
        return KVState(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros(batch, dtype=torch.long, device=device), torch.zeros(batch, dtype=torch.long, device=device),
                       conv)  # fmt: skip

    def step(self, hidden: torch.Tensor, state: KVState, backends: Backends, adapter: nn.Module | None = None) -> torch.Tensor:
        """Decode one token, hidden (b, d_model): append its key and value at each row's length, attend over the row's
        entries. In place and without a host sync on the fast path (a CUDA graph replays it; the decode runtime sized
        the buffers); the reference path (CPU, fast path off) grows a full buffer instead."""
        if not backends.on(hidden) and int(state.length.max()) >= state.capacity:
            _grow(state, max(16, state.capacity))
        b = hidden.shape[0]
        qkv = self._adapted(F.linear(hidden, self.in_proj.weight, self.in_proj.bias), hidden, adapter)  # (b, qkv_dim)
        if self.conv1d is not None:
            qkv = causal_conv_update_silu(qkv, state.conv, self._conv_weight(), self.conv1d.bias, None)
        q, k, v = self._split(qkv)  # (b, h, e), (b, c, e)
        if self.rotary_dim:
            freq = self.inv_freq(hidden.device)
            q, k = rope(q, state.position, freq), rope(k, state.position, freq)
        at = state.length.view(b, 1, 1, 1).expand(b, self.kv_heads, 1, self.head_dim)
        state.k.scatter_(2, at, k.unsqueeze(2).to(state.k.dtype))
        state.v.scatter_(2, at, v.unsqueeze(2).to(state.v.dtype))
        state.length += 1
        state.position += 1
        valid = torch.arange(state.capacity, device=hidden.device) < state.length[:, None]  # (b, capacity)
        g = self.heads // self.kv_heads
        q = q.view(b, self.kv_heads, g, self.head_dim).to(state.k.dtype)  # a kv head's query heads as its query rows
        if backends.attention_decode == "matmul":  # one GEMM reads K, one reads V, parallel over the cache's length
            scores = (q @ state.k.transpose(-1, -2)).float() * self.scale  # (b, c, g, capacity)
            probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1).to(state.v.dtype)
            o = probs @ state.v
        else:
            o = F.scaled_dot_product_attention(q, state.k, state.v, attn_mask=valid[:, None, None, :], scale=self.scale)
        return self.out_proj(o.reshape(b, -1).to(hidden.dtype))


def _grow(state: KVState, extra: int) -> None:
    pad = (0, 0, 0, extra)
    state.k, state.v = F.pad(state.k, pad), F.pad(state.v, pad)


def snapkv_score(q, k, real, last, window: int, scale: float) -> torch.Tensor:
    """(b, w) float32: SnapKV's vote of each key, from the attention of each row's last `window` real queries.
    q (b, h, w, e), k (b, c, w, e) rotated as the attention used them; real (b, w); last (b,) slot of the row's last
    real token. Computed one kv head at a time: memory (b, g, window, w)."""
    b, h, w, e = q.shape
    c = k.shape[1]
    g = h // c
    window = min(window, w)
    slots = last[:, None] - torch.arange(window - 1, -1, -1, device=q.device)  # (b, window): the window's slots
    valid = (slots >= 0) & real.gather(1, slots.clamp_min(0))
    slots = slots.clamp_min(0)
    key = torch.arange(w, device=q.device)
    allowed = (key[None, None, :] <= slots[:, :, None]) & real[:, None, :]  # (b, window, w)
    votes = []
    for j in range(c):
        qw = q[:, j * g : (j + 1) * g].gather(2, slots[:, None, :, None].expand(b, g, window, e)).float()
        logits = torch.einsum("bgqe,bke->bgqk", qw, k[:, j].float()) * scale
        probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        probs = probs.masked_fill(~valid[:, None, :, None], 0.0)
        votes.append(probs.sum(2))  # (b, g, w)
    vote = torch.cat(votes, 1)  # (b, h, w)
    vote = F.max_pool1d(vote, SNAPKV_POOL, stride=1, padding=SNAPKV_POOL // 2)
    return vote.amax(1)
