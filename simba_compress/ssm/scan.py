"""Reference selective scan (Mamba-1) in plain PyTorch, chunked, with no Python loop over time steps.

Shapes: b batch, l tokens, d channels (d_inner), n state size (d_state).

    h_t[d,n] = exp(dt_t[d] A[d,n]) h_{t-1}[d,n] + dt_t[d] B_t[n] x_t[d]
    y_t[d]   = sum_n C_t[n] h_t[d,n]

Inside a chunk the recurrence is solved in closed form with the cumulative decay G_t = A * sum_{k<=t} dt_k:
    h_t = exp(G_t) * (h_0 + sum_{s<=t} exp(-G_s) dt_s B_s x_s)
which is a cumsum instead of a loop over time. exp(-G_s) grows along the chunk, so a channel is computed in
float32 only while its decay range |G| within a chunk stays below MAX_LOG_RANGE (float32 overflows near
exp(88)). Real text drives a few channels of trained models to single-step decays of e^-80: those channels
are computed in float64 (overflow near exp(709)), and past that through the pairwise decays
exp(G_t - G_s) <= 1 of every pair in a short chunk (an (L, L) matrix per channel and state: L times the work,
but no range limit). The rounding error stays below eps * chunk * max|dt B x| because every factor
exp(G_t - G_s) it stands for is <= 1.

Under autograd every chunk is recomputed in the backward (torch.utils.checkpoint): what is kept is the state
entering each chunk, (b, d, n) per chunk, instead of the (b, L, d, n) decays and states of every chunk; the
forward computes exactly what it computes without the recomputation.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

MAX_LOG_RANGE = {torch.float32: 60.0, torch.float64: 600.0}  # below exp(88) and exp(709), the overflow points
# With autograd, the backward of exp(G_t) * exp(-G_s) cancels two terms of size exp(|G|): the relative error
# of the gradient is eps * exp(range), so training keeps ranges small (float32 ~3e-4, float64 ~1e-5).
MAX_LOG_RANGE_GRAD = {torch.float32: 8.0, torch.float64: 25.0}
MAX_CHUNK = 8  # fastest on 2 CPU cores: longer chunks fall out of the L2 cache
MAX_CHUNK_GPU = 64  # on a GPU, fewer and larger launches win
# The pairwise path's chunk L: as long as its (b, L, L, d, n) decays fit in this many elements (64 MiB in
# float32), up to MAX_CHUNK_GPU: few channels take it, and each chunk costs a dozen small ops whatever its size.
PAIRWISE_ELEMENTS = 1 << 24


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
    last: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Scan x (b, l, d) with step sizes dt (b, l, d) > 0, A (d, n) < 0, B and C (b, l, n).

    Returns y (b, l, d) and the final state h (b, d, n), both float32, and, when `last` (b,) is given,
    Simba's global-impact score of every token against row position last[b] (b, l), fused into the scan
    (see _scan). Tokens after last[b] get score 0.

    Channels are independent, so each is computed in the cheapest way that cannot overflow: float32 chunks
    where its decay range per chunk stays below MAX_LOG_RANGE, float64 chunks where it does not (trained
    models have a few such channels: a dozen of 640 in the proxies), pairwise decays beyond that (under
    autograd's tighter ranges: a quarter of the proxies' channels at the GPU's chunk of 64, which one step at
    a time would turn into 1024 iterations per layer).
    """
    b, length, d = x.shape
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    h0 = x.new_zeros(b, d, A.shape[-1]) if h0 is None else h0.float()
    chunk = MAX_CHUNK if x.device.type == "cpu" else MAX_CHUNK_GPU
    grad = _needs_grad(x, dt, A, B, C, h0)
    limits = MAX_LOG_RANGE_GRAD if grad else MAX_LOG_RANGE
    pad = (-length) % chunk
    steps = torch.nn.functional.pad(dt * A.abs().amax(dim=-1), (0, 0, 0, pad)).unflatten(1, (-1, chunk))
    worst = steps.sum(2).amax(dim=(0, 1))  # (d,): each channel's largest decay range within a chunk
    f32, f64 = limits[torch.float32], limits[torch.float64]
    beyond = worst > f64
    pair_chunk = math.isqrt(PAIRWISE_ELEMENTS // (b * max(1, int(beyond.sum())) * A.shape[-1]))
    groups = [
        (worst <= f32, torch.float32, chunk, False),
        ((worst > f32) & (worst <= f64), torch.float64, chunk, False),
        (beyond, torch.float32, max(1, min(MAX_CHUNK_GPU, pair_chunk)), True),
    ]
    groups = [g for g in groups if bool(g[0].any())]
    if len(groups) == 1:
        _, work, step, pairwise = groups[0]
        return _scan(x, dt, A, B, C, h0, last, work, step, pairwise, grad)
    y, h = torch.empty_like(x), torch.empty_like(h0)
    score = None
    for sel, work, step, pairwise in groups:
        ys, hs, ss = _scan(x[..., sel], dt[..., sel], A[sel], B, C, h0[:, sel], last, work, step, pairwise, grad)
        y[..., sel], h[:, sel] = ys, hs
        score = ss if score is None or ss is None else torch.maximum(score, ss)  # max over all channels
    return y, h, score


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _scan(x, dt, A, B, C, h, last, work: torch.dtype, chunk: int, pairwise: bool, grad: bool):
    """The chunked scan in `work` precision, chunk by chunk through _chunk or _pairwise_chunk, each chunk
    recomputed in the backward when `grad`. With the chunk-local terms w_t = exp(-G_t) dt_t B_t x_t it forms,
    Simba's global impact of token t on position T is one contraction:
        dy_T(t)[d] = sum_n C_T[n] exp(A[d,n] (S_T - S_c)[d]) w_t[d,n]       (S_c: sum of dt before t's chunk)
    instead of score.global_impact's exp per (token, channel, state).
    """
    b, length, d = x.shape
    u, A, B, C, h = (dt * x).to(work), A.to(work), B.to(work), C.to(work), h.to(work)  # u = dt x: (b, l, d)
    pad = (-length) % chunk
    # in-chunk sums of dt; float64 for the pairwise path, whose exponents are differences of them
    S = torch.nn.functional.pad(dt.to(torch.float64 if pairwise else work), (0, 0, 0, pad))
    S = S.unflatten(1, (-1, chunk)).cumsum(2)  # (b, c, L, d)
    gaps = c_last = None
    if last is not None:
        with torch.no_grad():  # the ranking is not differentiable
            # float64 for the running sums: S_T - S_c subtracts two large sums
            totals = S[:, :, -1].double()
            before = torch.cumsum(totals, dim=1) - totals  # S_c: (b, c, d)
            rows = torch.arange(b, device=x.device)
            s_last = before[rows, last // chunk] + S.flatten(1, 2)[rows, last].double()  # S_T: (b, d)
            gaps = s_last.unsqueeze(1) - before  # S_T - S_c: (b, c, d)
            c_last = C[rows, last].unsqueeze(1)  # C_T: (b, 1, n)
    S = S.flatten(1, 2)
    body = _pairwise_chunk if pairwise else _chunk
    tril = torch.ones(chunk, chunk, dtype=work, device=x.device).tril()  # in-chunk cumsum as a matmul: faster
    ys, scores = [], []
    for i, c0 in enumerate(range(0, length, chunk)):
        c1 = min(c0 + chunk, length)
        args = (S[:, c0:c1], u[:, c0:c1], A, B[:, c0:c1], C[:, c0:c1], h, tril[: c1 - c0, : c1 - c0],
                None if last is None else gaps[:, i], c_last)
        if grad:  # keep only this chunk's inputs; its (b, L, d, n) intermediates are recomputed in the backward
            y, h, score = checkpoint(body, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            y, h, score = body(*args, inplace=True)
        ys.append(y)
        scores.append(score)
    y, h = torch.cat(ys, dim=1), h.float()
    if last is None:
        return y, h, None
    after = torch.arange(length, device=x.device)[None, :] > last[:, None]
    return y, h, torch.cat(scores, dim=1).masked_fill(after, 0.0)


def _chunk(S, u, A, B, C, h, tril, gap, c_last, inplace: bool = False):
    """One chunk of L steps in closed form: (y (b, L, d) float32, state after it (b, d, n), score (b, L) or None).

    S (b, L, d): in-chunk cumulative dt; u = dt x (b, L, d); h (b, d, n) the state entering the chunk; gap
    (b, d) = S_T - S_c and c_last (b, 1, n) = C_T for the score. inplace: reuse buffers (no backward runs).
    """
    decay = torch.exp(S.unsqueeze(-1) * A)  # exp(G_t): (b, L, d, n), within the group's range limit
    w = u.unsqueeze(-1) * B.unsqueeze(2)  # dt_s B_s x_s: (b, L, d, n)
    w = w.div_(decay) if inplace else w / decay  # exp(-G_s) dt_s B_s x_s
    score = None
    if gap is not None:
        with torch.no_grad():
            reach = torch.exp((gap.to(A.dtype).unsqueeze(-1) * A).clamp_max(0))  # (b, d, n)
            score = torch.linalg.vecdot(w, (reach * c_last).unsqueeze(1)).abs().amax(-1).float()  # (b, L)
    # h_t = exp(G_t) (h_0 + sum_{s<=t} exp(-G_s) dt_s B_s x_s)
    if inplace:
        w[:, 0] += h
        states = torch.matmul(tril, w.flatten(2)).view_as(w).mul_(decay)
    else:
        states = (torch.matmul(tril, w.flatten(2)).view_as(w) + h.unsqueeze(1)) * decay  # (b, L, d, n)
    y = torch.linalg.vecdot(states, C.unsqueeze(2)).float()  # C_t . h_t: (b, L, d)
    return y, states[:, -1].clone(), score  # a copy: a view would keep every chunk's states alive


def _pairwise_chunk(S, u, A, B, C, h, tril, gap, c_last, inplace: bool = False):
    """_chunk for channels of any decay range: h_t = exp(G_t) h_0 + sum_{s<=t} exp(G_t - G_s) dt_s B_s x_s,
    every factor <= 1. S is float64 (G_t - G_s is a difference of its sums); the rest in A's dtype."""
    work = A.dtype
    diff = (S.unsqueeze(2) - S.unsqueeze(1)).clamp_min(0).to(work)  # S_t - S_s: (b, t, s, d), 0 where s > t
    pair = torch.exp(diff.unsqueeze(-1) * A) * tril.view(1, *tril.shape, 1, 1)  # exp(G_t - G_s): (b, t, s, d, n)
    w = u.unsqueeze(-1) * B.unsqueeze(2)  # (b, L, d, n)
    states = torch.einsum("btsdn,bsdn->btdn", pair, w) + torch.exp(S.to(work).unsqueeze(-1) * A) * h.unsqueeze(1)
    score = None
    if gap is not None:
        with torch.no_grad():  # exp(A (S_T - S_t)) per token
            reach = torch.exp(((gap.unsqueeze(1) - S).to(work).unsqueeze(-1) * A).clamp_max(0))  # (b, L, d, n)
            score = torch.linalg.vecdot(w, reach * c_last.unsqueeze(1)).abs().amax(-1).float()
    y = torch.linalg.vecdot(states, C.unsqueeze(2)).float()
    return y, states[:, -1].clone(), score  # a copy: a view would keep every chunk's states alive


def selective_step(
    h: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step for decoding: h (b, d, n), x and dt (b, d), B and C (b, n). Returns y (b, d), new h."""
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    h = torch.exp(dt.unsqueeze(-1) * A.float()) * h + (dt * x).unsqueeze(-1) * B.unsqueeze(1)
    y = torch.einsum("bdn,bn->bd", h, C)
    return y, h
