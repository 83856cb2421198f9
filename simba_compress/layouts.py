"""Checkpoint layouts: what each family's config.json says (-> ModelConfig), and how it names and shapes the
weights (<-> MambaLM's state dict). checkpoints.py owns the files; this module owns the translation.

Layouts read (Checkpoint.layout):
- "original": state-spaces / mamba_ssm's MambaLMHeadModel (config.json of MambaConfig's fields, pytorch_model.bin):
  Mamba-1, Mamba-2, and the hybrids with `attn_layer_idx` / `attn_cfg` (mamba_ssm's MHA: fused qkv in_proj, an
  optional causal conv over qkv, partial RoPE) and `d_intermediate` GatedMLPs (mamba2attn-2.7b's layout).
- "transformers": transformers' MambaForCausalLM / Mamba2ForCausalLM.
- "granitemoehybrid", "bamba", "nemotron_h": transformers' GraniteMoeHybridForCausalLM (dense or MoE MLPs, its
  multipliers, NoPE or RoPE), BambaForCausalLM, NemotronHForCausalLM (Mamba-2 'M', attention '*' and MLP '-'
  layers), in the names their checkpoints have on disk (transformers 5 renames some when it loads them and
  writes the disk names back when it saves; both are read).
- "jamba": transformers' JambaForCausalLM (AI21's Jamba, Jamba-1.5): Mamba-1 layers with RMSNorms on dt, B and C,
  GQA attention without positional encoding every attn_layer_period layers, a gated MLP after every mixer, a MoE
  (no shared MLP, top-k of the softmax) every expert_layer_period layers; experts one tensor per expert on disk,
  stacked in memory (both read).
- "falcon_h1": transformers' FalconH1ForCausalLM: every layer attention (RoPE) and Mamba-2 side by side
  (parallel.py), its muP multipliers, the Mamba-2 with or without its gated norm, d_ssm channels.
- "zamba2": transformers' Zamba2ForCausalLM: Mamba-2 layers and hybrid layers, each a use of one of num_mem_blocks
  shared transformer blocks (shared.py). On disk a block's tensors sit under its first use's layer
  (model.layers.{i}.shared_transformer.*, the later uses tied to it), with every use's adapters in that block's
  adapter lists (..._adapter_list.{u}, u the use's index among the hybrid layers); in memory the block is
  backbone.shared.{j} and use u's adapters are its layer's mixer's own. Tied copies under later uses are read
  once (the first use's) and not written.

Written back (ModelConfig.arch, the family a model was read from): pure Mamba models in transformers' Mamba /
Mamba2 layout (as before); the transformers hybrids in their own layout, so transformers loads the output dense;
the state-spaces hybrid, which no transformers class reads, in its own layout (config.json of exactly MambaConfig's
fields, which mamba_ssm's from_pretrained passes to MambaConfig(**...), so the schedule goes to simba.json beside
it; pytorch_model.bin, the file mamba_ssm loads). A bad or unsupported config is one line naming the file and key.

In memory, attention is one form (attention.py): q, k and v of transformers' layouts are concatenated into one
in_proj (out_proj is o_proj); MLPs are one form (mlp.py): fc1 = [gate; up] (mamba_ssm's GatedMLP stores [up; gate],
Bamba's, Jamba's and Falcon-H1's gate_proj and up_proj are two matrices); experts (E, 2i, d) [gate; up] and (E, d, i).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import SimbaError
from .layers import ModelConfig

LAYOUTS = ("original", "transformers", "granitemoehybrid", "bamba", "nemotron_h", "jamba", "falcon_h1", "zamba2")
HYBRID_TYPES = ("granitemoehybrid", "bamba", "nemotron_h", "jamba", "falcon_h1", "zamba2")  # model_type, each its layout
GATED_MLP_MULTIPLE = 128  # mamba_ssm's GatedMLP rounds its hidden size up to a multiple of this
SSM_TYPES = ("mamba", "linear_attention")  # transformers' names of a Mamba layer in layer_types (old, new)
ATTN_TYPES = ("attention", "full_attention")


def _int(cfg: dict, key: str, file: Path, default=None, minimum: int = 1):
    v = cfg.get(key, default)
    if v is None:
        raise SimbaError(f"{file}: missing '{key}'")
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise SimbaError(f"{file}: '{key}' must be an integer >= {minimum}, got {v!r}")
    return v


def _float(v) -> float:
    return float(v["__float__"]) if isinstance(v, dict) else float(v)  # transformers writes inf as {"__float__": ...}


# mamba_ssm's Mamba2 options (its constructor's arguments, as ssm_cfg stores them) that change what the layer computes,
# with the one value this project's Mamba-2 mixer implements: every published Mamba-2 checkpoint and hybrid uses these
# (A_init_range, dt_min/max, conv_init and the like only initialise; chunk_size does not change the result)
MAMBA2_FIXED = {"D_has_hdim": False, "norm_before_gate": False, "rmsnorm": True, "dt_limit": [0.0, float("inf")]}


def _check_mamba2_options(ssm_cfg: dict, d_inner: int, file: Path) -> None:
    """One clear error for a Mamba2 option this project does not implement, naming the file and key."""
    for key, ok in MAMBA2_FIXED.items():
        value = ssm_cfg.get(key, ok)
        if (_float_list(value) if isinstance(value, (list, tuple)) else value) != ok:
            raise SimbaError(f"{file}: ssm_cfg.{key} = {value!r} is not supported for Mamba-2 (only {ok!r})")
    if ssm_cfg.get("d_ssm") not in (None, d_inner):  # fewer SSM channels: the rest is a gated MLP inside the layer
        raise SimbaError(f"{file}: ssm_cfg.d_ssm = {ssm_cfg['d_ssm']!r} is not supported for Mamba-2 (only d_inner, "
                         f"{d_inner}: no gated-MLP channels)")  # fmt: skip


def _float_list(values) -> list:
    try:
        return [_float(v) for v in values]
    except (TypeError, ValueError):
        return list(values)


def _no_time_step_limit(cfg: dict, key: str, file: Path) -> None:
    limit = [_float(v) for v in (cfg.get(key) or [0, "inf"])]
    if limit != [0.0, float("inf")]:
        raise SimbaError(f"{file}: '{key}' {limit} is not supported (only no limit)")


def _expect(cfg: dict, key: str, ok, file: Path, default=None) -> None:
    v = cfg.get(key, default)
    if v not in (ok if isinstance(ok, tuple) else (ok,)):
        raise SimbaError(f"{file}: '{key}' = {v!r} is not supported (supported: {ok!r})")


def read_config(cfg: dict, file: Path) -> tuple[str, dict]:
    """(layout, ModelConfig keyword arguments) of a parsed config.json; SimbaError naming the file and key."""
    if "d_model" in cfg and "n_layer" in cfg:
        return "original", _original(cfg, file)
    model_type = cfg.get("model_type")
    if model_type in HYBRID_TYPES:
        readers = {"granitemoehybrid": _granite, "bamba": _bamba, "nemotron_h": _nemotron, "jamba": _jamba,
                   "falcon_h1": _falcon_h1, "zamba2": _zamba2}  # fmt: skip
        return model_type, readers[model_type](cfg, file)
    if model_type == "mamba2":
        _no_time_step_limit(cfg, "time_step_limit", file)
        mc = _transformers_fields(cfg, file, d_state=128)
        mc.update(expand=cfg.get("expand", 2), dt_rank=1, layer="mamba2")
        mc.update(headdim=cfg.get("head_dim", 64), ngroups=cfg.get("n_groups", 1))
        heads = cfg.get("num_heads")
        if heads is not None and heads * mc["headdim"] != mc["expand"] * mc["d_model"]:
            raise SimbaError(f"{file}: num_heads {heads} x head_dim {mc['headdim']} != expand x hidden_size")
        return "transformers", mc
    if model_type == "mamba" or ("hidden_size" in cfg and "state_size" in cfg):
        mc = _transformers_fields(cfg, file, d_state=16)
        inner = cfg.get("intermediate_size", cfg.get("expand", 2) * mc["d_model"])
        if inner % mc["d_model"]:
            raise SimbaError(f"{file}: intermediate_size {inner} is not a multiple of hidden_size {mc['d_model']}")
        mc.update(expand=inner // mc["d_model"], dt_rank=cfg.get("time_step_rank", "auto"))
        return "transformers", mc
    raise SimbaError(f"{file}: not a Mamba checkpoint config (no d_model/n_layer or a model_type this reads: mamba, "
                     f"mamba2, {', '.join(HYBRID_TYPES)})")  # fmt: skip


def _transformers_fields(cfg: dict, file: Path, d_state: int) -> dict:
    """The ModelConfig fields MambaConfig and Mamba2Config name alike."""
    return dict(
        d_model=_int(cfg, "hidden_size", file),
        n_layer=_int(cfg, "num_hidden_layers", file),
        vocab_size=_int(cfg, "vocab_size", file),
        d_state=cfg.get("state_size", d_state),
        d_conv=cfg.get("conv_kernel", 4),
        conv_bias=cfg.get("use_conv_bias", True),
        bias=cfg.get("use_bias", False),
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        rms_norm=True,
        residual_in_fp32=cfg.get("residual_in_fp32", True),
        tie_embeddings=cfg.get("tie_word_embeddings", True),
    )


# state-spaces / mamba_ssm

MHA_KEYS = {"num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias", "softmax_scale",
            "causal", "d_conv", "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved"}  # fmt: skip


def _original(cfg: dict, file: Path) -> dict:
    ssm_cfg = cfg.get("ssm_cfg") or {}
    vocab = _int(cfg, "vocab_size", file)
    pad = cfg.get("pad_vocab_size_multiple", 8) or 1
    vocab += (pad - vocab % pad) % pad
    d_model = _int(cfg, "d_model", file)
    mc = dict(
        d_model=d_model,
        n_layer=_int(cfg, "n_layer", file),
        vocab_size=vocab,
        d_state=ssm_cfg.get("d_state", 16),
        d_conv=ssm_cfg.get("d_conv", 4),
        expand=ssm_cfg.get("expand", 2),
        dt_rank=ssm_cfg.get("dt_rank", "auto"),
        conv_bias=ssm_cfg.get("conv_bias", True),
        bias=ssm_cfg.get("bias", False),
        norm_eps=cfg.get("norm_epsilon", 1e-5),
        rms_norm=cfg.get("rms_norm", True),
        residual_in_fp32=cfg.get("residual_in_fp32", True),
        tie_embeddings=cfg.get("tie_embeddings", True),
    )
    if ssm_cfg.get("layer", "Mamba1") == "Mamba2":
        _check_mamba2_options(ssm_cfg, mc["expand"] * mc["d_model"], file)
        mc.update(layer="mamba2", d_state=ssm_cfg.get("d_state", 128), headdim=ssm_cfg.get("headdim", 64))
        mc.update(ngroups=ssm_cfg.get("ngroups", 1), dt_rank=1)
    elif ssm_cfg.get("layer", "Mamba1") != "Mamba1":
        raise SimbaError(f"{file}: ssm_cfg.layer {ssm_cfg['layer']!r} is not supported (Mamba1 or Mamba2)")
    d_int = cfg.get("d_intermediate", 0) or 0
    if not isinstance(d_int, int) or d_int < 0:
        raise SimbaError(f"{file}: 'd_intermediate' must be an integer >= 0, got {d_int!r}")
    if d_int:  # GatedMLP(hidden_features=d_intermediate) after every mixer, rounded up as GatedMLP does
        mc.update(d_intermediate=-(-d_int // GATED_MLP_MULTIPLE) * GATED_MLP_MULTIPLE, block_mlp=True)
    attn = cfg.get("attn_layer_idx") or []
    if attn:
        a = cfg.get("attn_cfg") or {}
        unknown = sorted(set(a) - MHA_KEYS)
        if unknown:
            raise SimbaError(f"{file}: attn_cfg.{unknown[0]} is not an argument of mamba_ssm's MHA")
        for key, ok, default in (("causal", True, False), ("mlp_dim", 0, 0), ("rotary_emb_interleaved", False, False)):
            if a.get(key, default) != ok:
                raise SimbaError(f"{file}: attn_cfg.{key} = {a.get(key, default)!r} is not supported ({ok!r} only)")
        if not isinstance(attn, list) or not all(isinstance(i, int) for i in attn):
            raise SimbaError(f"{file}: 'attn_layer_idx' must be a list of layer indices, got {attn!r}")
        heads = _int(a, "num_heads", file.with_name(file.name + ": attn_cfg"))
        mc.update(attn_layers=attn, attn_heads=heads, attn_kv_heads=a.get("num_heads_kv") or heads,
                  attn_head_dim=a.get("head_dim") or d_model // heads, attn_conv=a.get("d_conv", 0) or 0,
                  rotary_dim=a.get("rotary_emb_dim", 0) or 0, rope_theta=float(a.get("rotary_emb_base", 10000.0)),
                  attn_qkv_bias=a.get("qkv_proj_bias", True), attn_out_bias=a.get("out_proj_bias", True),
                  attn_scale=float(a.get("softmax_scale") or 0.0))  # fmt: skip
    if attn or d_int:
        mc["arch"] = "mamba_ssm"
    return mc


def original_config(c: ModelConfig) -> dict:
    """config.json of the state-spaces layout: exactly MambaConfig's fields (mamba_ssm builds MambaConfig(**it))."""
    ssm_cfg = {"layer": "Mamba2" if c.layer == "mamba2" else "Mamba1", "d_state": c.d_state, "d_conv": c.d_conv,
               "expand": c.expand, "conv_bias": c.conv_bias, "bias": c.bias}  # fmt: skip
    if c.layer == "mamba2":
        ssm_cfg |= {"headdim": c.headdim, "ngroups": c.ngroups}
    else:
        ssm_cfg["dt_rank"] = c.dt_rank
    attn_cfg = {}
    if c.attn_layers:
        attn_cfg = {"num_heads": c.attn_heads, "num_heads_kv": c.attn_kv_heads, "head_dim": c.attn_head_dim,
                    "causal": True, "d_conv": c.attn_conv, "rotary_emb_dim": c.rotary_dim,
                    "rotary_emb_base": c.rope_theta, "qkv_proj_bias": c.attn_qkv_bias, "out_proj_bias": c.attn_out_bias,
                    "softmax_scale": c.attn_scale or None}  # fmt: skip
    return {"d_model": c.d_model, "d_intermediate": c.d_intermediate if c.block_mlp else 0, "n_layer": c.n_layer,
            "vocab_size": c.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": list(c.attn_layers), "attn_cfg": attn_cfg,
            "rms_norm": c.rms_norm, "residual_in_fp32": c.residual_in_fp32, "fused_add_norm": True,
            "pad_vocab_size_multiple": 1, "tie_embeddings": c.tie_embeddings}  # fmt: skip


def _check_original_writable(c: ModelConfig) -> None:
    bad = [name for name, v in (("mlp_layers", c.mlp_layers), ("n_experts", c.n_experts), ("mlp_act", c.mlp_act != "silu"),
                                ("mlp_gated", not c.mlp_gated), ("mlp_bias", c.mlp_bias),
                                ("d_inner_size", c.d_inner_size)) if v]  # fmt: skip
    bad += _foreign(c, "mamba_ssm")  # the multipliers, Jamba's norms, Falcon-H1's parallel layers
    if bad:
        raise SimbaError(f"save: the state-spaces layout has no {bad[0]}; this model cannot be written in it")


# transformers' hybrids


def _mamba_fields(cfg: dict, file: Path, d_model: int) -> dict:
    """GraniteMoeHybrid's and Bamba's Mamba-2 settings (mamba_*)."""
    expand = _int(cfg, "mamba_expand", file, 2)
    heads = _int(cfg, "mamba_n_heads", file, 128)
    head = cfg.get("mamba_d_head", "auto")
    head = expand * d_model // heads if head in ("auto", None) else head
    if heads * head != expand * d_model:
        raise SimbaError(f"{file}: mamba_n_heads {heads} x mamba_d_head {head} != mamba_expand x hidden_size")
    _no_time_step_limit(cfg, "time_step_limit", file)
    return dict(layer="mamba2", d_state=_int(cfg, "mamba_d_state", file, 256), d_conv=_int(cfg, "mamba_d_conv", file, 4),
                expand=expand, headdim=head, ngroups=_int(cfg, "mamba_n_groups", file, 1), dt_rank=1,
                conv_bias=cfg.get("mamba_conv_bias", True), bias=cfg.get("mamba_proj_bias", False))  # fmt: skip


def _rope(cfg: dict, file: Path) -> tuple[float, dict]:
    """(rope_theta, rope parameters) of a transformers config: rope_parameters (transformers 5) or the older keys."""
    params = dict(cfg.get("rope_parameters") or {})
    if cfg.get("rope_scaling"):
        params |= cfg["rope_scaling"]
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise SimbaError(f"{file}: rope_type {kind!r} is not supported (only 'default')")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))), params


def _silu(cfg: dict, key: str, file: Path) -> None:
    _expect(cfg, key, "silu", file, "silu")


def _dims(cfg: dict, file: Path) -> tuple[int, int, int, int]:
    """hidden_size, num_hidden_layers, num_attention_heads and the attention's head dim of a transformers hybrid
    (GraniteMoeHybrid, Bamba, Jamba, Falcon-H1), whose hidden_act must be SiLU."""
    d, heads = _int(cfg, "hidden_size", file), _int(cfg, "num_attention_heads", file)
    _silu(cfg, "hidden_act", file)
    return d, _int(cfg, "num_hidden_layers", file), heads, cfg.get("head_dim") or d // heads


def _granite(cfg: dict, file: Path) -> dict:
    d, n, heads, head_dim = _dims(cfg, file)
    types = cfg.get("layer_types", cfg.get("layers_block_type")) or [SSM_TYPES[0]] * n
    if len(types) != n or not all(t in SSM_TYPES + ATTN_TYPES for t in types):
        raise SimbaError(f"{file}: 'layer_types' must name {n} layers, each mamba or attention, got {types!r}")
    rope = cfg.get("position_embedding_type") == "rope"
    theta, _ = _rope(cfg, file) if rope else (10000.0, {})
    experts = cfg.get("num_local_experts", 0) or 0
    top = _int(cfg, "num_experts_per_tok", file, 2) if experts else 0
    if top > experts:
        raise SimbaError(f"{file}: 'num_experts_per_tok' {top} is more than 'num_local_experts' {experts}")
    return dict(
        d_model=d, n_layer=n, vocab_size=_int(cfg, "vocab_size", file), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rms_norm=True, residual_in_fp32=False, tie_embeddings=cfg.get("tie_word_embeddings", False),
        **_mamba_fields(cfg, file, d),
        attn_layers=[i for i, t in enumerate(types) if t in ATTN_TYPES], attn_heads=heads,
        attn_kv_heads=cfg.get("num_key_value_heads") or heads, attn_head_dim=head_dim,
        rotary_dim=head_dim if rope else 0, rope_theta=theta, attn_qkv_bias=cfg.get("attention_bias", False),
        attn_out_bias=cfg.get("attention_bias", False), attn_scale=float(cfg.get("attention_multiplier", 1.0)),
        d_intermediate=_int(cfg, "shared_intermediate_size", file, 1024), block_mlp=True,
        n_experts=experts, experts_per_token=top,
        expert_intermediate=cfg.get("intermediate_size", 0) if experts else 0,
        embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
        logits_scaling=float(cfg.get("logits_scaling", 1.0)), arch="granitemoehybrid",
    )  # fmt: skip


def _bamba(cfg: dict, file: Path) -> dict:
    d, n, heads, head_dim = _dims(cfg, file)
    theta, params = _rope(cfg, file)
    attn = cfg.get("attn_layer_indices") or []
    return dict(
        d_model=d, n_layer=n, vocab_size=_int(cfg, "vocab_size", file), norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rms_norm=True, residual_in_fp32=False, tie_embeddings=cfg.get("tie_word_embeddings", False),
        **_mamba_fields(cfg, file, d),
        attn_layers=list(attn), attn_heads=heads, attn_kv_heads=cfg.get("num_key_value_heads") or heads,
        attn_head_dim=head_dim, rotary_dim=int(head_dim * float(params.get("partial_rotary_factor", 0.5))) // 2 * 2,
        rope_theta=theta, attn_qkv_bias=cfg.get("attention_bias", False), attn_out_bias=cfg.get("attention_bias", False),
        d_intermediate=_int(cfg, "intermediate_size", file), block_mlp=True, mlp_bias=cfg.get("mlp_bias", False),
        arch="bamba",
    )  # fmt: skip


NEMOTRON_CODES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
NEMOTRON_TYPES = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-", "moe": "E"}


def _nemotron(cfg: dict, file: Path) -> dict:
    if "hybrid_override_pattern" in cfg:
        pattern, key = cfg["hybrid_override_pattern"], "hybrid_override_pattern"
    else:
        key = "layers_block_type" if "layers_block_type" in cfg else "layer_types"
        types = cfg.get(key) or []
        pattern = "".join(NEMOTRON_TYPES.get(t, "?") for t in types) if isinstance(types, list) else "?"
    if not isinstance(pattern, str) or not pattern or set(pattern) - set(NEMOTRON_CODES):
        raise SimbaError(f"{file}: '{key}' must give each layer as M, *, - or E, got {cfg.get(key)!r}")
    if "E" in pattern:
        raise SimbaError(f"{file}: '{key}' has MoE ('E') layers, which are not supported (M, * and - are)")
    d = _int(cfg, "hidden_size", file)
    heads = _int(cfg, "num_attention_heads", file)
    m_heads, m_head = _int(cfg, "mamba_num_heads", file, 128), _int(cfg, "mamba_head_dim", file, 64)
    _silu(cfg, "mamba_hidden_act", file)
    _expect(cfg, "mlp_hidden_act", ("relu2", "silu"), file, "relu2")
    _no_time_step_limit(cfg, "time_step_limit" if "time_step_limit" in cfg else "mamba_dt_limit", file)
    inner = m_heads * m_head
    return dict(
        d_model=d, n_layer=len(pattern), vocab_size=_int(cfg, "vocab_size", file),
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5), rms_norm=True, residual_in_fp32=cfg.get("residual_in_fp32", False),
        tie_embeddings=cfg.get("tie_word_embeddings", False), layer="mamba2",
        d_state=_int(cfg, "ssm_state_size", file, 128), d_conv=cfg.get("conv_kernel", cfg.get("mamba_d_conv", 4)),
        expand=max(1, inner // d), d_inner_size=inner if inner != max(1, inner // d) * d else 0, headdim=m_head,
        ngroups=cfg.get("n_groups", cfg.get("mamba_n_groups", 8)), dt_rank=1,
        conv_bias=cfg.get("use_conv_bias", cfg.get("mamba_conv_bias", True)), bias=cfg.get("use_bias", False),
        attn_layers=[i for i, ch in enumerate(pattern) if ch == "*"], attn_heads=heads,
        attn_kv_heads=cfg.get("num_key_value_heads") or heads, attn_head_dim=cfg.get("head_dim") or d // heads,
        mlp_layers=[i for i, ch in enumerate(pattern) if ch == "-"],
        d_intermediate=_int(cfg, "intermediate_size", file) if "-" in pattern else 0, mlp_gated=False,
        mlp_act=cfg.get("mlp_hidden_act", "relu2"), mlp_bias=cfg.get("mlp_bias", False), arch="nemotron_h",
    )  # fmt: skip


def _periodic(n: int, period: int, offset: int) -> list[int]:
    return [i for i in range(n) if i % period == offset]


def _period(cfg: dict, prefix: str, file: Path, period: int, offset: int) -> tuple[int, int]:
    """Jamba's {prefix}_period and {prefix}_offset (offset < period)."""
    p = _int(cfg, f"{prefix}_period", file, period)
    o = _int(cfg, f"{prefix}_offset", file, offset, minimum=0)
    if o >= p:
        raise SimbaError(f"{file}: '{prefix}_offset' {o} must be smaller than '{prefix}_period' {p}")
    return p, o


def _jamba(cfg: dict, file: Path) -> dict:
    d, n, heads, head_dim = _dims(cfg, file)
    inter = _int(cfg, "intermediate_size", file)
    experts = _int(cfg, "num_experts", file, 16)
    moe = _periodic(n, *_period(cfg, "expert_layer", file, 2, 1)) if experts > 1 else []  # 1 expert: dense MLPs
    top = _int(cfg, "num_experts_per_tok", file, 2)
    if moe and top > experts:
        raise SimbaError(f"{file}: 'num_experts_per_tok' {top} is more than 'num_experts' {experts}")
    return dict(
        d_model=d, n_layer=n, vocab_size=_int(cfg, "vocab_size", file), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rms_norm=True, residual_in_fp32=False, tie_embeddings=cfg.get("tie_word_embeddings", False),
        d_state=_int(cfg, "mamba_d_state", file, 16), d_conv=_int(cfg, "mamba_d_conv", file, 4),
        expand=_int(cfg, "mamba_expand", file, 2), dt_rank=cfg.get("mamba_dt_rank", "auto"),
        conv_bias=cfg.get("mamba_conv_bias", True), bias=cfg.get("mamba_proj_bias", False), bcdt_norm=True,
        attn_layers=_periodic(n, *_period(cfg, "attn_layer", file, 8, 4)), attn_heads=heads,
        attn_kv_heads=cfg.get("num_key_value_heads") or heads, attn_head_dim=head_dim,
        d_intermediate=inter, block_mlp=True, n_experts=experts if moe else 0, moe_layers=moe,
        experts_per_token=top if moe else 0, expert_intermediate=inter if moe else 0,
        moe_shared=False, moe_renormalize=False, arch="jamba",
    )  # fmt: skip


def _multipliers(cfg: dict, key: str, n: int, file: Path) -> list[float]:
    """A list of n multipliers ([] where every one is 1, as absent)."""
    v = cfg.get(key) or [1.0] * n
    if not isinstance(v, (list, tuple)) or len(v) != n or not all(isinstance(m, (int, float)) for m in v):
        raise SimbaError(f"{file}: '{key}' must be a list of {n} numbers, got {v!r}")
    return [] if all(m == 1.0 for m in v) else [float(m) for m in v]


def _falcon_h1(cfg: dict, file: Path) -> dict:
    d, n, heads, head_dim = _dims(cfg, file)
    theta, _ = _rope(cfg, file)
    inner = cfg.get("mamba_d_ssm") or _int(cfg, "mamba_expand", file, 2) * d
    m_heads = _int(cfg, "mamba_n_heads", file, 128)
    m_head = cfg.get("mamba_d_head", "auto")
    m_head = inner // m_heads if m_head in ("auto", None) else m_head
    if m_heads * m_head != inner:
        raise SimbaError(f"{file}: mamba_n_heads {m_heads} x mamba_d_head {m_head} != mamba_d_ssm {inner}")
    _no_time_step_limit(cfg, "time_step_limit", file)
    norm = cfg.get("mamba_rms_norm", False)
    if norm and cfg.get("mamba_norm_before_gate", True):
        raise SimbaError(f"{file}: 'mamba_norm_before_gate' true with 'mamba_rms_norm' is not supported (the norm "
                         "after the gate only)")  # fmt: skip
    if cfg.get("projectors_bias", False) != cfg.get("mamba_proj_bias", False):
        raise SimbaError(f"{file}: 'projectors_bias' {cfg.get('projectors_bias')!r} differs from 'mamba_proj_bias' "
                         f"{cfg.get('mamba_proj_bias')!r}, which is not supported (one bias setting for in_proj and "
                         "out_proj)")  # fmt: skip
    expand = max(1, inner // d)
    bias = cfg.get("attention_bias", False)
    return dict(
        d_model=d, n_layer=n, vocab_size=_int(cfg, "vocab_size", file), norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rms_norm=True, residual_in_fp32=False, tie_embeddings=cfg.get("tie_word_embeddings", False), layer="mamba2",
        d_state=_int(cfg, "mamba_d_state", file, 256), d_conv=_int(cfg, "mamba_d_conv", file, 4), expand=expand,
        d_inner_size=inner if inner != expand * d else 0, headdim=m_head, ngroups=_int(cfg, "mamba_n_groups", file, 1),
        dt_rank=1, conv_bias=cfg.get("mamba_conv_bias", True), bias=cfg.get("mamba_proj_bias", False), ssm_norm=norm,
        attn_layers=list(range(n)), attn_parallel=True, attn_heads=heads,
        attn_kv_heads=cfg.get("num_key_value_heads") or heads, attn_head_dim=head_dim, rotary_dim=head_dim,
        rope_theta=theta, attn_qkv_bias=bias, attn_out_bias=bias,
        d_intermediate=_int(cfg, "intermediate_size", file), block_mlp=True, mlp_bias=cfg.get("mlp_bias", False),
        embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
        lm_head_multiplier=float(cfg.get("lm_head_multiplier", 1.0)),
        ssm_in_multiplier=float(cfg.get("ssm_in_multiplier", 1.0)),
        ssm_out_multiplier=float(cfg.get("ssm_out_multiplier", 1.0)),
        attn_in_multiplier=float(cfg.get("attention_in_multiplier", 1.0)),
        attn_out_multiplier=float(cfg.get("attention_out_multiplier", 1.0)),
        key_multiplier=float(cfg.get("key_multiplier", 1.0)),
        ssm_proj_multipliers=_multipliers(cfg, "ssm_multipliers", 5, file),
        mlp_multipliers=_multipliers(cfg, "mlp_multipliers", 2, file), arch="falcon_h1",
    )  # fmt: skip


ZAMBA2_TYPES = {"mamba": "mamba", "linear_attention": "mamba", "hybrid": "hybrid"}  # layers_block_type (old, new)


def _zamba2(cfg: dict, file: Path) -> dict:
    d, n, heads = _int(cfg, "hidden_size", file), _int(cfg, "num_hidden_layers", file), _int(cfg, "num_attention_heads", file)
    key = "layers_block_type" if "layers_block_type" in cfg else "layer_types"
    types = cfg.get(key)
    if not isinstance(types, list) or len(types) != n or not all(t in ZAMBA2_TYPES for t in types):
        raise SimbaError(f"{file}: '{key}' must name {n} layers, each mamba or hybrid, got {types!r}")
    hybrid = [i for i, t in enumerate(types) if ZAMBA2_TYPES[t] == "hybrid"]
    if not hybrid:
        raise SimbaError(f"{file}: '{key}' has no hybrid layer (a Zamba2 without attention is not supported)")
    if (2 * d) % heads:
        raise SimbaError(f"{file}: 'num_attention_heads' {heads} must divide 2 x hidden_size {2 * d}")
    head_dim = 2 * d // heads  # the attention reads [stream; embeddings]: 2 hidden_size wide
    kv = cfg.get("num_key_value_heads") or heads
    adapters = bool(cfg.get("use_shared_attention_adapter", False))
    if adapters and kv != heads:
        raise SimbaError(f"{file}: 'num_key_value_heads' {kv} with 'use_shared_attention_adapter' is not supported "
                         f"(the adapters need num_attention_heads, {heads})")  # fmt: skip
    expand, m_heads = _int(cfg, "mamba_expand", file, 2), _int(cfg, "n_mamba_heads", file, 8)
    if (expand * d) % m_heads:
        raise SimbaError(f"{file}: 'n_mamba_heads' {m_heads} must divide mamba_expand x hidden_size {expand * d}")
    _expect(cfg, "hidden_act", ("gelu", "silu"), file, "gelu")
    _expect(cfg, "use_long_context", False, file, False)
    if not cfg.get("tie_word_embeddings", True):  # transformers unties every _tied_weights_keys then, blocks included
        raise SimbaError(f"{file}: 'tie_word_embeddings' false is not supported (transformers then gives each hybrid "
                         "layer its own copy of its shared block: nothing is shared)")  # fmt: skip
    # Mamba-2's gated norm has eps 1e-5 in Zamba2 whatever rms_norm_eps says; the project's uses the model's norm_eps
    _expect(cfg, "rms_norm_eps", 1e-5, file, 1e-5)
    rope = bool(cfg.get("use_mem_rope", False))
    theta, _ = _rope(cfg, file) if rope else (10000.0, {})
    dt_min = cfg.get("time_step_min", 0.001)
    if not isinstance(dt_min, (int, float)) or dt_min < 0:
        raise SimbaError(f"{file}: 'time_step_min' must be a number >= 0, got {dt_min!r}")
    bias = cfg.get("add_bias_linear", False)
    inter = cfg.get("intermediate_size") or 4 * d
    return dict(
        d_model=d, n_layer=n, vocab_size=_int(cfg, "vocab_size", file), norm_eps=1e-5, rms_norm=True,
        residual_in_fp32=False, tie_embeddings=True, layer="mamba2", d_state=_int(cfg, "mamba_d_state", file, 64), d_conv=_int(cfg, "mamba_d_conv", file, 4), expand=expand,
        headdim=expand * d // m_heads, ngroups=_int(cfg, "mamba_ngroups", file, 1), dt_rank=1, dt_min=float(dt_min),
        conv_bias=cfg.get("use_conv_bias", True), bias=bias,
        attn_layers=hybrid, attn_heads=heads, attn_kv_heads=kv, attn_head_dim=head_dim,
        rotary_dim=head_dim if rope else 0, rope_theta=theta, attn_scale=(head_dim / 2) ** -0.5,
        d_intermediate=_int({"intermediate_size": inter}, "intermediate_size", file), mlp_act=cfg.get("hidden_act", "gelu"),
        mlp_bias=bias, shared_blocks=_int(cfg, "num_mem_blocks", file, 1),
        adapter_rank=_int(cfg, "adapter_rank", file, 128), attn_adapters=adapters, arch="zamba2",
    )  # fmt: skip


def hybrid_config(c: ModelConfig) -> dict:
    """config.json in the transformers layout of c.arch (GraniteMoeHybrid, Bamba, NemotronH), as their hub
    checkpoints write it (the names older transformers versions read too: layer_types of mamba / attention,
    hybrid_override_pattern)."""
    common = {"hidden_size": c.d_model, "num_hidden_layers": c.n_layer, "vocab_size": c.vocab_size,
              "tie_word_embeddings": c.tie_embeddings, "num_attention_heads": c.attn_heads,
              "num_key_value_heads": c.attn_kv_heads, "use_cache": True}  # fmt: skip
    mamba = {"mamba_n_heads": c.d_inner // c.headdim, "mamba_d_head": c.headdim, "mamba_n_groups": c.ngroups,
             "mamba_d_state": c.d_state, "mamba_d_conv": c.d_conv, "mamba_expand": c.expand,
             "mamba_conv_bias": c.conv_bias, "mamba_proj_bias": c.bias, "rms_norm_eps": c.norm_eps,
             "hidden_act": "silu"}  # fmt: skip
    if c.arch == "granitemoehybrid":
        rope = {"position_embedding_type": "rope", "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}} \
            if c.rotary_dim else {"position_embedding_type": "nope"}  # fmt: skip
        return common | mamba | rope | {
            "architectures": ["GraniteMoeHybridForCausalLM"], "model_type": "granitemoehybrid",
            "layer_types": ["attention" if k == "attention" else "mamba" for k in c.kinds],
            "attention_bias": c.attn_qkv_bias, "attention_multiplier": c.attn_scale or c.attn_head_dim**-0.5,
            "shared_intermediate_size": c.d_intermediate, "num_local_experts": c.n_experts,
            "num_experts_per_tok": c.experts_per_token or 1, "intermediate_size": c.expert_intermediate or c.d_intermediate,
            "embedding_multiplier": c.embedding_multiplier, "residual_multiplier": c.residual_multiplier,
            "logits_scaling": c.logits_scaling,
        }  # fmt: skip
    if c.arch == "bamba":
        return common | mamba | {
            "architectures": ["BambaForCausalLM"], "model_type": "bamba", "attn_layer_indices": list(c.attn_layers),
            "attention_bias": c.attn_qkv_bias, "intermediate_size": c.d_intermediate, "mlp_bias": c.mlp_bias,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta,
                                "partial_rotary_factor": c.rotary_dim / c.attn_head_dim},
        }  # fmt: skip
    if c.arch == "jamba":
        attn, moe = _period_of(c.attn_layers, c.n_layer, "attn_layers"), _period_of(c.moe_layers, c.n_layer, "moe_layers")
        return common | {
            "architectures": ["JambaForCausalLM"], "model_type": "jamba", "head_dim": c.attn_head_dim,
            "intermediate_size": c.d_intermediate, "hidden_act": "silu", "rms_norm_eps": c.norm_eps,
            "attn_layer_period": attn[0], "attn_layer_offset": attn[1], "num_experts": c.n_experts or 1,
            "num_experts_per_tok": c.experts_per_token or 1, "expert_layer_period": moe[0], "expert_layer_offset": moe[1],
            "mamba_d_state": c.d_state, "mamba_d_conv": c.d_conv, "mamba_expand": c.expand, "mamba_dt_rank": c.dt_rank,
            "mamba_conv_bias": c.conv_bias, "mamba_proj_bias": c.bias,
        }  # fmt: skip
    if c.arch == "falcon_h1":
        return common | {
            "architectures": ["FalconH1ForCausalLM"], "model_type": "falcon_h1", "head_dim": c.attn_head_dim,
            "intermediate_size": c.d_intermediate, "hidden_act": "silu", "rms_norm_eps": c.norm_eps,
            "attention_bias": c.attn_qkv_bias, "mlp_bias": c.mlp_bias,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "mamba_d_ssm": c.d_inner, "mamba_n_heads": c.d_inner // c.headdim, "mamba_d_head": c.headdim,
            "mamba_n_groups": c.ngroups, "mamba_d_state": c.d_state, "mamba_d_conv": c.d_conv, "mamba_expand": c.expand,
            "mamba_conv_bias": c.conv_bias, "mamba_proj_bias": c.bias, "projectors_bias": c.bias,
            "mamba_rms_norm": c.ssm_norm, "mamba_norm_before_gate": False,
            "embedding_multiplier": c.embedding_multiplier, "lm_head_multiplier": c.lm_head_multiplier,
            "ssm_in_multiplier": c.ssm_in_multiplier, "ssm_out_multiplier": c.ssm_out_multiplier,
            "attention_in_multiplier": c.attn_in_multiplier, "attention_out_multiplier": c.attn_out_multiplier,
            "key_multiplier": c.key_multiplier, "ssm_multipliers": c.ssm_proj_multipliers or [1.0] * 5,
            "mlp_multipliers": c.mlp_multipliers or [1.0, 1.0],
        }  # fmt: skip
    if c.arch == "zamba2":
        return common | {
            "architectures": ["Zamba2ForCausalLM"], "model_type": "zamba2",
            "layers_block_type": ["hybrid" if k == "shared" else "mamba" for k in c.kinds],
            "mamba_d_state": c.d_state, "mamba_d_conv": c.d_conv, "mamba_expand": c.expand, "mamba_ngroups": c.ngroups,
            "n_mamba_heads": c.d_inner // c.headdim, "use_conv_bias": c.conv_bias, "add_bias_linear": c.bias,
            "time_step_min": c.dt_min, "intermediate_size": c.d_intermediate, "hidden_act": c.mlp_act,
            "num_mem_blocks": c.shared_blocks, "adapter_rank": c.adapter_rank,
            "use_shared_attention_adapter": c.attn_adapters, "use_mem_rope": bool(c.rotary_dim),
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}, "rms_norm_eps": c.norm_eps,
        }  # fmt: skip
    codes = {"attention": "*", "mlp": "-"}
    return common | {
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
        "hybrid_override_pattern": "".join(codes.get(k, "M") for k in c.kinds), "head_dim": c.attn_head_dim,
        "intermediate_size": c.d_intermediate or 4 * c.d_model, "mlp_hidden_act": c.mlp_act, "mlp_bias": c.mlp_bias,
        "mamba_num_heads": c.d_inner // c.headdim, "mamba_head_dim": c.headdim, "ssm_state_size": c.d_state,
        "n_groups": c.ngroups, "conv_kernel": c.d_conv, "expand": c.expand, "use_conv_bias": c.conv_bias,
        "use_bias": c.bias, "layer_norm_epsilon": c.norm_eps, "residual_in_fp32": c.residual_in_fp32,
        "mamba_hidden_act": "silu", "attention_bias": False,
    }  # fmt: skip


def _period_of(layers: list[int], n: int, name: str) -> tuple[int, int]:
    """(period, offset) that place exactly `layers` among n (Jamba's attn_layer_* and expert_layer_*)."""
    for period in range(1, n + 2):
        for offset in range(period):
            if _periodic(n, period, offset) == list(layers):
                return period, offset
    raise SimbaError(f"save: the jamba layout places layers every period from an offset; this model's {name} {layers} "
                     "are not so placed, it cannot be written in it")  # fmt: skip


# What only some families compute: (the families (ModelConfig.arch) whose layout can write it, its name, whether a
# model has it)
FAMILY_FEATURES = (
    (("granitemoehybrid", "falcon_h1"), "embedding_multiplier", lambda c: c.embedding_multiplier != 1.0),
    (("granitemoehybrid",), "the Granite multipliers", lambda c: (c.residual_multiplier, c.logits_scaling) != (1, 1)),
    (("jamba",), "bcdt_norm", lambda c: c.bcdt_norm),
    (("jamba",), "moe_layers", lambda c: c.moe_layers != list(range(c.n_layer)) * bool(c.n_experts)),
    (("jamba",), "moe_shared", lambda c: c.n_experts and not c.moe_shared),
    (("jamba",), "moe_renormalize", lambda c: c.n_experts and not c.moe_renormalize),
    (("falcon_h1",), "attn_parallel", lambda c: c.attn_parallel),
    (("zamba2",), "shared_blocks", lambda c: c.shared_blocks),
    (("zamba2",), "dt_min", lambda c: c.dt_min),
    (("falcon_h1",), "ssm_norm", lambda c: not c.ssm_norm),
    (("falcon_h1",), "the Falcon-H1 multipliers", lambda c: c.ssm_proj_multipliers or c.mlp_multipliers or (
        c.lm_head_multiplier, c.ssm_in_multiplier, c.ssm_out_multiplier, c.attn_in_multiplier, c.attn_out_multiplier,
        c.key_multiplier) != (1,) * 6),
)  # fmt: skip


def _foreign(c: ModelConfig, arch: str) -> list[str]:
    """The features of other families that c has (which the layout of `arch` has no setting for)."""
    return [name for families, name, has in FAMILY_FEATURES if arch not in families and has(c)]


def _check_hybrid_writable(c: ModelConfig) -> None:
    checks = {
        "granitemoehybrid": (("attn_conv", c.attn_conv), ("mlp_layers", c.mlp_layers), ("mlp_act", c.mlp_act != "silu"),
                             ("mlp_gated", not c.mlp_gated), ("mlp_bias", c.mlp_bias), ("d_inner_size", c.d_inner_size),
                             ("rotary_dim", c.rotary_dim not in (0, c.attn_head_dim)),
                             ("attn_qkv_bias", c.attn_qkv_bias != c.attn_out_bias), ("residual_in_fp32", c.residual_in_fp32)),
        "bamba": (("attn_conv", c.attn_conv), ("mlp_layers", c.mlp_layers), ("n_experts", c.n_experts),
                  ("mlp_act", c.mlp_act != "silu"), ("mlp_gated", not c.mlp_gated), ("d_inner_size", c.d_inner_size),
                  ("attn_scale", c.attn_scale not in (0.0, c.attn_head_dim**-0.5)),
                  ("attn_qkv_bias", c.attn_qkv_bias != c.attn_out_bias), ("residual_in_fp32", c.residual_in_fp32)),
        "nemotron_h": (("attn_conv", c.attn_conv), ("block_mlp", c.block_mlp), ("rotary_dim", c.rotary_dim),
                       ("attn_qkv_bias", c.attn_qkv_bias or c.attn_out_bias), ("mlp_gated", c.mlp_gated),
                       ("attn_scale", c.attn_scale not in (0.0, c.attn_head_dim**-0.5))),
        "jamba": (("layer", c.layer != "mamba1"), ("bcdt_norm", not c.bcdt_norm), ("attn_conv", c.attn_conv),
                  ("rotary_dim", c.rotary_dim), ("attn_qkv_bias", c.attn_qkv_bias or c.attn_out_bias),
                  ("attn_scale", c.attn_scale not in (0.0, c.attn_head_dim**-0.5)), ("mlp_layers", c.mlp_layers),
                  ("block_mlp", not c.block_mlp), ("mlp_act", c.mlp_act != "silu"), ("mlp_gated", not c.mlp_gated),
                  ("mlp_bias", c.mlp_bias), ("d_inner_size", c.d_inner_size), ("residual_in_fp32", c.residual_in_fp32),
                  ("expert_intermediate", c.n_experts and c.expert_intermediate != c.d_intermediate)),
        "falcon_h1": (("layer", c.layer != "mamba2"), ("attn_parallel", c.attn_layers != list(range(c.n_layer))),
                      ("attn_conv", c.attn_conv), ("rotary_dim", c.rotary_dim != c.attn_head_dim),
                      ("attn_scale", c.attn_scale not in (0.0, c.attn_head_dim**-0.5)),
                      ("attn_qkv_bias", c.attn_qkv_bias != c.attn_out_bias), ("mlp_layers", c.mlp_layers),
                      ("block_mlp", not c.block_mlp), ("n_experts", c.n_experts), ("mlp_act", c.mlp_act != "silu"),
                      ("mlp_gated", not c.mlp_gated), ("residual_in_fp32", c.residual_in_fp32)),
        "zamba2": (("shared_blocks", not c.shared_blocks), ("attn_conv", c.attn_conv),
                   ("rotary_dim", c.rotary_dim not in (0, c.attn_head_dim)),
                   ("attn_head_dim", c.attn_head_dim * c.attn_heads != 2 * c.d_model),
                   ("attn_scale", c.attn_scale != (c.attn_head_dim / 2) ** -0.5),
                   ("attn_qkv_bias", c.attn_qkv_bias or c.attn_out_bias), ("mlp_bias", c.mlp_bias != c.bias),
                   ("mlp_act", c.mlp_act not in ("gelu", "silu")), ("d_inner_size", c.d_inner_size),
                   ("norm_eps", c.norm_eps != 1e-5), ("residual_in_fp32", c.residual_in_fp32),
                   ("tie_embeddings", not c.tie_embeddings)),
    }[c.arch]  # fmt: skip
    bad = [name for name, v in checks if v] + _foreign(c, c.arch)
    if bad:
        raise SimbaError(f"save: the {c.arch} layout has no {bad[0]} setting like this model's; it cannot be written in it")


def config_json(c: ModelConfig) -> dict:
    """config.json of the layout a model is written in (c.arch)."""
    if c.arch == "mamba_ssm":
        _check_original_writable(c)
        return original_config(c)
    if c.arch:
        _check_hybrid_writable(c)
        return hybrid_config(c)
    if c.hybrid or c.d_inner_size:
        raise SimbaError("save: a hybrid model needs a layout to be written in (ModelConfig.arch)")
    return mamba_config(c)


def mamba_config(config: ModelConfig) -> dict:
    """config.json in transformers' MambaConfig (or Mamba2Config) terms."""
    if config.layer == "mamba2":
        return {
            "architectures": ["Mamba2ForCausalLM"],
            "model_type": "mamba2",
            "hidden_size": config.d_model,
            "num_hidden_layers": config.n_layer,
            "vocab_size": config.vocab_size,
            "state_size": config.d_state,
            "expand": config.expand,
            "head_dim": config.headdim,
            "num_heads": config.d_inner // config.headdim,
            "n_groups": config.ngroups,
            "conv_kernel": config.d_conv,
            "use_conv_bias": config.conv_bias,
            "use_bias": config.bias,
            "layer_norm_epsilon": config.norm_eps,
            "residual_in_fp32": config.residual_in_fp32,
            "tie_word_embeddings": config.tie_embeddings,
            "rms_norm": True,
            "hidden_act": "silu",
            "use_cache": True,
        }
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.vocab_size,
        "state_size": config.d_state,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "intermediate_size": config.d_inner,
        "time_step_rank": config.dt_rank,
        "use_conv_bias": config.conv_bias,
        "use_bias": config.bias,
        "layer_norm_epsilon": config.norm_eps,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "use_cache": True,
    }


# weights

SSM_PARAMS = ("in_proj", "conv1d", "dt_bias", "A_log", "D", "norm", "out_proj", "x_proj", "dt_proj", "dt_layernorm",
              "b_layernorm", "c_layernorm")  # fmt: skip
FEED_FORWARD = ("bamba", "jamba", "falcon_h1")  # the layouts whose block MLP is feed_forward (gate, up, down) after
# pre_ff_layernorm, and whose final norm is final_layernorm


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _move(sd: dict, out: dict, old: str, new: str) -> None:
    """Move every tensor named old + '.x' (or old itself) to new + '.x'."""
    for k in [k for k in sd if k == old or k.startswith(old + ".")]:
        out[new + k[len(old):]] = sd.pop(k)


def to_model(sd: dict[str, torch.Tensor], c: ModelConfig, layout: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (layout's names) under MambaLM's names. Tensors it does not know keep their names
    (the loader reports them)."""
    sd = dict(sd)
    if layout in ("original", "transformers"):
        out = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in sd.items()}
        if c.block_mlp and layout == "original":  # GatedMLP's fc1 is [up; gate]: ours is [gate; up]
            for i in range(c.n_layer):
                k = f"backbone.layers.{i}.mlp.fc1.weight"
                if k in out:
                    out[k] = _swap_halves(out[k])
        return out
    if layout == "zamba2":
        return _zamba2_to_model(sd, c)
    out: dict[str, torch.Tensor] = {}
    if layout == "nemotron_h":
        sd = {("backbone." + k[len("model."):] if k.startswith("model.") else k): v for k, v in sd.items()}
        _move(sd, out, "backbone.embeddings", "backbone.embeddings")
        _move(sd, out, "backbone.norm_f", "backbone.norm_f")
    else:
        _move(sd, out, "model.embed_tokens", "backbone.embeddings")
        _move(sd, out, "model.norm" if layout == "granitemoehybrid" else "model.final_layernorm", "backbone.norm_f")
    _move(sd, out, "lm_head", "lm_head")
    for i, kind in enumerate(c.kinds):
        src = f"backbone.layers.{i}." if layout == "nemotron_h" else f"model.layers.{i}."
        dst = f"backbone.layers.{i}."
        if layout == "nemotron_h":
            _move(sd, out, src + "norm", dst + "norm")
            attn = ssm = src + "mixer."
        else:
            _move(sd, out, src + "input_layernorm", dst + "norm")
            attn, ssm = src + "self_attn.", src + "mamba."
        if kind in ("attention", "parallel"):  # a parallel layer's attention is mixer.attn, its SSM mixer.ssm
            to = dst + ("mixer.attn." if kind == "parallel" else "mixer.")
            for part in ("weight", "bias"):
                qkv = [sd.pop(f"{attn}{p}_proj.{part}", None) for p in "qkv"]
                if all(t is not None for t in qkv):
                    out[f"{to}in_proj.{part}"] = torch.cat(qkv, dim=0)
                else:  # the loader names what is missing
                    out.update({f"{attn}{p}_proj.{part}": t for p, t in zip("qkv", qkv) if t is not None})
            _move(sd, out, attn + "o_proj", to + "out_proj")
        if kind == "mlp":
            _move(sd, out, ssm + "up_proj", dst + "mixer.mlp.fc1")
            _move(sd, out, ssm + "down_proj", dst + "mixer.mlp.fc2")
        elif kind != "attention":
            for p in SSM_PARAMS:
                _move(sd, out, ssm + p, dst + ("mixer.ssm." if kind == "parallel" else "mixer.") + p)
        if layout == "granitemoehybrid":
            _move(sd, out, src + "post_attention_layernorm", dst + "norm2")
            mlp = dst + ("mlp.shared." if c.n_experts else "mlp.")
            _move(sd, out, src + "shared_mlp.input_linear", mlp + "fc1")
            _move(sd, out, src + "shared_mlp.output_linear", mlp + "fc2")
            moe = src + "block_sparse_moe."
            for old, new in (("input_linear.weight", "experts_fc1"), ("experts.gate_up_proj", "experts_fc1"),
                             ("output_linear.weight", "experts_fc2"), ("experts.down_proj", "experts_fc2"),
                             ("router.layer.weight", "router.weight"), ("router.weight", "router.weight")):  # fmt: skip
                if moe + old in sd:
                    out[dst + "mlp." + new] = sd.pop(moe + old)
        elif layout in FEED_FORWARD:
            _move(sd, out, src + "pre_ff_layernorm", dst + "norm2")
            ff = src + "feed_forward."
            for part in ("weight", "bias"):
                gate, up = sd.pop(f"{ff}gate_proj.{part}", None), sd.pop(f"{ff}up_proj.{part}", None)
                if gate is not None and up is not None:
                    out[f"{dst}mlp.fc1.{part}"] = torch.cat([gate, up], dim=0)
            _move(sd, out, ff + "down_proj", dst + "mlp.fc2")
            if c.moe(i):  # Jamba: experts.{e}.(gate|up|down)_proj on disk, experts.gate_up_proj / down_proj in memory
                _move(sd, out, ff + "router", dst + "mlp.router")
                _move(sd, out, ff + "experts.gate_up_proj", dst + "mlp.experts_fc1")
                _move(sd, out, ff + "experts.down_proj", dst + "mlp.experts_fc2")
                _stack_experts(sd, out, ff + "experts.", dst + "mlp.", c.n_experts)
    return out | sd  # what was not recognised keeps its name


# Zamba2: a shared block's tensors under model.layers.{i}.shared_transformer. (-> backbone.shared.{j}.), and the
# names of use u's adapters there (-> the hybrid layer's mixer.)
ZAMBA2_BLOCK = (("input_layernorm", "norm"), ("self_attn.o_proj", "attn.out_proj"), ("pre_ff_layernorm", "norm2"),
                ("feed_forward.gate_up_proj", "mlp.fc1"), ("feed_forward.down_proj", "mlp.fc2"))  # fmt: skip
ZAMBA2_ADAPTERS = (("feed_forward.gate_up_proj_adapter_list.{u}", "mlp_adapter"),
                   ("self_attn.linear_q_adapter_list.{u}", "qkv_adapter.q"),
                   ("self_attn.linear_k_adapter_list.{u}", "qkv_adapter.k"),
                   ("self_attn.linear_v_adapter_list.{u}", "qkv_adapter.v"))  # fmt: skip


def _zamba2_uses(c: ModelConfig) -> list[tuple[int, int, int, int]]:
    """(layer, use u, block j, the layer of block j's first use) of each hybrid layer."""
    return [(i, u, u % c.shared_blocks, c.attn_layers[u % c.shared_blocks]) for u, i in enumerate(c.attn_layers)]


def _zamba2_to_model(sd: dict, c: ModelConfig) -> dict:
    out: dict[str, torch.Tensor] = {}
    _move(sd, out, "model.embed_tokens", "backbone.embeddings")
    _move(sd, out, "model.final_layernorm", "backbone.norm_f")
    _move(sd, out, "lm_head", "lm_head")
    uses = _zamba2_uses(c)
    for i, u, j, first in uses:
        src, dst = f"model.layers.{i}.", f"backbone.layers.{i}.mixer."
        _move(sd, out, src + "mamba_decoder.input_layernorm", dst + "norm")
        _move(sd, out, src + "mamba_decoder.mamba", dst + "ssm")
        _move(sd, out, src + "linear", dst + "linear")
        st = f"model.layers.{first}.shared_transformer."  # the block's own copy (later uses' are tied to it)
        for old, new in ZAMBA2_ADAPTERS:
            _move(sd, out, st + old.format(u=u), dst + new)
        if i == first:
            blk = f"backbone.shared.{j}."
            for old, new in ZAMBA2_BLOCK:
                _move(sd, out, st + old, blk + new)
            qkv = [sd.pop(f"{st}self_attn.{p}_proj.weight", None) for p in "qkv"]
            if all(t is not None for t in qkv):
                out[blk + "attn.in_proj.weight"] = torch.cat(qkv, dim=0)
            else:  # the loader names what is missing
                out.update({f"{st}self_attn.{p}_proj.weight": t for p, t in zip("qkv", qkv) if t is not None})
    for i, *_ in uses:  # a later use's tied copy of its block (saved by some versions): the same tensors, read once
        for k in [k for k in sd if k.startswith(f"model.layers.{i}.shared_transformer.")]:
            del sd[k]
    for i, kind in enumerate(c.kinds):
        if kind != "shared":
            _move(sd, out, f"model.layers.{i}.input_layernorm", f"backbone.layers.{i}.norm")
            _move(sd, out, f"model.layers.{i}.mamba", f"backbone.layers.{i}.mixer")
    return out | sd


def _zamba2_from_model(sd: dict, c: ModelConfig) -> dict:
    out: dict[str, torch.Tensor] = {}
    _move(sd, out, "backbone.embeddings", "model.embed_tokens")
    _move(sd, out, "backbone.norm_f", "model.final_layernorm")
    _move(sd, out, "lm_head", "lm_head")
    h, kv, e = c.attn_heads, c.attn_kv_heads, c.attn_head_dim
    for i, u, j, first in _zamba2_uses(c):
        src, dst = f"backbone.layers.{i}.mixer.", f"model.layers.{i}."
        _move(sd, out, src + "norm", dst + "mamba_decoder.input_layernorm")
        _move(sd, out, src + "ssm", dst + "mamba_decoder.mamba")
        _move(sd, out, src + "linear", dst + "linear")
        st = f"model.layers.{first}.shared_transformer."
        for old, new in ZAMBA2_ADAPTERS:
            _move(sd, out, src + new, st + old.format(u=u))
        if i == first:
            blk = f"backbone.shared.{j}."
            for old, new in ZAMBA2_BLOCK:
                _move(sd, out, blk + new, st + old)
            for p, piece in zip("qkv", sd.pop(blk + "attn.in_proj.weight").split([h * e, kv * e, kv * e], dim=0)):
                out[f"{st}self_attn.{p}_proj.weight"] = piece
    for i, kind in enumerate(c.kinds):
        if kind != "shared":
            _move(sd, out, f"backbone.layers.{i}.norm", f"model.layers.{i}.input_layernorm")
            _move(sd, out, f"backbone.layers.{i}.mixer", f"model.layers.{i}.mamba")
    if sd:
        raise RuntimeError(f"layouts.from_model: no zamba2 name for {sorted(sd)[0]}")
    return out


def _stack_experts(sd: dict, out: dict, src: str, dst: str, n: int) -> None:
    """Experts stored one tensor each (src{e}.gate_proj.weight, up_proj, down_proj) as dst experts_fc1 (n, 2i, d)
    [gate; up] and experts_fc2 (n, d, i); left as they are (the loader names them) unless all n are there."""
    names = [f"{src}{e}.{p}_proj.weight" for e in range(n) for p in ("gate", "up", "down")]
    if not all(k in sd for k in names):
        return
    gate, up, down = ([sd.pop(f"{src}{e}.{p}_proj.weight") for e in range(n)] for p in ("gate", "up", "down"))
    out[dst + "experts_fc1"] = torch.stack([torch.cat([g, u], dim=0) for g, u in zip(gate, up)])
    out[dst + "experts_fc2"] = torch.stack(down)


def from_model(sd: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    """MambaLM's tensors under the names (and shapes) of the layout c.arch writes (config_json's)."""
    if not c.arch:
        return dict(sd)
    if c.arch == "mamba_ssm":
        out = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in sd.items()}
        for k in [k for k in out if k.endswith(".mlp.fc1.weight")]:
            out[k] = _swap_halves(out[k])
        return out
    if c.arch == "zamba2":
        return _zamba2_from_model(dict(sd), c)
    sd, out = dict(sd), {}
    nemo = c.arch == "nemotron_h"
    prefix = "backbone." if nemo else "model."
    _move(sd, out, "backbone.embeddings", prefix + ("embeddings" if nemo else "embed_tokens"))
    _move(sd, out, "backbone.norm_f", prefix + ("norm_f" if nemo else "norm" if c.arch == "granitemoehybrid" else "final_layernorm"))
    _move(sd, out, "lm_head", "lm_head")
    h, kv, e = c.attn_heads, c.attn_kv_heads, c.attn_head_dim
    for i, kind in enumerate(c.kinds):
        src, dst = f"backbone.layers.{i}.", f"{prefix}layers.{i}."
        _move(sd, out, src + "norm2", dst + ("post_attention_layernorm" if c.arch == "granitemoehybrid" else "pre_ff_layernorm"))
        _move(sd, out, src + "norm", dst + ("norm" if nemo else "input_layernorm"))
        attn, ssm = (dst + "mixer.",) * 2 if nemo else (dst + "self_attn.", dst + "mamba.")
        if kind in ("attention", "parallel"):
            mixer = src + ("mixer.attn." if kind == "parallel" else "mixer.")
            for part in ("weight", "bias"):
                t = sd.pop(f"{mixer}in_proj.{part}", None)
                if t is not None:
                    for p, piece in zip("qkv", t.split([h * e, kv * e, kv * e], dim=0)):
                        out[f"{attn}{p}_proj.{part}"] = piece
            _move(sd, out, mixer + "out_proj", attn + "o_proj")
        if kind == "mlp":
            _move(sd, out, src + "mixer.mlp.fc1", ssm + "up_proj")
            _move(sd, out, src + "mixer.mlp.fc2", ssm + "down_proj")
        elif kind != "attention":
            _move(sd, out, src + ("mixer.ssm" if kind == "parallel" else "mixer"), ssm.rstrip("."))
        if c.arch == "granitemoehybrid":
            mlp = src + ("mlp.shared." if c.n_experts else "mlp.")
            _move(sd, out, mlp + "fc1", dst + "shared_mlp.input_linear")
            _move(sd, out, mlp + "fc2", dst + "shared_mlp.output_linear")
            moe = dst + "block_sparse_moe."
            for new, old in (("input_linear.weight", "experts_fc1"), ("output_linear.weight", "experts_fc2"),
                             ("router.layer.weight", "router.weight")):  # fmt: skip
                if src + "mlp." + old in sd:
                    out[moe + new] = sd.pop(src + "mlp." + old)
        elif c.arch in FEED_FORWARD:
            for part in ("weight", "bias"):
                t = sd.pop(f"{src}mlp.fc1.{part}", None)
                if t is not None:
                    gate, up = t.chunk(2, dim=0)
                    out[f"{dst}feed_forward.gate_proj.{part}"], out[f"{dst}feed_forward.up_proj.{part}"] = gate, up
            _move(sd, out, src + "mlp.fc2", dst + "feed_forward.down_proj")
            _move(sd, out, src + "mlp.router", dst + "feed_forward.router")
            if src + "mlp.experts_fc1" in sd:  # Jamba's experts, one tensor each as its checkpoints store them
                fc1, fc2 = sd.pop(src + "mlp.experts_fc1"), sd.pop(src + "mlp.experts_fc2")
                for x, (w1, w2) in enumerate(zip(fc1, fc2)):
                    gate, up = w1.chunk(2, dim=0)
                    for p, w in (("gate", gate), ("up", up), ("down", w2)):
                        out[f"{dst}feed_forward.experts.{x}.{p}_proj.weight"] = w
    if sd:
        raise RuntimeError(f"layouts.from_model: no {c.arch} name for {sorted(sd)[0]}")
    return out
