"""Which kernels a model runs: one explicit setting (Backends) and the probes for the optional packages.

Every mixer has a PyTorch reference path (CPU, tests, training without kernels) and, on CUDA, a fast path
through mamba_ssm / causal_conv1d where they are installed and the project's own Triton kernels otherwise.
Which one runs is `model.backends`, a frozen dataclass a caller can set and a test can flip, as mamba_ssm's
`use_fast_path`; the environment variables below only give its defaults:

    SIMBA_COMPRESS_KERNELS=0      fast_path=False: the reference path everywhere (to compare, or to debug)
    SIMBA_COMPRESS_TRITON=0       triton=False: mamba_ssm's kernels only; scores and gathers in PyTorch
    SIMBA_COMPRESS_SCAN=triton    scan="triton": the prefill scan through the project's Triton kernels even where
                                  mamba_ssm is installed: Mamba-1's selective scan (its cost follows the token
                                  count step by step, where mamba_ssm's works in 2048-token chunks) and Mamba-2's
                                  SSD (ssm/triton_ssd.py); "auto" takes mamba_ssm's where it is installed
    SIMBA_COMPRESS_STEP=triton    step="triton" (or "mamba_ssm"): the decode step's kernels; "auto" takes
                                  mamba_ssm's selective_state_update with causal_conv1d's causal_conv1d_update
                                  where both are installed (faster on the H200: 1.95 against 2.49 ms a token for
                                  mamba-1.4b, benchmarks/results/gpu_generate.md), else the project's Triton step
                                  (step_path)

The probes import each optional package once. mamba_ssm 2.3.2 imports its Mamba-1 CUDA extension
(`selective_scan_cuda`) at package import; its next release makes that extension opt-in (state-spaces/mamba
PR #977), so the Mamba-1 scan is probed through the extension itself and the Mamba-2 kernels (Triton only)
through their own modules: either can be present without the other.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Literal

import torch


@dataclass(frozen=True)
class Backends:
    fast_path: bool = True  # on CUDA: the fused kernels; False: the PyTorch reference path everywhere
    triton: bool = True  # the project's Triton kernels (scores, freeze-and-gather, norms, scans and steps)
    scan: Literal["auto", "triton"] = "auto"  # prefill scan: mamba_ssm's where installed, or the project's Triton
    step: Literal["auto", "triton", "mamba_ssm"] = "auto"  # decode step kernels

    def __post_init__(self) -> None:
        if self.scan not in ("auto", "triton"):
            raise ValueError(f"scan: 'auto' or 'triton', got {self.scan!r}")
        if self.step not in ("auto", "triton", "mamba_ssm"):
            raise ValueError(f"step: 'auto', 'triton' or 'mamba_ssm', got {self.step!r}")

    @classmethod
    def from_env(cls) -> "Backends":
        env = os.environ.get
        return cls(fast_path=env("SIMBA_COMPRESS_KERNELS", "1") != "0", triton=env("SIMBA_COMPRESS_TRITON", "1") != "0",
                   scan=env("SIMBA_COMPRESS_SCAN", "auto"), step=env("SIMBA_COMPRESS_STEP", "auto"))  # fmt: skip

    def replace(self, **changes) -> "Backends":
        return replace(self, **changes)

    def on(self, x: torch.Tensor) -> bool:
        """Whether x's computation takes the fast path (CUDA and fast_path)."""
        return self.fast_path and x.is_cuda

    def use_triton(self, x: torch.Tensor) -> bool:
        """Whether the project's Triton kernels run on x."""
        return self.on(x) and self.triton and triton_kernels() is not None

    def scan_path(self, x: torch.Tensor, mamba_ssm: bool, grad: bool) -> str | None:
        """Which prefill scan a mixer runs on x: "mamba_ssm" (`mamba_ssm`: its kernel is installed), "triton" (the
        project's: forward only, so not when a backward will run, `grad`), or None (the reference path: CPU, fast
        path off, or training without mamba_ssm). scan "triton" prefers the project's where it can run."""
        if not self.on(x):
            return None
        triton = self.use_triton(x) and not grad
        if mamba_ssm and not (self.scan == "triton" and triton):
            return "mamba_ssm"
        return "triton" if triton else None

    def step_path(self, x: torch.Tensor, mamba_ssm: bool, preferred: bool = True) -> str | None:
        """Which fused decode step a mixer runs on x: "mamba_ssm" (its kernels; `mamba_ssm`: they can run the step),
        "triton" (the project's), or None (the reference step: CPU, fast path off, or neither). `step` names one
        where it can run; "auto" takes mamba_ssm's where it can and is `preferred` (everything it is best with
        is installed), else Triton's, else mamba_ssm's."""
        if not self.on(x):
            return None
        triton = self.use_triton(x)
        if self.step == "mamba_ssm" and mamba_ssm:
            return "mamba_ssm"
        if self.step == "triton" and triton:
            return "triton"
        if mamba_ssm and (preferred or not triton):
            return "mamba_ssm"
        return "triton" if triton else None


# Probes: each returns the callable (or module) or None; cached, so a test that hides a package clears them with
# clear_probes() after patching the import.


@functools.cache
def selective_scan_fn():
    """mamba_ssm's Mamba-1 scan, only where its CUDA extension is built."""
    try:
        import selective_scan_cuda  # noqa: F401  (the extension the function needs)
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
    except Exception:  # not installed, or installed without the extension
        return None
    return fn


@functools.cache
def selective_state_update():
    """mamba_ssm's Triton step kernel (Mamba-1's and, in heads form, Mamba-2's)."""
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as fn
    except Exception:
        return None
    return fn


@functools.cache
def ssd_kernels():
    """mamba_ssm's Triton SSD (Mamba-2) prefill: (mamba_chunk_scan_combined, gated RMSNorm function), or None."""
    try:
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:
        return None
    return mamba_chunk_scan_combined, rmsnorm_fn


@functools.cache
def causal_conv1d_fn():
    try:
        from causal_conv1d import causal_conv1d_fn as fn
    except Exception:
        return None
    return fn


@functools.cache
def causal_conv1d_update():
    try:
        from causal_conv1d import causal_conv1d_update as fn
    except Exception:
        return None
    return fn


@functools.cache
def triton_kernels():
    """The project's Triton kernels (ssm/triton_kernels.py), or None without triton or a backend for it."""
    try:
        from .ssm import triton_kernels as tk
    except Exception:
        return None
    return tk


@functools.cache
def triton_ssd():
    """The project's Mamba-2 Triton kernels (ssm/triton_ssd.py: the SSD prefill, gated norm and step), or None."""
    try:
        from .ssm import triton_ssd as ts
    except Exception:
        return None
    return ts


PROBES = (selective_scan_fn, selective_state_update, ssd_kernels, causal_conv1d_fn, causal_conv1d_update, triton_kernels,
          triton_ssd)  # fmt: skip


def clear_probes() -> None:
    for probe in PROBES:
        probe.cache_clear()


def mamba_ssm_available() -> bool:
    """mamba_ssm's Mamba-1 scan on this machine (CUDA and the extension)."""
    return torch.cuda.is_available() and selective_scan_fn() is not None


def causal_conv1d_available() -> bool:
    return torch.cuda.is_available() and causal_conv1d_fn() is not None


def triton_available() -> bool:
    return torch.cuda.is_available() and triton_kernels() is not None


def describe() -> dict[str, bool]:
    """What this machine has, for reports and `info`."""
    cuda = torch.cuda.is_available()
    return {"cuda": cuda, "mamba_ssm_scan": cuda and selective_scan_fn() is not None,
            "mamba_ssm_ssd": cuda and ssd_kernels() is not None, "causal_conv1d": cuda and causal_conv1d_fn() is not None,
            "triton": cuda and triton_kernels() is not None}  # fmt: skip
