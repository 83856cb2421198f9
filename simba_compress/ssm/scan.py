"""Reference selective scan (Mamba-1) in plain PyTorch, chunked, with no Python loop over time steps.

Shapes: b batch, l tokens, d channels (d_inner), n state size (d_state).

    h_t[d,n] = exp(dt_t[d] A[d,n]) h_{t-1}[d,n] + dt_t[d] B_t[n] x_t[d]
    y_t[d]   = sum_n C_t[n] h_t[d,n]

Inside a chunk the recurrence is solved in closed form with the cumulative decay G_t = A * sum_{k<=t} dt_k:
    h_t = exp(G_t) * (h_0 + sum_{s<=t} exp(-G_s) dt_s B_s x_s)
which is a cumsum instead of a loop over time. exp(-G_s) grows along the chunk, so a chunk is computed in
float32 only while its decay range |G| stays below MAX_LOG_RANGE (float32 overflows near exp(88)). Real text
drives single steps of trained models to decays of e^-80, so such a chunk is computed in float64 (overflow
near exp(709)), and past that one step at a time. The rounding error stays below eps * chunk * max|dt B x|
because every factor exp(G_t - G_s) it stands for is <= 1.
"""

from __future__ import annotations

import torch

MAX_LOG_RANGE = {torch.float32: 60.0, torch.float64: 600.0}  # below exp(88) and exp(709), the overflow points
MAX_CHUNK = 8  # fastest on 2 CPU cores: longer chunks fall out of the L2 cache
MAX_CHUNK_GPU = 64  # on a GPU, fewer and larger launches win


def chunk_ranges(dt: torch.Tensor, A: torch.Tensor, chunk: int) -> list[float]:
    """Upper bound of the decay range |G| inside each chunk: the fastest state of each channel, max over (b, d)."""
    rate = A.abs().amax(dim=-1)  # (d,)
    pad = (-dt.shape[1]) % chunk
    steps = torch.nn.functional.pad(dt.float() * rate, (0, 0, 0, pad)).unflatten(1, (-1, chunk))  # (b, c, L, d)
    return steps.sum(2).amax(dim=(0, 2)).tolist()


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
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    h = x.new_zeros(b, d, A.shape[-1]) if h0 is None else h0.float()
    chunk = MAX_CHUNK if x.device.type == "cpu" else MAX_CHUNK_GPU
    ranges = chunk_ranges(dt, A, chunk)
    inplace = not torch.is_grad_enabled()  # reuse buffers when no backward will need them
    u = dt * x  # (b, l, d)
    pad = (-length) % chunk
    S = torch.nn.functional.pad(dt, (0, 0, 0, pad)).unflatten(1, (-1, chunk)).cumsum(2)  # in-chunk: (b, c, L, d)
    if last is not None:
        # float64 for the running sums: S_T - S_c subtracts two large sums
        totals = S[:, :, -1].double()
        before = torch.cumsum(totals, dim=1) - totals  # S_c, dt summed before each chunk: (b, c, d)
        rows = torch.arange(b, device=x.device)
        s_last = before[rows, last // chunk] + S.flatten(1, 2)[rows, last].double()  # S_T: (b, d)
        c_last = C[rows, last]  # C_T: (b, n)
    S = S.flatten(1, 2)
    ys, scores = [], []
    for i, c0 in enumerate(range(0, length, chunk)):
        c1 = min(c0 + chunk, length)
        # float32 while the chunk's decay range allows, float64 (range exp(709)) where real text drives
        # a step's decay into the tens; past that, one step at a time, where the clamp below is exact
        work = torch.float32 if ranges[i] <= MAX_LOG_RANGE[torch.float32] else torch.float64
        step = chunk if ranges[i] <= MAX_LOG_RANGE[torch.float64] else 1
        limit = MAX_LOG_RANGE[work]
        Aw, h = A.to(work), h.to(work)
        for s0 in range(c0, c1, step):
            s1 = min(s0 + step, c1)
            G = (S if step > 1 else dt)[:, s0:s1].to(work).unsqueeze(-1) * Aw  # decay since s0
            decay = torch.exp(G.clamp_min(-limit))  # exp(G_t): (b, L, d, n)
            inputs = u[:, s0:s1].to(work).unsqueeze(-1) * B[:, s0:s1].to(work).unsqueeze(2)  # dt B x: (b, L, d, n)
            if last is not None:
                # dy_T(t) = sum_n C_T exp(A (S_T - S_ref)) * [exp(-G_t) dt B x], with S_ref = dt summed before s0;
                # a single step takes S_ref after itself and plain dt B x, so no clamped factor enters
                if step > 1:
                    ref, src = before[:, i] + (S[:, s0 - 1].double() if s0 > c0 else 0.0), None
                else:
                    ref, src = before[:, i] + S[:, s0].double(), inputs
            w = inputs.div_(decay) if inplace and last is None else inputs / decay  # exp(-G_s) dt_s B_s x_s
            if last is not None:
                reach = torch.exp(((s_last - ref).to(work).unsqueeze(-1) * Aw).clamp_max(0.0))  # (b, d, n)
                impact = torch.linalg.vecdot(w if src is None else src, (reach * c_last.to(work).unsqueeze(1)).unsqueeze(1))
                scores.append(impact.abs().amax(-1).float())  # (b, L)
            # h_t = exp(G_t) (h_0 + sum_{s<=t} exp(-G_s) dt_s B_s x_s)
            if inplace:
                w[:, 0] += h
                states = torch.cumsum(w, dim=1, out=w).mul_(decay)
            else:
                states = (torch.cumsum(w, dim=1) + h.unsqueeze(1)) * decay  # (b, L, d, n)
            ys.append(torch.matmul(states, C[:, s0:s1].to(work).unsqueeze(-1)).squeeze(-1).float())  # C_t . h_t
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
