"""Analytic FLOP accounting, per token and per layer, from the model config.

Conventions: a matmul of (m x k) by (k x n) is 2mkn FLOPs; an elementwise op is 1 FLOP per element, with
exp/softplus/silu counted as listed in ELEMENTWISE; the selective scan is 9 * d_inner * d_state per token,
mamba_ssm's own convention for selective_scan_ref. The FLOP ratio (--flops) is backbone FLOPs (every Mamba
block plus the pruning score) of the pruned model over the dense model at the same input length; the LM
head (2 * d_model * vocab per position that needs logits) is reported beside it, not inside it. A Mamba-1
layer's scan (and an in-layer score) runs on its tokens padded to whole chunks of mamba_ssm's kernel
(ModelConfig.scan_chunks), as the GPU runs it: those steps are counted, in the pruned and the dense model alike.
The matmul terms are checked against torch.utils.flop_counter in tests/test_flops.py.

Hybrids. An attention layer on k tokens costs its projections, the conv over qkv (mamba_ssm's d_conv) and RoPE per
token, and the k(k+1)/2 causal (query, key) pairs of its kept tokens: per pair and query head, q.k (2e), the
softmax (SOFTMAX) and the weighted sum of v (2e); grouped kv heads (GQA) cost the same products, fewer projections.
MLPs cost their two (or, gated, three) projections per token; a MoE its router, the top-k experts a token runs and
(Granite) its shared MLP. A parallel layer (Falcon-H1) costs its SSM mixer and its attention on the same tokens, their
sum and multipliers. A Zamba2 hybrid layer costs its Mamba-2 and its use of a shared block on the same tokens (the
norm of [stream; embeddings], the attention's projections from 2 d_model, the use's LoRA adapters and linear, the MLP
and the pairs: shared_flops). Jamba's dt, B and C norms, Falcon-H1's multipliers and its ungated norm are counted where the
model has them. An in-layer score that an attention or MLP layer ranks by is computed by the layer
pruning.score_source names (carried up), and counted there. KV-cache bytes (attention layers, kept tokens) are
reported beside the FLOP ratio (kv_cache_bytes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .attention import SNAPKV_WINDOW
from .layers import ATTENTION_KINDS, ModelConfig
from .pruning import IN_LAYER, QUERY_POOL, QUERY_WINDOW, SimbaConfig, scorers

GELU = 8  # the exact GELU: x / sqrt(2), erf (~4), + 1, * 0.5, * x (Zamba2's shared MLP)
SILU, SOFTPLUS = 4, 4  # x * sigmoid(x): neg, exp, add, div (+ the mul counted separately); log(1 + exp(x))
SCAN_PER_STATE = 9  # mamba_ssm: 9 * L * D * N for the discretisation, the state update and C . h
SOFTMAX = 5  # per score: the scale, the max subtracted, exp, the sum, the division
ROPE = 3  # per rotated element: two products and a sum
SNAPKV_POOL_FLOPS = 5  # per vote: the max over SNAPKV_POOL neighbours


def mlp_flops(cfg: ModelConfig, moe: bool = False) -> int:
    """FLOPs per token of one MLP (mlp.MLP) of the model's shape, or (moe) of its MoE: the experts, and Granite's
    shared MLP beside them."""
    d, i = cfg.d_model, cfg.d_intermediate
    act = {"silu": SILU, "gelu": GELU}.get(cfg.mlp_act, 2)  # relu2: relu then the square
    if cfg.mlp_gated:
        flops = 2 * d * 2 * i + (act + 1) * i + 2 * i * d + ((2 * i + d) if cfg.mlp_bias else 0)
    else:
        flops = 2 * d * i + act * i + 2 * i * d + ((i + d) if cfg.mlp_bias else 0)
    gate, down = cfg.mlp_multipliers or (1.0, 1.0)  # Falcon-H1's: the gate before the activation, the output
    flops += (i if gate != 1.0 else 0) + (d if down != 1.0 else 0)
    if not moe:
        return flops
    k, ie, e = cfg.experts_per_token, cfg.expert_intermediate, cfg.n_experts
    # router logits, the softmax (over the top k: Granite; over every expert: Jamba), each expert's gated MLP, the
    # weighted sum
    routed = 2 * d * e + SOFTMAX * (k if cfg.moe_renormalize else e) + k * (2 * d * 2 * ie + (SILU + 1) * ie + 2 * ie * d)
    return (flops if cfg.moe_shared else 0) + routed + 2 * k * d


def attention_flops(cfg: ModelConfig) -> dict[str, int]:
    """FLOPs per token of an attention layer's token-wise parts (attention_pair_flops: the rest)."""
    d, h, c, e = cfg.d_model, cfg.attn_heads, cfg.attn_kv_heads, cfg.attn_head_dim
    qkv = (h + 2 * c) * e
    return {
        "norm": 4 * d,
        "in_proj": 2 * d * qkv + (qkv if cfg.attn_qkv_bias else 0),
        "conv": 2 * qkv * cfg.attn_conv + qkv if cfg.attn_conv else 0,  # mamba_ssm's conv has a bias, no activation
        "rope": ROPE * cfg.rotary_dim * (h + c),
        "out_proj": 2 * h * e * d + (d if cfg.attn_out_bias else 0),
        "residual": d,
    }


def shared_matmul_flops(cfg: ModelConfig) -> dict[str, int]:
    """The matmuls per token of a Zamba2 hybrid layer's use of its shared block: the attention's projections (input
    [stream; embeddings], 2 d_model), each use's LoRA adapters (A then B), the MLP and the use's linear."""
    d, r, i = cfg.d_model, cfg.adapter_rank, cfg.d_intermediate
    h, c, e = cfg.attn_heads, cfg.attn_kv_heads, cfg.attn_head_dim
    qkv = (h + 2 * c) * e
    lora = 2 * r * (3 * 2 * d + qkv) if cfg.attn_adapters else 0  # q, k, v: 2d -> r -> their widths
    return {"in_proj": 2 * 2 * d * qkv, "qkv_adapter": lora, "out_proj": 2 * h * e * d,
            "mlp": 2 * d * 2 * i + 2 * i * d, "mlp_adapter": 2 * r * (d + 2 * i), "linear": 2 * d * d}  # fmt: skip


def shared_flops(cfg: ModelConfig) -> dict[str, int]:
    """FLOPs per token of a Zamba2 hybrid layer's use of its shared block, its (query, key) pairs aside: the norm
    of [stream; embeddings], the attention's projections and RoPE, the adapters and their sums, the MLP's norm and
    the MLP, the linear and the term's add to Mamba-2's input."""
    d, i, c = cfg.d_model, cfg.d_intermediate, cfg.attn_kv_heads
    qkv = (cfg.attn_heads + 2 * c) * cfg.attn_head_dim
    mm = shared_matmul_flops(cfg)
    return {
        "norm": 4 * 2 * d, "in_proj": mm["in_proj"], "qkv_adapter": mm["qkv_adapter"] + (qkv if cfg.attn_adapters else 0),
        "rope": ROPE * cfg.rotary_dim * (cfg.attn_heads + c), "out_proj": mm["out_proj"], "norm2": 4 * d,
        "mlp": mlp_flops(cfg), "mlp_adapter": mm["mlp_adapter"] + 2 * i, "linear": mm["linear"], "add": d,
    }  # fmt: skip


def attention_pair_flops(cfg: ModelConfig) -> int:
    """FLOPs per causal (query, key) pair: over the query heads, q.k, the softmax and the weighted sum of v."""
    return cfg.attn_heads * (4 * cfg.attn_head_dim + SOFTMAX)


def causal_pairs(tokens: int) -> int:
    return tokens * (tokens + 1) // 2


def block_flops(cfg: ModelConfig, layer: int | None = None) -> dict[str, int]:
    """FLOPs per token of block `layer` (None: an SSM layer of the model), by component; an attention layer's
    (query, key) pairs are counted by layer_flops."""
    kind = cfg.layer if layer is None else cfg.kind(layer)
    d = cfg.d_model
    if kind == "attention":
        parts = attention_flops(cfg)
    elif kind == "mlp":
        parts = {"norm": 4 * d, "mlp": mlp_flops(cfg), "residual": d}
    else:
        parts = _ssm_flops(cfg)
    if kind == "shared":  # Zamba2: the use of a shared block before the Mamba-2 (shared.py), named shared_*
        parts |= {"shared_" + k: v for k, v in shared_flops(cfg).items()}
    if kind == "parallel":  # the attention beside the SSM mixer, the four multipliers where they are not 1, the sum
        multipliers = (cfg.ssm_in_multiplier, cfg.ssm_out_multiplier, cfg.attn_in_multiplier, cfg.attn_out_multiplier)
        parts |= {"attn_" + k: v for k, v in attention_flops(cfg).items() if k not in ("norm", "residual")}
        parts["parallel"] = d + d * sum(m != 1.0 for m in multipliers)
    if cfg.residual_multiplier != 1.0:
        parts["residual"] += d
    if cfg.block_mlp:
        parts |= {"norm2": 4 * d, "mlp": mlp_flops(cfg, cfg.moe(layer)),
                  "residual2": d * (2 if cfg.residual_multiplier != 1.0 else 1)}  # fmt: skip
    return parts


def _ssm_flops(cfg: ModelConfig) -> dict[str, int]:
    """FLOPs per token of one Mamba block, by component."""
    d, e, n, r, k = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
    if cfg.layer == "mamba2":
        h, gn = e // cfg.headdim, cfg.ngroups * cfg.d_state
        conv_dim = e + 2 * gn
        proj = 2 * e + 2 * gn + h
        return {
            "norm": 4 * d,
            # + Falcon-H1's multipliers of the projection's parts
            "in_proj": 2 * d * proj + (proj if cfg.bias else 0) + (proj if cfg.ssm_proj_multipliers else 0),
            "conv": 2 * conv_dim * k + (conv_dim if cfg.conv_bias else 0) + SILU * conv_dim,
            "dt": h + SOFTPLUS * h,
            # scalar decay per head: exp(dt A) per head, dt x per channel, then per (channel, state) the
            # outer product with B (1), the state update (2) and C . h (2)
            "scan": 5 * e * n + e + 2 * h,
            # y + D x, * silu(z), the grouped RMS norm (Falcon-H1 without mamba_rms_norm: none)
            "gate_skip": 2 * e + (SILU + 1) * e + (4 * e if cfg.ssm_norm else 0),
            "out_proj": 2 * e * d + (d if cfg.bias else 0),
            "residual": d,
        }
    return {
        "norm": 4 * d,
        "in_proj": 2 * d * 2 * e + (2 * e if cfg.bias else 0),
        "conv": 2 * e * k + (e if cfg.conv_bias else 0) + SILU * e,
        "x_proj": 2 * e * (r + 2 * n) + (4 * (r + 2 * n) if cfg.bcdt_norm else 0),  # + Jamba's dt, B and C norms
        "dt_proj": 2 * r * e + e + SOFTPLUS * e,
        "scan": SCAN_PER_STATE * e * n,
        "gate_skip": 2 * e + (SILU + 1) * e,  # y + D x, then * silu(z)
        "out_proj": 2 * e * d + (d if cfg.bias else 0),
        "residual": d,
    }


def matmul_flops(cfg: ModelConfig, layer: int | None = None) -> dict[str, int]:
    """The projection and conv part of block_flops, per token: what torch.utils.flop_counter counts as
    mm/addmm and convolution. (The reference scan's own in-chunk matmul is an implementation device of the
    CPU path, not part of the scan's analytic 9 d_inner d_state.) An attention layer's (query, key) products,
    2 e per pair and query head for q.k and as many for the sum of v, are attention_pair_flops' matmul part."""
    d, e, n, r, k = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
    kind = cfg.layer if layer is None else cfg.kind(layer)
    mlp = {}
    if cfg.block_mlp or kind == "mlp":
        i = cfg.d_intermediate
        dense = 2 * d * (2 if cfg.mlp_gated else 1) * i + 2 * i * d
        mlp = {"mlp": dense} if kind == "mlp" or not cfg.moe(layer) or cfg.moe_shared else {}
        if kind != "mlp" and cfg.moe(layer):
            ie = cfg.expert_intermediate
            mlp["router"] = 2 * d * cfg.n_experts
            mlp["experts"] = cfg.experts_per_token * (2 * d * 2 * ie + 2 * ie * d)
    if kind == "mlp":
        return mlp
    h = cfg.attn_heads * cfg.attn_head_dim
    qkv = h + 2 * cfg.attn_kv_heads * cfg.attn_head_dim
    attention = {"in_proj": 2 * d * qkv, "conv": 2 * qkv * cfg.attn_conv, "out_proj": 2 * h * d}
    if kind == "attention":
        return attention | mlp
    if kind == "parallel":  # the SSM mixer's (below) and the attention's, named attn_*
        mlp = {"attn_" + key: v for key, v in attention.items()} | mlp
    if kind == "shared":  # the Mamba-2's (below) and the shared block's use, named shared_*
        mlp = {"shared_" + key: v for key, v in shared_matmul_flops(cfg).items()}
    if cfg.layer == "mamba2":
        h, gn = e // cfg.headdim, cfg.ngroups * cfg.d_state
        return {"in_proj": 2 * d * (2 * e + 2 * gn + h), "conv": 2 * (e + 2 * gn) * k, "out_proj": 2 * e * d} | mlp
    return {
        "in_proj": 2 * d * 2 * e,
        "conv": 2 * e * k,
        "x_proj": 2 * e * (r + 2 * n),
        "dt_proj": 2 * r * e,
        "out_proj": 2 * e * d,
    } | mlp


def snapkv_flops(cfg: ModelConfig, tokens: int, window: int) -> int:
    """SnapKV's score over `tokens` keys (attention.snapkv_score): the last max(window, SNAPKV_WINDOW) queries
    against every key, per query head: q.k (2e) and the softmax, their sum over the queries, the max-pool, the max
    over heads."""
    w = min(max(window, SNAPKV_WINDOW), tokens)
    h = cfg.attn_heads
    return h * w * tokens * (2 * cfg.attn_head_dim + SOFTMAX + 1) + h * tokens * (SNAPKV_POOL_FLOPS + 1)


def score_flops(cfg: ModelConfig, criterion: str) -> int:
    """FLOPs per scored token of a criterion (the token sort is O(l log l) and not counted); for "snapkv" the cost
    per key of its default window (snapkv_flops gives it for any window)."""
    e, n, d = cfg.d_inner, cfg.d_state, cfg.d_model
    if criterion == "snapkv":
        return snapkv_flops(cfg, SNAPKV_WINDOW, 1) // SNAPKV_WINDOW
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


KV_DTYPE = "bfloat16"  # the KV-cache bytes are reported at the dtype a model is served in
KV_BYTES = 2


@dataclass
class FlopReport:
    seq_len: int
    tokens: list[int]  # tokens each layer runs on
    per_layer: list[int]  # backbone FLOPs of each layer, the score it computes included
    dense: int  # backbone FLOPs of the dense model
    sparse: int  # backbone FLOPs of the pruned model, score included
    score: int  # of which the pruning score
    ratio: float  # sparse / dense: what --flops sets
    head_per_position: int  # LM head + final norm, per position that needs logits (beside the ratio)
    per_token_block: dict[str, int]
    kv_cache_bytes: int = 0  # the attention layers' KV cache after a pruned prefill of one sequence (KV_DTYPE)
    kv_cache_dense_bytes: int = 0  # the same, dense
    kv_cache_dtype: str = KV_DTYPE

    def to_dict(self) -> dict:
        return asdict(self)


def scan_steps(cfg: ModelConfig, tokens: int) -> int:
    """Steps the scan of a layer on `tokens` tokens runs, padded to whole chunks of its fused kernel
    (ModelConfig.scan_chunks: Mamba-1's; Mamba-2's SSD pads nothing)."""
    return cfg.scan_chunks.scan_length(tokens) if tokens > 0 else tokens


def layer_flops(cfg: ModelConfig, tokens: int, score: str | None = None, layer: int | None = None, window: int = 1) -> int:
    """Backbone FLOPs of layer `layer` (None: an SSM layer) on `tokens` tokens, an SSM scan's padding included, and
    with `score` (a criterion) the score of those tokens it computes (an SSM in-layer one over the scan's steps;
    snapkv with the protected tail `window`)."""
    kind = cfg.layer if layer is None else cfg.kind(layer)
    block = block_flops(cfg, layer)
    flops = tokens * sum(block.values())
    if kind in ATTENTION_KINDS:
        flops += causal_pairs(tokens) * attention_pair_flops(cfg)
        if score == "snapkv":
            return flops + snapkv_flops(cfg, tokens, window)
    if kind == "attention":
        if score is not None and score in IN_LAYER:
            raise ValueError(f"an attention layer does not compute {score!r}")
        return flops + (tokens * score_flops(cfg, score) if score is not None else 0)
    steps = scan_steps(cfg, tokens) if kind != "mlp" else tokens
    flops += (steps - tokens) * block.get("scan", 0)
    if score is not None:
        flops += (steps if score in IN_LAYER else tokens) * score_flops(cfg, score)
    return flops


def kv_cache_bytes(cfg: ModelConfig, tokens: list[int], element_bytes: int = KV_BYTES) -> int:
    """Bytes of the attention layers' KV caches for one sequence, tokens[i] cached at layer i."""
    per_token = 2 * cfg.attn_kv_heads * cfg.attn_head_dim * element_bytes
    return sum(per_token * tokens[i] for i in cfg.attn_layers)


def scoring_layers(cfg: ModelConfig, simba: SimbaConfig | None, tokens: list[int]) -> dict[int, str]:
    """layer -> the in-layer criterion it computes under `simba` with these per-layer token counts (model.py's
    forward: pruning.scorers), or, for a criterion that reads the block output, each layer that prunes."""
    prunes = [i + 1 < len(tokens) and tokens[i + 1] < k for i, k in enumerate(tokens)]
    out = scorers(cfg.kinds, prunes, simba)
    if simba is not None and simba.criterion not in IN_LAYER:
        out = {i: simba.criterion for i, p in enumerate(prunes) if p}
    return out


def count(cfg: ModelConfig, simba: SimbaConfig | None, seq_len: int) -> FlopReport:
    """Backbone FLOPs of one sequence of seq_len real tokens, dense and as pruned by `simba`."""
    n_real = torch.tensor([seq_len])
    tokens = [seq_len] * cfg.n_layer if simba is None else simba.counts(n_real, cfg.scan_chunks)[:, 0].tolist()
    scoring = scoring_layers(cfg, simba, tokens)
    window = simba.protect_last if simba is not None else 1
    per_layer, score = [], 0
    for i, k in enumerate(tokens):
        plain = layer_flops(cfg, k, layer=i)
        flops = layer_flops(cfg, k, scoring[i], i, window) if i in scoring else plain
        score += flops - plain
        per_layer.append(flops)
    dense = sum(layer_flops(cfg, seq_len, layer=i) for i in range(cfg.n_layer))
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
        kv_cache_bytes=kv_cache_bytes(cfg, tokens),
        kv_cache_dense_bytes=kv_cache_bytes(cfg, [seq_len] * cfg.n_layer),
    )
