"""Reference selective scan (Mamba-1) in plain PyTorch, chunked, with no Python loop over time steps.

Shapes: b batch, l tokens, d channels (d_inner), n state size (d_state).

    h_t[d,n] = exp(dt_t[d] A[d,n]) h_{t-1}[d,n] + dt_t[d] B_t[n] x_t[d]
    y_t[d]   = sum_n C_t[n] h_t[d,n]

Inside a chunk the recurrence is solved in closed form with the cumulative decay G_t = A * sum_{k<=t} dt_k:
    h_t = exp(G_t) * (h_0 + sum_{s<=t} exp(-G_s) dt_s B_s x_s)
which is a cumsum instead of a loop over time. exp(-G_s) grows along the chunk, so a channel is computed in
float32 only while its decay range |G| within a chunk stays below MAX_LOG_RANGE (float32 overflows near
exp(88)). Real text drives a few channels of trained models to single-step decays of e^-80: those channels
are computed in float64 (overflow near exp(709)), and past that one step at a time. The rounding error stays
below eps * chunk * max|dt B x| because every factor exp(G_t - G_s) it stands for is <= 1.
"""

from __future__ import annotations

import torch

MAX_LOG_RANGE = {torch.float32: 60.0, torch.float64: 600.0}  # below exp(88) and exp(709), the overflow points
# With autograd, the backward of exp(G_t) * exp(-G_s) cancels two terms of size exp(|G|): the relative error
# of the gradient is eps * exp(range), so training keeps ranges small (float32 ~3e-4, float64 ~1e-5).
MAX_LOG_RANGE_GRAD = {torch.float32: 8.0, torch.float64: 25.0}
MAX_CHUNK = 8  # fastest on 2 CPU cores: longer chunks fall out of the L2 cache
MAX_CHUNK_GPU = 64  # on a GPU, fewer and larger launches win


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
    models have a few such channels: a dozen of 640 in the proxies), one step at a time beyond that.
    """
    b, length, d = x.shape
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    h0 = x.new_zeros(b, d, A.shape[-1]) if h0 is None else h0.float()
    chunk = MAX_CHUNK if x.device.type == "cpu" else MAX_CHUNK_GPU
    limits = MAX_LOG_RANGE_GRAD if torch.is_grad_enabled() else MAX_LOG_RANGE
    pad = (-length) % chunk
    steps = torch.nn.functional.pad(dt * A.abs().amax(dim=-1), (0, 0, 0, pad)).unflatten(1, (-1, chunk))
    worst = steps.sum(2).amax(dim=(0, 1))  # (d,): each channel's largest decay range within a chunk
    f32, f64 = limits[torch.float32], limits[torch.float64]
    groups = [
        (worst <= f32, torch.float32, chunk),
        ((worst > f32) & (worst <= f64), torch.float64, chunk),
        (worst > f64, torch.float64, 1),
    ]
    groups = [(sel, work, step) for sel, work, step in groups if bool(sel.any())]
    if len(groups) == 1:
        _, work, step = groups[0]
        return _scan(x, dt, A, B, C, h0, last, work, step)
    y, h = torch.empty_like(x), torch.empty_like(h0)
    score = None
    for sel, work, step in groups:
        ys, hs, ss = _scan(x[..., sel], dt[..., sel], A[sel], B, C, h0[:, sel], last, work, step)
        y[..., sel], h[:, sel] = ys, hs
        score = ss if score is None or ss is None else torch.maximum(score, ss)  # max over all channels
    return y, h, score


def _scan(x, dt, A, B, C, h, last, work: torch.dtype, chunk: int):
    """The chunked scan in `work` precision. With the chunk-local terms w_t = exp(-G_t) dt_t B_t x_t it forms,
    Simba's global impact of token t on position T is one contraction:
        dy_T(t)[d] = sum_n C_T[n] exp(A[d,n] (S_T - S_c)[d]) w_t[d,n]       (S_c: sum of dt before t's chunk)
    instead of score.global_impact's exp per (token, channel, state).
    """
    b, length, d = x.shape
    inplace = not torch.is_grad_enabled()  # reuse buffers when no backward will need them
    u, A, B, C, h = (dt * x).to(work), A.to(work), B.to(work), C.to(work), h.to(work)  # u = dt x: (b, l, d)
    limit = (MAX_LOG_RANGE_GRAD if torch.is_grad_enabled() else MAX_LOG_RANGE)[work]
    pad = (-length) % chunk
    S = torch.nn.functional.pad(dt.to(work), (0, 0, 0, pad)).unflatten(1, (-1, chunk)).cumsum(2)  # (b, c, L, d)
    if last is not None:
        # float64 for the running sums: S_T - S_c subtracts two large sums
        totals = S[:, :, -1].double()
        before = torch.cumsum(totals, dim=1) - totals  # S_c: (b, c, d)
        rows = torch.arange(b, device=x.device)
        s_last = before[rows, last // chunk] + S.flatten(1, 2)[rows, last].double()  # S_T: (b, d)
        c_last = C[rows, last].unsqueeze(1)  # C_T: (b, 1, n)
    S = S.flatten(1, 2)
    ones = torch.ones(chunk, chunk, dtype=work, device=x.device).tril()  # in-chunk cumsum as a matmul: faster
    ys, scores = [], []
    for i, c0 in enumerate(range(0, length, chunk)):
        c1 = min(c0 + chunk, length)
        # exp(G_t): (b, L, d, n). The clamp acts only on single steps (chunk 1) that decay past `limit`,
        # where exp(-limit) and the true factor are both zero to working precision.
        decay = torch.exp((S[:, c0:c1].unsqueeze(-1) * A).clamp_min(-limit))
        w = u[:, c0:c1].unsqueeze(-1) * B[:, c0:c1].unsqueeze(2)  # dt_s B_s x_s: (b, L, d, n)
        if last is not None and chunk == 1:  # one step: measure from after it, with plain dt B x
            reach = torch.exp(((s_last - before[:, i] - S[:, c0].double()).to(work).unsqueeze(-1) * A).clamp_max(0))
            scores.append(torch.linalg.vecdot(w, (reach * c_last).unsqueeze(1)).abs().amax(-1).float())
        w = w.div_(decay) if inplace else w / decay  # exp(-G_s) dt_s B_s x_s
        if last is not None and chunk > 1:
            reach = torch.exp(((s_last - before[:, i]).to(work).unsqueeze(-1) * A).clamp_max(0))  # (b, d, n)
            scores.append(torch.linalg.vecdot(w, (reach * c_last).unsqueeze(1)).abs().amax(-1).float())  # (b, L)
        # h_t = exp(G_t) (h_0 + sum_{s<=t} exp(-G_s) dt_s B_s x_s)
        tril = ones[: c1 - c0, : c1 - c0]
        if inplace:
            w[:, 0] += h
            states = torch.matmul(tril, w.flatten(2)).view_as(w).mul_(decay)
        else:
            states = (torch.matmul(tril, w.flatten(2)).view_as(w) + h.unsqueeze(1)) * decay  # (b, L, d, n)
        ys.append(torch.linalg.vecdot(states, C[:, c0:c1].unsqueeze(2)).float())  # C_t . h_t: (b, L, d)
        h = states[:, -1]
    y, h = torch.cat(ys, dim=1), h.float()
    if last is None:
        return y, h, None
    after = torch.arange(length, device=x.device)[None, :] > last[:, None]
    return y, h, torch.cat(scores, dim=1).masked_fill(after, 0.0)


def selective_step(
    h: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step for decoding: h (b, d, n), x and dt (b, d), B and C (b, n). Returns y (b, d), new h."""
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    h = torch.exp(dt.unsqueeze(-1) * A.float()) * h + (dt * x).unsqueeze(-1) * B.unsqueeze(1)
    y = torch.einsum("bdn,bn->bd", h, C)
    return y, h
