"""The Simba forward: dense equality with transformers, a naive per-row reference, padding, generation."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import random_hybrid, random_model, to_transformers
from simba_compress import SimbaConfig
from simba_compress.pruning import CRITERIA, QUERY_POOL, QUERY_TEMPERATURE, QUERY_WINDOW, query_attention
from simba_compress.schedules import linear
from test_ssm import loop_impact, loop_scan, loop_share


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@torch.no_grad()
def test_dense_equals_transformers_on_proxy(l16):
    ids = torch.randint(0, 8192, (2, 200), generator=torch.Generator().manual_seed(0))
    ours = l16(ids, simba=None).logits
    ref = to_transformers(l16)(ids, use_cache=False).logits
    assert rel_err(ours, ref) <= 1e-5


@torch.no_grad()
def test_keep_one_everywhere_equals_transformers_random_model():
    m = random_model(n_layer=4, d_model=24, vocab=96)
    ids = torch.randint(0, 96, (3, 45))
    ours = m(ids, simba=SimbaConfig([1.0] * 4)).logits
    ref = to_transformers(m)(ids, use_cache=False).logits
    assert rel_err(ours, ref) <= 1e-5


def naive_mixer(mix, hidden, want_internals):
    """mamba_simple's forward with the conv and the scan written as loops over time."""
    l = hidden.shape[0]
    x, z = mix.in_proj(hidden).chunk(2, dim=-1)
    w = mix.conv1d.weight[:, 0, :]  # (d, k)
    k = w.shape[1]
    xpad = torch.cat([x.new_zeros(k - 1, x.shape[1]), x])
    x = torch.stack([(xpad[t : t + k].T * w).sum(-1) + mix.conv1d.bias for t in range(l)])
    x = F.silu(x)
    dt, B, C = mix.x_proj(x).split([mix.dt_rank, mix.d_state, mix.d_state], dim=-1)
    dt = F.softplus(mix.dt_proj(dt))
    A = -torch.exp(mix.A_log)
    y, _ = loop_scan(x[None], dt[None], A, B[None], C[None])
    y = (y[0].float() + x * mix.D) * F.silu(z)
    return mix.out_proj(y), (x, dt, A, B, C)


@torch.no_grad()
def naive_sparse_forward(model, ids, simba):
    """One row, layer by layer: run each layer on its kept tokens, rank them, keep the top ones in order."""
    T = ids.shape[0]
    stream = model.backbone.embeddings(ids).float()
    positions = list(range(T))
    counts = simba.counts(torch.tensor([T]))[:, 0].tolist()
    for i, block in enumerate(model.backbone.layers):
        sub = stream[positions]
        out, (x, dt, A, B, C) = naive_mixer(block.mixer, block.norm(sub), True)
        sub = sub + out
        stream[positions] = sub
        if i + 1 < len(counts) and counts[i + 1] < counts[i]:
            if simba.criterion in ("simba", "share"):
                loop = loop_impact if simba.criterion == "simba" else loop_share
                score = loop(x[None], dt[None], A, B[None], C[None], torch.tensor([len(positions) - 1]))[0]
            elif simba.criterion == "deci":
                score = dt.norm(dim=-1)
            elif simba.criterion == "utr":
                score = sub.clamp(min=0).sum(-1)
            elif simba.criterion in ("query", "recent-query"):  # its math: test_query_attention_equals_its_loop_definition
                query = torch.tensor([[p >= T - QUERY_WINDOW for p in positions]])
                score = query_attention(sub[None], torch.ones_like(query), query)[0]
                if simba.criterion == "recent-query":  # the most recent ceil(k / 2) tokens first
                    score[len(positions) - (counts[i + 1] + 1) // 2 :] = float("inf")
            else:
                score = sub.norm(dim=-1)
            protected = set(positions[-simba.protect_last :])
            ranked = sorted(range(len(positions)), key=lambda j: (positions[j] not in protected, -float(score[j])))
            positions = sorted(positions[j] for j in ranked[: counts[i + 1]])
    return model.lm_head(model.backbone.norm_f(stream))


def loop_query(hidden, is_query, window=QUERY_WINDOW, tau=QUERY_TEMPERATURE, pool=QUERY_POOL):
    """pruning.query_attention's definition for one row of w real slots, in loops (float64): each of the last
    `window` query slots spreads a softmax of cosine similarities / tau over the slots; sum; max over +-pool."""
    h = [v / v.norm() for v in hidden.double()]
    w = len(h)
    queries = [j for j in range(w) if is_query[j]][-window:]
    attention = [0.0] * w
    for q in queries:
        e = [math.exp(float(h[q] @ h[t]) / tau) for t in range(w)]
        for t in range(w):
            attention[t] += e[t] / sum(e)
    return torch.tensor([max(attention[max(0, t - pool) : t + pool + 1]) for t in range(w)], dtype=torch.float64)


@pytest.mark.parametrize("side", ["none", "left", "right"])
@pytest.mark.parametrize("window,pool,tau", [(32, 8, 0.05), (4, 2, 1.0), (6, 0, 0.3)])
def test_query_attention_equals_its_loop_definition(side, window, pool, tau):
    g = torch.Generator().manual_seed(window)
    lengths = [40, 23, 9] if side != "none" else [40, 40, 40]
    w = max(lengths)
    hidden = torch.randn(3, w, 16, generator=g) + 0.8 * torch.randn(16, generator=g)  # a shared direction, as streams have
    real = torch.zeros(3, w, dtype=torch.bool)
    for r, n in enumerate(lengths):
        real[r, w - n :] = True if side != "right" else False
        real[r, :n] = True if side == "right" else real[r, :n]
    query = torch.zeros_like(real)  # each row's last k real slots (the protected end): k below and above the window
    for r, k in enumerate([3, 12, 40]):
        slots = real[r].nonzero().flatten()
        query[r, slots[-k:]] = True
    got = query_attention(hidden, real, query, window, tau, pool)
    for r in range(3):
        slots = real[r].nonzero().flatten()
        ref = loop_query(hidden[r, slots], query[r, slots].tolist(), window, tau, pool)
        assert torch.allclose(got[r, slots].double(), ref, rtol=1e-5, atol=1e-6)
        assert torch.isinf(got[r, ~real[r]]).all()


def test_query_ranks_what_the_end_resembles_first():
    """A token far back that the prompt's end matches outranks every token near the end that it does not."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 200, 32, generator=g)
    hidden[0, 20] = hidden[0, 195] * 2  # the needle: the question (last slots) resembles it
    query = torch.zeros(1, 200, dtype=torch.bool)
    query[0, 190:] = True
    scores = query_attention(hidden, torch.ones(1, 200, dtype=torch.bool), query)
    before = 190 - QUERY_POOL  # (the pool carries the queries' attention to themselves onto the 8 slots before them)
    top = scores[0, :before].argsort(descending=True, stable=True)[: 2 * QUERY_POOL + 1]
    assert sorted(top.tolist()) == list(range(20 - QUERY_POOL, 20 + QUERY_POOL + 1))  # the needle and its neighbours


@pytest.mark.parametrize("criterion", ["simba", "query", "recent-query", "share", "deci", "utr", "l2norm"])
@pytest.mark.parametrize("protect", [1, 5])
def test_sparse_forward_equals_naive_reference(criterion, protect):
    m = random_model(n_layer=4, d_model=16, vocab=64, seed=3)
    simba = SimbaConfig(linear(4, 0.3), criterion, protect)
    ids = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = m(ids, simba=simba, return_kept=True)
    for r in range(2):
        ref = naive_sparse_forward(m, ids[r], simba)
        assert rel_err(out.logits[r], ref) <= 1e-4
    kept_top = out.kept[-1]
    assert kept_top.shape[1] == simba.counts(torch.tensor([33]))[-1, 0]
    assert (kept_top[:, -protect:] == torch.arange(33 - protect, 33)).all()  # the protected tail


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("criterion", ["simba", "query", "recent-query", "share", "deci", "utr", "stride"])
def test_padded_batch_equals_rows_alone(side, criterion):
    m = random_model(n_layer=4, d_model=16, vocab=64, seed=5)
    simba = SimbaConfig(linear(4, 0.2), criterion, 2)
    lengths = [30, 17, 9]
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, 64, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for r, row in enumerate(rows):
        sl = slice(T - len(row), T) if side == "left" else slice(0, len(row))
        ids[r, sl], mask[r, sl] = row, 1
    with torch.no_grad():
        out = m(ids, mask, simba=simba, return_kept=True)
        for r, row in enumerate(rows):
            alone = m(row[None], simba=simba).logits[0]
            sl = slice(T - len(row), T) if side == "left" else slice(0, len(row))
            assert rel_err(out.logits[r, sl], alone) <= 1e-5
    counts = simba.counts(torch.tensor(lengths))
    for layer, kept in enumerate(out.kept):
        real = kept >= 0
        assert (real.sum(1) == counts[layer]).all()  # each row keeps its own share, never padding
        assert all(bool(mask[r, kept[r][real[r]]].all()) for r in range(3))


def test_padding_with_holes_is_an_error():
    m = random_model()
    mask = torch.tensor([[1, 0, 1, 1]])
    with pytest.raises(ValueError, match="one side"):
        m(torch.ones(1, 4, dtype=torch.long), mask, simba=SimbaConfig(linear(3, 0.5)))


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_keeps_the_scheduled_count(criterion):
    m = random_hybrid(n_layer=5, attn_layers=(0, 3)) if criterion == "snapkv" else random_model(n_layer=5)
    simba = SimbaConfig(linear(5, 0.25), criterion, 3, seed=7)
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        out = m(ids, simba=simba, return_kept=True)
        again = m(ids, simba=simba, return_kept=True)
    counts = simba.counts(torch.tensor([40, 40]))
    for layer, kept in enumerate(out.kept):
        assert kept.shape[1] == counts[layer, 0]
        assert (kept.diff(dim=1) > 0).all()  # original order, no duplicates
        assert (kept[:, -3:] == torch.tensor([37, 38, 39])).all()
    assert all(torch.equal(a, b) for a, b in zip(out.kept, again.kept))  # deterministic, "random" included


def test_stride_keeps_evenly_spaced_tokens():
    m = random_model(n_layer=2)
    simba = SimbaConfig([1.0, 0.25], "stride", 1)
    with torch.no_grad():
        kept = m(torch.randint(0, 64, (1, 40)), simba=simba, return_kept=True).kept[1][0]
    assert kept.tolist() == list(range(3, 40, 4))


def test_utr_scores_clipped_activation_sum():
    from simba_compress.pruning import CRITERION_FNS, LayerView

    hidden = torch.tensor([[[1.0, -2.0, 3.0], [-1.0, -1.0, 0.5]]])
    view = LayerView(0, hidden, None, torch.tensor([1]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([1]),
                     torch.arange(2)[None], torch.tensor([2]))
    assert CRITERION_FNS["utr"](view, 0).tolist() == [[4.0, 0.5]]


@torch.no_grad()
def test_generate_dense_matches_greedy_full_forward():
    m = random_model(n_layer=3, vocab=64, seed=11)
    prompt = torch.randint(0, 64, (2, 12))
    out = m.generate(prompt, max_new_tokens=6)
    seq = prompt
    for _ in range(6):
        nxt = m(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


@torch.no_grad()
def test_generate_after_pruned_prefill():
    """Decoding continues each layer from the state of the tokens that layer kept."""
    m = random_model(n_layer=4, vocab=64, seed=12)
    m.simba = SimbaConfig(linear(4, 0.3), "simba", 1)
    prompt = torch.randint(0, 64, (1, 30))
    out = m.generate(prompt, max_new_tokens=5)
    assert out.shape == (1, 35) and torch.equal(out[:, :30], prompt)
    assert out[0, 30] == m(prompt).logits[0, -1].argmax()
    # the second new token equals a pruned forward over prompt + first token with that token protected:
    # the same kept prompt tokens, so the same states (the schedule counts are those of the prompt)
    pre = m(prompt, return_states=True)
    logits, _ = m.step(out[:, 30], pre.states)
    assert out[0, 31] == logits[0].argmax()


@torch.no_grad()
def test_generate_left_padded_batch_equals_rows_alone():
    m = random_model(n_layer=3, vocab=64, seed=13)
    m.simba = SimbaConfig(linear(3, 0.5), "simba", 1)
    a, b = torch.randint(1, 64, (20,)), torch.randint(1, 64, (12,))
    ids = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 8:], mask[1, 8:] = b, 1
    out = m.generate(ids, mask, max_new_tokens=4)
    assert torch.equal(out[0, 20:], m.generate(a[None], max_new_tokens=4)[0, 20:])
    assert torch.equal(out[1, 20:], m.generate(b[None], max_new_tokens=4)[0, 12:])
    with pytest.raises(ValueError, match="left-padded"):
        m.generate(ids.flip(1), mask.flip(1), max_new_tokens=1)


@pytest.mark.parametrize("criterion", ["simba", "share", "deci"])
def test_capped_forward_equals_naive_reference(criterion):
    """max_tokens (context extension): dense lower layers, at most 12 tokens from layer 2 on."""
    m = random_model(n_layer=4, d_model=16, vocab=64, seed=4)
    simba = SimbaConfig([1.0] * 4, criterion, 3, max_tokens=[0, 0, 12, 12])
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = m(ids, simba=simba, return_kept=True)
        short = m(ids[:, :12], simba=simba).logits
    assert [k.shape[1] for k in out.kept] == [40, 40, 12, 12]
    for r in range(2):
        assert rel_err(out.logits[r], naive_sparse_forward(m, ids[r], simba)) <= 1e-4
    assert rel_err(short, m(ids[:, :12], simba=None).logits) <= 1e-6  # the cap binds only past its length
