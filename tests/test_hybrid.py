"""Hybrid SSM-attention models: every layout against its reference (transformers' own forward on random small
configs; mamba_ssm's MHA / Block math re-implemented here), the output folder, pruning through attention (a per-row
reference), carried and SnapKV scores, decoding with per-layer KV caches, and left-padded batches."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import random_hybrid
from simba_compress import SimbaConfig, SimbaError, load, save
from simba_compress.checkpoints import read_checkpoint
from simba_compress.layouts import from_model
from simba_compress.pruning import score_source

transformers = pytest.importorskip("transformers")


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights with trained-like SSM ranges (A, dt), norms away from 1, every bias nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 3)
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.rand(p.shape, generator=g) * (math.log(0.5) - math.log(1e-3)) + math.log(1e-3))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def left_padded(ids: torch.Tensor, pad: list[int]):
    mask = torch.ones_like(ids)
    for r, n in enumerate(pad):
        mask[r, :n] = 0
    position = (mask.cumsum(1) - 1).clamp_min(0)  # transformers' generate gives a left-padded row these position_ids
    return mask, position


GRANITE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_d_conv=4, mamba_expand=2,
               shared_intermediate_size=40, layer_types=["mamba", "attention", "mamba", "attention"])  # fmt: skip
JAMBA = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, attn_layer_period=3, attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4)
FALCON_H1 = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=40, mamba_d_ssm=48, mamba_n_heads=3, mamba_d_state=8, mamba_chunk_size=16,
                 mamba_rms_norm=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                 embedding_multiplier=3.0, lm_head_multiplier=0.3, key_multiplier=0.7, attention_in_multiplier=1.3,
                 attention_out_multiplier=0.8, ssm_in_multiplier=1.25, ssm_out_multiplier=0.4,
                 ssm_multipliers=[0.5, 0.25, 0.7, 1.5, 0.6], mlp_multipliers=[0.9, 0.6])
ZAMBA2 = dict(vocab_size=96, hidden_size=16, num_hidden_layers=5, num_attention_heads=4, intermediate_size=24,
              layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid"], mamba_d_state=8, n_mamba_heads=4,
              mamba_ngroups=2, num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=3, use_mem_rope=True,
              chunk_size=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
CASES = {
    "granite_dense_nope": ("GraniteMoeHybrid", GRANITE | dict(num_local_experts=0, position_embedding_type="nope")),
    "granite_moe_rope_multipliers": ("GraniteMoeHybrid", GRANITE | dict(
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, position_embedding_type="rope",
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.5,
        attention_bias=True, tie_word_embeddings=True, mamba_proj_bias=True)),
    "bamba": ("Bamba", dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
                            intermediate_size=48, attn_layer_indices=[2])),
    "nemotron_h": ("NemotronH", dict(vocab_size=96, hidden_size=32, hybrid_override_pattern="M*-M-*", num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
                                     mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=16)),
    # Jamba: Mamba-1 with dt/B/C norms, NoPE GQA at layer 1, MoE (4 experts, top 2, no shared MLP) at layers 1 and 3
    "jamba_moe": ("Jamba", JAMBA | dict(num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1)),
    "jamba_dense": ("Jamba", JAMBA | dict(num_experts=1, attn_layer_period=2, attn_layer_offset=0, mamba_dt_rank="auto",
                                          tie_word_embeddings=True)),
    # Falcon-H1: attention (RoPE, head_dim != hidden / heads) beside Mamba-2 (d_ssm != expand x hidden) in every layer,
    # every muP multiplier away from 1; without and with the gated norm (groups, biases)
    "falcon_h1": ("FalconH1", FALCON_H1),
    "falcon_h1_norm": ("FalconH1", FALCON_H1 | dict(mamba_rms_norm=True, mamba_norm_before_gate=False, mamba_d_ssm=64,
                                                   mamba_n_heads=4, mamba_n_groups=2, attention_bias=True,
                                                   mamba_proj_bias=True, projectors_bias=True, mlp_bias=True,
                                                   tie_word_embeddings=True)),
    # Zamba2: hybrid layers 1, 3, 4 use 2 shared blocks in turn (0, 1, 0), with LoRA on q, k, v and the MLP, RoPE,
    # grouped Mamba-2; and one block for every use (layers 0 and 2), GQA, no RoPE, biases, a SiLU MLP
    "zamba2": ("Zamba2", ZAMBA2),
    "zamba2_gqa_bias": ("Zamba2", ZAMBA2 | dict(num_mem_blocks=1, use_shared_attention_adapter=False, use_mem_rope=False,
                                                num_key_value_heads=2, add_bias_linear=True, hidden_act="silu",
                                                mamba_ngroups=1,
                                                layers_block_type=["hybrid", "mamba", "hybrid", "mamba"],
                                                num_hidden_layers=4)),
}  # fmt: skip


def transformers_model(case: str, **overrides):
    family, kwargs = CASES[case]
    config = getattr(transformers, f"{family}Config")(**kwargs | overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return randomize(getattr(transformers, f"{family}ForCausalLM")(config))


@pytest.fixture(scope="module", params=sorted(CASES))
def written(request, tmp_path_factory):
    """(case, transformers' model, its folder written by save_pretrained)."""
    ref = transformers_model(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    ref.save_pretrained(folder)
    return request.param, ref, folder


@torch.no_grad()
def test_dense_logits_equal_transformers(written):
    case, ref, folder = written
    ours = load(folder)
    assert read_checkpoint(folder).layout == ref.config.model_type == ours.config.arch
    assert ours.config.attn_layers and ours.config.n_layer == len(ours.config.kinds)
    ids = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(1))
    assert rel_err(ours(ids, simba=None).logits, ref(ids, use_cache=False).logits) < 1e-5
    mask, position = left_padded(ids, [0, 9])
    ours_padded = ours(ids, mask, simba=None).logits
    theirs = ref(ids, attention_mask=mask, position_ids=position, use_cache=False).logits
    real = mask.bool()
    assert rel_err(ours_padded[real], theirs[real]) < 1e-5
    # a padded row's real tokens see exactly what they see alone (with an in_proj bias, the Mamba layers' conv reads
    # the bias at the padding, as transformers' does: equal to transformers above, not to the row alone)
    if not ours.config.bias:
        alone = ours(ids[1:, 9:], simba=None).logits
        assert rel_err(ours_padded[1, 9:], alone[0]) < 1e-5


@torch.no_grad()
def test_output_folder_reloads_pruned_and_transformers_reads_it_dense(written, tmp_path):
    case, ref, folder = written
    ours = load(folder)
    ours.simba = SimbaConfig([1.0, 1.0, 0.5] + [0.5] * (ours.config.n_layer - 3), protect_last=4)
    out = save(ours, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == ref.config.model_type and cfg["simba"]["keep"] == ours.simba.keep
    back = load(out)
    assert back.simba == ours.simba and back.config == ours.config
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(2))
    assert torch.equal(back(ids).logits, ours(ids).logits)
    dense = type(ref).from_pretrained(out).eval()
    assert rel_err(dense(ids, use_cache=False).logits, ours(ids, simba=None).logits) < 1e-5


def mha_reference(disk: dict, prefix: str, x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """mamba_ssm's MHA forward (modules/mha.py, no cache), written out: in_proj, the conv over qkv (nn.Conv1d with
    padding d_conv - 1, the last d_conv - 1 outputs cut), flash_attn's non-interleaved rotary on the first
    rotary_emb_dim dims of q and k, kv heads repeated, causal softmax attention, out_proj. x (l, d) one row."""
    a = cfg["attn_cfg"]
    h, c, e = a["num_heads"], a["num_heads_kv"], a["head_dim"]
    qkv = x @ disk[prefix + "in_proj.weight"].T + disk[prefix + "in_proj.bias"]
    if a.get("d_conv"):
        k = a["d_conv"]
        w, b = disk[prefix + "conv1d.weight"][:, 0], disk[prefix + "conv1d.bias"]
        padded = torch.cat([qkv.new_zeros(k - 1, qkv.shape[1]), qkv])
        qkv = torch.stack([(padded[t : t + k] * w.T).sum(0) + b for t in range(x.shape[0])])
    q, kk, v = qkv.split([h * e, c * e, c * e], dim=-1)
    q, kk, v = q.view(-1, h, e), kk.view(-1, c, e), v.view(-1, c, e)
    rd = a.get("rotary_emb_dim", 0)
    if rd:
        inv = 1.0 / (a.get("rotary_emb_base", 10000.0) ** (torch.arange(0, rd, 2).float() / rd))
        ang = torch.arange(x.shape[0]).float()[:, None] * inv  # (l, rd/2)
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]

        def rot(t):
            x1, x2 = t[..., : rd // 2], t[..., rd // 2 : rd]
            return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, t[..., rd:]], dim=-1)

        q, kk = rot(q), rot(kk)
    kk, v = kk.repeat_interleave(h // c, dim=1), v.repeat_interleave(h // c, dim=1)
    scores = torch.einsum("qhe,khe->hqk", q, kk) * (a.get("softmax_scale") or e**-0.5)
    causal = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).tril()
    o = torch.einsum("hqk,khe->qhe", scores.masked_fill(~causal, float("-inf")).softmax(-1), v).reshape(x.shape[0], -1)
    return o @ disk[prefix + "out_proj.weight"].T + disk[prefix + "out_proj.bias"]


@torch.no_grad()
def test_state_spaces_hybrid_equals_mamba_ssm_math(tmp_path):
    """A state-spaces hybrid folder (attention with GQA, the qkv conv, partial rotary, biases; d_intermediate
    GatedMLPs) loaded by simba_compress equals mamba_ssm's Block math computed here from the folder's own tensors
    (benchmarks/check_mamba_ssm_hybrid.py runs mamba_ssm itself, rotary aside)."""
    m = randomize(random_hybrid(n_layer=3, attn_layers=(1,), d_model=32, vocab=64, attn_qkv_bias=True,
                                attn_out_bias=True, d_intermediate=256, block_mlp=True, rotary_dim=4), seed=3)  # fmt: skip
    cfg = {"d_model": 32, "d_intermediate": 200, "n_layer": 3, "vocab_size": 60, "pad_vocab_size_multiple": 8,
           "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16}, "attn_layer_idx": [1],
           "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "d_conv": 4, "rotary_emb_dim": 4,
                        "causal": True, "qkv_proj_bias": True, "out_proj_bias": True},
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "tie_embeddings": True}  # fmt: skip
    disk = from_model(m.state_dict(), m.config)  # mamba_ssm's names: GatedMLP's fc1 is [up; gate]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save(disk, tmp_path / "pytorch_model.bin")
    ours = load(tmp_path)
    assert ours.config.arch == "mamba_ssm" and ours.config.d_intermediate == 256  # 200 rounded up as GatedMLP does
    ids = torch.randint(0, 60, (1, 21), generator=torch.Generator().manual_seed(0))
    # the reference: mamba_ssm's Block (add, norm, mixer; add, norm2, GatedMLP) on the file's tensors
    h = disk["backbone.embedding.weight"][ids[0]]
    residual = torch.zeros_like(h)
    for i in range(3):
        p = f"backbone.layers.{i}."
        residual = residual + h

        def rms(x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

        x = rms(residual, disk[p + "norm.weight"])
        if i == 1:
            h = mha_reference(disk, p + "mixer.", x, cfg)
        else:
            h = ours.backbone.layers[i].mixer(x[None], _ctx()).out[0]  # Mamba-2: tested against transformers elsewhere
        residual = residual + h
        x = rms(residual, disk[p + "norm2.weight"])
        y, gate = (x @ disk[p + "mlp.fc1.weight"].T).chunk(2, dim=-1)
        h = (y * F.silu(gate)) @ disk[p + "mlp.fc2.weight"].T
    logits = rms(residual + h, disk["backbone.norm_f.weight"]) @ disk["backbone.embedding.weight"].T
    assert rel_err(ours(ids, simba=None).logits[0], logits) < 1e-5
    # written back in the same layout, schedule in simba.json (mamba_ssm builds MambaConfig(**config.json))
    ours.simba = SimbaConfig([1.0, 0.5, 0.5], protect_last=2)
    out = save(ours, tmp_path / "out")
    assert set(json.loads((out / "config.json").read_text())) == set(cfg)
    assert (out / "pytorch_model.bin").exists() and (out / "simba.json").exists()
    back_disk = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(back_disk[k], disk[k]) for k in disk)
    assert load(out).simba == ours.simba


def _ctx(w: int = 21):
    from simba_compress.backends import Backends
    from simba_compress.layers import MixerContext

    return MixerContext(None, torch.tensor([w - 1]), backends=Backends(fast_path=False))


def test_bad_hybrid_configs_name_the_file_and_key(written, tmp_path):
    case, ref, folder = written
    cfg = json.loads((folder / "config.json").read_text())
    bad = {
        "granite_dense_nope": ({"hidden_act": "gelu"}, "'hidden_act' = 'gelu' is not supported"),
        "granite_moe_rope_multipliers": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type 'yarn'"),
        "bamba": ({"time_step_limit": [0.0, 1.0]}, r"'time_step_limit' \[0.0, 1.0\] is not supported"),
        "nemotron_h": ({"hybrid_override_pattern": "M*E-M-"}, r"MoE \('E'\) layers, which are not supported"),
        "jamba_moe": ({"attn_layer_offset": 3}, "'attn_layer_offset' 3 must be smaller than 'attn_layer_period' 3"),
        "jamba_dense": ({"hidden_act": "gelu"}, "'hidden_act' = 'gelu' is not supported"),
        "falcon_h1": ({"ssm_multipliers": [1.0, 2.0]}, r"'ssm_multipliers' must be a list of 5 numbers, got \[1.0, 2.0\]"),
        "falcon_h1_norm": ({"mamba_norm_before_gate": True}, "'mamba_norm_before_gate' true with 'mamba_rms_norm' is "
                                                             "not supported"),
        "zamba2": ({"tie_word_embeddings": False}, "'tie_word_embeddings' false is not supported"),
        "zamba2_gqa_bias": ({"use_shared_attention_adapter": True}, "'num_key_value_heads' 2 with "
                                                                    "'use_shared_attention_adapter' is not supported"),
    }[case]
    (tmp_path / "config.json").write_text(json.dumps(cfg | bad[0]))
    with pytest.raises(SimbaError, match=bad[1]) as e:
        read_checkpoint(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_granite_top_k_over_its_experts_names_the_key(tmp_path):
    transformers_model("granite_moe_rope_multipliers").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"num_experts_per_tok": 5}))
    with pytest.raises(SimbaError, match="'num_experts_per_tok' 5 is more than 'num_local_experts' 4"):
        read_checkpoint(tmp_path)


@torch.no_grad()
def naive_hybrid_forward(model, ids: torch.Tensor, simba: SimbaConfig) -> torch.Tensor:
    """One row, layer by layer: each block runs densely on its kept tokens alone (a token dropped below is absent, so
    never a key), at their original RoPE positions; the tokens kept for the next layer are the top ones of the
    score of the layer score_source names, computed on that layer's own tokens and carried up."""
    from simba_compress.backends import Backends
    from simba_compress.layers import MixerContext

    T = ids.shape[0]
    stream = model.embed(ids[None])[0]
    embeddings = stream.clone()  # the original embeddings, which Zamba2's hybrid layers read at their tokens
    positions = list(range(T))
    counts = simba.counts(torch.tensor([T]))[:, 0].tolist()
    scores: dict[int, dict[int, float]] = {}  # source layer -> position -> score
    kinds = model.config.kinds
    for i, block in enumerate(model.backbone.layers):
        pos = torch.tensor(positions)
        prunes = i + 1 < len(counts) and counts[i + 1] < counts[i]
        needed = {score_source(kinds, j, simba) for j in range(i, len(counts) - 1) if counts[j + 1] < counts[j]} - {None}
        crit = next((c for (src, c) in needed if src == i), None)
        ctx = MixerContext(None, torch.tensor([len(positions) - 1]), pos[None], crit, backends=Backends(fast_path=False),
                           window=simba.protect_last, embeddings=embeddings[pos][None])  # fmt: skip
        sub = stream[pos][None]
        h, out, res = block(sub, None, ctx, owned=False)
        sub = (h + out)[0]
        stream[pos] = sub
        if crit is not None:
            scores[i] = dict(zip(positions, res.score[0].tolist()))
        if prunes:
            src = score_source(kinds, i, simba)
            score = [scores[src[0]][p] for p in positions] if src else sub.norm(dim=-1).tolist()
            protected = set(positions[-simba.protect_last :])
            ranked = sorted(range(len(positions)), key=lambda j: (positions[j] not in protected, -score[j]))
            positions = sorted(positions[j] for j in ranked[: counts[i + 1]])
    return model.head(model.backbone.norm_f(stream))


@pytest.mark.parametrize("criterion, attention_score", [("simba", "carry"), ("simba", "snapkv"), ("snapkv", "carry"),
                                                         ("l2norm", "carry")])  # fmt: skip
@torch.no_grad()
def test_pruned_forward_equals_per_row_reference(criterion, attention_score):
    """Pruning through attention layers, batched and padded on the left, equals running each layer on its kept tokens
    alone (the attention after a pruning Mamba layer, and a Mamba layer after a pruning attention layer)."""
    m = random_hybrid(n_layer=6, attn_layers=(1, 3), d_model=32, vocab=64, d_intermediate=40, block_mlp=True)
    simba = SimbaConfig([1.0, 1.0, 0.75, 0.5, 0.5, 0.25], criterion, protect_last=3, attention_score=attention_score)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(5))
    mask, _ = left_padded(ids, [0, 7])
    logits = m(ids, mask, simba=simba).logits
    for row, pad in enumerate([0, 7]):
        ref = naive_hybrid_forward(m, ids[row, pad:], simba)
        assert rel_err(logits[row, pad:], ref) < 1e-5


def test_score_sources():
    kinds = ["mamba2", "attention", "mlp", "mamba2", "attention"]
    simba = SimbaConfig([1.0] * 5, attention_score="carry")
    assert [score_source(kinds, i, simba) for i in range(5)] == [(0, "simba"), (0, "simba"), (0, "simba"), (3, "simba"), (3, "simba")]
    snap = SimbaConfig([1.0] * 5, attention_score="snapkv")
    assert [score_source(kinds, i, snap)[0] for i in range(5)] == [0, 1, 0, 3, 4]
    kv = SimbaConfig([1.0] * 5, "snapkv")
    assert score_source(kinds, 2, kv) == (1, "snapkv") and score_source(kinds, 3, kv) == (1, "snapkv")
    with pytest.raises(SimbaError, match="^criterion: .snapkv.: layer 0 prunes, but no layer at or below"):
        score_source(kinds, 0, kv)
    assert score_source(["attention", "mamba2"], 0, simba) == (0, "snapkv")  # no SSM layer below: the attention's own
    assert score_source(kinds, 1, SimbaConfig([1.0] * 5, "utr")) is None


@torch.no_grad()
def test_generate_decodes_over_each_layers_kept_tokens():
    """generate (pruned prefill, a KV cache per attention layer holding its kept tokens, decoded at the original
    positions) equals the reference step, and greedy tokens equal a forward that ran the same pruned prefill; a
    left-padded row decodes as it does alone."""
    m = random_hybrid(n_layer=5, attn_layers=(1, 4), d_model=32, vocab=64, rotary_dim=8)
    m.simba = SimbaConfig([1.0, 0.5, 0.5, 0.25, 0.25], protect_last=2)
    ids = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(3))
    mask, _ = left_padded(ids, [0, 5])
    out = m.generate(ids, mask, max_new_tokens=6)
    prefill = m(ids, mask, return_states=True, last_logits=1)
    kv = prefill.states[1]
    assert kv.length.tolist() == [17, 14] and kv.position.tolist() == [33, 28]  # kept tokens; next position
    assert prefill.states[4].length.tolist() == [9, 7]
    assert torch.equal(out[:, 33:], greedy_steps(m, prefill, 6))
    alone = m.generate(ids[1:, 5:], max_new_tokens=6)
    assert torch.equal(out[1, 33:], alone[0, 28:])


def greedy_steps(m, prefill, n: int) -> torch.Tensor:
    """(b, n) greedy tokens of the reference step after a prefill (m(..., return_states=True, last_logits=1))."""
    token, states, steps = prefill.logits[:, -1].argmax(-1), prefill.states, []
    for _ in range(n):
        steps.append(token)
        logits, states = m.step(token, states)
        token = logits.argmax(-1)
    return torch.stack(steps, 1)


def assert_steps_continue_the_forward(m, vocab: int) -> None:
    """Dense: decode steps after a prefill give the logits the forward gives the same tokens in the longer prompt."""
    ids = torch.randint(0, vocab, (2, 30), generator=torch.Generator().manual_seed(4))
    full = m(ids, simba=None).logits
    states = m(ids[:, :24], simba=None, return_states=True).states
    for t in range(24, 30):
        logits, states = m.step(ids[:, t], states)
        assert rel_err(logits, full[:, t]) < 1e-5


@torch.no_grad()
def test_decode_step_equals_the_forward_of_the_longer_prompt():
    """Dense: a decode step after a prefill gives the logits the forward gives the same token in a longer prompt
    (the KV cache, the conv state over qkv and RoPE positions continue exactly)."""
    m = random_hybrid(n_layer=4, attn_layers=(0, 2), d_model=32, vocab=64, rotary_dim=8, d_intermediate=40, block_mlp=True)
    assert_steps_continue_the_forward(m, 64)


def test_moe_gather_and_loop_paths_agree():
    from simba_compress.mlp import GATHER_PAIRS

    m = load_case_model("granite_moe_rope_multipliers")
    moe = m.backbone.layers[0].mlp
    x = torch.randn(3, GATHER_PAIRS, m.config.d_model)
    with torch.no_grad():
        looped = moe(x)  # 3 x 64 tokens x top-2 pairs: one expert at a time
        gathered = torch.cat([moe(x[:, t : t + 1]) for t in range(x.shape[1])], 1)  # 3 tokens x top-2: gathered
    torch.testing.assert_close(gathered, looped, rtol=1e-5, atol=1e-6)


def load_case_model(case: str, **overrides):
    """simba_compress's model of a CASES model, read from the folder transformers writes (config overrides: vocab_size)."""
    import tempfile

    ref = transformers_model(case, **overrides)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        return load(d)


def test_cli_compresses_a_granite_folder_with_kv_cache_reported(tmp_path, capsys):
    """The CLI on a transformers hybrid: a calibrated search in the fast form, the report's KV-cache bytes beside the
    FLOP ratio, info, bench's KV-cache column, and an output transformers reads dense."""
    import shutil

    from conftest import CORPUS
    from simba_compress.cli import main

    family, kwargs = CASES["granite_dense_nope"]
    ref = randomize(getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(
        **kwargs | dict(vocab_size=8192, num_hidden_layers=6, layer_types=["mamba", "attention", "mamba", "mamba",
                                                                           "attention", "mamba"]))))  # fmt: skip
    ref.save_pretrained(tmp_path / "granite")
    for f in (CORPUS / "tokenizer").iterdir():
        shutil.copy(f, tmp_path / "granite" / f.name)
    out = tmp_path / "out"
    args = ["--model", str(tmp_path / "granite"), "--flops", "0.7", "--output", str(out), "--calib-samples", "2",
            "--calib-seq-len", "128", "--seq-len", "128", "--trials", "3", "--protect-last", "4", "--json"]  # fmt: skip
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    flops = report["flops"]
    assert 0 < flops["kv_cache_bytes"] < flops["kv_cache_dense_bytes"] == 2 * 128 * 2 * 2 * 8 * 2  # 2 layers, bf16
    assert report["schedule"]["attention_score"] == "snapkv"  # the default
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "attention at layers 1, 4: 4 heads, 2 kv heads of 8, no positional encoding" in text and "KV cache at 1024" in text
    assert main(["bench", "--model", str(out), "--prompt-len", "64", "--new-tokens", "2", "--reps", "1", "--json"]) == 0
    rows = {r["impl"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    # the KV cache the prefill leaves: 2 attention layers, 2 kv heads of 8, float32 on the CPU
    assert 0 < rows["simba"]["kv_cache_bytes"] < rows["dense"]["kv_cache_bytes"] == 2 * 64 * 2 * 2 * 8 * 4
    dense = type(ref).from_pretrained(out).eval()
    ids = torch.randint(0, 8192, (1, 20))
    with torch.no_grad():
        assert rel_err(dense(ids, use_cache=False).logits, load(out)(ids, simba=None).logits) < 1e-4


def test_attention_score_is_a_pruning_setting(capsys):
    """attention_score lives in the settings objects: checked once when made (naming the field; the CLI names its
    flag), carried into the schedule; a schedule the model cannot score is refused when it is made, not at the
    forward (snapkv below the first attention layer, or on a pure Mamba model)."""
    from conftest import random_model
    from simba_compress.cli import main
    from simba_compress.compress import compress
    from simba_compress.settings import ExplicitSchedule, LinearSchedule

    with pytest.raises(SimbaError, match=r"^attention_score: 'bogus' is not one of carry, snapkv$"):
        LinearSchedule(flops=0.6, attention_score="bogus")
    assert main(["--model", "demo", "--flops", "0.6", "--attention-score", "bogus"]) == 2
    assert "--attention-score: Input should be 'carry' or 'snapkv'" in capsys.readouterr().err
    m = random_hybrid(n_layer=6, attn_layers=(2, 4))
    keep = [1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert compress(m, ExplicitSchedule(keep=keep, attention_score="carry")).attention_score == "carry"
    assert compress(m, LinearSchedule(flops=0.7)).attention_score == "snapkv"  # the default
    assert compress(m, ExplicitSchedule(keep=keep, criterion="snapkv")).criterion == "snapkv"
    with pytest.raises(SimbaError, match=r"^criterion: 'snapkv': layer 1 prunes, but no layer at or below it"):
        compress(m, ExplicitSchedule(keep=[1.0, 1.0, 0.75, 0.75, 0.5, 0.25], criterion="snapkv"))
    with pytest.raises(SimbaError, match=r"^criterion: 'snapkv': layer 0 prunes"):
        compress(random_model(n_layer=4, d_model=32, vocab=64), LinearSchedule(final_keep=0.5, criterion="snapkv"))


@torch.no_grad()
def test_matmul_decode_equals_sdpa_decode():
    from simba_compress.backends import Backends

    m = random_hybrid(n_layer=3, attn_layers=(0, 2), rotary_dim=8)
    ids = torch.randint(0, 64, (2, 20))
    mask, _ = left_padded(ids, [0, 4])
    out = m(ids, mask, simba=None, return_states=True)
    for backends in (Backends(fast_path=False), Backends(fast_path=False, attention_decode="matmul")):
        states = [s.clone() for s in out.states]
        logits = []
        for t in range(3):
            h, mixed = m.embed(ids[:, t]), None
            for block, st in zip(m.backbone.layers, states):
                h, mixed = block.step(h, mixed, st, backends)
            logits.append(m.head(m.backbone.norm_f(h + mixed)))
        if backends.attention_decode == "sdpa":
            first = torch.stack(logits)
    torch.testing.assert_close(torch.stack(logits), first, rtol=1e-5, atol=1e-5)


def test_gpu_hybrid_benchmark_smoke(tmp_path):
    """benchmarks/gpu_hybrid.py --smoke: both shapes, tiny, on the CPU; rows for ours and transformers' generate."""
    import subprocess
    import sys

    from conftest import REPO

    r = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_hybrid.py"), "--smoke", "--out", str(tmp_path),
                        "--impls", "dense", "simba", "transformers"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_hybrid.json").read_text())["rows"]
    assert {(x["model"], x["impl"]) for x in rows} >= {("mamba2attn-2.7b", "simba"), ("granite-4.0-h-micro", "dense"),
                                                         ("granite-4.0-h-micro", "transformers")}  # fmt: skip
    simba = next(x for x in rows if x["impl"] == "simba" and x["model"] == "mamba2attn-2.7b")
    assert 0.5 < simba["flops"] < 0.7 and simba["decode_ms_per_token"] > 0 and simba["kv_buffers_gb"] > 0
    assert "| simba | 2 | 48 |" in (tmp_path / "gpu_hybrid.md").read_text()


def test_hybrid_quality_script_on_a_tiny_hybrid(tmp_path):
    """benchmarks/hybrid_quality.py end to end on a tiny random hybrid: the choice on training text, the headline
    rows (dense, truncate, Simba with either attention score, SnapKV-style and Simba step schedules), passkey."""
    import subprocess
    import sys

    from conftest import CORPUS, REPO

    from transformers import AutoTokenizer

    m = random_hybrid(n_layer=8, attn_layers=(1, 5), d_model=32, vocab=8192)
    save(m, tmp_path / "tiny", tokenizer=AutoTokenizer.from_pretrained(str(CORPUS / "tokenizer")))
    import lzma

    text = lzma.open(CORPUS / "valid.txt.xz", "rt").read()[:400_000]  # a small corpus: the script reads it whole
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, part in (("train", text[:200_000]), ("valid", text[200_000:])):
        with lzma.open(corpus / f"{name}.txt.xz", "wt") as f:
            f.write(part)
    args = [sys.executable, str(REPO / "benchmarks/hybrid_quality.py"), "--corpus", str(corpus), "--model",
            str(tmp_path / "tiny"), "--passkey-model", str(tmp_path / "tiny"), "--out", str(tmp_path / "out"),
            "--windows", "2", "--choose-windows", "2", "--seq-lens", "1024", "--passkey-lengths", "1024",
            "--per-depth", "1"]  # fmt: skip
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    state = json.loads((tmp_path / "out" / "hybrid_quality.json").read_text())
    assert state["choice"] in ("carry", "snapkv")
    methods = {(x["stage"], x["method"]) for x in state["rows"]}
    for method in ("dense", "truncate", "simba", "snapkv", "simba-step", "simba-step-snapkv"):
        assert ("headline", method) in methods and ("passkey", method) in methods
    assert all(abs(x["flop_ratio"] - 0.6) < 0.05 for x in state["rows"] if x["method"] in ("snapkv", "simba-step"))
    assert "## Passkey exact match" in (tmp_path / "out" / "hybrid_quality.md").read_text()
