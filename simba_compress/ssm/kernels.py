"""The GPU path and its dispatch: mamba_ssm / causal_conv1d kernels when they are installed, the project's
Triton kernels (ssm/triton_kernels.py) for the selective scan where mamba_ssm is missing, the global-impact
score and the freeze/gather of kept tokens, and the reference PyTorch path for everything else. Nothing here
imports mamba_ssm, causal_conv1d or triton on the CPU path: each is looked up once, on first use with a CUDA
tensor.

The Mamba-1 mixer on CUDA (mamba1_forward) works channel-major, (b, d, l), the layout of the scan kernels,
so no activation is transposed or copied: in_proj is one GEMM that writes x and z as (b, d, l)
views (as mamba_ssm's own Mamba does), x_proj and dt_proj are batched GEMMs whose outputs B, C (b, n, l) and
dt (b, d, l) are already the kernel's operands, and the kernel applies softplus(dt + bias), D and the
silu(z) gate itself. dt exists only in the model's dtype; the score kernel takes the softplus again in float32.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .score import channel_share, global_impact, step_norm

# SIMBA_COMPRESS_KERNELS=0 forces the reference path everywhere (to compare, or to debug);
# SIMBA_COMPRESS_TRITON=0 keeps mamba_ssm but takes the score and the gather from PyTorch.
ENABLED = os.environ.get("SIMBA_COMPRESS_KERNELS", "1") != "0"
TRITON_ENABLED = os.environ.get("SIMBA_COMPRESS_TRITON", "1") != "0"
# SIMBA_COMPRESS_SCAN=triton runs inference through the Triton scan even where mamba_ssm is installed: its cost
# follows the token count step by step, where mamba_ssm's kernel works in 2048-token chunks (README, GPU speed)
SCAN = os.environ.get("SIMBA_COMPRESS_SCAN", "auto")
# The decode step (mamba1_step): "auto" (default): mamba_ssm's selective_state_update and causal_conv1d's
# causal_conv1d_update where both are installed (measured faster on the H200: 1.95 against 2.49 ms a token for
# mamba-1.4b at batch 1 in a CUDA graph, benchmarks/results/gpu_generate.md), else the project's two Triton
# kernels (conv + x_proj, dt_proj + the SSM update); "triton" or "mamba_ssm" forces one
STEP = os.environ.get("SIMBA_COMPRESS_STEP", "auto")
ALIGN_TOKENS = 8  # the GPU mixer pads the token axis to a multiple of this (16-byte rows for the GEMMs)


@functools.cache
def _mamba_selective_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without its CUDA extension
        return None
    return selective_scan_fn


@functools.cache
def _causal_conv1d():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


@functools.cache
def _selective_state_update():
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception:
        return None
    return selective_state_update


@functools.cache
def _causal_conv1d_update():
    try:
        from causal_conv1d import causal_conv1d_update
    except Exception:
        return None
    return causal_conv1d_update


@functools.cache
def _triton_kernels():
    try:
        from . import triton_kernels
    except Exception:  # triton missing, or no backend for this machine
        return None
    return triton_kernels


def mamba_ssm_available() -> bool:
    return torch.cuda.is_available() and _mamba_selective_scan() is not None


def causal_conv1d_available() -> bool:
    return torch.cuda.is_available() and _causal_conv1d() is not None


def triton_available() -> bool:
    return torch.cuda.is_available() and _triton_kernels() is not None


def _use_triton(x: torch.Tensor) -> bool:
    return ENABLED and TRITON_ENABLED and x.is_cuda and _triton_kernels() is not None


def scan_kernel(mixer: torch.nn.Module, hidden: torch.Tensor):
    """The selective scan a Mamba-1 mixer on `hidden` runs through mamba1_forward: mamba_ssm's selective_scan_fn
    on CUDA, else the Triton scan (same contract, forward only: not when a backward will run); None means the
    reference path (CPU, kernels disabled, or training without mamba_ssm). SCAN = "triton" prefers the Triton
    scan to mamba_ssm's where no backward runs."""
    if not (ENABLED and hidden.is_cuda):
        return None
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in mixer.parameters()))
    triton_ok = _use_triton(hidden) and not needs_grad
    if _mamba_selective_scan() is not None and not (SCAN == "triton" and triton_ok):
        return _mamba_selective_scan()
    return _triton_kernels().selective_scan if triton_ok else None


def impact_score(x, dt_raw, dt_bias, A, B, C, last) -> torch.Tensor:
    """Global impact of every token on row position last[b]: (b, l) float32. Channel-major operands: x and
    dt_raw (b, d, l) (dt = softplus(dt_raw + dt_bias)), B and C (b, n, l). Triton on CUDA, else score.py."""
    if _use_triton(x):
        return _triton_kernels().global_impact(x, dt_raw, dt_bias, A, B, C, last)
    dt = F.softplus(dt_raw.float() + dt_bias.float()[:, None])
    return global_impact(x.mT, dt.mT, A, B.mT, C.mT, last)


def freeze_and_gather(h, idx, kept, stays, frozen) -> torch.Tensor:
    """Freeze the stream h (b, w, dm) of the tokens that leave it into frozen (b, l + 1, dm) at their original
    positions idx (b, w), and return the rows `kept` (b, w') that the next layer runs on (stays (b, w'): the
    kept slot holds a real token). One Triton pass on CUDA; on CPU a scatter of every slot and a gather (a
    kept token's frozen row is written again later, so freezing it too changes nothing)."""
    if _use_triton(h) and not (torch.is_grad_enabled() and h.requires_grad):  # the kernel has no backward
        return _triton_kernels().freeze_and_gather(h, idx, kept, stays, frozen)
    frozen.scatter_(1, idx.unsqueeze(-1).expand_as(h), h)
    return h.gather(1, kept.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def _batched(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (o, i) @ x (b, i, l) -> (b, o, l) contiguous, one batched GEMM, no copy of x."""
    return torch.bmm(weight.unsqueeze(0).expand(x.shape[0], -1, -1), x)


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv) of x (b, d, l) with weight (d, k): causal_conv1d's kernel when installed."""
    fn = _causal_conv1d()
    if fn is not None:
        return fn(x, weight, bias, activation="silu")
    k = weight.shape[-1]
    return F.silu(F.conv1d(x, weight.unsqueeze(1), bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]])


SCAN_CHUNK = 2048  # mamba_ssm's scan chunk for rows longer than the largest of SHORT_CHUNKS
SHORT_CHUNKS = (128, 256, 512, 1024)  # its one-chunk kernels for shorter rows


def scan_length(tokens: int) -> int:
    """Tokens mamba_ssm's selective scan should run on for a row of `tokens`: its kernel works in chunks of 128,
    256, 512 or 1024 steps (one chunk, by the row's length) or in 2048-step chunks beyond, and on a row that is
    not a whole number of chunks it takes a slower path (1.2-1.5x the time of the whole chunks it rounds up
    to on the H200, benchmarks/results/gpu_scan.json). So the GPU mixer left-pads the scan's operands up to
    this length with zero inputs, which leave the state at zero (exact), and flops.count counts those steps."""
    for chunk in SHORT_CHUNKS:
        if tokens <= chunk:
            return chunk
    return -(-tokens // SCAN_CHUNK) * SCAN_CHUNK


def keeps_width(tokens):
    """Whether SimbaConfig.align leaves a width of `tokens` as it is (an int, or an array elementwise): within the
    short rows' kernels, or whole SCAN_CHUNKs."""
    return (tokens <= SHORT_CHUNKS[-1]) | (tokens % SCAN_CHUNK == 0)


def mamba1_forward(mixer, hidden: torch.Tensor, mask: torch.Tensor | None, score, last, want_state: bool, scan):
    """MambaMixer.forward on CUDA through `scan` (scan_kernel's choice): (out, scores, conv_state, ssm_state).

    hidden (b, l, d_model), mask (b, l, 1) in hidden's dtype or None. Equal to the reference path up to
    float rounding: the kernel computes dt, the scan, D x and the gate in float32, as the reference does.
    """
    d, n, r, k = mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.d_conv
    if mask is not None:
        hidden = hidden * mask
    # Zero inputs on the left leave the state at zero, so the real tokens' outputs and the final state (decoding's)
    # are those of the unpadded row. Two paddings use that: (a) the GEMMs run on a multiple of ALIGN_TOKENS tokens
    # (a row stride that is not a multiple of 8 bf16 values misses the tensor-core kernels: 2-3x slower on the
    # H200), (b) mamba_ssm's scan runs on whole chunks (scan_length): its operands are padded after in_proj, so
    # the projections run on the real tokens only.
    true_length = hidden.shape[1]
    gemm_pad = (-true_length) % ALIGN_TOKENS
    length = true_length + gemm_pad  # the GEMMs' tokens
    scan_len = scan_length(length) if scan is _mamba_selective_scan() else length
    pad = scan_len - true_length  # every left zero the scan sees
    if gemm_pad:
        hidden = F.pad(hidden, (0, 0, gemm_pad, 0))
    if mask is not None:
        mask = F.pad(mask, (0, 0, pad, 0))
    last = None if last is None else last + pad
    b, dm = hidden.shape[0], hidden.shape[2]
    # one GEMM (2d, dm) @ (dm, b l) read as (b, 2d, l): x and z are views with unit stride along l
    xz = (mixer.in_proj.weight @ hidden.reshape(b * length, dm).t()).view(2 * d, b, length).permute(1, 0, 2)
    if mixer.in_proj.bias is not None:
        xz = _zero_left(xz + mixer.in_proj.bias.view(1, -1, 1), gemm_pad)  # the padding's input stays zero
    if scan_len > length:
        xz = F.pad(xz, (scan_len - length, 0))
    x, z = xz[:, :d], xz[:, d:]
    conv_state = None
    if want_state:  # the last k-1 conv inputs, zero-padded on the left as the reference's padded window
        conv_state = F.pad(x[:, :, -(k - 1) :], (max(0, k - 1 - scan_len), 0)).contiguous()
    x = _zero_left(causal_conv_silu(x, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias), pad)  # silu(bias) there
    if mask is not None:
        x = x * mask.transpose(1, 2)
    x_dbl = _batched(mixer.x_proj.weight, x)  # (b, r + 2n, L)
    dt_raw = _batched(mixer.dt_proj.weight, x_dbl[:, :r])  # (b, d, L), bias added in float32 by the kernels
    B, C = x_dbl[:, r : r + n], x_dbl[:, r + n :]  # (b, n, L) views
    A, D, dt_bias = float_params(mixer)
    y, h = scan(x, dt_raw, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True, return_last_state=True)
    # y (b, d, L) = (scan + D x) * silu(z) in hidden's dtype; out_proj reads its last `length` tokens transposed,
    # without a copy (an offset that is a multiple of 8, as the GEMM's alignment wants)
    y = y[:, :, scan_len - length :]
    out = torch.bmm(y.transpose(1, 2), mixer.out_proj.weight.t().unsqueeze(0).expand(b, -1, -1))
    del y, xz, z  # the score runs in their memory: a pruned layer's peak stays at the dense layer's
    if mixer.out_proj.bias is not None:
        out = out + mixer.out_proj.bias
    impact = None
    if score == "simba":
        impact = impact_score(x, dt_raw, dt_bias, A, B, C, last)
    elif score in ("share", "deci"):
        dt = F.softplus(dt_raw.float() + dt_bias[:, None])  # (b, d, L)
        impact = channel_share(x.mT, dt.mT, A, B.mT, C.mT, last) if score == "share" else step_norm(dt, dim=1)
    out = out[:, gemm_pad:]
    impact = None if impact is None else impact[:, pad:]
    return out, impact, conv_state, (h.float().contiguous() if want_state else None)


def float_params(mixer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = -exp(A_log), D and the dt bias of a Mamba-1 mixer in float32, as its kernels take them. Without
    autograd they are made once per version of the weights (a model in bf16 would otherwise cast them in every
    layer of every forward: five small launches a layer); an in-place update or a move makes them anew."""
    params = (mixer.A_log, mixer.D, mixer.dt_proj.bias)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return -torch.exp(params[0].float()), params[1].float(), params[2].float()
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
    cached = mixer.__dict__.get("_float_params")
    if cached is None or cached[0] != key:
        cached = (key, (-torch.exp(params[0].float()), params[1].float(), params[2].float()))
        mixer.__dict__["_float_params"] = cached
    return cached[1]


def _zero_left(t: torch.Tensor, pad: int) -> torch.Tensor:
    """t (b, c, l) with its first `pad` time steps zeroed: in place without autograd, else as a new tensor."""
    if not pad:
        return t
    if not torch.is_grad_enabled():
        t[..., :pad] = 0
        return t
    return F.pad(t[..., pad:], (pad, 0))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None) -> torch.Tensor:
    """model.RMSNorm's math on the residual stream x (..., dm): (x * rsqrt(mean(x^2) + eps)) in float32, in the
    weight's dtype, times the weight. With `add`: x += add in place first (the decode step's residual add).
    One Triton pass on CUDA (no autograd), else PyTorch."""
    no_grad = not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    if _use_triton(x) and no_grad and (add is None or x.is_contiguous()):
        return _triton_kernels().rms_norm(x, weight, eps, add)
    if add is not None:
        x.add_(add)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype) * weight


def fused_step_available(x: torch.Tensor) -> bool:
    """Whether mamba1_step has kernels on x's device: the project's Triton step, or mamba_ssm's and causal_conv1d's."""
    if not (ENABLED and x.is_cuda):
        return False
    return _use_triton(x) or (_selective_state_update() is not None and _causal_conv1d_update() is not None)


def mamba1_step(mixer, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, A: torch.Tensor):
    """MambaMixer.step through fused kernels, on state buffers updated in place: hidden (b, d_model), conv_state
    (b, d, k - 1), ssm_state (b, d, n) float32, A = -exp(A_log) (d, n) float32 (the decode runtime keeps it).
    STEP "mamba_ssm" (the default where installed): causal_conv1d_update, x_proj, dt_proj and mamba_ssm's
    selective_state_update, as mamba_ssm's own step; "triton" (the default otherwise): the project's two kernels
    for conv + x_proj and dt_proj + the SSM update (triton_kernels.py), between in_proj and out_proj. Returns the
    mixer output (b, d_model)."""
    d, n, r = mixer.d_inner, mixer.d_state, mixer.dt_rank
    xz = F.linear(hidden, mixer.in_proj.weight, mixer.in_proj.bias)  # (b, 2d)
    x, z = xz[:, :d], xz[:, d:]
    weight = mixer.conv1d.weight.squeeze(1)  # (d, k)
    mamba = _selective_state_update() is not None and _causal_conv1d_update() is not None
    if (STEP != "triton" and mamba) or not _use_triton(x):
        x = _causal_conv1d_update()(x, conv_state, weight, mixer.conv1d.bias, "silu")
        x_dbl = F.linear(x, mixer.x_proj.weight)  # (b, r + 2n)
        dt_raw = F.linear(x_dbl[:, :r], mixer.dt_proj.weight)  # (b, d); the bias is added in float32 by the kernel
        y = _selective_state_update()(ssm_state, x, dt_raw, A, x_dbl[:, r : r + n], x_dbl[:, r + n :], mixer.D, z=z,
                                      dt_bias=mixer.dt_proj.bias, dt_softplus=True)  # fmt: skip
    else:
        tk = _triton_kernels()
        x, parts = tk.conv_xproj_step(x, conv_state, weight, mixer.conv1d.bias, mixer.x_proj.weight)
        y = tk.ssm_step(ssm_state, x, parts, mixer.dt_proj.weight, mixer.dt_proj.bias, A, mixer.D, z)
    return F.linear(y, mixer.out_proj.weight, mixer.out_proj.bias)
