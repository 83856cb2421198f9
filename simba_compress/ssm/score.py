"""Token scores computed from a Mamba-1 layer's own SSM inputs (reference PyTorch path).

Simba's global impact: unrolling the scan, the contribution of token t to the output at the last real
position T is

    dy_T(t)[d] = dt_t[d] x_t[d] * sum_n C_T[n] B_t[n] exp(A[d,n] (S_T[d] - S_t[d])),   S_t = sum_{k<=t} dt_k

and the score is s(t) = max_d |dy_T(t)[d]|. S_T - S_t is taken as a reverse cumsum (no cancellation of two
large sums), every exponent is <= 0, and tokens are processed in chunks so memory stays O(chunk * d * n).
The decay makes this max a recency ranking in practice: fast channels give recent tokens impacts that far
tokens reach in no channel. channel_share ranks each token within each channel instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

SCORE_CHUNK_ELEMENTS = 1 << 22  # (b * chunk * d * n) floats per chunk: 16 MiB in float32
SCORE_CHUNK_ELEMENTS_GPU = 1 << 26  # 256 MiB: fewer launches; a GPU has the memory


def _channel_impacts(x, dt, A, B, C, last) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(c0, c1, |dy_T(t)[d]| for t in [c0, c1)) chunk by chunk: (b, c1 - c0, d) float32, 0 after last[b]."""
    b, length, d = x.shape
    n = A.shape[-1]
    positions = torch.arange(length, device=x.device)
    upto = (positions[None, :] <= last[:, None]).unsqueeze(-1)  # (b, l, 1)
    dt = torch.where(upto, dt.float(), 0.0)
    after = torch.flip(torch.cumsum(torch.flip(dt, [1]), 1), [1]) - dt  # S_T - S_t: (b, l, d)
    c_last = C.float().gather(1, last.view(b, 1, 1).expand(b, 1, n))  # C_T: (b, 1, n)
    cb = B.float() * c_last  # C_T[n] B_t[n]: (b, l, n)
    u = (dt * x.float()).abs()  # |dt_t x_t|: (b, l, d), 0 after last
    A = A.float()
    budget = SCORE_CHUNK_ELEMENTS_GPU if x.is_cuda else SCORE_CHUNK_ELEMENTS
    chunk = max(1, budget // max(1, b * d * n))
    for c0 in range(0, length, chunk):
        c1 = min(c0 + chunk, length)
        decay = torch.exp(after[:, c0:c1].unsqueeze(-1) * A)  # (b, L, d, n)
        yield c0, c1, torch.einsum("bldn,bln->bld", decay, cb[:, c0:c1]).abs_().mul_(u[:, c0:c1])


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
    score = x.new_empty(x.shape[:2], dtype=torch.float32)
    for c0, c1, impact in _channel_impacts(x, dt, A, B, C, last):
        score[:, c0:c1] = impact.amax(dim=-1)
    return score


def channel_share(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, last: torch.Tensor):
    """The "share" criterion: s(t) = max_d |dy_T(t)[d]| / sum_t' |dy_T(t')[d]|, the largest share token t holds
    of any channel's total impact on position last[b]. A slow (long-memory) channel spreads its impact over
    the whole row, so a token it relies on scores by its content rather than its distance from T, where the
    plain max (global_impact) lets fast channels' recent tokens outrank it. Same inputs and output as
    global_impact; keeps one (b, l, d) float32 tensor, never a (b, l, d, n) one.
    """
    per_channel = torch.cat([impact for _, _, impact in _channel_impacts(x, dt, A, B, C, last)], dim=1)
    total = per_channel.sum(dim=1, keepdim=True)  # (b, 1, d)
    return per_channel.div_(total.clamp_min(torch.finfo(torch.float32).tiny)).amax(dim=-1)


def step_norm(dt: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """DeciMamba's token score: the L2 norm over channels (`dim`) of the step size dt = softplus(dt_raw + bias),
    (b, l) float32. A large step writes the token strongly into the state (and forgets what came before)."""
    return dt.float().norm(dim=dim)


def mamba1_score(criterion: str, x, dt, A, B, C, last) -> torch.Tensor:
    """The in-layer criterion `criterion` (pruning.IN_LAYER) of a Mamba-1 layer from its own SSM inputs, channel-last:
    x and dt (b, l, d), A (d, n), B and C (b, l, n) (views of channel-major tensors are fine). (b, l) float32."""
    if criterion == "simba":
        return global_impact(x, dt, A, B, C, last)
    if criterion == "share":
        return channel_share(x, dt, A, B, C, last)
    if criterion == "deci":
        return step_norm(dt)
    raise ValueError(f"{criterion!r} is not an in-layer criterion of a Mamba-1 layer")
