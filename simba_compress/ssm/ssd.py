"""Reference SSD scan (Mamba-2) and its global-impact score, in plain PyTorch.

Shapes: b batch, l tokens, h heads, p head dim, g groups (B and C are shared by h // g heads), n state.

    h_t[h] = exp(dt_t[h] A[h]) h_{t-1}[h] + dt_t[h] x_t[h] (x) B_t[g(h)]          (p x n per head)
    y_t[h] = h_t[h] C_t[g(h)]

A is a scalar per head, so within a chunk the decay between two tokens is exp(A_cs[t] - A_cs[s]) with
every exponent <= 0: the chunked form below (the "SSD minimal" algorithm) is stable without care.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .score import SCORE_CHUNK_ELEMENTS, SCORE_CHUNK_ELEMENTS_GPU, step_norm

SSD_CHUNK = 64


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor | None = None,
    chunk: int = SSD_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, l, h, p), dt (b, l, h) > 0, A (h,) < 0, B and C (b, l, g, n) -> y (b, l, h, p), final h (b, h, p, n)."""
    b, length, H, P = x.shape
    rep = H // B.shape[2]
    x, dt, A = x.float(), dt.float(), A.float()
    B = B.float().repeat_interleave(rep, dim=2)  # (b, l, h, n)
    C = C.float().repeat_interleave(rep, dim=2)
    pad = (-length) % chunk  # padded steps have dt = 0: no decay, no input, so the final state is unchanged
    x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    x, dt, B, C = (t.unflatten(1, (-1, chunk)) for t in (x, dt, B, C))  # (b, c, L, ...)
    a = torch.cumsum(dt * A, dim=2)  # (b, c, L, h): log decay from the chunk start, <= 0
    # within a chunk: y_t = sum_{s<=t} (C_t . B_s) exp(a_t - a_s) dt_s x_s
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    seg = (a.unsqueeze(3) - a.unsqueeze(2)).masked_fill(~causal[:, :, None], float("-inf"))  # (b, c, t, s, h)
    weights = torch.einsum("bcthn,bcshn->bctsh", C, B) * torch.exp(seg) * dt.unsqueeze(2)
    y = torch.einsum("bctsh,bcshp->bcthp", weights, x)
    # each chunk's own contribution to the state at its end, then the states carried across chunks
    local = torch.einsum("bcsh,bcshp,bcshn->bchpn", torch.exp(a[:, :, -1:] - a) * dt, x, B)
    # across chunks, the same closed form one level up (no loop over chunks): the state entering chunk c is
    # sum_{j<c} exp(T_c - T_{j+1}) local_j + exp(T_c) h0, T_c the log decay of all chunks before c. T in float64:
    # the differences of two long sums keep their precision; every exponent is <= 0.
    T = F.pad(torch.cumsum(a[:, :, -1].double(), dim=1), (0, 0, 1, 0))  # (b, c + 1, h): T_0 = 0 ... T_C
    n_chunks = a.shape[1]
    before = torch.ones(n_chunks + 1, n_chunks, dtype=torch.bool, device=x.device).tril(-1)  # j < c
    gap = (T.unsqueeze(2) - T[:, 1:].unsqueeze(1)).masked_fill(~before[None, :, :, None], float("-inf"))
    carried = torch.einsum("bcjh,bjhpn->bchpn", torch.exp(gap).float(), local)  # (b, c + 1, h, p, n)
    if h0 is not None:
        carried = carried + torch.exp(T).float()[:, :, :, None, None] * h0.float().unsqueeze(1)
    y = y + torch.einsum("bcthn,bchpn->bcthp", C * torch.exp(a).unsqueeze(-1), carried[:, :-1])
    return y.flatten(1, 2)[:, :length], carried[:, -1]


def ssd_step(h, x, dt, A, B, C):
    """One decoding step: h (b, h, p, n), x (b, h, p), dt (b, h), B and C (b, g, n). Returns y (b, h, p), h."""
    rep = x.shape[1] // B.shape[1]
    B, C = B.float().repeat_interleave(rep, dim=1), C.float().repeat_interleave(rep, dim=1)
    dt = dt.float()
    h = torch.exp(dt * A.float())[:, :, None, None] * h + (dt[:, :, None] * x.float()).unsqueeze(-1) * B.unsqueeze(2)
    return torch.einsum("bhpn,bhn->bhp", h, C), h


def _token_head_factors(x, dt, A, B, C, last) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(c0, c1, f) token chunk by token chunk: f (b, c1 - c0, h) float32 = |dt_t[h] (C_T[g] . B_t[g]) exp(A[h] (S_T[h] -
    S_t[h]))|, 0 after last[b]. Token t's impact on channel (h, p) is f[t, h] |x_t[h, p]|: the factor is one number
    per token and head, so no (b, l, h, p) float32 tensor is needed (chunks bound what a caller builds from it)."""
    b, length, H, P = x.shape
    rep = H // B.shape[2]
    upto = torch.arange(length, device=x.device)[None, :] <= last[:, None]  # (b, l)
    dt = torch.where(upto.unsqueeze(-1), dt.float(), 0.0)
    after = torch.flip(torch.cumsum(torch.flip(dt, [1]), 1), [1]) - dt  # S_T - S_t: (b, l, h), no cancellation
    decay = torch.exp(after * A.float()).mul_(dt)
    c_last = C[torch.arange(b, device=x.device), last].float()  # (b, g, n)
    budget = SCORE_CHUNK_ELEMENTS_GPU if x.is_cuda else SCORE_CHUNK_ELEMENTS
    chunk = max(1, budget // max(1, b * H * P))
    for c0 in range(0, length, chunk):
        c1 = min(c0 + chunk, length)
        cb = torch.einsum("blgn,bgn->blg", B[:, c0:c1].float(), c_last).repeat_interleave(rep, dim=2)  # (b, L, h)
        yield c0, c1, cb.mul_(decay[:, c0:c1]).abs_()


def ssd_impact(x, dt, A, B, C, last) -> torch.Tensor:
    """Global impact of every token on row position last[b], for Mamba-2 (b, l), 0 after last[b]:

        dy_T(t)[h, p] = dt_t[h] x_t[h, p] (C_T[g] . B_t[g]) exp(A[h] (S_T[h] - S_t[h])),   s(t) = max_{h,p} |.|

    A per head makes it cheap: s(t) = max_h f[t, h] max_p |x_t[h, p]| (_token_head_factors), O(l h p) reads of x in
    its own dtype, one (b, l, h) float32 tensor.
    """
    xmax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1)  # max_p |x|: (b, l, h), one pass, no |x| copy
    score = x.new_empty(x.shape[:2], dtype=torch.float32)
    for c0, c1, f in _token_head_factors(x, dt, A, B, C, last):
        score[:, c0:c1] = f.mul_(xmax[:, c0:c1]).amax(-1)
    return score


def ssd_share(x, dt, A, B, C, last) -> torch.Tensor:
    """The "share" criterion for Mamba-2 (score.channel_share): each (head, head dim) channel's impacts as
    shares of its total over the row, max over channels. (b, l) float32, 0 after last[b]. Two passes over x in
    token chunks (the channel totals, then the shares): float32 of one chunk at a time."""
    b, length, H, P = x.shape
    total = x.new_zeros(b, H, P, dtype=torch.float32)
    for c0, c1, f in _token_head_factors(x, dt, A, B, C, last):
        total += torch.einsum("blh,blhp->bhp", f, x[:, c0:c1].abs().float())
    total.clamp_min_(torch.finfo(torch.float32).tiny)
    score = x.new_empty(b, length, dtype=torch.float32)
    for c0, c1, f in _token_head_factors(x, dt, A, B, C, last):
        per_channel = x[:, c0:c1].abs().float().mul_(f.unsqueeze(-1))  # (b, L, h, p): this chunk's impacts
        score[:, c0:c1] = per_channel.div_(total.unsqueeze(1)).flatten(2).amax(-1)
    return score


def ssd_score(criterion: str, x, dt, A, B, C, last) -> torch.Tensor:
    """The in-layer criterion `criterion` (pruning.IN_LAYER) of a Mamba-2 layer from its own SSM inputs: x (b, l, h, p),
    dt (b, l, h), A (h,), B and C (b, l, g, n). (b, l) float32."""
    if criterion == "simba":
        return ssd_impact(x, dt, A, B, C, last)
    if criterion == "share":
        return ssd_share(x, dt, A, B, C, last)
    if criterion == "deci":
        return step_norm(dt)  # over heads
    raise ValueError(f"{criterion!r} is not an in-layer criterion of a Mamba-2 layer")
