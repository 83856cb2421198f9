"""Triton kernels for the GPU path: the Mamba-1 selective scan (the GPU path without mamba_ssm), Simba's
global-impact score and the freeze/gather of kept tokens.

Imported only through backends.triton_kernels(), and only when triton imports (CI has no triton; the CPU path never
imports this module). With TRITON_INTERPRET=1 set before the import, the kernels run on CPU tensors through
Triton's interpreter, which is how tests check them on a machine without a GPU.

Score (ssm/score.py is the reference): for token t of row b, against the row's last real position T,
    s(t) = max_d |dt_t[d] x_t[d]| * |sum_n C_T[n] B_t[n] exp(A[d,n] (S_T[d] - S_t[d]))|,  S_t = sum_{k<=t} dt_k
with dt = softplus(dt_raw + dt_bias) taken inside the kernel (no float32 (b, l, d) dt in memory) and S_T - S_t
a suffix sum (no cancellation of two large prefix sums). Two launches over a (d-block, time segment, batch)
grid: the first sums dt over each segment; a tiny torch op turns those sums into each segment's suffix sum;
the second walks its segment backwards in time blocks, carrying the suffix sum of every channel of its block,
and writes the max over its channels of every token's contribution; a last amax over channel blocks gives
s(t). Nothing of size (b, l, d, n) exists: the sum over n is a loop of d_state exp2 per (t, d) in registers,
the same exp count as one pass of the scan itself, which is the floor for this score.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
BLOCK_T = 32  # time steps per tile
BLOCK_D = 64  # channels per tile: 32 x 64 fp32 accumulators = 16 registers a thread with 4 warps
PROGRAMS_PER_SM = 4  # enough programs in flight to hide memory latency; more segments only add passes


@triton.jit
def _softplus(v):
    # as mamba_ssm's selective scan: identity above 20; log(1 + e^v) ~ e^v far below 0 (no log1p in tl)
    return tl.where(v > 20.0, v, tl.where(v < -15.0, tl.exp(v), tl.log(1.0 + tl.exp(tl.minimum(v, 20.0)))))


@triton.jit
def _segment_dt_sums(
    dt_ptr, bias_ptr, last_ptr, out_ptr,
    L, D, n_seg, SEG, s_b, s_d, s_l,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, seg, d] = sum of softplus(dt_raw + bias) over the segment's steps t <= last[b]."""
    pid_d, seg, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    last = tl.load(last_ptr + b)
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    base = dt_ptr + b.to(tl.int64) * s_b
    for i in range(SEG // BLOCK_T):
        t = seg * SEG + i * BLOCK_T + tl.arange(0, BLOCK_T)
        m = (t[:, None] <= last) & dmask[None, :]
        v = tl.load(base + t[:, None] * s_l + d[None, :] * s_d, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(tl.where(m, _softplus(v + bias[None, :]), 0.0), axis=0)
    tl.store(out_ptr + (b * n_seg + seg) * D + d, acc, mask=dmask)


@triton.jit
def _impact_partial(
    x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, last_ptr, carry_ptr, out_ptr,
    L, D, n_seg, n_dblk, SEG,
    sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sA_d, sA_n,
    N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, d-block, t] = max over the block's channels of |dy_T(t)[d]| for the segment's tokens."""
    pid_d, seg, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    last = tl.load(last_ptr + b)
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    carry = tl.load(carry_ptr + (b * n_seg + seg) * D + d, mask=dmask, other=0.0)  # sum of dt after the segment
    b64 = b.to(tl.int64)
    x_base, dt_base = x_ptr + b64 * sx_b, dt_ptr + b64 * sdt_b
    B_base, C_base = B_ptr + b64 * sB_b, C_ptr + b64 * sC_b
    for i in range(SEG // BLOCK_T):  # backwards in time: the suffix sum grows block by block
        t = seg * SEG + SEG - (i + 1) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t <= last
        m = tmask[:, None] & dmask[None, :]
        v = tl.load(dt_base + t[:, None] * sdt_l + d[None, :] * sdt_d, mask=m, other=0.0).to(tl.float32)
        dt = tl.where(m, _softplus(v + bias[None, :]), 0.0)
        after = carry[None, :] + (tl.cumsum(dt, axis=0, reverse=True) - dt)  # S_T - S_t >= 0
        carry += tl.sum(dt, axis=0)
        x = tl.load(x_base + t[:, None] * sx_l + d[None, :] * sx_d, mask=m, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for n in tl.static_range(N):
            a = tl.load(A_ptr + d * sA_d + n * sA_n, mask=dmask, other=0.0) * 1.4426950408889634  # A log2(e)
            c_last = tl.load(C_base + n * sC_n + last * sC_l).to(tl.float32)
            bt = tl.load(B_base + n * sB_n + t * sB_l, mask=tmask, other=0.0).to(tl.float32)
            acc += (bt * c_last)[:, None] * tl.exp2(after * a[None, :])
        s = tl.max(tl.abs(acc) * tl.abs(dt * x), axis=1)  # 0 for t > last: dt is 0 there
        tl.store(out_ptr + (b64 * n_dblk + pid_d) * L + t, s, mask=t < L)


def _programs_wanted(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter on CPU: a few segments, so the suffix-sum carry between them is exercised


def global_impact(
    x: torch.Tensor,
    dt_raw: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    last: torch.Tensor,
) -> torch.Tensor:
    """Score every token against row position last[b]; (b, l) float32, 0 after last[b].

    x and dt_raw (b, d, l) and B, C (b, n, l) in any strides (the GPU path passes the channel-major views it
    already has), dt_bias (d,), A (d, n) float32. dt = softplus(dt_raw + dt_bias) is taken in float32 here.
    """
    b, d, length = x.shape
    n = A.shape[-1]
    last = last.to(torch.int32).contiguous()
    bias = dt_bias.float().contiguous()
    A = A.float()
    n_dblk = triton.cdiv(d, BLOCK_D)
    n_tblk = triton.cdiv(length, BLOCK_T)
    n_seg = min(n_tblk, max(1, triton.cdiv(_programs_wanted(x.device), b * n_dblk)))
    seg = triton.cdiv(n_tblk, n_seg) * BLOCK_T
    n_seg = triton.cdiv(length, seg)
    grid = (n_dblk, n_seg, b)
    sums = torch.empty(b, n_seg, d, device=x.device, dtype=torch.float32)
    _segment_dt_sums[grid](
        dt_raw, bias, last, sums, length, d, n_seg, seg, *dt_raw.stride(), BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D
    )  # SEG is a run-time argument: every layer's width differs, and a constexpr would compile each one
    # each segment's carry: the sum of dt over the segments after it (float64: b * n_seg * d numbers, cheap)
    sums = sums.double()
    carry = (sums.flip(1).cumsum(1).flip(1) - sums).float().contiguous()
    partial = torch.empty(b, n_dblk, length, device=x.device, dtype=torch.float32)
    _impact_partial[grid](
        x, dt_raw, bias, A, B, C, last, carry, partial,
        length, d, n_seg, n_dblk, seg,
        *x.stride(), *dt_raw.stride(), *B.stride(), *C.stride(), *A.stride(),
        N=n, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return partial.amax(dim=1)


@triton.jit
def _freeze_gather(
    h_ptr, dest_ptr, freeze_ptr, frozen_ptr, out_ptr,
    W, DM, s_hb, s_hw, s_fb, s_fl, s_ob, s_ow,
    BLOCK: tl.constexpr,
):
    """Row (b, slot) of h goes to out[b, dest] if dest >= 0 and to frozen[b, freeze] if freeze >= 0."""
    slot, b = tl.program_id(0), tl.program_id(1)
    b64 = b.to(tl.int64)
    dest = tl.load(dest_ptr + b64 * W + slot).to(tl.int64)
    pos = tl.load(freeze_ptr + b64 * W + slot).to(tl.int64)
    src = h_ptr + b64 * s_hb + slot * s_hw
    for c0 in range(0, DM, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < DM
        row = tl.load(src + c, mask=m)
        if dest >= 0:
            tl.store(out_ptr + b64 * s_ob + dest * s_ow + c, row, mask=m)
        if pos >= 0:
            tl.store(frozen_ptr + b64 * s_fb + pos * s_fl + c, row, mask=m)


def freeze_and_gather(
    h: torch.Tensor, idx: torch.Tensor, kept: torch.Tensor, stays: torch.Tensor, frozen: torch.Tensor
) -> torch.Tensor:
    """One pass over h (b, w, dm): the rows of `kept` (b, w') go to the next layer's stream, and the rows whose
    token leaves the stream go to frozen (b, l + 1, dm) at their position idx (b, w). A token stays when its
    slot is kept and real in the next layer (stays (b, w')); kept fill slots of a shorter row are frozen too.
    Each row is read once and written once or twice (a dropped token of a fill slot)."""
    b, w, dm = h.shape
    h = h.contiguous()
    width = kept.shape[1]
    slots = torch.arange(width, device=h.device, dtype=torch.int32).expand(b, width)
    dest = torch.full((b, w), -1, device=h.device, dtype=torch.int32).scatter_(1, kept, slots)
    stays_slot = torch.zeros(b, w, device=h.device, dtype=torch.bool).scatter_(1, kept, stays)
    freeze = torch.where(stays_slot, -1, idx).to(torch.int32)
    out = h.new_empty(b, width, dm)
    block = min(triton.next_power_of_2(dm), 4096)
    _freeze_gather[(w, b)](
        h, dest, freeze, frozen, out, w, dm, h.stride(0), h.stride(1), frozen.stride(0), frozen.stride(1),
        out.stride(0), out.stride(1), BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )
    return out


# Selective scan (forward), channel-major as mamba_ssm's selective_scan_fn, whose contract it follows:
#     h_t[d,n] = exp(dt_t[d] A[d,n]) h_{t-1}[d,n] + dt_t[d] B_t[n] u_t[d],   y_t[d] = C_t . h_t[d] + D[d] u_t[d]
# times silu(z_t[d]) when z is given, dt = softplus(delta + delta_bias). One program owns BLOCK_D channels of one
# row and keeps their (BLOCK_D, n) state in registers; it walks the row in tiles of BLOCK_T steps, and inside a
# tile the recurrence is a parallel prefix (tl.associative_scan) over pairs (decay, input): every factor is a
# product of decays <= 1, so nothing can overflow (unlike the closed form of ssm/scan.py, which divides by them).


@triton.jit
def _linear_recurrence(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, b1 * a2 + b2


def _scan_configs():
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter: one small tile, no tuning runs
        return [triton.Config({"BLOCK_D": 8, "BLOCK_T": 16}, num_warps=4)]
    # few channels a program won on the H200 (more programs in flight, fewer registers each): 4 x 64 x 4 warps
    # beat 8-32 channels; the list keeps neighbours of the winner so other GPUs and shapes can pick their own
    return [
        triton.Config({"BLOCK_D": bd, "BLOCK_T": bt}, num_warps=w, num_stages=s)
        for bd, bt, w, s in (
            (4, 64, 4, 3), (4, 64, 2, 3), (4, 128, 4, 2), (2, 64, 2, 3), (2, 128, 4, 2), (4, 32, 2, 3),
            (8, 32, 4, 2), (8, 64, 8, 2), (16, 16, 4, 2),
        )
    ]  # fmt: skip


@triton.autotune(configs=_scan_configs(), key=["D", "N_PAD"])  # not the length: every pruned layer differs
@triton.jit
def _selective_scan_fwd(
    u_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, h_ptr,
    L, D, N,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sA_d, sA_n, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
    sz_b, sz_d, sz_l, sy_b, sy_d, sy_l,
    N_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_d, b = tl.program_id(0), tl.program_id(1)
    b64 = b.to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, N_PAD)
    dmask, nmask = d < D, n < N
    A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=dmask[:, None] & nmask[None, :], other=0.0)
    A = A.to(tl.float32) * 1.4426950408889634  # exp(x) = exp2(x log2 e)
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros((BLOCK_D,), tl.float32)
    Dd = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32) if HAS_D else tl.zeros((BLOCK_D,), tl.float32)
    h = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    last_step = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[None, None, :]
    u_base, dt_base, y_base = u_ptr + b64 * su_b, dt_ptr + b64 * sdt_b, y_ptr + b64 * sy_b
    B_base, C_base, z_base = B_ptr + b64 * sB_b, C_ptr + b64 * sC_b, z_ptr + b64 * sz_b
    for t0 in range(0, L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < L
        m = dmask[:, None] & tmask[None, :]
        u = tl.load(u_base + d[:, None] * su_d + t[None, :] * su_l, mask=m, other=0.0).to(tl.float32)
        dt = tl.load(dt_base + d[:, None] * sdt_d + t[None, :] * sdt_l, mask=m, other=0.0).to(tl.float32)
        dt = dt + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(m, dt, 0.0)  # steps past the end: decay 1, input 0, so the state passes through
        nt = nmask[:, None] & tmask[None, :]
        Bt = tl.load(B_base + n[:, None] * sB_n + t[None, :] * sB_l, mask=nt, other=0.0).to(tl.float32)
        Ct = tl.load(C_base + n[:, None] * sC_n + t[None, :] * sC_l, mask=nt, other=0.0).to(tl.float32)
        decay = tl.exp2(dt[:, None, :] * A[:, :, None])  # (BLOCK_D, N_PAD, BLOCK_T)
        inp = (dt * u)[:, None, :] * Bt[None, :, :]
        decay, states = tl.associative_scan((decay, inp), axis=2, combine_fn=_linear_recurrence)
        states += decay * h[:, :, None]  # the state entering the tile, carried through the tile's decays
        y = tl.sum(states * Ct[None, :, :], axis=1) + Dd[:, None] * u  # (BLOCK_D, BLOCK_T)
        if HAS_Z:
            zt = tl.load(z_base + d[:, None] * sz_d + t[None, :] * sz_l, mask=m, other=0.0).to(tl.float32)
            y = y * zt * tl.sigmoid(zt)
        tl.store(y_base + d[:, None] * sy_d + t[None, :] * sy_l, y.to(y_ptr.dtype.element_ty), mask=m)
        h = tl.sum(tl.where(last_step, states, 0.0), axis=2)
    hmask = dmask[:, None] & nmask[None, :]
    tl.store(h_ptr + (b64 * D + d[:, None]) * N + n[None, :], h, mask=hmask)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """mamba_ssm's selective_scan_fn, forward only: u, delta, z (b, d, l), A (d, n), B and C (b, n, l), each in
    any strides (the GPU path passes views), D and delta_bias (d,). Returns y (b, d, l) in u's dtype and, with
    return_last_state, the final state (b, d, n) float32. No backward: callers under autograd use mamba_ssm or
    the reference scan."""
    b, d, length = u.shape
    n = A.shape[-1]
    y = torch.empty(b, d, length, device=u.device, dtype=u.dtype)
    h = torch.empty(b, d, n, device=u.device, dtype=torch.float32)
    dummy = y  # stands for absent optional operands; never read (the flags are constexpr)
    zs = z.stride() if z is not None else (0, 0, 0)
    _selective_scan_fwd[lambda meta: (triton.cdiv(d, meta["BLOCK_D"]), b)](
        u, delta, dummy if delta_bias is None else delta_bias, A, B, C, dummy if D is None else D,
        dummy if z is None else z, y, h,
        length, d, n,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zs, *y.stride(),
        N_PAD=triton.next_power_of_2(n), HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_D=D is not None, HAS_Z=z is not None,
    )  # fmt: skip
    return (y, h) if return_last_state else y


# RMS norm of the residual stream, as model.RMSNorm: (x * rsqrt(mean(x^2) + eps)) in float32, rounded to the
# weight's dtype, times the weight. One program per row; optionally adds the mixer's output to the stream first
# and writes the sum back (the decode step's residual add), so the stream is read once and written once.


@triton.jit
def _rms_norm(
    x_ptr, add_ptr, w_ptr, out_ptr, DM, s_x, s_add, s_out, eps,
    HAS_ADD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < DM
    x = tl.load(x_ptr + row * s_x + c, mask=m, other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(add_ptr + row * s_add + c, mask=m, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * s_x + c, x.to(x_ptr.dtype.element_ty), mask=m)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / DM + eps)
    w = tl.load(w_ptr + c, mask=m, other=0.0)
    y = (x * rstd).to(w_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * s_out + c, y.to(out_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None) -> torch.Tensor:
    """RMS norm of x (..., dm) in the weight's dtype. With `add` (x's shape): x += add first, in place (x is the
    residual stream, contiguous), and the norm is of the sum."""
    dm = x.shape[-1]
    assert add is None or x.is_contiguous()  # the in-place add must reach x itself
    rows = x.reshape(-1, dm)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty(rows.shape, device=x.device, dtype=weight.dtype)
    addr = rows if add is None else add.reshape(-1, dm).contiguous()
    block = triton.next_power_of_2(dm)
    _rms_norm[(rows.shape[0],)](
        rows, addr, weight, out, dm, rows.stride(0), addr.stride(0), out.stride(0), eps,
        HAS_ADD=add is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return out.view(x.shape)


# Decode step kernels (one new token per row). A Mamba-1 step is in_proj -> conv -> x_proj -> dt_proj -> SSM
# update -> out_proj: six GEMV-sized launches, bound by launch latency rather than bytes at batch 1. Two kernels
# here take the middle four:
#   conv_xproj_step: x = silu(causal conv of (conv state, x_t) + bias), the state shifted in place; and this
#     block of channels' share of x_proj's product, written as partial sums (b, channel blocks, r + 2n)
#   ssm_step: sums the partials into x_dbl = (dt_low, B, C), rounded to the model's dtype as x_proj's output
#     would be; dt = softplus(W_dt dt_low + bias); h = exp(dt A) h + dt B x (in place, float32);
#     y = (C . h + D x) * silu(z)
# Deterministic: no atomics, the partials are summed in a fixed order.

CONV_BLOCK_D = 64  # channels a conv_xproj_step program owns (and x_proj partial sums it writes)
SSM_BLOCK_D = 32  # channels an ssm_step program owns: b * d / 32 programs fill the GPU at batch 1


@triton.jit
def _conv_xproj_step(
    x_ptr, state_ptr, w_ptr, b_ptr, wx_ptr, xout_ptr, part_ptr, D, E, n_dblk, s_xb, s_sb, s_sd,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    d = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    m = d < D
    x = tl.load(x_ptr + b * s_xb + d, mask=m, other=0.0)
    acc = tl.load(w_ptr + d * K + (K - 1), mask=m, other=0.0).to(tl.float32) * x.to(tl.float32)
    state = state_ptr + b * s_sb + d * s_sd
    prev = tl.load(state, mask=m, other=0.0)
    for k in tl.static_range(K - 1):  # state[k] (oldest first) meets w[k], then moves to state[k - 1]
        acc += tl.load(w_ptr + d * K + k, mask=m, other=0.0).to(tl.float32) * prev.to(tl.float32)
        if k + 1 < K - 1:
            nxt = tl.load(state + (k + 1), mask=m, other=0.0)
            tl.store(state + k, nxt, mask=m)
            prev = nxt
    tl.store(state + (K - 2), x.to(state_ptr.dtype.element_ty), mask=m)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=m, other=0.0).to(tl.float32)
    xo = (acc * tl.sigmoid(acc)).to(xout_ptr.dtype.element_ty)
    tl.store(xout_ptr + b * D + d, xo, mask=m)
    xf = tl.where(m, xo.to(tl.float32), 0.0)
    part = part_ptr + (b * n_dblk + pid) * E
    for e0 in range(0, E, BLOCK_E):  # x_proj's rows, this block's columns
        e = e0 + tl.arange(0, BLOCK_E)
        em = e < E
        w = tl.load(wx_ptr + e[:, None] * D + d[None, :], mask=em[:, None] & m[None, :], other=0.0).to(tl.float32)
        tl.store(part + e, tl.sum(w * xf[None, :], axis=1), mask=em)


def conv_xproj_step(x, conv_state, conv_w, conv_b, x_proj_w) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, d) (unit stride along d), conv_state (b, d, k - 1) updated in place, conv_w (d, k), x_proj_w (r + 2n,
    d) -> (silu(conv) (b, d) in x's dtype, x_proj partial sums (b, d / CONV_BLOCK_D, r + 2n) float32)."""
    b, d = x.shape
    k, e = conv_w.shape[-1], x_proj_w.shape[0]
    assert x.stride(1) == 1 and conv_state.stride(2) == 1 and conv_w.is_contiguous() and x_proj_w.is_contiguous()
    n_dblk = triton.cdiv(d, CONV_BLOCK_D)
    xout = torch.empty(b, d, device=x.device, dtype=x.dtype)
    parts = torch.empty(b, n_dblk, e, device=x.device, dtype=torch.float32)
    _conv_xproj_step[(n_dblk, b)](
        x, conv_state, conv_w, conv_w if conv_b is None else conv_b, x_proj_w, xout, parts, d, e, n_dblk,
        x.stride(0), conv_state.stride(0), conv_state.stride(1),
        K=k, HAS_BIAS=conv_b is not None, BLOCK_D=CONV_BLOCK_D, BLOCK_E=32,
    )  # fmt: skip
    return xout, parts


@triton.jit
def _ssm_step(
    h_ptr, x_ptr, part_ptr, wdt_ptr, bias_ptr, A_ptr, D_ptr, z_ptr, y_ptr,
    D, N, R, E, n_dblk, s_hb, s_zb,
    N_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    d = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, N_PAD)
    dm, nm = d < D, n < N
    m2 = dm[:, None] & nm[None, :]
    part = part_ptr + b * n_dblk * E
    dt = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):  # dt_raw = W_dt @ dt_low, dt_low = x_proj's first R outputs
        r = r0 + tl.arange(0, BLOCK_R)
        rm = r < R
        low = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for j in range(n_dblk):
            low += tl.load(part + j * E + r, mask=rm, other=0.0)
        low = low.to(x_ptr.dtype.element_ty).to(tl.float32)  # x_proj's output is in the model's dtype
        w = tl.load(wdt_ptr + d[:, None] * R + r[None, :], mask=dm[:, None] & rm[None, :], other=0.0).to(tl.float32)
        dt += tl.sum(w * low[None, :], axis=1)
    dt = dt.to(x_ptr.dtype.element_ty).to(tl.float32)  # as dt_proj's output
    Bt = tl.zeros((N_PAD,), dtype=tl.float32)
    Ct = tl.zeros((N_PAD,), dtype=tl.float32)
    for j in range(n_dblk):
        Bt += tl.load(part + j * E + R + n, mask=nm, other=0.0)
        Ct += tl.load(part + j * E + R + N + n, mask=nm, other=0.0)
    Bt = Bt.to(x_ptr.dtype.element_ty).to(tl.float32)
    Ct = Ct.to(x_ptr.dtype.element_ty).to(tl.float32)
    x = tl.load(x_ptr + b * D + d, mask=dm, other=0.0).to(tl.float32)
    dt = _softplus(dt + tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32))
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=m2, other=0.0)
    hp = h_ptr + b * s_hb + d[:, None] * N + n[None, :]
    h = tl.load(hp, mask=m2, other=0.0)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bt[None, :]
    tl.store(hp, h, mask=m2)
    y = tl.sum(h * Ct[None, :], axis=1) + tl.load(D_ptr + d, mask=dm, other=0.0).to(tl.float32) * x
    z = tl.load(z_ptr + b * s_zb + d, mask=dm, other=0.0).to(tl.float32)
    y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + b * D + d, y.to(y_ptr.dtype.element_ty), mask=dm)


def ssm_step(h, x, parts, dt_weight, dt_bias, A, D, z) -> torch.Tensor:
    """One selective-scan step: h (b, d, n) float32 contiguous, updated in place; x (b, d) contiguous (from
    conv_xproj_step), parts its x_proj partial sums (b, blocks, r + 2n), dt_weight (d, r), dt_bias and D (d,),
    A (d, n) float32 contiguous, z (b, d) with unit stride along d. Returns y (b, d) in x's dtype."""
    b, d, n = h.shape
    r = dt_weight.shape[1]
    assert h.is_contiguous() and A.is_contiguous() and h.dtype == A.dtype == torch.float32 and x.is_contiguous()
    assert parts.is_contiguous() and parts.shape[-1] == r + 2 * n and dt_weight.is_contiguous() and z.stride(1) == 1
    y = torch.empty(b, d, device=x.device, dtype=x.dtype)
    _ssm_step[(triton.cdiv(d, SSM_BLOCK_D), b)](
        h, x, parts, dt_weight, dt_bias, A, D, z, y, d, n, r, r + 2 * n, parts.shape[1], h.stride(0), z.stride(0),
        N_PAD=triton.next_power_of_2(n), BLOCK_R=32, BLOCK_D=SSM_BLOCK_D,
    )  # fmt: skip
    return y
