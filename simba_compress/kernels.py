"""GPU helpers every layer shares, each with its PyTorch twin: the RMS norm (with the residual add fused), the
freeze-and-gather of kept tokens between layers, and the causal depthwise conv. The mixers' own fast paths live
with them (mamba1.py, mamba2.py); the Triton kernels in ssm/triton_kernels.py; which path runs is a Backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends as probes
from .backends import Backends

ALIGN_TOKENS = 8  # the fast paths pad the token axis to a multiple of this (16-byte rows for the GEMMs)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None, backends: Backends = Backends()
) -> torch.Tensor:
    """layers.RMSNorm's math on the residual stream x (..., dm): (x * rsqrt(mean(x^2) + eps)) in float32, in the
    weight's dtype, times the weight. With `add`: x += add in place first (the decode step's residual add).
    One Triton pass on CUDA (no autograd), else PyTorch."""
    no_grad = not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    if backends.use_triton(x) and no_grad and (add is None or x.is_contiguous()):
        return probes.triton_kernels().rms_norm(x, weight, eps, add)
    if add is not None:
        x.add_(add)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype) * weight


def freeze_and_gather(h, idx, kept, stays, frozen, backends: Backends = Backends()) -> torch.Tensor:
    """Freeze the stream h (b, w, dm) of the tokens that leave it into frozen (b, l + 1, dm) at their original
    positions idx (b, w), and return the rows `kept` (b, w') that the next layer runs on (stays (b, w'): the
    kept slot holds a real token). One Triton pass on CUDA; on CPU a scatter of every slot and a gather (a
    kept token's frozen row is written again later, so freezing it too changes nothing)."""
    if backends.use_triton(h) and not (torch.is_grad_enabled() and h.requires_grad):  # the kernel has no backward
        return probes.triton_kernels().freeze_and_gather(h, idx, kept, stays, frozen)
    frozen.scatter_(1, idx.unsqueeze(-1).expand_as(h), h)
    return h.gather(1, kept.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv) of x (b, c, l) with weight (c, k): causal_conv1d's kernel when installed."""
    fn = probes.causal_conv1d_fn()
    if fn is not None and x.is_cuda:
        return fn(x, weight, bias, activation="silu")
    k = weight.shape[-1]
    return F.silu(F.conv1d(x, weight.unsqueeze(1), bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]])


def causal_conv_update_silu(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """One decode step of silu(causal depthwise conv): x (b, c), conv_state (b, c, k - 1) the previous inputs,
    updated in place; weight (c, k). causal_conv1d's update kernel where installed (its state holds k - 1 inputs
    as ours does), else PyTorch."""
    fn = probes.causal_conv1d_update()
    if fn is not None and x.is_cuda:
        return fn(x, conv_state, weight, bias, "silu")
    window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)  # (b, c, k)
    out = (window * weight).sum(-1)
    conv_state.copy_(window[:, :, 1:])
    return F.silu(out if bias is None else out + bias)


def batched(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (o, i) @ x (b, i, l) -> (b, o, l) contiguous, one batched GEMM, no copy of x."""
    return torch.bmm(weight.unsqueeze(0).expand(x.shape[0], -1, -1), x)


def zero_left(t: torch.Tensor, pad: int) -> torch.Tensor:
    """t (b, c, l) with its first `pad` time steps zeroed: in place without autograd, else as a new tensor."""
    if not pad:
        return t
    if not torch.is_grad_enabled():
        t[..., :pad] = 0
        return t
    return F.pad(t[..., pad:], (pad, 0))


def float32_cached(module: torch.nn.Module, params: tuple[torch.Tensor, ...], make) -> tuple[torch.Tensor, ...]:
    """make(*params): the float32 forms of a mixer's small parameters (A = -exp(A_log), D, the dt bias) as its
    kernels take them. Without autograd they are made once per version of the weights (a bf16 model would
    otherwise cast them in every layer of every forward: a few small launches a layer) and written into the
    same tensors each time (refresh in place), so a CUDA graph that read them reads the new values after a
    prepare_step(); an in-place update, a move or a new dtype makes them anew."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return make(*params)
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
    cached = module.__dict__.get("_float32_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    fresh = make(*params)
    if cached is not None and all(a.shape == b.shape and a.device == b.device for a, b in zip(cached[1], fresh)):
        for old, new in zip(cached[1], fresh):
            old.copy_(new)
        fresh = cached[1]
    module.__dict__["_float32_cache"] = (key, fresh)
    return fresh
