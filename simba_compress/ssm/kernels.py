"""GPU kernels: mamba_ssm's selective scan when it is installed (it only imports with its compiled CUDA
extension, so nothing on the CPU path may import it)."""

from __future__ import annotations

import functools
import os

import torch

# SIMBA_COMPRESS_KERNELS=0 forces the reference path everywhere (to compare, or to debug)
ENABLED = os.environ.get("SIMBA_COMPRESS_KERNELS", "1") != "0"


@functools.cache
def _mamba_selective_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without its CUDA extension
        return None
    return selective_scan_fn


def mamba_ssm_available() -> bool:
    return torch.cuda.is_available() and _mamba_selective_scan() is not None


def use_kernels(x: torch.Tensor) -> bool:
    """Whether this tensor's scan runs in mamba_ssm's kernel."""
    return ENABLED and x.is_cuda and _mamba_selective_scan() is not None


def mamba_scan(
    x: torch.Tensor, dt_raw: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """mamba_ssm's fused selective scan; shapes as ssm.scan (b, l, d) / (b, l, n). dt = softplus(dt_raw + dt_bias)
    is taken inside the kernel, as in mamba_ssm's own Mamba. Returns y (b, l, d) float32 and h (b, d, n)."""
    fn = _mamba_selective_scan()
    y, h = fn(
        x.transpose(1, 2).contiguous(),
        dt_raw.transpose(1, 2).contiguous().to(x.dtype),
        A.float().contiguous(),
        B.transpose(1, 2).contiguous(),
        C.transpose(1, 2).contiguous(),
        delta_bias=dt_bias.float(),
        delta_softplus=True,
        return_last_state=True,
    )
    return y.transpose(1, 2).float(), h.float()
