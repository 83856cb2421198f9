"""The hybrids' MLPs: a gated or plain MLP, Granite's mixture of experts beside its shared MLP, and NemotronH's MLP
layers ('-' in its hybrid_override_pattern) as a mixer of their own.

    MLP:  fc2(act(gate) * up), [gate; up] = fc1(x)    (gated: mamba_ssm's GatedMLP, Granite's shared MLP, Bamba's)
          fc2(act(fc1(x)))                            (plain: NemotronH's, act relu2 = relu(x)^2)
    MoE:  shared(x) + sum over the top-k experts e of x's router logits of softmax(top-k logits)_e * expert_e(x)

Every checkpoint layout is converted to this one form when it is read (layouts.py: mamba_ssm's GatedMLP keeps the
gate in the second half of fc1, transformers' Granite in the first; Bamba's gate_proj and up_proj are two
matrices), so one forward serves all. An MLP works token by token: on the tokens a pruned layer kept, as on a
decode step's one token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backends import Backends
from .layers import Mixer, MixerContext, MixerOutput, ModelConfig

# Above this many (token, expert) pairs the experts run one at a time on the tokens routed to them (the index lists
# wait for the device); at or below it, each pair reads its expert's weights by gathering them, which no host
# ever waits for: the decode step (batch x top-k pairs) is captured in a CUDA graph that way.
GATHER_PAIRS = 64


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if name == "silu" else torch.relu(x).square()


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, gated: bool, act: str, bias: bool):
        super().__init__()
        self.gated, self.act = gated, act
        self.fc1 = nn.Linear(d_model, (2 if gated else 1) * hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        if self.gated:
            gate, up = y.chunk(2, dim=-1)
            y = activation(self.act, gate) * up
        else:
            y = activation(self.act, y)
        return self.fc2(y)


class MoE(nn.Module):
    """Granite's MoE block (GraniteMoeHybridMoE beside GraniteMoeHybridMLP): a router, n_experts gated SiLU MLPs
    stored as (experts, out, in) tensors (transformers' layout), and the shared MLP every token also runs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, e, i = cfg.d_model, cfg.n_experts, cfg.expert_intermediate
        self.top_k = cfg.experts_per_token
        self.shared = MLP(d, cfg.d_intermediate, cfg.mlp_gated, cfg.mlp_act, cfg.mlp_bias)
        self.router = nn.Linear(d, e, bias=False)
        self.experts_fc1 = nn.Parameter(torch.randn(e, 2 * i, d) * 0.02)  # [gate; up] per expert
        self.experts_fc2 = nn.Parameter(torch.randn(e, d, i) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        top, expert = self.router(flat).float().topk(self.top_k, dim=-1)  # (n, k)
        weight = top.softmax(-1).to(x.dtype)
        routed = self._gathered(flat, expert, weight) if expert.numel() <= GATHER_PAIRS else self._looped(flat, expert, weight)
        return self.shared(x) + routed.view_as(x)

    def _expert_mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _gathered(self, flat: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("nd,nkod->nko", flat, self.experts_fc1[expert])  # (n, k, 2i)
        y = torch.einsum("nki,nkdi->nkd", self._expert_mlp(h), self.experts_fc2[expert])
        return (y * weight.unsqueeze(-1)).sum(1)

    def _looped(self, flat: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(flat)
        for e in expert.unique().tolist():
            token, slot = torch.where(expert == e)
            y = F.linear(self._expert_mlp(F.linear(flat[token], self.experts_fc1[e])), self.experts_fc2[e])
            out.index_add_(0, token, y * weight[token, slot, None])
        return out


def make_mlp(cfg: ModelConfig) -> nn.Module:
    """The MLP after a block's mixer (ModelConfig.block_mlp): Granite's MoE with its shared MLP, or one MLP."""
    if cfg.n_experts:
        return MoE(cfg)
    return MLP(cfg.d_model, cfg.d_intermediate, cfg.mlp_gated, cfg.mlp_act, cfg.mlp_bias)


class MLPMixer(Mixer):
    """An MLP as a layer of its own (NemotronH's '-' layers): no state, nothing to score; pruning carries the score of
    the nearest layer below that has one (pruning.score_source)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mlp = MLP(cfg.d_model, cfg.d_intermediate, cfg.mlp_gated, cfg.mlp_act, cfg.mlp_bias)

    def forward(self, hidden: torch.Tensor, ctx: MixerContext) -> MixerOutput:
        if ctx.score is not None:
            raise ValueError(f"an MLP layer computes no score ({ctx.score!r})")
        return MixerOutput(self.mlp(hidden))

    def step(self, hidden: torch.Tensor, state, backends: Backends) -> torch.Tensor:
        return self.mlp(hidden)

    def zero_state(self, batch: int, device, dtype: torch.dtype, capacity: int = 0) -> None:
        return None
