"""The hybrids' MLPs: a gated or plain MLP, the mixtures of experts of Granite (beside its shared MLP) and Jamba, and
NemotronH's MLP layers ('-' in its hybrid_override_pattern) as a mixer of their own.

    MLP:  fc2(act(gate) * up), [gate; up] = fc1(x)    (gated: mamba_ssm's GatedMLP, Granite's shared MLP, Bamba's,
                                                       Jamba's, Falcon-H1's: m_down fc2(act(m_gate gate) * up))
          fc2(act(fc1(x)))                            (plain: NemotronH's, act relu2 = relu(x)^2)
    MoE:  shared(x) + sum over the top-k experts e of x's router logits of w_e * expert_e(x), w = softmax(top-k
          logits) (Granite); Jamba: no shared MLP, w = the top-k of softmax(all logits), not renormalised

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
    if name == "gelu":  # Zamba2's shared MLP: the exact (erf) GELU, transformers' "gelu"
        return F.gelu(x)
    return F.silu(x) if name == "silu" else torch.relu(x).square()


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, gated: bool, act: str, bias: bool, multipliers=()):
        super().__init__()
        self.gated, self.act = gated, act
        self.fc1 = nn.Linear(d_model, (2 if gated else 1) * hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)
        self.gate_multiplier, self.down_multiplier = multipliers or (1.0, 1.0)  # Falcon-H1's mlp_multipliers

    @classmethod
    def of(cls, cfg: ModelConfig) -> "MLP":
        """The model's MLP (a block's, a shared one, an MLP layer)."""
        return cls(cfg.d_model, cfg.d_intermediate, cfg.mlp_gated, cfg.mlp_act, cfg.mlp_bias, cfg.mlp_multipliers)

    def forward(self, x: torch.Tensor, adapter: nn.Module | None = None) -> torch.Tensor:
        """adapter: a term added to fc1's output (a Zamba2 use's LoRA: shared.py)."""
        y = self.fc1(x) if adapter is None else self.fc1(x) + adapter(x)
        if self.gated:
            gate, up = y.chunk(2, dim=-1)
            y = activation(self.act, gate if self.gate_multiplier == 1.0 else gate * self.gate_multiplier) * up
        else:
            y = activation(self.act, y)
        y = self.fc2(y)
        return y if self.down_multiplier == 1.0 else y * self.down_multiplier


class MoE(nn.Module):
    """A mixture of experts: a router and n_experts gated SiLU MLPs stored as (experts, out, in) tensors (transformers'
    layout); with Granite's block (GraniteMoeHybridMoE beside GraniteMoeHybridMLP) also the shared MLP every token
    runs (ModelConfig.moe_shared), Jamba's (JambaSparseMoeBlock) the experts alone."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, e, i = cfg.d_model, cfg.n_experts, cfg.expert_intermediate
        self.top_k, self.renormalize = cfg.experts_per_token, cfg.moe_renormalize
        self.shared = MLP.of(cfg) if cfg.moe_shared else None
        self.router = nn.Linear(d, e, bias=False)
        self.experts_fc1 = nn.Parameter(torch.randn(e, 2 * i, d) * 0.02)  # [gate; up] per expert
        self.experts_fc2 = nn.Parameter(torch.randn(e, d, i) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat).float()
        if self.renormalize:  # softmax over the top-k logits: the weights sum to 1
            top, expert = logits.topk(self.top_k, dim=-1)  # (n, k)
            weight = top.softmax(-1)
        else:  # the top-k probabilities of the softmax over every expert
            weight, expert = logits.softmax(-1).topk(self.top_k, dim=-1)
        weight = weight.to(x.dtype)
        routed = self._gathered(flat, expert, weight) if expert.numel() <= GATHER_PAIRS else self._looped(flat, expert, weight)
        routed = routed.view_as(x)
        return routed if self.shared is None else self.shared(x) + routed

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


def make_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    """The MLP after block `layer`'s mixer (ModelConfig.block_mlp): the MoE where the block has it, or one MLP."""
    return MoE(cfg) if cfg.moe(layer) else MLP.of(cfg)


class MLPMixer(Mixer):
    """An MLP as a layer of its own (NemotronH's '-' layers): no state, nothing to score; pruning carries the score of
    the nearest layer below that has one (pruning.score_source)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mlp = MLP.of(cfg)

    def forward(self, hidden: torch.Tensor, ctx: MixerContext) -> MixerOutput:
        if ctx.score is not None:
            raise ValueError(f"an MLP layer computes no score ({ctx.score!r})")
        return MixerOutput(self.mlp(hidden))

    def step(self, hidden: torch.Tensor, state, backends: Backends) -> torch.Tensor:
        return self.mlp(hidden)

    def zero_state(self, batch: int, device, dtype: torch.dtype, capacity: int = 0) -> None:
        return None
