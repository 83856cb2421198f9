"""Simba's global-impact score, computed from a Mamba-1 layer's own recurrence (reference PyTorch path).

Unrolling the scan, the contribution of token t to the output at the last real position T is

    dy_T(t)[d] = dt_t[d] x_t[d] * sum_n C_T[n] B_t[n] exp(A[d,n] (S_T[d] - S_t[d])),   S_t = sum_{k<=t} dt_k

and the score is s(t) = max_d |dy_T(t)[d]|. S_T - S_t is taken as a reverse cumsum (no cancellation of two
large sums), every exponent is <= 0, and tokens are processed in chunks so memory stays O(chunk * d * n).
"""

from __future__ import annotations

import torch

SCORE_CHUNK_ELEMENTS = 1 << 22  # (b * chunk * d * n) floats per chunk: 16 MiB in float32


def global_impact(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    last: torch.Tensor,
) -> torch.Tensor:
    """Score every token of x (b, l, d) against the output at position last[b] (b,) of its row.

    dt (b, l, d), A (d, n), B and C (b, l, n) are the layer's own SSM inputs. Returns (b, l) float32;
    tokens after last[b] get 0 (the caller ranks them out).
    """
    b, length, d = x.shape
    n = A.shape[-1]
    positions = torch.arange(length, device=x.device)
    upto = (positions[None, :] <= last[:, None]).unsqueeze(-1)  # (b, l, 1)
    dt = torch.where(upto, dt.float(), 0.0)
    after = torch.flip(torch.cumsum(torch.flip(dt, [1]), 1), [1]) - dt  # S_T - S_t: (b, l, d)
    c_last = C.float().gather(1, last.view(b, 1, 1).expand(b, 1, n))  # C_T: (b, 1, n)
    cb = B.float() * c_last  # C_T[n] B_t[n]: (b, l, n)
    u = (dt * x.float()).abs()  # |dt_t x_t|: (b, l, d)
    A = A.float()
    score = x.new_empty(b, length, dtype=torch.float32)
    chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, b * d * n))
    for c0 in range(0, length, chunk):
        c1 = min(c0 + chunk, length)
        decay = torch.exp(after[:, c0:c1].unsqueeze(-1) * A)  # (b, L, d, n)
        impact = torch.einsum("bldn,bln->bld", decay, cb[:, c0:c1]).abs_().mul_(u[:, c0:c1])
        score[:, c0:c1] = impact.amax(dim=-1)
    return score.masked_fill_(~upto.squeeze(-1), 0.0)


def step_norm(dt: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """DeciMamba's token score: the L2 norm over channels (`dim`) of the step size dt = softplus(dt_raw + bias),
    (b, l) float32. A large step writes the token strongly into the state (and forgets what came before)."""
    return dt.float().norm(dim=dim)
