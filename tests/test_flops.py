"""Analytic FLOPs against torch.utils.flop_counter on the reference path, and schedules meeting a ratio."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import MODELS, random_model, shared
from simba_compress import ModelConfig, SimbaConfig, SimbaError, load
from simba_compress.flops import count, head_flops, matmul_flops, score_flops
from simba_compress.layers import SCAN_CHUNKS
from simba_compress.schedules import linear, linear_for_flops
from simba_compress.settings import LinearSchedule


def counted(model, ids, simba):
    """flop_counter's FLOPs inside the Mamba mixers by op kind, and the whole forward's projections."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids, simba=simba)
    per = fc.get_flop_counts()
    mixers = [ops for mod, ops in per.items() if mod.endswith(".mixer") and mod.count(".") == 4]
    by_op = lambda names: sum(v for ops in mixers for op, v in ops.items() if str(op).split(".")[-1] in names)  # noqa: E731
    in_proj = sum(sum(ops.values()) for mod, ops in per.items() if mod.endswith("mixer.in_proj"))
    glob = per["Global"]
    projections = sum(v for op, v in glob.items() if str(op).split(".")[-1] in ("mm", "addmm"))
    return dict(in_proj=in_proj, linear=by_op(("mm", "addmm")), conv=by_op(("convolution",)), all_projections=projections)


@pytest.mark.parametrize("simba", [None, SimbaConfig(linear(4, 0.3), "simba", 1)])
def test_matmul_flops_match_flop_counter(simba):
    m = random_model(n_layer=4, d_model=32, vocab=128)
    ids = torch.randint(0, 128, (2, 50))
    got = counted(m, ids, simba)
    report = count(m.config, simba, 50)
    tokens = 2 * sum(report.tokens)  # tokens the layers ran on, batch of 2
    a = matmul_flops(m.config)
    assert got["in_proj"] == a["in_proj"] * tokens
    assert got["linear"] == (a["in_proj"] + a["x_proj"] + a["dt_proj"] + a["out_proj"]) * tokens
    assert got["conv"] == a["conv"] * tokens
    head = 2 * 50 * (head_flops(m.config) - 4 * m.config.d_model)  # LM head at every position
    assert got["all_projections"] == got["linear"] + head


def test_dense_proxies_sit_at_their_layer_ratio():
    l16 = load(shared(MODELS / "mamba-proxy-d320-l16")).config
    dense16 = count(l16, None, 1024).dense
    for name, ratio in [("l12", 0.75), ("l9", 0.5625), ("l6", 0.375)]:
        cfg = load(shared(MODELS / f"mamba-proxy-d320-{name}")).config
        assert count(cfg, None, 1024).dense / dense16 == pytest.approx(ratio)


def test_score_cost_is_counted_only_where_a_layer_prunes():
    cfg = random_model(n_layer=4).config
    flat = count(cfg, SimbaConfig([1.0, 0.5, 0.5, 0.5]), 100)
    assert flat.score > 0 and flat.per_layer[0] > flat.per_layer[1]  # layer 0 scores once
    assert flat.per_layer[1] == flat.per_layer[2] == flat.per_layer[3]
    assert count(cfg, SimbaConfig([1.0] * 4), 100).ratio == 1.0


def test_query_score_counts_the_matmul_it_runs():
    """The query criterion's similarities are the one matmul of its score: flop_counter's count of it is the
    2 QUERY_WINDOW d_model per scored token inside score_flops; the rest is elementwise (counted 1 an op)."""
    from simba_compress.pruning import CRITERION_FNS, QUERY_POOL, QUERY_WINDOW, LayerView

    cfg = random_model(n_layer=2, d_model=24).config
    b, w = 2, 90
    view = LayerView(0, torch.randn(b, w, 24), None, torch.full((b,), w - 1), torch.ones(b, w, dtype=torch.bool), 40,
                     torch.arange(w).expand(b, w), torch.full((b,), w))
    with FlopCounterMode(display=False) as fc:
        CRITERION_FNS["query"](view, 0)
    assert fc.get_total_flops() == b * w * 2 * QUERY_WINDOW * 24
    assert score_flops(cfg, "query") == 2 * QUERY_WINDOW * 24 + 3 * 24 + 5 * QUERY_WINDOW + 2 * QUERY_POOL
    for shape in (dict(d_model=320, d_state=16), dict(d_model=2048, d_state=16)):  # the proxies, mamba-1.4b
        big = ModelConfig(n_layer=16, vocab_size=8192, **shape)
        assert score_flops(big, "query") < score_flops(big, "simba")  # cheaper than the impact it replaces
    simba = SimbaConfig([1.0, 0.5], "query")
    assert count(cfg, simba, w).score == w * score_flops(cfg, "query")  # layer 0 scores its 90 tokens


@pytest.mark.parametrize("target", [0.95, 0.8, 0.7, 0.6, 0.55])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_linear_schedule_meets_the_target_within_half_a_percent(target, seq_len):
    cfg = load(shared(MODELS / "mamba-proxy-d320-l16")).config
    s = linear_for_flops(cfg, LinearSchedule(flops=target, seq_len=seq_len, form="exact"))
    assert abs(count(cfg, s, seq_len).ratio - target) <= 0.005 * target
    assert s.keep[0] == 1.0 and all(a >= b for a, b in zip(s.keep, s.keep[1:]))


def test_unreachable_or_invalid_targets_are_clear_errors():
    cfg = random_model(n_layer=4).config
    with pytest.raises(SimbaError, match="flops 0.3: below what a linear schedule reaches") as e:
        linear_for_flops(cfg, LinearSchedule(flops=0.3, form="exact"))
    assert e.value.field == "flops"
    for bad in (0.0, 1.5, -1):  # refused when the settings are made, naming the field
        with pytest.raises(SimbaError, match=r"^flops: must be in \(0, 1\], got"):
            LinearSchedule(flops=bad)


def test_granularity_rounds_counts_into_a_staircase():
    from simba_compress.pruning import SimbaConfig
    from simba_compress.schedules import linear

    n = torch.tensor([8192, 1000])
    exact = SimbaConfig(linear(48, 0.2))
    stairs = SimbaConfig(linear(48, 0.2), granularity=2048)
    k, ks = exact.counts(n), stairs.counts(n)
    assert (ks[:, 0] % 2048 == 0).all() and set(ks[:, 0].tolist()) == {8192, 6144, 4096, 2048}
    assert ((ks[:, 0] - k[:, 0]).abs() <= 1024).all()  # the nearest multiple
    assert (ks[1:] <= ks[:-1]).all()  # never increases with depth
    assert (ks[:, 1] == 1000).all()  # a row shorter than the granularity is not pruned
    # the FLOP ratio counts the rounded tokens; only the three layers where the count drops pay for a score
    cfg = ModelConfig(d_model=2048, n_layer=48, vocab_size=50280)
    r, rs = count(cfg, exact, 8192), count(cfg, stairs, 8192)
    assert abs(rs.ratio - r.ratio) < 0.02
    assert sum(a > b for a, b in zip(rs.tokens, rs.tokens[1:])) == 3 and rs.score < r.score / 5
    with pytest.raises(ValueError, match="granularity"):
        SimbaConfig([1.0], granularity=0)


@pytest.mark.parametrize("n_layer,seq_len,criterion", [(16, 4096, "simba"), (12, 1000, "simba"), (16, 1024, "deci")])
@pytest.mark.parametrize("target", [0.8, 0.75, 0.6, 0.55])
def test_fast_form_is_the_nearest_staircase_at_the_budget(n_layer, seq_len, criterion, target):
    """The default form: keep ratios from FAST_LEVELS, few scoring layers, the FLOP ratio (padded scans and
    scores included) within the form's tolerance, and to_fast's dynamic programme finds the staircase that
    brute force over every staircase at the budget finds nearest the linear profile."""
    import numpy as np

    from simba_compress.schedules import FAST_LEVELS, fast_candidates, fast_tolerance

    cfg = ModelConfig(d_model=256, n_layer=n_layer, vocab_size=128)
    exact = linear_for_flops(cfg, LinearSchedule(flops=target, seq_len=seq_len, criterion=criterion, form="exact"))
    fast = linear_for_flops(cfg, LinearSchedule(flops=target, seq_len=seq_len, criterion=criterion, form="fast"))
    assert set(fast.keep) <= set(FAST_LEVELS) and fast.keep[0] == 1.0 and fast.align and not exact.align
    assert all(a >= b for a, b in zip(fast.keep, fast.keep[1:]))
    report = count(cfg, fast, seq_len)
    tol = fast_tolerance(cfg, fast, target, seq_len)
    assert abs(report.ratio - target) <= tol
    assert sum(a > b for a, b in zip(report.tokens, report.tokens[1:])) <= len(FAST_LEVELS) - 1  # scoring layers

    def distance(keep):
        return float(((np.log2(keep) - np.log2(np.clip(exact.keep, FAST_LEVELS[-1], 1.0))) ** 2).sum())

    candidates = fast_candidates(cfg, exact, target, seq_len)
    assert all(abs(count(cfg, SimbaConfig(k, criterion, align=True), seq_len).ratio - target) <= tol for k in candidates[::50])
    assert distance(fast.keep) == pytest.approx(min(distance(k) for k in candidates))


def test_align_splits_runs_between_whole_chunks_and_keeps_their_tokens():
    """SimbaConfig.align (the fast form's): in rows over 1024 tokens every width is a multiple of 2048 (or 1024,
    or the row itself), a run between two is split between them with its tokens kept to within a layer's step;
    rows whose widths are whole chunks (8192) or short (1024) are untouched; each row of a batch on its own."""
    keep = [1.0] * 7 + [0.75] * 15 + [0.5] * 16 + [0.25] * 10
    rows = torch.tensor([1024, 1500, 2048, 3000, 4096, 8192, 12288])
    chunks = SCAN_CHUNKS["mamba1"]
    plain, aligned = SimbaConfig(keep).counts(rows), SimbaConfig(keep, align=True).counts(rows, chunks)
    for j, n in enumerate(rows.tolist()):
        a, p = aligned[:, j].tolist(), plain[:, j].tolist()
        assert all(x >= y for x, y in zip(a, a[1:])) and a[0] == n
        assert all(w <= 1024 or w % 2048 == 0 or w == n for w in a)
        assert abs(sum(a) - sum(p)) <= 1024
        if n in (1024, 8192):
            assert a == p
    assert aligned[:, 4].tolist() == [4096] * 15 + [2048] * 23 + [1024] * 10  # 3/4 of 4096: 8 at 4096, 7 at 2048
    assert SimbaConfig.from_dict({"keep": keep}).align is False  # folders saved before the field run as they did
    assert torch.equal(SimbaConfig(keep, align=True).counts(rows), aligned)  # Mamba-1's chunks by default
    # Mamba-2's SSD pads nothing: align leaves every width as it is
    assert torch.equal(SimbaConfig(keep, align=True).counts(rows, SCAN_CHUNKS["mamba2"]), plain)


def test_fast_form_out_of_reach_is_a_clear_error():
    """A shallow model's staircases are few: 6 layers reach 0.6 but not 0.98 (one layer at 3/4 is 0.958)."""
    cfg = ModelConfig(d_model=256, n_layer=6, vocab_size=128)
    assert abs(count(cfg, linear_for_flops(cfg, LinearSchedule(flops=0.6)), 1024).ratio - 0.6) < 0.006
    with pytest.raises(SimbaError, match=r"^flops 0.98: no fast-form schedule of 6 layers .* use form 'exact'"):
        linear_for_flops(cfg, LinearSchedule(flops=0.98))


def test_max_tokens_caps_the_layers_it_names_and_is_counted():
    """Context extension: at most T tokens per row from layer L on; shorter rows are untouched."""
    from simba_compress.schedules import max_tokens_list

    caps = max_tokens_list("1000@2", 6)
    assert caps == [0, 0, 1000, 1000, 1000, 1000]
    s = SimbaConfig(linear(6, 0.5), protect_last=4, max_tokens=caps)
    k = s.counts(torch.tensor([8000, 1200, 500]))
    plain = SimbaConfig(linear(6, 0.5), protect_last=4).counts(torch.tensor([8000, 1200, 500]))
    assert k[:2, 0].tolist() == plain[:2, 0].tolist() and (k[2:, 0] == 1000).all()
    assert (k[:, 1] == torch.minimum(plain[:, 1], torch.tensor([1200, 1200, 1000, 1000, 1000, 1000]))).all()
    assert torch.equal(k[:, 2], plain[:, 2])  # a prompt shorter than the cap: the schedule alone
    cfg = random_model(n_layer=6).config
    dense_caps = SimbaConfig([1.0] * 6, max_tokens=caps)
    r = count(cfg, dense_caps, 8000)
    assert r.tokens == [8000, 8000, 1000, 1000, 1000, 1000] and r.score > 0  # layer 1 scores, once
    # the scan and the in-layer score run on whole chunks of mamba_ssm's kernel: 8000 -> 8192, 1000 -> 1024 steps
    padding = (2 * (8192 - 8000) + 4 * (1024 - 1000)) * r.per_token_block["scan"]
    assert r.score == 8192 * score_flops(cfg, "simba")
    assert r.sparse == 20000 * sum(r.per_token_block.values()) + padding + r.score
    assert count(cfg, dense_caps, 1000).ratio == 1.0
    for bad in ([0, 0, 100], [100] + [0] * 5, [0, 100, 200, 200, 200, 200], [0, -1, 0, 0, 0, 0]):
        with pytest.raises(ValueError, match="max_tokens"):
            SimbaConfig([1.0] * len(bad) if len(bad) != 3 else [1.0] * 6, max_tokens=bad)
    for spec, msg in (("1000@0", "first capped layer"), ("1000@6", "first capped layer"), ("a@b", "TOKENS@LAYER"),
                      ("1,2", "2 caps for a model of 6")):
        with pytest.raises(SimbaError, match=msg):
            max_tokens_list(spec, 6)


def _hybrid_counts(model, ids, simba):
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids, simba=simba)
    per = fc.get_flop_counts()
    op = lambda mod, name: sum(v for o, v in per.get(mod, {}).items() if str(o).split(".")[-1] == name)  # noqa: E731
    return per, op


@pytest.mark.parametrize("simba", [None, SimbaConfig([1.0, 0.75, 0.75, 0.5, 0.5, 0.25], protect_last=2)])
def test_hybrid_matmul_flops_match_flop_counter(simba):
    """Every layer kind's projections and convs, Granite's MoE (router, the top-k experts each token runs, the shared
    MLP), and the attention's q.k and v products (the CPU's SDPA computes the full square the causal mask then
    halves: 4 e per (query, key) and query head), with SnapKV's votes where an attention layer scores (2 e per
    window query, key and query head), per layer on the tokens it kept."""
    from conftest import random_hybrid
    from simba_compress.attention import SNAPKV_WINDOW
    from simba_compress.flops import attention_pair_flops, causal_pairs, scoring_layers

    m = random_hybrid(n_layer=6, attn_layers=(1, 4), d_intermediate=40, block_mlp=True, n_experts=4,
                      experts_per_token=2, expert_intermediate=24)  # fmt: skip
    b, w = 2, 48
    ids = torch.randint(0, 64, (b, w))
    per, op = _hybrid_counts(m, ids, simba)
    report = count(m.config, simba, w)
    cfg = m.config
    scoring = scoring_layers(cfg, simba, report.tokens)
    assert simba is None or scoring == {0: "simba", 2: "simba", 4: "snapkv"}  # attention_score "snapkv", the default
    for i, k in enumerate(report.tokens):
        a = matmul_flops(cfg, i)
        layer = f"MambaLM.backbone.layers.{i}"
        assert op(layer + ".mixer.in_proj", "mm") == b * k * a["in_proj"]
        assert op(layer + ".mixer.out_proj", "mm") == b * k * a["out_proj"]
        assert op(layer + ".mixer", "convolution") == b * k * a["conv"]
        assert op(layer + ".mlp.shared", "mm") == b * k * a["mlp"]
        assert op(layer + ".mlp.router", "mm") == b * k * a["router"]
        mlp_all = sum(v for o, v in per[layer + ".mlp"].items() if str(o).split(".")[-1] in ("mm", "bmm"))  # gathered: bmm
        assert mlp_all == b * k * (a["mlp"] + a["router"] + a["experts"])  # every token runs its top-k experts
        if cfg.kind(i) == "attention":
            window = min(max(simba.protect_last, SNAPKV_WINDOW), k) if scoring.get(i) == "snapkv" else 0
            assert op(layer + ".mixer", "bmm") == b * cfg.attn_heads * cfg.attn_head_dim * (4 * k * k + 2 * window * k)
            assert causal_pairs(k) * 4 * cfg.attn_heads * cfg.attn_head_dim <= causal_pairs(k) * attention_pair_flops(cfg)
    assert report.kv_cache_bytes < report.kv_cache_dense_bytes or simba is None


def test_kv_cache_bytes_are_the_decoders_prefill_cache():
    """count's KV-cache bytes (per sequence, bf16) are those of the KV states a pruned prefill leaves per row."""
    from conftest import random_hybrid

    m = random_hybrid(n_layer=5, attn_layers=(0, 2, 4))
    simba = SimbaConfig([1.0, 0.75, 0.5, 0.5, 0.25], protect_last=1)
    with torch.no_grad():
        states = m(torch.randint(0, 64, (3, 40)), simba=simba, return_states=True, last_logits=1).states
    cached = sum(2 * st.length * st.k.shape[1] * st.k.shape[3] for st in states if st is not None and hasattr(st, "k"))
    report = count(m.config, simba, 40)
    assert (cached * 2 == report.kv_cache_bytes).all()  # 2 bytes a value (bfloat16)
    assert report.kv_cache_dense_bytes == 3 * 40 * 2 * m.config.attn_kv_heads * m.config.attn_head_dim * 2
    assert [report.tokens[i] for i in (0, 2, 4)] == [40, 20, 10]


def test_hybrid_fast_form_meets_the_target():
    """The fast form's search and the linear fit work for a hybrid (per-layer costs: attention grows with the
    square of its tokens, scores carried from the SSM layer below are counted there)."""
    from conftest import random_hybrid
    from simba_compress.schedules import fast_candidates, fast_tolerance, to_fast

    cfg = random_hybrid(n_layer=8, attn_layers=(2, 5), d_model=64, d_intermediate=128, block_mlp=True).config
    for target in (0.8, 0.6):
        s = linear_for_flops(cfg, LinearSchedule(flops=target, protect_last=4))
        assert abs(count(cfg, s, 1024).ratio - target) <= fast_tolerance(cfg, s, target, 1024)
        assert s.align and set(s.keep) <= {1.0, 0.75, 0.5, 0.25, 0.125, 0.0625}
    exact = linear_for_flops(cfg, LinearSchedule(flops=0.6, protect_last=4, form="exact"))
    candidates = fast_candidates(cfg, exact, 0.6, 1024)
    tol = fast_tolerance(cfg, exact, 0.6, 1024)
    assert candidates and to_fast(cfg, exact, 0.6, 1024).keep in candidates
    assert all(abs(count(cfg, SimbaConfig(k, protect_last=4, align=True), 1024).ratio - 0.6) <= tol for k in candidates)
