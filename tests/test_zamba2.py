"""Zamba2 (shared transformer blocks used by several hybrid layers, each use with its own LoRA adapters and linear,
reading the original embeddings beside the stream) beyond what test_hybrid.py's shared cases check (dense logits
equal transformers', padded too; the output folder; bad configs) and test_hf.py's remote code: the blocks held once,
the Mamba-2 step-size floor, pruning through the hybrid layers against the per-row reference, decoding, FLOPs
against torch's counter."""

from __future__ import annotations

import pytest
import torch

from simba_compress import SimbaConfig, load, save
from simba_compress.flops import attention_pair_flops, block_flops, causal_pairs, count, layer_flops, matmul_flops
from simba_compress.layers import ParallelState
from test_hybrid import (
    assert_steps_continue_the_forward,
    greedy_steps,
    left_padded,
    naive_hybrid_forward,
    rel_err,
    transformers_model,
)
from test_jamba_falcon import _module_flops

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """case -> (transformers' model, its folder, simba_compress's load of it)."""
    out = {}
    for case in ("zamba2", "zamba2_gqa_bias"):
        ref = transformers_model(case)
        folder = tmp_path_factory.mktemp(case)
        ref.save_pretrained(folder)
        out[case] = (ref, folder, load(folder))
    return out


@torch.no_grad()
def test_shared_blocks_are_held_once_and_written_once(models, tmp_path):
    """Hybrid layers 1 and 4 use block 0, layer 3 block 1: the same module, owned by the backbone, in the state dict
    once; the model has as many parameters as transformers' (tied) one; the output names each block's tensors once,
    under its first use, with every use's adapters in its adapter lists, as transformers writes it."""
    from safetensors.torch import load_file

    ref, _, m = models["zamba2"]
    layers, shared = m.backbone.layers, m.backbone.shared
    assert layers[1].mixer.block is shared[0] and layers[4].mixer.block is shared[0] and layers[3].mixer.block is shared[1]
    assert layers[1].mixer.linear is not layers[4].mixer.linear  # each use's own
    assert layers[1].mixer.qkv_adapter.q[0].weight.shape == (3, 32) and layers[1].mixer.mlp_adapter[1].weight.shape == (48, 3)
    sd = m.state_dict()
    assert "backbone.shared.0.attn.in_proj.weight" in sd and not any("block" in k for k in sd)
    ours_n = sum(p.numel() for p in m.parameters())
    assert ours_n == sum(p.numel() for p in ref.parameters())  # parameters() counts a tied tensor once
    disk = load_file(str(save(m, tmp_path / "out") / "model.safetensors"))
    theirs = load_file(str(models["zamba2"][1] / "model.safetensors"))
    assert set(disk) == set(theirs)
    assert not any(k.startswith("model.layers.4.shared_transformer.") for k in disk)
    assert "model.layers.1.shared_transformer.feed_forward.gate_up_proj_adapter_list.2.0.weight" in disk
    for k in theirs:
        assert torch.equal(disk[k], theirs[k]), k


@torch.no_grad()
def test_the_step_size_floor_is_transformers_time_step_min(models):
    """Zamba2's prefill clamps softplus(dt + dt_bias) at time_step_min (0.001): without the floor the logits of the
    test model differ from transformers', so the equality test_hybrid checks rests on it."""
    ref, _, m = models["zamba2"]
    ids = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(1))
    theirs = ref(ids, use_cache=False).logits
    assert m.config.dt_min == 0.001 and rel_err(m(ids, simba=None).logits, theirs) < 1e-5
    mixers = [b.mixer.ssm if hasattr(b.mixer, "ssm") else b.mixer for b in m.backbone.layers]
    try:
        for x in mixers:
            x.dt_min = 0.0
        assert rel_err(m(ids, simba=None).logits, theirs) > 1e-4
    finally:
        for x in mixers:
            x.dt_min = 0.001


CRITERIA = [("simba", "snapkv"), ("simba", "carry"), ("snapkv", "carry"), ("l2norm", "carry")]
PRUNED = [("zamba2", [1.0, 1.0, 0.75, 0.5, 0.5], [0, 7]), ("zamba2_gqa_bias", [1.0, 0.75, 0.5, 0.5], [0, 0])]


@pytest.mark.parametrize("case, keep, pad", PRUNED)
@pytest.mark.parametrize("criterion, attention_score", CRITERIA)
@torch.no_grad()
def test_pruned_forward_equals_per_row_reference(models, case, keep, pad, criterion, attention_score):
    """Pruning after and before hybrid layers (ranked by the Mamba-2's score, the shared attention's, carried up, or
    the stream's norm), batched and left-padded, equals each layer run on its kept tokens alone: the shared attention
    over them only, the original embeddings of those tokens beside the stream. (The bias case runs unpadded: with an
    in_proj bias a padded row's conv reads the bias at the padding, as transformers' does.)"""
    *_, m = models[case]
    simba = SimbaConfig(keep, criterion, protect_last=3, attention_score=attention_score)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    mask, _ = left_padded(ids, pad)
    logits = m(ids, mask, simba=simba).logits
    for row, p in enumerate(pad):
        assert rel_err(logits[row, p:], naive_hybrid_forward(m, ids[row, p:], simba)) < 1e-5
    assert (logits - m(ids, mask, simba=None).logits).abs().max() > 1e-3  # it prunes


@pytest.mark.parametrize("case", ["zamba2", "zamba2_gqa_bias"])
@torch.no_grad()
def test_decode_step_equals_the_forward_of_the_longer_prompt(models, case):
    """Dense: steps after a prefill give the forward's logits of the same tokens in the longer prompt (each use's KV
    cache at its RoPE positions, the token's embedding beside the stream, the Mamba-2 state with its dt floor)."""
    assert_steps_continue_the_forward(models[case][2], 96)


@torch.no_grad()
def test_generate_after_a_pruned_prefill(models):
    """generate equals the reference step after the same pruned prefill (greedy); each use's KV cache holds the tokens
    its layer kept; a left-padded row decodes as it does alone."""
    *_, m = models["zamba2"]
    m.simba = SimbaConfig([1.0, 1.0, 0.5, 0.5, 0.5], protect_last=2)
    try:
        ids = torch.randint(0, 96, (2, 33), generator=torch.Generator().manual_seed(3))
        mask, _ = left_padded(ids, [0, 5])
        out = m.generate(ids, mask, max_new_tokens=5)
        prefill = m(ids, mask, return_states=True, last_logits=1)
        kv = {i: s.kv for i, s in enumerate(prefill.states) if isinstance(s, ParallelState)}
        assert sorted(kv) == [1, 3, 4]
        assert kv[1].length.tolist() == [33, 28] and kv[3].length.tolist() == kv[4].length.tolist() == [17, 14]
        assert torch.equal(out[:, 33:], greedy_steps(m, prefill, 5))
        assert torch.equal(out[1, 33:], m.generate(ids[1:, 5:], max_new_tokens=5)[0, 28:])
    finally:
        m.simba = None


@pytest.mark.parametrize("case", ["zamba2", "zamba2_gqa_bias"])
def test_flops_match_the_flop_counter(models, case):
    """A hybrid layer's matmuls (Mamba-2's projections, the shared attention's from 2 d_model, each use's adapters,
    the MLP, the linear) and conv on its kept tokens, and its attention's q.k and v products over them, per layer."""
    *_, m = models[case]
    cfg, b, w = m.config, 2, 40
    simba = SimbaConfig([1.0] + [0.75] * (cfg.n_layer - 2) + [0.5], protect_last=2)
    op = _module_flops(m, torch.randint(0, 96, (b, w)), simba)
    report = count(cfg, simba, w)
    pairs = [0] * cfg.shared_blocks  # per shared block, the q.k and v products of its uses
    for i, k in enumerate(report.tokens):
        a, layer = matmul_flops(cfg, i), f"MambaLM.backbone.layers.{i}.mixer"
        assert op(layer, "convolution") == b * k * a["conv"]
        assert op(layer, "mm", "addmm") == b * k * sum(v for p, v in a.items() if p != "conv"), i
        if cfg.kind(i) == "shared":
            assert op(layer + ".linear", "mm") == b * k * a["shared_linear"] == b * k * 2 * 16 * 16
            pairs[cfg.shared_use(i)[1]] += b * cfg.attn_heads * cfg.attn_head_dim * 4 * k * k
    # the counter names a shared module by its owner's path, whichever use runs it
    assert [op(f"MambaLM.backbone.shared.{j}.attn", "bmm") for j in range(cfg.shared_blocks)] == pairs
    parts = block_flops(cfg, 1 if case == "zamba2" else 0)
    assert parts["shared_norm"] == 4 * 32 and parts["shared_in_proj"] == 2 * 32 * (4 + 2 * cfg.attn_kv_heads) * 8
    assert parts["shared_qkv_adapter"] == (2 * 3 * (3 * 32 + 96) + 96 if cfg.attn_adapters else 0)
    assert parts["shared_mlp_adapter"] == 2 * 3 * (16 + 48) + 48
    k = 30
    assert layer_flops(cfg, k, layer=1) - k * sum(block_flops(cfg, 1).values()) == (
        causal_pairs(k) * attention_pair_flops(cfg) if cfg.kind(1) == "shared" else 0)
