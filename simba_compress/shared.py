"""Zamba2's hybrid layer (transformers' Zamba2HybridLayer): a use of a shared transformer block, then Mamba-2.

    out = mamba(norm(h + t)),   t = linear_u(mlp_j(norm2_j(a)) with fc1 + adapter_u),
                                a = attn_j(norm_j([h; e])) with q, k, v + their adapters_u (attn_adapters)

h is the residual stream, e the original embeddings (the model's input, not the stream), u the use's index among the
hybrid layers and j = u % shared_blocks the block it uses; the block adds `out` to h (no residual around t: t only
joins Mamba-2's input). The shared blocks' weights are modules the backbone owns (model.Backbone.shared); each use
holds its block by reference, unregistered, so the state dict and the saved checkpoint have them once. Each use's
LoRA adapters (rank adapter_rank), linear, Mamba-2 and its norm are its own.

Under pruning the layer runs on its kept tokens, as every layer: they are the attention's queries and keys (its KV
cache holds only them), Mamba-2's steps, and e is the original embeddings gathered at them (MixerContext.embeddings).
The layer ranks tokens by its Mamba-2's in-layer score (simba, share, deci) or its attention's ("snapkv"); its decode
state is both (layers.ParallelState: the Mamba-2 state and this use's KV cache).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .attention import AttentionMixer
from .backends import Backends
from .layers import Mixer, MixerContext, MixerOutput, ModelConfig, ParallelState, RMSNorm, make_norm, norm
from .mamba2 import Mamba2Mixer
from .mlp import MLP


def lora(d_in: int, rank: int, d_out: int) -> nn.Sequential:
    """x -> B A x, A (rank, d_in), B (d_out, rank): transformers' adapter (its names: .0 and .1)."""
    return nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=False))


class QKVAdapter(nn.Module):
    """A use's adapters on q, k and v, their outputs concatenated as the attention's fused in_proj is."""

    def __init__(self, d_in: int, rank: int, dims: tuple[int, int, int]):
        super().__init__()
        self.q, self.k, self.v = (lora(d_in, rank, n) for n in dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


class SharedBlock(nn.Module):
    """The weights a shared transformer block's uses share: the norm of [h; e] (2 d_model), the attention (input
    2 d_model, output d_model), the MLP's norm and the gated MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norm = RMSNorm(2 * d, cfg.norm_eps)
        self.attn = AttentionMixer(cfg, d_in=2 * d)
        self.norm2 = RMSNorm(d, cfg.norm_eps)
        self.mlp = MLP(d, cfg.d_intermediate, True, cfg.mlp_act, cfg.mlp_bias)


class SharedMixer(Mixer):
    """One hybrid layer: its use of `block` (module docstring). It reads the stream itself (model.Block gives it
    un-normalised: its own norm is Mamba-2's, of h + t)."""

    def __init__(self, cfg: ModelConfig, block: SharedBlock):
        super().__init__()
        self._block = (block,)  # by reference, not registered: the backbone owns (and saves) its weights
        d, r, e = cfg.d_model, cfg.adapter_rank, cfg.attn_head_dim
        dims = (cfg.attn_heads * e, cfg.attn_kv_heads * e, cfg.attn_kv_heads * e)
        self.qkv_adapter = QKVAdapter(2 * d, r, dims) if cfg.attn_adapters else None
        self.mlp_adapter = lora(d, r, 2 * cfg.d_intermediate)
        self.linear = nn.Linear(d, d, bias=False)
        self.norm = make_norm(cfg)
        self.ssm = Mamba2Mixer(cfg)

    @property
    def block(self) -> SharedBlock:
        return self._block[0]

    def _attention_input(self, hidden: torch.Tensor, embeddings: torch.Tensor, backends: Backends) -> torch.Tensor:
        return norm(self.block.norm, torch.cat([hidden, embeddings.to(hidden.dtype)], dim=-1), backends)

    def _term(self, attended: torch.Tensor, backends: Backends) -> torch.Tensor:
        """t of the attention's output: the MLP (its fc1 plus this use's adapter), then this use's linear."""
        return self.linear(self.block.mlp(norm(self.block.norm2, attended, backends), self.mlp_adapter))

    def forward(self, hidden: torch.Tensor, ctx: MixerContext) -> MixerOutput:
        """hidden: the stream (b, w, d_model) at the layer's kept tokens; ctx.embeddings the original embeddings there."""
        if ctx.embeddings is None:
            raise ValueError("a Zamba2 hybrid layer needs the original embeddings (MixerContext.embeddings)")
        snap = ctx.score == "snapkv"
        x = self._attention_input(hidden, ctx.embeddings, ctx.backends)
        a = self.block.attn(x, replace(ctx, score=ctx.score if snap else None), self.qkv_adapter)
        t = self._term(a.out, ctx.backends)
        s = self.ssm(norm(self.norm, hidden + t, ctx.backends), replace(ctx, score=None if snap else ctx.score))
        state = ParallelState(s.state, a.state) if ctx.want_state else None
        return MixerOutput(s.out, a.score if snap else s.score, state)

    def step(self, hidden: torch.Tensor, state: ParallelState, backends: Backends, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """One new token: hidden (b, d_model) the stream, embedding (b, d_model) the token's original embedding."""
        if embedding is None:
            raise ValueError("a Zamba2 hybrid layer's step needs the token's embedding")
        a = self.block.attn.step(self._attention_input(hidden, embedding, backends), state.kv, backends, self.qkv_adapter)
        t = self._term(a, backends)
        return self.ssm.step(norm(self.norm, hidden + t, backends), state.ssm, backends)

    def zero_state(self, batch: int, device, dtype: torch.dtype, capacity: int = 0) -> ParallelState:
        return ParallelState(self.ssm.zero_state(batch, device, dtype), self.block.attn.zero_state(batch, device, dtype, capacity))

    def prepare_step(self) -> None:
        self.ssm.prepare_step()
        self.block.attn.prepare_step()
