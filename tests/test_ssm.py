"""The reference scan and the global-impact score against straightforward loops over time (float64)."""

import pytest
import torch

from simba_compress.ssm import channel_share, global_impact, selective_scan, selective_step


def loop_scan(x, dt, A, B, C, h0=None):
    """The recurrence as written, one step at a time, in float64."""
    b, l, d = x.shape
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for t in range(l):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


def loop_channel_impact(x, dt, A, B, C, last):
    """|dy_T(t)[d]| from its definition, token by token, in float64: (b, l, d), 0 after last."""
    b, l, d = x.shape
    out = torch.zeros(b, l, d, dtype=torch.float64)
    for r in range(b):
        T = int(last[r])
        for t in range(T + 1):
            gap = dt[r, t + 1 : T + 1].double().sum(0)  # S_T - S_t: (d,)
            contrib = dt[r, t].double() * x[r, t].double() * (C[r, T].double() * B[r, t].double() * torch.exp(A.double() * gap[:, None])).sum(-1)
            out[r, t] = contrib.abs()
    return out


def loop_impact(x, dt, A, B, C, last):
    """Simba's score from its definition: max_d |dy_T(t)[d]|."""
    return loop_channel_impact(x, dt, A, B, C, last).amax(-1)


def loop_share(x, dt, A, B, C, last):
    """The share criterion from its definition: max_d |dy_T(t)[d]| / sum_t' |dy_T(t')[d]|."""
    per_channel = loop_channel_impact(x, dt, A, B, C, last)
    return (per_channel / per_channel.sum(1, keepdim=True)).amax(-1)


def inputs(b=2, l=37, d=6, n=4, dt_scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, d, generator=g)
    dt = torch.rand(b, l, d, generator=g) * dt_scale + 1e-3
    A = -torch.exp(torch.rand(d, n, generator=g) * 3)
    B = torch.randn(b, l, n, generator=g)
    C = torch.randn(b, l, n, generator=g)
    return x, dt, A, B, C


@pytest.mark.parametrize("length", [1, 7, 8, 9, 37, 64])
@pytest.mark.parametrize("dt_scale", [0.05, 3.0, 40.0])  # slow, fast (float64 chunks), extreme (single steps)
def test_scan_matches_loop(length, dt_scale):
    x, dt, A, B, C = inputs(l=length, dt_scale=dt_scale)
    h0 = torch.randn(2, 6, 4)
    with torch.no_grad():
        y, h, _ = selective_scan(x, dt, A, B, C, h0=h0)
    yr, hr = loop_scan(x, dt, A, B, C, h0)
    assert torch.allclose(y.double(), yr, rtol=1e-5, atol=1e-5 * yr.abs().max().item())
    assert torch.allclose(h.double(), hr, rtol=1e-5, atol=1e-5 * hr.abs().max().item())


def test_scan_with_grad_equals_without():
    x, dt, A, B, C = inputs(l=30)
    x.requires_grad_(True)
    y1, h1, s1 = selective_scan(x, dt, A, B, C, last=torch.tensor([29, 20]))
    with torch.no_grad():
        y2, h2, s2 = selective_scan(x, dt, A, B, C, last=torch.tensor([29, 20]))
    assert torch.allclose(y1, y2) and torch.allclose(h1, h2) and torch.allclose(s1, s2)
    y1.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_step_continues_scan():
    x, dt, A, B, C = inputs(l=21)
    with torch.no_grad():
        y_all, _, _ = selective_scan(x, dt, A, B, C)
        _, h, _ = selective_scan(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20])
        y_last, _ = selective_step(h, x[:, 20], dt[:, 20], A, B[:, 20], C[:, 20])
    assert torch.allclose(y_last, y_all[:, 20], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dt_scale", [0.05, 3.0, 40.0])
def test_score_reference_and_fused_match_definition(dt_scale):
    x, dt, A, B, C = inputs(l=29, dt_scale=dt_scale)
    last = torch.tensor([28, 13])
    ref = loop_impact(x, dt, A, B, C, last)
    plain = global_impact(x, dt, A, B, C, last)
    with torch.no_grad():
        _, _, fused = selective_scan(x, dt, A, B, C, last=last)
    scale = ref.abs().max().item()
    assert torch.allclose(plain.double(), ref, rtol=1e-4, atol=1e-6 * scale)
    assert torch.allclose(fused.double(), ref, rtol=1e-4, atol=1e-6 * scale)
    assert (plain[1, 14:] == 0).all() and (fused[1, 14:] == 0).all()  # after the row's last token


def test_score_is_chunked_in_memory(monkeypatch):
    """A tiny chunk budget gives the same score: memory is bounded by the chunk, not the sequence."""
    import simba_compress.ssm.score as score

    x, dt, A, B, C = inputs(l=50)
    last = torch.tensor([49, 30])
    full = global_impact(x, dt, A, B, C, last)
    monkeypatch.setattr(score, "SCORE_CHUNK_ELEMENTS", 2 * 6 * 4 * 3)  # 3 tokens a chunk
    assert torch.allclose(score.global_impact(x, dt, A, B, C, last), full)


@pytest.mark.parametrize("dt_scale", [0.05, 0.3, 3.0, 40.0])  # float32, float32 + float64, + pairwise, pairwise
def test_scan_gradients_match_the_loop(dt_scale):
    """Gradients stay finite and accurate where decays are fast (the backward of exp(G) exp(-G) cancels)."""
    x, dt, A, B, C = inputs(l=70, dt_scale=dt_scale)
    weights = torch.randn(2, 70, 6, generator=torch.Generator().manual_seed(1))
    leaves = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C)]
    y, h, _ = selective_scan(*leaves)
    ((y * weights).sum() + h.sum()).backward()
    ref = [t.double().clone().requires_grad_(True) for t in (x, dt, A, B, C)]
    yr, hr = loop_scan(*ref)
    ((yr * weights).sum() + hr.sum()).backward()
    for got, want in zip(leaves, ref):
        assert torch.isfinite(got.grad).all()
        assert torch.allclose(got.grad.double(), want.grad, rtol=1e-3, atol=1e-3 * want.grad.abs().max().item())


def test_recomputing_chunks_in_the_backward_changes_nothing(monkeypatch):
    """Under autograd each chunk is recomputed in the backward; without the recomputation (the chunk's graph
    kept whole) the forward is bit for bit the same and so are the gradients."""
    import simba_compress.ssm.scan as scan

    x, dt, A, B, C = inputs(l=70, dt_scale=0.3)  # float32, float64 and pairwise channels
    last = torch.tensor([69, 40])
    runs = []
    for recompute in (True, False):
        if not recompute:
            monkeypatch.setattr(scan, "checkpoint", lambda fn, *args, **kw: fn(*args))
        leaves = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C)]
        y, h, s = selective_scan(*leaves, last=last)
        (y.square().sum() + h.sum()).backward()
        runs.append((y.detach(), h.detach(), s, [t.grad for t in leaves]))
    (y1, h1, s1, g1), (y2, h2, s2, g2) = runs
    assert torch.equal(y1, y2) and torch.equal(h1, h2) and torch.equal(s1, s2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dt_scale", [0.05, 0.3, 40.0])
def test_backward_keeps_chunk_states_not_every_decay(dt_scale):
    """What autograd keeps for the backward of a scan (distinct storages) is O(b l (d + n)) plus one (b, d, n)
    state per chunk: less than one (b, l, d, n) tensor, where keeping every chunk's decays and states took 7-17."""
    b, l, d, n = 2, 256, 32, 16
    leaves = [t.requires_grad_(True) for t in inputs(b=b, l=l, d=d, n=n, dt_scale=dt_scale)]
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(*leaves, last=torch.tensor([l - 1, 100]))
    assert sum(kept.values()) < b * l * d * n * 4, sum(kept.values())


@pytest.mark.parametrize("dt_scale", [0.05, 3.0])
def test_channel_share_matches_definition(dt_scale, monkeypatch):
    import simba_compress.ssm.score as score

    x, dt, A, B, C = inputs(l=29, dt_scale=dt_scale)
    last = torch.tensor([28, 13])
    ref = loop_share(x, dt, A, B, C, last)
    monkeypatch.setattr(score, "SCORE_CHUNK_ELEMENTS", 2 * 6 * 4 * 5)  # chunks of 5 tokens
    got = channel_share(x, dt, A, B, C, last)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-7)
    assert (got[1, 14:] == 0).all() and (got <= 1).all()
    # a far token that dominates one slow channel holds most of it, whatever its distance from T
    A_slow = A.clone()
    A_slow[0] = -1e-4
    x2, B2 = x.clone(), B.clone()
    x2[:, 2, 0] = 1e3
    B2[:, 2] = C[torch.arange(2), last]  # written where T reads
    assert (channel_share(x2, dt, A_slow, B2, C, last)[:, 2] > 0.5).all()
