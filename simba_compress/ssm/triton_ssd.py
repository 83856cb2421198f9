"""Triton kernels for Mamba-2 (SSD) without mamba_ssm: the chunked prefill scan, the gated RMS norm, and the
fused decode step. ssm/ssd.py is their reference; mamba2.py chooses between these, mamba_ssm's, and it.

Imported only through backends.triton_kernels() (with ssm/triton_kernels.py), so only where triton imports. With
TRITON_INTERPRET=1 set before the import they run on CPU tensors through Triton's interpreter (the tests).

Shapes: b batch, l tokens, h heads of p channels, g groups (B and C shared by h / g heads), n d_state.

Prefill (ssd_scan): the chunked SSD algorithm of mamba_ssm's mamba_chunk_scan_combined, in three launches instead
of its five (the step sizes' cumsum is fused into the first, C B^T into the last):
  1. _chunk_state: per (chunk, head): dt = softplus(dt_raw + bias), the log decay a_s = cumsum(dt A) within the
     chunk (written out, with dt, for launch 3), and the chunk's own end state  sum_s exp(a_end - a_s) dt_s x_s B_s^T
     (a (p, L) @ (L, n) product on tensor cores);
  2. _state_passing: per head, sequentially over chunks: the state entering each chunk (written over the chunk's
     own state) and the final state;
  3. _chunk_scan: per (chunk, 64-token block, head): y_t = exp(a_t) C_t h_in + sum_{s<=t} (C_t . B_s) exp(a_t - a_s)
     dt_s x_s + D x_t, two products on tensor cores. Every exponent is <= 0.
Chunks of 256 tokens (mamba_ssm's): the states between chunks are b * l / 256 * h * p * n float32, the largest
buffer here (as in mamba_ssm). Float32 operands are multiplied in IEEE float32 (Triton's default there is TF32,
whose 10-bit mantissa would put a float32 model 1e-3 from its reference); bf16 ones on bf16 tensor cores with
float32 accumulation, as mamba_ssm.

Decode step (ssd_step): in_proj -> [conv + SSM update + D skip] -> [gated norm] -> out_proj, the bracketed parts
as two launches (mamba_ssm's step takes three: causal_conv1d_update, selective_state_update, its gated norm):
  _step_heads: per (row, head, block of the head's channels): the conv update of its x channels (their state
     shifted in place), the conv of its group's B and C (from their state, not shifted: every head of the group
     reads it), dt, h = exp(dt A) h + dt x B^T (in place, float32), y = h C + D x;
  _step_norm: per (row, group): y silu(z), RMS-normalised over the group, times the weight; and the shift of the
     group's B and C conv state, which must wait until every head has read it (the previous launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernels import _softplus

CHUNK = 256  # tokens per chunk of the prefill scan (mamba_ssm's chunk_size for every Mamba-2 checkpoint)
BLOCK_M = 64  # tokens of a chunk-scan program (its output rows)
BLOCK_K = 64  # tokens per inner step (the reduction dim of the products)


@triton.jit
def _chunk_state(
    x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, states_ptr, acs_ptr, dts_ptr, decay_ptr,
    L, H, P, N, n_chunks, heads_per_group,
    sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sB_b, sB_l, sB_g, sB_n,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """states[b, c, h] = sum_s exp(a_end - a_s) dt_s x_s B_s^T over chunk c; acs, dts: a_s and dt_s of every token
    (b, h, chunks * CHUNK); decay[b, h, c] = a_end."""
    pid_pn, pid_bc, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, c = pid_bc // n_chunks, pid_bc % n_chunks
    n_pblk = tl.cdiv(P, BLOCK_P)
    p = (pid_pn % n_pblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (pid_pn // n_pblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask, nmask = p < P, n < N
    g = h // heads_per_group
    b64 = b.to(tl.int64)
    A = tl.load(A_ptr + h).to(tl.float32)
    bias = tl.load(bias_ptr + h).to(tl.float32)
    dt_base = dt_ptr + b64 * sdt_b + h * sdt_h
    x_base = x_ptr + b64 * sx_b + h * sx_h
    B_base = B_ptr + b64 * sB_b + g * sB_g
    row = (b64 * H + h) * (n_chunks * CHUNK)
    # the chunk's total log decay first, so that every weight below is exp(a_end - a_s) <= 1
    a_end = 0.0
    for k0 in range(0, CHUNK, BLOCK_K):
        s = c * CHUNK + k0 + tl.arange(0, BLOCK_K)
        v = tl.load(dt_base + s * sdt_l, mask=s < L, other=0.0).to(tl.float32)
        da = tl.where(s < L, _softplus(v + bias), 0.0) * A  # past the row: dt = 0, no decay and no input
        a_end += tl.sum(da, axis=0)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    a_run = 0.0
    for k0 in range(0, CHUNK, BLOCK_K):
        s = c * CHUNK + k0 + tl.arange(0, BLOCK_K)
        smask = s < L
        v = tl.load(dt_base + s * sdt_l, mask=smask, other=0.0).to(tl.float32)
        dt = tl.where(smask, _softplus(v + bias), 0.0)
        a = a_run + tl.cumsum(dt * A, axis=0)
        a_run += tl.sum(dt * A, axis=0)
        if pid_pn == 0:  # one program of the (chunk, head) writes its dt and log decays
            tl.store(acs_ptr + row + s, a)
            tl.store(dts_ptr + row + s, dt)
        w = tl.exp(tl.minimum(a_end - a, 0.0)) * dt  # (BLOCK_K,)
        xt = tl.load(x_base + s[None, :] * sx_l + p[:, None] * sx_p, mask=pmask[:, None] & smask[None, :], other=0.0)
        Bs = tl.load(B_base + s[:, None] * sB_l + n[None, :] * sB_n, mask=smask[:, None] & nmask[None, :], other=0.0)
        Bs = (Bs.to(tl.float32) * w[:, None]).to(xt.dtype)
        acc += tl.dot(xt, Bs, input_precision=PRECISION)
    out = states_ptr + ((b64 * n_chunks + c) * H + h) * P * N
    tl.store(out + p[:, None] * N + n[None, :], acc, mask=pmask[:, None] & nmask[None, :])
    if pid_pn == 0:
        tl.store(decay_ptr + (b64 * H + h) * n_chunks + c, a_end)


@triton.jit
def _state_passing(states_ptr, decay_ptr, final_ptr, H, PN, n_chunks, BLOCK: tl.constexpr):
    """Sequentially over chunks: states[b, c, h] becomes the state entering chunk c; final[b, h] the last state."""
    pid, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    b64 = b.to(tl.int64)
    state = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(n_chunks):
        ptr = states_ptr + ((b64 * n_chunks + c) * H + h) * PN + offs
        local = tl.load(ptr, mask=m, other=0.0)
        tl.store(ptr, state, mask=m)
        state = tl.exp(tl.load(decay_ptr + (b64 * H + h) * n_chunks + c)) * state + local
    tl.store(final_ptr + (b64 * H + h) * PN + offs, state, mask=m)


@triton.jit
def _chunk_scan(
    x_ptr, B_ptr, C_ptr, D_ptr, states_ptr, acs_ptr, dts_ptr, y_ptr,
    L, H, P, N, n_chunks, heads_per_group,
    sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n, sy_b, sy_l, sy_h, sy_p,
    HAS_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """y_t = exp(a_t) C_t h_in + sum_{s <= t in the chunk} (C_t . B_s) exp(a_t - a_s) dt_s x_s + D x_t."""
    pid_mp, pid_bc, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, c = pid_bc // n_chunks, pid_bc % n_chunks
    n_pblk = tl.cdiv(P, BLOCK_P)
    m_blk = pid_mp // n_pblk
    p = (pid_mp % n_pblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    tloc = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    t = c * CHUNK + tloc
    tmask, pmask, nmask = t < L, p < P, n < N
    g = h // heads_per_group
    b64 = b.to(tl.int64)
    row = (b64 * H + h) * (n_chunks * CHUNK)
    C_base = C_ptr + b64 * sC_b + g * sC_g
    B_base = B_ptr + b64 * sB_b + g * sB_g
    x_base = x_ptr + b64 * sx_b + h * sx_h
    a_t = tl.load(acs_ptr + row + t)
    Ct = tl.load(C_base + t[:, None] * sC_l + n[None, :] * sC_n, mask=tmask[:, None] & nmask[None, :], other=0.0)
    # the state entering the chunk, decayed to each token
    h_in = tl.load(states_ptr + ((b64 * n_chunks + c) * H + h) * P * N + p[None, :] * N + n[:, None],
                   mask=nmask[:, None] & pmask[None, :], other=0.0)
    acc = tl.dot(Ct, h_in.to(Ct.dtype), input_precision=PRECISION) * tl.exp(a_t)[:, None]
    # the chunk's own tokens up to t
    for k0 in range(0, (m_blk + 1) * BLOCK_M, BLOCK_K):
        sloc = k0 + tl.arange(0, BLOCK_K)
        s = c * CHUNK + sloc
        smask = s < L
        BsT = tl.load(B_base + s[None, :] * sB_l + n[:, None] * sB_n, mask=nmask[:, None] & smask[None, :], other=0.0)
        cb = tl.dot(Ct, BsT, input_precision=PRECISION)  # (BLOCK_M, BLOCK_K) float32
        a_s = tl.load(acs_ptr + row + s)
        dt_s = tl.load(dts_ptr + row + s)
        w = cb * tl.exp(tl.minimum(a_t[:, None] - a_s[None, :], 0.0)) * dt_s[None, :]
        w = tl.where(tloc[:, None] >= sloc[None, :], w, 0.0)
        xs = tl.load(x_base + s[:, None] * sx_l + p[None, :] * sx_p, mask=smask[:, None] & pmask[None, :], other=0.0)
        acc += tl.dot(w.to(xs.dtype), xs, input_precision=PRECISION)
    if HAS_D:
        xt = tl.load(x_base + t[:, None] * sx_l + p[None, :] * sx_p, mask=tmask[:, None] & pmask[None, :], other=0.0)
        acc += tl.load(D_ptr + h).to(tl.float32) * xt.to(tl.float32)
    out = y_ptr + b64 * sy_b + h * sy_h + t[:, None] * sy_l + p[None, :] * sy_p
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=tmask[:, None] & pmask[None, :])


def _block(size: int, cap: int) -> int:
    """A power-of-two block >= 16 (tl.dot's smallest) covering `size` up to `cap`."""
    return max(16, min(cap, triton.next_power_of_2(size)))


def _precision(*ts: torch.Tensor) -> str:
    return "ieee" if any(t.dtype == torch.float32 for t in ts) else "tf32"


def ssd_scan(
    x: torch.Tensor,
    dt_raw: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba-2 prefill scan from a zero state, mamba_chunk_scan_combined's contract (dt_softplus=True):
    x (b, l, h, p), dt_raw (b, l, h) before the bias and softplus, dt_bias, A and D (h,), B and C (b, l, g, n), each
    in any strides (the mixer passes views of its projections). Returns y (b, l, h, p) in x's dtype, with D x, and
    the final state (b, h, p, n) float32."""
    b, length, nh, p = x.shape
    g, n = B.shape[2], B.shape[3]
    n_chunks = triton.cdiv(length, CHUNK)
    dev = x.device
    states = torch.empty(b, n_chunks, nh, p, n, device=dev, dtype=torch.float32)
    acs = torch.empty(b, nh, n_chunks * CHUNK, device=dev, dtype=torch.float32)
    dts = torch.empty_like(acs)
    decay = torch.empty(b, nh, n_chunks, device=dev, dtype=torch.float32)
    final = torch.empty(b, nh, p, n, device=dev, dtype=torch.float32)
    y = torch.empty(b, length, nh, p, device=dev, dtype=x.dtype)
    A, bias = A.float().contiguous(), dt_bias.float().contiguous()
    prec = _precision(x, B, C)
    bp, bn = _block(p, 64), _block(n, 64)
    grid = (triton.cdiv(p, bp) * triton.cdiv(n, bn), b * n_chunks, nh)
    _chunk_state[grid](
        x, dt_raw, bias, A, B, states, acs, dts, decay,
        length, nh, p, n, n_chunks, nh // g,
        *x.stride(), *dt_raw.stride(), *B.stride(),
        CHUNK=CHUNK, BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=BLOCK_K, PRECISION=prec, num_warps=4,
    )  # fmt: skip
    block = min(1024, triton.next_power_of_2(p * n))
    _state_passing[(triton.cdiv(p * n, block), b, nh)](states, decay, final, nh, p * n, n_chunks, BLOCK=block)
    bp = _block(p, 64)
    grid = (CHUNK // BLOCK_M * triton.cdiv(p, bp), b * n_chunks, nh)
    _chunk_scan[grid](
        x, B, C, y if D is None else D, states, acs, dts, y,
        length, nh, p, n, n_chunks, nh // g,
        *x.stride(), *B.stride(), *C.stride(), *y.stride(),
        HAS_D=D is not None, CHUNK=CHUNK, BLOCK_M=BLOCK_M, BLOCK_P=bp, BLOCK_N=_block(n, 256), BLOCK_K=BLOCK_K,
        PRECISION=prec, num_warps=4,
    )  # fmt: skip
    return y, final


# The gated RMS norm of a Mamba-2 layer (mamba2.GatedRMSNorm, norm_before_gate=False): v = y silu(z), normalised
# over each group of e / g channels in float32, rounded to the weight's dtype, times the weight.


@triton.jit
def _gated_norm_rows(y_ptr, z_ptr, w_ptr, out_ptr, rows, rmask, c, cmask, s_y, s_z, s_out, group_size, eps,
                     NORM: tl.constexpr):  # fmt: skip
    """Rows `rows` (R,) of channels c (C,) of one group: (R, C) tiles. NORM False: the gate y silu(z) alone (Falcon-H1
    without mamba_rms_norm; w_ptr is not read)."""
    m = rmask[:, None] & cmask[None, :]
    y = tl.load(y_ptr + rows[:, None] * s_y + c[None, :], mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * s_z + c[None, :], mask=m, other=0.0).to(tl.float32)
    v = y * z * tl.sigmoid(z)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / group_size + eps)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0)
        v = (v * rstd[:, None]).to(w_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * s_out + c[None, :], v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_norm(y_ptr, z_ptr, w_ptr, out_ptr, R, group_size, s_y, s_z, s_out, eps, BLOCK: tl.constexpr,
                ROWS: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # a few rows a program where groups are small
    j = tl.arange(0, BLOCK)
    _gated_norm_rows(y_ptr, z_ptr, w_ptr, out_ptr, rows, rows < R, tl.program_id(1) * group_size + j, j < group_size,
                     s_y, s_z, s_out, group_size, eps, True)  # fmt: skip


def _norm_warps(block: int) -> int:
    return min(16, max(1, block // 256))


NORM_ELEMENTS = 4096  # elements a gated-norm program covers: one row of a large group, several of small ones


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """GatedRMSNorm of y and z (..., e) (any row strides, unit channel stride), in the weight's dtype."""
    e = y.shape[-1]
    rows_y, rows_z = y.reshape(-1, e), z.reshape(-1, e)
    rows_y = rows_y if rows_y.stride(-1) == 1 else rows_y.contiguous()
    rows_z = rows_z if rows_z.stride(-1) == 1 else rows_z.contiguous()
    out = torch.empty(rows_y.shape, device=y.device, dtype=weight.dtype)
    block = triton.next_power_of_2(group_size)
    rows = max(1, NORM_ELEMENTS // block)
    n_rows = rows_y.shape[0]
    _gated_norm[(triton.cdiv(n_rows, rows), e // group_size)](
        rows_y, rows_z, weight, out, n_rows, group_size, rows_y.stride(0), rows_z.stride(0), out.stride(0), eps,
        BLOCK=block, ROWS=rows, num_warps=_norm_warps(block),
    )  # fmt: skip
    return out.view(*y.shape[:-1], e)


# The decode step. The conv state is (b, conv channels, k - 1), oldest input first, as the prefill leaves it.

STEP_BLOCK_P = 16  # channels of one head a step program owns: b * h * p / 16 programs fill the GPU at batch 1


@triton.jit
def _conv_silu(x_new, state_ptr, s_d, w_ptr, bias_ptr, ch, mask, K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """silu(conv of (the state's k - 1 inputs, x_new)) of channels ch, in float32; the state is not changed."""
    acc = tl.load(w_ptr + ch * K + (K - 1), mask=mask, other=0.0).to(tl.float32) * x_new.to(tl.float32)
    for k in tl.static_range(K - 1):
        prev = tl.load(state_ptr + ch * s_d + k, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + ch * K + k, mask=mask, other=0.0).to(tl.float32) * prev
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    return acc * tl.sigmoid(acc)


@triton.jit
def _shift_in(x_new, state_ptr, s_d, ch, mask, K: tl.constexpr):
    """The conv state of channels ch moves one step: oldest input out, x_new in."""
    for k in tl.static_range(K - 2):
        tl.store(state_ptr + ch * s_d + k, tl.load(state_ptr + ch * s_d + k + 1, mask=mask), mask=mask)
    tl.store(state_ptr + ch * s_d + (K - 2), x_new.to(state_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_heads(
    xbc_ptr, dt_ptr, conv_ptr, cw_ptr, cb_ptr, h_ptr, A_ptr, D_ptr, bias_ptr, y_ptr,
    E, P, N, G, heads_per_group, s_xb, s_dtb, s_cb, s_cd, s_yb,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_hp, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    n_pblk = tl.cdiv(P, BLOCK_P)
    h = pid_hp // n_pblk
    p = (pid_hp % n_pblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pmask, nmask = p < P, n < N
    g = h // heads_per_group
    xbc, conv = xbc_ptr + b * s_xb, conv_ptr + b * s_cb
    dty = xbc_ptr.dtype.element_ty  # the conv's output is in the model's dtype, as the reference's
    ch = h * P + p  # this block's x channels: their conv state is this program's alone
    x_new = tl.load(xbc + ch, mask=pmask, other=0.0)
    x = _conv_silu(x_new, conv, s_cd, cw_ptr, cb_ptr, ch, pmask, K, HAS_BIAS).to(dty).to(tl.float32)
    _shift_in(x_new, conv, s_cd, ch, pmask, K)
    chB, chC = E + g * N + n, E + G * N + g * N + n  # the group's B and C: read here, shifted by _step_norm
    Bt = _conv_silu(tl.load(xbc + chB, mask=nmask, other=0.0), conv, s_cd, cw_ptr, cb_ptr, chB, nmask, K, HAS_BIAS)
    Ct = _conv_silu(tl.load(xbc + chC, mask=nmask, other=0.0), conv, s_cd, cw_ptr, cb_ptr, chC, nmask, K, HAS_BIAS)
    Bt, Ct = Bt.to(dty).to(tl.float32), Ct.to(dty).to(tl.float32)
    dt = _softplus(tl.load(dt_ptr + b * s_dtb + h).to(tl.float32) + tl.load(bias_ptr + h).to(tl.float32))
    decay = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))
    hp = h_ptr + ((b * (G * heads_per_group) + h) * P + p[:, None]) * N + n[None, :]
    m2 = pmask[:, None] & nmask[None, :]
    state = tl.load(hp, mask=m2, other=0.0)
    state = decay * state + (dt * x)[:, None] * Bt[None, :]
    tl.store(hp, state, mask=m2)
    y = tl.sum(state * Ct[None, :], axis=1) + tl.load(D_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + b * s_yb + ch, y.to(y_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _step_norm(
    y_ptr, z_ptr, w_ptr, out_ptr, xbc_ptr, conv_ptr, E, N, G, group_size, s_yb, s_zb, s_ob, s_xb, s_cb, s_cd, eps,
    K: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, NORM: tl.constexpr,
):
    b, g = tl.program_id(0).to(tl.int64), tl.program_id(1)
    j = tl.arange(0, BLOCK)
    row = b + tl.zeros((1,), tl.int64)
    _gated_norm_rows(y_ptr, z_ptr, w_ptr, out_ptr, row, row >= 0, g * group_size + j, j < group_size, s_yb, s_zb, s_ob,
                     group_size, eps, NORM)  # fmt: skip
    n = tl.arange(0, BLOCK_N)
    nmask = n < N
    xbc, conv = xbc_ptr + b * s_xb, conv_ptr + b * s_cb
    for which in tl.static_range(2):  # B, then C
        ch = E + which * G * N + g * N + n
        _shift_in(tl.load(xbc + ch, mask=nmask, other=0.0), conv, s_cd, ch, nmask, K)


def ssd_step(
    xbc: torch.Tensor,
    dt_raw: torch.Tensor,
    z: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor | None,
    group_size: int,
    eps: float,
) -> torch.Tensor:
    """One Mamba-2 decode step between in_proj and out_proj: xbc (b, e + 2 g n), dt_raw (b, h) and z (b, e) (views of
    in_proj's output, unit stride along channels), conv_state (b, e + 2 g n, k - 1) and ssm_state (b, h, p, n)
    float32 contiguous, both updated in place; conv_weight (e + 2 g n, k) contiguous; A, D, dt_bias (h,) float32.
    Returns the gated norm's output (b, e) in the norm weight's dtype; without a norm weight, y silu(z) in xbc's."""
    b, nh, p, n = ssm_state.shape
    e = nh * p
    g = (xbc.shape[1] - e) // (2 * n)
    k = conv_weight.shape[1]
    assert ssm_state.is_contiguous() and ssm_state.dtype == torch.float32 and conv_weight.is_contiguous() and k >= 2
    assert xbc.stride(1) == 1 and dt_raw.stride(1) == 1 and z.stride(1) == 1 and conv_state.stride(2) == 1
    y = torch.empty(b, e, device=xbc.device, dtype=xbc.dtype)
    bn = triton.next_power_of_2(n)
    _step_heads[(nh * triton.cdiv(p, STEP_BLOCK_P), b)](
        xbc, dt_raw, conv_state, conv_weight, conv_weight if conv_bias is None else conv_bias, ssm_state, A, D,
        dt_bias, y, e, p, n, g, nh // g, xbc.stride(0), dt_raw.stride(0), conv_state.stride(0), conv_state.stride(1),
        y.stride(0), K=k, HAS_BIAS=conv_bias is not None, BLOCK_P=STEP_BLOCK_P, BLOCK_N=bn,
    )  # fmt: skip
    out = torch.empty(b, e, device=xbc.device, dtype=xbc.dtype if norm_weight is None else norm_weight.dtype)
    block = triton.next_power_of_2(group_size)
    _step_norm[(b, g)](
        y, z, y if norm_weight is None else norm_weight, out, xbc, conv_state, e, n, g, group_size, y.stride(0),
        z.stride(0), out.stride(0), xbc.stride(0), conv_state.stride(0), conv_state.stride(1), eps, K=k, BLOCK=block,
        BLOCK_N=bn, NORM=norm_weight is not None, num_warps=_norm_warps(block),
    )  # fmt: skip
    return out
