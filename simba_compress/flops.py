"""Analytic FLOP accounting, per token and per layer, from the model config.

Conventions: a matmul of (m x k) by (k x n) is 2mkn FLOPs; an elementwise op is 1 FLOP per element, with
exp/softplus/silu counted as listed in ELEMENTWISE; the selective scan is 9 * d_inner * d_state per token,
mamba_ssm's own convention for selective_scan_ref. The FLOP ratio (--flops) is backbone FLOPs (every Mamba
block plus the pruning score) of the pruned model over the dense model at the same input length; the LM
head (2 * d_model * vocab per position that needs logits) is reported beside it, not inside it. A Mamba-1
layer's scan (and an in-layer score) runs on its tokens padded to whole chunks of mamba_ssm's kernel
(ModelConfig.scan_chunks), as the GPU runs it: those steps are counted, in the pruned and the dense model alike.
The matmul terms are checked against torch.utils.flop_counter in tests/test_flops.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .layers import ModelConfig
from .pruning import IN_LAYER, QUERY_POOL, QUERY_WINDOW, SimbaConfig

SILU, SOFTPLUS = 4, 4  # x * sigmoid(x): neg, exp, add, div (+ the mul counted separately); log(1 + exp(x))
SCAN_PER_STATE = 9  # mamba_ssm: 9 * L * D * N for the discretisation, the state update and C . h


def block_flops(cfg: ModelConfig) -> dict[str, int]:
    """FLOPs per token of one Mamba block, by component."""
    d, e, n, r, k = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
    if cfg.layer == "mamba2":
        h, gn = e // cfg.headdim, cfg.ngroups * cfg.d_state
        conv_dim = e + 2 * gn
        return {
            "norm": 4 * d,
            "in_proj": 2 * d * (2 * e + 2 * gn + h) + ((2 * e + 2 * gn + h) if cfg.bias else 0),
            "conv": 2 * conv_dim * k + (conv_dim if cfg.conv_bias else 0) + SILU * conv_dim,
            "dt": h + SOFTPLUS * h,
            # scalar decay per head: exp(dt A) per head, dt x per channel, then per (channel, state) the
            # outer product with B (1), the state update (2) and C . h (2)
            "scan": 5 * e * n + e + 2 * h,
            "gate_skip": 2 * e + (SILU + 1) * e + 4 * e,  # y + D x, * silu(z), grouped RMS norm
            "out_proj": 2 * e * d + (d if cfg.bias else 0),
            "residual": d,
        }
    return {
        "norm": 4 * d,
        "in_proj": 2 * d * 2 * e + (2 * e if cfg.bias else 0),
        "conv": 2 * e * k + (e if cfg.conv_bias else 0) + SILU * e,
        "x_proj": 2 * e * (r + 2 * n),
        "dt_proj": 2 * r * e + e + SOFTPLUS * e,
        "scan": SCAN_PER_STATE * e * n,
        "gate_skip": 2 * e + (SILU + 1) * e,  # y + D x, then * silu(z)
        "out_proj": 2 * e * d + (d if cfg.bias else 0),
        "residual": d,
    }


def matmul_flops(cfg: ModelConfig) -> dict[str, int]:
    """The projection and conv part of block_flops, per token: what torch.utils.flop_counter counts as
    mm/addmm and convolution. (The reference scan's own in-chunk matmul is an implementation device of the
    CPU path, not part of the scan's analytic 9 d_inner d_state.)"""
    d, e, n, r, k = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
    if cfg.layer == "mamba2":
        h, gn = e // cfg.headdim, cfg.ngroups * cfg.d_state
        return {"in_proj": 2 * d * (2 * e + 2 * gn + h), "conv": 2 * (e + 2 * gn) * k, "out_proj": 2 * e * d}
    return {
        "in_proj": 2 * d * 2 * e,
        "conv": 2 * e * k,
        "x_proj": 2 * e * (r + 2 * n),
        "dt_proj": 2 * r * e,
        "out_proj": 2 * e * d,
    }


def score_flops(cfg: ModelConfig, criterion: str) -> int:
    """FLOPs per scored token of a criterion (the token sort is O(l log l) and not counted)."""
    e, n, d = cfg.d_inner, cfg.d_state, cfg.d_model
    if cfg.layer == "mamba2" and criterion == "deci":
        return 2 * (e // cfg.headdim)  # one step size per head
    if cfg.layer == "mamba2" and criterion in ("simba", "share"):
        # C_T . B_t per group (2gn), reverse cumsum, exp and products per head (~6h), max |x| over head dims (2e);
        # share: |x| times the head's factor per channel, then divide by the channel's sum over the row (3e more)
        return 2 * cfg.ngroups * n + 6 * (e // cfg.headdim) + (2 * e if criterion == "simba" else 5 * e)
    return {
        # contraction of the scan's own exp(-G) dt B x with a per-chunk weight (2en), |.| and max over d (2e),
        # and the per-chunk weights exp(A (S_T - S_c)) C_T amortised over a chunk of 8 (<= en)
        "simba": 3 * e * n + 2 * e,
        # not fused: exp(A (S_T - S_t)) per (channel, state) (2en), contraction with C_T B_t (2en), |dt x| (2e),
        # the channel's sum over the row, the division and the max over channels (3e)
        "share": 4 * e * n + 5 * e,
        # pruning.query_attention: normalise the stream (3d), cosine with each of the QUERY_WINDOW queries (2d each),
        # scale, exp, sum and divide per query (4 each), the sum over the queries (1 each), the pool's comparisons
        "query": 2 * QUERY_WINDOW * d + 3 * d + 5 * QUERY_WINDOW + 2 * QUERY_POOL,
        "recent-query": 2 * QUERY_WINDOW * d + 3 * d + 5 * QUERY_WINDOW + 2 * QUERY_POOL + 2,  # + the recency mask
        "deci": 2 * e,  # square and sum of the step sizes the layer already computed
        "utr": 2 * d,  # clamp, sum
        "l2norm": 2 * d,  # square, sum
        "random": 1,
        "stride": 1,
    }[criterion]


def head_flops(cfg: ModelConfig) -> int:
    """Final norm and LM head per position that needs logits."""
    return 4 * cfg.d_model + 2 * cfg.d_model * cfg.vocab_size


@dataclass
class FlopReport:
    seq_len: int
    tokens: list[int]  # tokens each layer runs on
    per_layer: list[int]  # backbone FLOPs of each layer, the score after it included
    dense: int  # backbone FLOPs of the dense model
    sparse: int  # backbone FLOPs of the pruned model, score included
    score: int  # of which the pruning score
    ratio: float  # sparse / dense: what --flops sets
    head_per_position: int  # LM head + final norm, per position that needs logits (beside the ratio)
    per_token_block: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def scan_steps(cfg: ModelConfig, tokens: int) -> int:
    """Steps the scan of a layer on `tokens` tokens runs, padded to whole chunks of its fused kernel
    (ModelConfig.scan_chunks: Mamba-1's; Mamba-2's SSD pads nothing)."""
    return cfg.scan_chunks.scan_length(tokens) if tokens > 0 else tokens


def layer_flops(cfg: ModelConfig, tokens: int, score: str | None = None) -> int:
    """Backbone FLOPs of one layer on `tokens` tokens, its scan's padding included, and with `score` (a criterion)
    the score of those tokens after it (an in-layer one over the scan's steps)."""
    block = block_flops(cfg)
    steps = scan_steps(cfg, tokens)
    flops = tokens * sum(block.values()) + (steps - tokens) * block["scan"]
    if score is not None:
        flops += (steps if score in IN_LAYER else tokens) * score_flops(cfg, score)
    return flops


def count(cfg: ModelConfig, simba: SimbaConfig | None, seq_len: int) -> FlopReport:
    """Backbone FLOPs of one sequence of seq_len real tokens, dense and as pruned by `simba`."""
    n_real = torch.tensor([seq_len])
    tokens = [seq_len] * cfg.n_layer if simba is None else simba.counts(n_real, cfg.scan_chunks)[:, 0].tolist()
    per_layer, score = [], 0
    for i, k in enumerate(tokens):
        plain = layer_flops(cfg, k)
        scores = simba is not None and i + 1 < len(tokens) and tokens[i + 1] < k
        flops = layer_flops(cfg, k, simba.criterion) if scores else plain
        score += flops - plain
        per_layer.append(flops)
    dense = cfg.n_layer * layer_flops(cfg, seq_len)
    sparse = sum(per_layer)
    return FlopReport(
        seq_len=seq_len,
        tokens=tokens,
        per_layer=per_layer,
        dense=dense,
        sparse=sparse,
        score=score,
        ratio=sparse / dense,
        head_per_position=head_flops(cfg),
        per_token_block=block_flops(cfg),
    )
