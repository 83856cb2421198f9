"""Jamba (Mamba-1 with dt/B/C norms, NoPE attention, MoE every other layer) and Falcon-H1 (attention beside Mamba-2 in
every layer, muP multipliers) beyond what test_hybrid.py's shared cases check (dense logits equal transformers',
padded too; the output folder; bad configs): the names transformers keeps in memory, pruning through them against
the per-row reference, decoding, FLOPs against torch's counter, the fast paths through Triton's interpreter, and
the errors of configs and saves they cannot take."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO, run_in_triton_interpreter
from simba_compress import SimbaConfig, SimbaError, load, save
from simba_compress.checkpoints import read_checkpoint
from simba_compress.flops import (
    attention_pair_flops,
    block_flops,
    causal_pairs,
    count,
    layer_flops,
    matmul_flops,
    mlp_flops,
    score_flops,
    snapkv_flops,
)
from simba_compress.layers import ModelConfig, ParallelState
from simba_compress.layouts import config_json
from test_hybrid import (
    CASES,
    assert_steps_continue_the_forward,
    greedy_steps,
    left_padded,
    load_case_model,
    naive_hybrid_forward,
    rel_err,
    transformers_model,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models():
    """case -> the transformers model and simba_compress's load of its folder."""
    out = {}
    for case in ("jamba_moe", "jamba_dense", "falcon_h1", "falcon_h1_norm"):
        ref = transformers_model(case)
        out[case] = (ref, load_case_model(case))
    return out


@torch.no_grad()
def test_jamba_reads_the_names_transformers_keeps_in_memory(models, tmp_path):
    """transformers 5 stacks Jamba's experts in memory (experts.gate_up_proj, experts.down_proj) and writes one tensor
    per expert on disk (experts.{e}.gate_proj ...): both load to the same model, and the output is written per expert."""
    from safetensors.torch import load_file, save_file

    ref, ours = models["jamba_moe"]
    memory = ref.state_dict()
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in memory
    ref.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in memory.items()}, str(tmp_path / "model.safetensors"))
    ids = torch.randint(0, 96, (2, 25), generator=torch.Generator().manual_seed(7))
    assert torch.equal(load(tmp_path)(ids, simba=None).logits, ours(ids, simba=None).logits)
    out = save(ours, tmp_path / "out")
    disk = load_file(str(out / "model.safetensors"))
    assert {f"model.layers.3.feed_forward.experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")} <= set(disk)
    assert "model.layers.0.mamba.dt_layernorm.weight" in disk and "model.layers.1.feed_forward.router.weight" in disk


CRITERIA = [("simba", "snapkv"), ("simba", "carry"), ("snapkv", "carry"), ("l2norm", "carry")]


@pytest.mark.parametrize("case, keep", [("jamba_moe", [1.0, 1.0, 0.75, 0.5]), ("falcon_h1", [1.0, 0.75, 0.5])])
@pytest.mark.parametrize("criterion, attention_score", CRITERIA)
@torch.no_grad()
def test_pruned_forward_equals_per_row_reference(models, case, keep, criterion, attention_score):
    """Pruning through Jamba's attention layer (which prunes: its SnapKV score, or the Mamba-1 score of the layer below
    carried up) and its Mamba-1 layers with their norms, and through Falcon-H1's parallel layers (both halves on the
    kept tokens; the Mamba-2 half scores, or the attention half for snapkv), batched and left-padded, equals each
    layer run on its kept tokens alone."""
    _, m = models[case]
    simba = SimbaConfig(keep, criterion, protect_last=3, attention_score=attention_score)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    mask, _ = left_padded(ids, [0, 7])
    logits = m(ids, mask, simba=simba).logits
    for row, pad in enumerate([0, 7]):
        assert rel_err(logits[row, pad:], naive_hybrid_forward(m, ids[row, pad:], simba)) < 1e-5


@pytest.mark.parametrize("case", ["jamba_moe", "falcon_h1", "falcon_h1_norm"])
@torch.no_grad()
def test_decode_step_equals_the_forward_of_the_longer_prompt(models, case):
    """Dense: a step after a prefill gives the forward's logits of the same token in the longer prompt (Mamba-1 with
    its norms, the MoE, a parallel layer's SSM state and KV cache at RoPE positions, the multipliers)."""
    assert_steps_continue_the_forward(models[case][1], 96)


@pytest.mark.parametrize("case", ["jamba_moe", "falcon_h1"])
@torch.no_grad()
def test_generate_after_a_pruned_prefill(models, case):
    """generate equals the reference step after the same pruned prefill (greedy); each attention's KV cache holds the
    tokens its layer kept; a left-padded row decodes as it does alone."""
    _, m = models[case]
    n = m.config.n_layer
    m.simba = SimbaConfig([1.0] + [0.5] * (n - 1), protect_last=2)
    try:
        ids = torch.randint(0, 96, (2, 33), generator=torch.Generator().manual_seed(3))
        mask, _ = left_padded(ids, [0, 5])
        out = m.generate(ids, mask, max_new_tokens=5)
        prefill = m(ids, mask, return_states=True, last_logits=1)
        kv = [s.kv if isinstance(s, ParallelState) else s for s in prefill.states if hasattr(s, "capacity")]
        assert len(kv) == len(m.config.attn_layers)
        for i, st in zip(m.config.attn_layers, kv):
            assert st.length.tolist() == ([33, 28] if i == 0 else [17, 14])  # every token, or the kept half
        assert torch.equal(out[:, 33:], greedy_steps(m, prefill, 5))
        assert torch.equal(out[1, 33:], m.generate(ids[1:, 5:], max_new_tokens=5)[0, 28:])
    finally:
        m.simba = None


def _module_flops(model, ids, simba):
    """Per module, the FLOPs torch counts of the given ops (SDPA's math backend: the counter does not see the CPU's
    flash kernel, which SDPA picks for q, k, v straight from in_proj)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(ids, simba=simba)
    per = fc.get_flop_counts()
    return lambda mod, *names: sum(v for o, v in per.get(mod, {}).items() if str(o).split(".")[-1] in names)


@pytest.mark.parametrize("simba", [None, SimbaConfig([1.0, 1.0, 0.75, 0.5], protect_last=2)])
def test_jamba_flops_match_the_flop_counter(models, simba):
    """Jamba's Mamba-1 projections, its attention's (q.k and v products over the kept tokens, SnapKV's votes where the
    attention layer prunes), the dense MLPs and the MoE (router, each token's top-2 experts, no shared MLP), per layer;
    the analytic counts add the three norms and the softmax over every expert."""
    from simba_compress.attention import SNAPKV_WINDOW
    from simba_compress.flops import scoring_layers

    _, m = models["jamba_moe"]
    cfg, b, w = m.config, 2, 48
    op = _module_flops(m, torch.randint(0, 96, (b, w)), simba)
    report = count(cfg, simba, w)
    scoring = scoring_layers(cfg, simba, report.tokens)
    assert simba is None or scoring == {1: "snapkv", 2: "simba"}
    for i, k in enumerate(report.tokens):
        a, layer = matmul_flops(cfg, i), f"MambaLM.backbone.layers.{i}"
        for part in ("in_proj", "out_proj") + (("x_proj",) if cfg.kind(i) == "mamba1" else ()):
            assert op(f"{layer}.mixer.{part}", "mm") == b * k * a[part], (i, part)
        projections = sum(a.get(p, 0) for p in ("in_proj", "x_proj", "dt_proj", "out_proj"))
        assert op(layer + ".mixer", "mm") == b * k * projections  # dt_proj: a functional linear of the mixer's
        assert op(layer + ".mixer", "convolution") == b * k * a.get("conv", 0)
        assert op(layer + ".mlp", "mm", "bmm") == b * k * sum(a.get(p, 0) for p in ("mlp", "router", "experts"))
        assert ("router" in a) == (i in (1, 3)) and ("mlp" in a) == (i in (0, 2))  # MoE blocks: the experts alone
        if cfg.kind(i) == "attention":
            window = min(max(simba.protect_last, SNAPKV_WINDOW), k) if scoring.get(i) == "snapkv" else 0
            assert op(layer + ".mixer", "bmm") == b * cfg.attn_heads * cfg.attn_head_dim * (4 * k * k + 2 * window * k)
    dense, moe = mlp_flops(cfg), mlp_flops(cfg, moe=True)
    assert moe - 2 * 2 * (2 * 32 * 2 * 40 + 2 * 40 * 32) < dense < moe  # two experts, no shared MLP
    assert block_flops(cfg, 0)["x_proj"] == 2 * 64 * (4 + 16) + 4 * (4 + 16)  # x_proj and the dt, B, C norms
    assert block_flops(cfg, 1)["mlp"] == moe and block_flops(cfg, 0)["mlp"] == dense


def test_falcon_h1_flops_match_the_flop_counter(models):
    """A parallel layer: its Mamba-2's projections and conv and its attention's (q.k and v over the kept tokens) on the
    same tokens, counted under attn_*; its score is the Mamba-2's (simba) or the attention's (snapkv)."""
    _, m = models["falcon_h1"]
    cfg, b, w = m.config, 2, 40
    simba = SimbaConfig([1.0, 0.75, 0.5], protect_last=2)
    op = _module_flops(m, torch.randint(0, 96, (b, w)), simba)
    report = count(cfg, simba, w)
    for i, k in enumerate(report.tokens):
        a, layer = matmul_flops(cfg, i), f"MambaLM.backbone.layers.{i}"
        assert op(f"{layer}.mixer.ssm", "mm") == b * k * (a["in_proj"] + a["out_proj"])  # in_proj: a functional linear
        assert op(f"{layer}.mixer.ssm.out_proj", "mm") == b * k * a["out_proj"]
        assert op(f"{layer}.mixer.ssm", "convolution") == b * k * a["conv"]
        assert op(f"{layer}.mixer.attn.in_proj", "mm") == b * k * a["attn_in_proj"]
        assert op(f"{layer}.mixer.attn.out_proj", "mm") == b * k * a["attn_out_proj"]
        assert op(f"{layer}.mixer.attn", "bmm") == b * cfg.attn_heads * cfg.attn_head_dim * 4 * k * k
        assert op(layer + ".mlp", "mm") == b * k * a["mlp"]
    k = 30
    assert layer_flops(cfg, k, layer=0) - k * sum(block_flops(cfg, 0).values()) == causal_pairs(k) * attention_pair_flops(cfg)
    assert layer_flops(cfg, k, "snapkv", 0, 2) - layer_flops(cfg, k, layer=0) == snapkv_flops(cfg, k, 2)
    assert layer_flops(cfg, k, "simba", 0) - layer_flops(cfg, k, layer=0) == k * score_flops(cfg, "simba")
    parts = block_flops(cfg, 0)
    assert parts["parallel"] == 5 * 32 and parts["gate_skip"] == 2 * 48 + 5 * 48  # the sum and 4 multipliers; no norm
    assert parts["in_proj"] == 2 * 32 * (2 * 48 + 2 * 8 + 3) + (2 * 48 + 2 * 8 + 3)  # the projection's multipliers
    assert report.kv_cache_dense_bytes == 3 * w * 2 * 2 * 16 * 2  # every layer's attention, 2 kv heads of 16, bf16


# The fast paths through Triton's interpreter: the project's Triton kernels on CPU tensors --------------------------

FAST_PATHS = r"""
import sys
sys.path.insert(0, {tests!r})
from conftest import fused_step_logits, random_family
from simba_compress import SimbaConfig
from simba_compress import backends as probes
from simba_compress.ssm import triton_ssd
probes.Backends.on = lambda self, x: self.fast_path  # the fast paths on CPU tensors
triton_ssd.CHUNK, triton_ssd.BLOCK_M, triton_ssd.BLOCK_K = 32, 16, 16
rel = lambda a, r: ((a.double() - r.double()).abs().max() / r.double().abs().max()).item()
out = {{}}
for name in ("jamba", "falcon_h1"):
    m = random_family(name)
    reference, fast = probes.Backends(fast_path=False), probes.Backends(scan="triton", step="triton")
    ids = torch.randint(0, 64, (2, 33))
    mask = torch.ones(2, 33, dtype=torch.long)
    mask[0, :9] = 0
    simba = SimbaConfig([1.0, 0.5, 0.25], "simba", 2)
    errs = []
    with torch.no_grad():  # dense; pruned and left-padded (Falcon-H1 by its attention's score, generate below by Simba's)
        for kw in ({{"simba": None}}, {{"simba": SimbaConfig([1.0, 0.5, 0.25], "snapkv", 2) if name == "falcon_h1" else simba,
                                     "attention_mask": mask, "return_kept": True}}):
            res = {{}}
            for be in (fast, reference):
                m.backends = be
                res[be] = m(ids, **kw)
            errs.append(rel(res[fast].logits, res[reference].logits))
            for a, r in zip(res[fast].kept or [], res[reference].kept or []):
                errs.append(0.0 if torch.equal(a, r) else 1.0)
    out[name + "_forward"] = max(errs)
    m.simba = simba
    tokens = {{}}
    for be in (fast, reference):  # a pruned, left-padded prefill, then the fused step (Triton) or the reference step
        m.backends = be
        tokens[be] = m.generate(ids, mask, max_new_tokens=3)
    out[name + "_generate"] = bool(torch.equal(tokens[fast], tokens[reference]))
    m.backends = reference  # one fused step's logits against the reference step's, from the same prefill states
    with torch.no_grad():
        pre = m(ids, mask, return_states=True, last_logits=1)
        token = pre.logits[:, -1].argmax(-1)
        ref_logits, _ = m.step(token, pre.states)
        m.backends = fast
        out[name + "_step"] = rel(fused_step_logits(m, pre.states, token), ref_logits)
print(json.dumps(out))
"""


def test_fast_paths_in_interpreter():
    """The fast paths on CPU tensors through Triton's interpreter, against the reference path: Jamba's Mamba-1 with its
    dt/B/C norms through the Triton selective scan, score and fused step (the x_proj partial sums normalised between
    the step's two kernels), and Falcon-H1's Mamba-2 without its gated norm through the Triton SSD and the step's
    second kernel without the norm: dense, pruned and left-padded logits, kept tokens, one fused step, greedy tokens."""
    out = run_in_triton_interpreter(FAST_PATHS.format(tests=str(REPO / "tests")))
    for name in ("jamba", "falcon_h1"):
        assert out[name + "_forward"] < 1e-4 and out[name + "_step"] < 1e-4 and out[name + "_generate"], out


# Errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, change, message", [
    ("falcon_h1", {"projectors_bias": True}, "'projectors_bias' True differs from 'mamba_proj_bias' False"),
    ("falcon_h1", {"time_step_limit": [0.0, 2.0]}, r"'time_step_limit' \[0.0, 2.0\] is not supported"),
    ("falcon_h1", {"mamba_n_heads": 5}, "mamba_n_heads 5 x mamba_d_head 16 != mamba_d_ssm 48"),
    ("falcon_h1", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear' is not supported"),
    ("jamba_moe", {"num_experts_per_tok": 5}, "'num_experts_per_tok' 5 is more than 'num_experts' 4"),
    ("jamba_moe", {"expert_layer_period": 0}, "'expert_layer_period' must be an integer >= 1, got 0"),
])  # fmt: skip
def test_bad_configs_name_the_file_and_key(case, change, message, tmp_path):
    family, kwargs = CASES[case]
    cfg = getattr(transformers, f"{family}Config")(**kwargs).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg | change))
    with pytest.raises(SimbaError, match=message) as e:
        read_checkpoint(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "config.json") + ": ") and "\n" not in str(e.value)


def test_what_a_layout_cannot_write_is_refused():
    """Jamba places attention and experts periodically: other placements cannot be written in its layout; a family's
    own features (Jamba's norms, Falcon-H1's multipliers) cannot be written in another's."""
    jamba = dict(d_model=32, n_layer=4, vocab_size=64, bcdt_norm=True, attn_heads=4, d_intermediate=40, block_mlp=True,
                 residual_in_fp32=False, arch="jamba")  # fmt: skip
    assert config_json(ModelConfig(attn_layers=[1, 3], **jamba))["attn_layer_period"] == 2
    with pytest.raises(SimbaError, match=r"^save: the jamba layout places layers every period .* attn_layers \[0, 1, 3\]"):
        config_json(ModelConfig(attn_layers=[0, 1, 3], **jamba))
    with pytest.raises(SimbaError, match="^save: the bamba layout has no bcdt_norm setting"):
        config_json(ModelConfig(**(jamba | dict(arch="bamba", attn_layers=[1]))))
    with pytest.raises(SimbaError, match="^save: the state-spaces layout has no the Falcon-H1 multipliers"):
        config_json(ModelConfig(d_model=32, n_layer=2, vocab_size=64, layer="mamba2", headdim=16, attn_layers=[1],
                                attn_heads=4, key_multiplier=0.5, arch="mamba_ssm"))  # fmt: skip


def test_info_describes_both_families(models, tmp_path, capsys):
    from simba_compress.cli import main

    for case, expected in (("jamba_moe", ["Mamba-1 with dt, B and C normalised", "attention at layers 1:",
                                          "MoE of 4 experts (top 2) of 40 at layers 1, 3 instead of the MLP"]),
                           ("falcon_h1", ["attention beside the SSM mixer in layers 0, 1, 2: 4 heads, 2 kv heads of 16, "
                                          "RoPE on 16 of 16 dims"])):  # fmt: skip
        folder = save(models[case][1], tmp_path / case)
        assert main(["info", str(folder)]) == 0
        text = capsys.readouterr().out
        assert all(line in text for line in expected), text


@pytest.mark.parametrize("case", ["jamba_moe", "falcon_h1"])
def test_linear_schedule_meets_the_target(models, case):
    """The paper's linear schedule fitted to a budget with these families' per-layer costs (Jamba's dense and MoE
    blocks differ; every Falcon-H1 layer has an attention's quadratic part beside its Mamba-2) lands on it, and the
    KV cache shrinks with it. (The fast form's few staircases of 3-4 layers may not reach a given budget.)"""
    from simba_compress.compress import compress
    from simba_compress.schedules import flop_tolerance
    from simba_compress.settings import LinearSchedule

    m = load_case_model(case)
    simba = compress(m, LinearSchedule(flops=0.6, seq_len=512, form="exact"))
    report = count(m.config, simba, 512)
    assert abs(report.ratio - 0.6) <= flop_tolerance(m.config, 0.6, 512)
    assert 0 < report.kv_cache_bytes < report.kv_cache_dense_bytes
