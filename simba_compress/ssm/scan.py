"""Reference selective scan (Mamba-1) in plain PyTorch, chunked, with no Python loop over time steps.

Shapes: b batch, l tokens, d channels (d_inner), n state size (d_state).

    h_t[d,n] = exp(dt_t[d] A[d,n]) h_{t-1}[d,n] + dt_t[d] B_t[n] x_t[d]
    y_t[d]   = sum_n C_t[n] h_t[d,n]

Inside a chunk the recurrence is solved in closed form with the cumulative decay G_t = A * sum_{k<=t} dt_k:
    h_t = exp(G_t) * (h_0 + sum_{s<=t} exp(-G_s) dt_s B_s x_s)
which is a cumsum instead of a loop. exp(-G_s) grows along the chunk, so the chunk length is chosen per call
as the longest one whose total decay |G| stays below MAX_LOG_RANGE in every chunk and channel (float32
overflows near exp(88)); a model with very fast decays gets short chunks, never wrong numbers. The rounding
error stays below eps * chunk * max|dt B x| because every factor exp(G_t - G_s) it stands for is <= 1.
"""

from __future__ import annotations

import torch

MAX_LOG_RANGE = 60.0  # exp(60) ~ 1e26: headroom below float32's exp(88) for the cumsum
MAX_CHUNK = 8  # measured fastest on 2 CPU cores (benchmarks/cpu_forward.py); longer chunks fall out of cache


def chunk_length(dt: torch.Tensor, A: torch.Tensor, max_chunk: int = MAX_CHUNK) -> int:
    """Longest power-of-two chunk (<= max_chunk) whose decay range stays below MAX_LOG_RANGE everywhere.

    Bounded from above by the fastest channel at each step, so the check costs one pass over dt.
    """
    step = (dt.float() * A.abs().amax(dim=-1)).amax(dim=-1)  # (b, l): the largest log-decay of each step
    cum = torch.nn.functional.pad(torch.cumsum(step, dim=1), (1, 0))  # cum[:, i] = decay before token i
    length = step.shape[1]
    chunk = max_chunk
    while chunk > 1:
        ends = torch.arange(chunk, length + chunk, chunk, device=dt.device).clamp_max(length)
        if (cum[:, ends] - cum[:, ends - chunk]).max() <= MAX_LOG_RANGE:
            return chunk
        chunk //= 2
    return 1


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
    Simba's global-impact score of every token against row position last[b] (b, l), fused into the scan:
    with the chunk-local terms w_t = exp(-G_t) dt_t B_t x_t the scan already forms,
        dy_T(t)[d] = sum_n C_T[n] exp(A[d,n] (S_T - S_c)[d]) w_t[d,n]       (S_c: sum of dt before t's chunk)
    one contraction per token instead of score.global_impact's exp per (token, channel, state).
    Tokens after last[b] get 0.
    """
    b, length, d = x.shape
    n = A.shape[-1]
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    h = x.new_zeros(b, d, n) if h0 is None else h0.float()
    chunk = chunk_length(dt, A)
    y = x.new_empty(-(-length // chunk), b, chunk, d)  # chunk-major, so each chunk's output is contiguous
    u = dt * x  # (b, l, d)
    pad = (-length) % chunk
    S = torch.nn.functional.pad(dt, (0, 0, 0, pad)).unflatten(1, (-1, chunk)).cumsum(2)  # in-chunk: (b, c, L, d)
    if last is not None:
        score = x.new_empty(b, length)
        # float64 for the running sums: S_T - S_c subtracts two large sums
        totals = S[:, :, -1].double()
        before = torch.cumsum(totals, dim=1) - totals  # S_c, dt summed before each chunk: (b, c, d)
        rows = torch.arange(b, device=x.device)
        s_last = before[rows, last // chunk] + S.flatten(1, 2)[rows, last].double()  # S_T: (b, d)
        c_last = C[rows, last]  # C_T: (b, n)
    S = S.flatten(1, 2)
    for i, c0 in enumerate(range(0, length, chunk)):
        c1 = min(c0 + chunk, length)
        decay = torch.exp(S[:, c0:c1].unsqueeze(-1) * A)  # exp(G_t): (b, L, d, n)
        w = u[:, c0:c1].unsqueeze(-1) * B[:, c0:c1].unsqueeze(2)  # dt_s B_s x_s: (b, L, d, n)
        w.div_(decay)
        if last is not None:
            reach = torch.exp(((s_last - before[:, i]).float().unsqueeze(-1) * A).clamp_max(0.0))  # (b, d, n)
            impact = (w * (reach * c_last.unsqueeze(1)).unsqueeze(1)).sum(-1)  # dy_T(t): (b, L, d)
            score[:, c0:c1] = impact.abs_().amax(-1)
        w[:, 0] += h  # carry the state in: h_t = exp(G_t) (h_0 + sum_s exp(-G_s) dt_s B_s x_s)
        states = torch.cumsum(w, dim=1, out=w).mul_(decay)  # h_t: (b, L, d, n)
        torch.matmul(states, C[:, c0:c1].unsqueeze(-1), out=y[i, :, : c1 - c0].unsqueeze(-1))  # C_t . h_t
        h = states[:, -1]
    y = y.permute(1, 0, 2, 3).flatten(1, 2)[:, :length]
    if last is None:
        return y, h, None
    after = torch.arange(length, device=x.device)[None, :] > last[:, None]
    return y, h, score.masked_fill_(after, 0.0)


def selective_step(
    h: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step for decoding: h (b, d, n), x and dt (b, d), B and C (b, n). Returns y (b, d), new h."""
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    h = torch.exp(dt.unsqueeze(-1) * A.float()) * h + (dt * x).unsqueeze(-1) * B.unsqueeze(1)
    y = torch.einsum("bdn,bn->bd", h, C)
    return y, h
