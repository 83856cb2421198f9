"""Mamba-2 mixer (mamba_ssm's Mamba2): the PyTorch reference path and the CUDA fast paths, in one module.

Shapes: b batch, l tokens, e = d_inner, h heads of p = headdim, g groups, n d_state, k d_conv.

    in_proj -> z (e), xBC (e + 2 g n), dt (h);  xBC = silu(causal conv(xBC));  x, B, C = split(xBC)
    y = SSD(x, softplus(dt + dt_bias), A, B, C) + D x;  out = out_proj(rmsnorm_groups(y * silu(z)))

Falcon-H1's Mamba-2 differs in two things, on every path: in_proj's output is scaled part by part (z, x, B, C, dt:
ModelConfig.ssm_proj_multipliers, muP), and without mamba_rms_norm the output is out_proj(y * silu(z)), no norm
(ModelConfig.ssm_norm False; the Triton step then skips the norm in its second kernel). Zamba2's floors the step size
at ModelConfig.dt_min (its time_step_min) on the reference paths, which it then runs on CUDA too (the fused scans and
steps here take no floor).

On CUDA the prefill runs token-major as the reference (the GEMMs' rows are channels: no alignment padding, unlike
Mamba-1's channel-major GEMMs), through one of two SSD scans (backends.scan_path): mamba_ssm's Triton SSD
(mamba_chunk_scan_combined, chunks of 256 tokens; softplus, D and the final state inside it) and its gated RMSNorm
kernel where installed, else the project's own Triton SSD and gated norm (ssm/triton_ssd.py, the same chunked
algorithm); the conv is causal_conv1d's where installed, else PyTorch's. The decode step (backends.step_path) runs
through causal_conv1d_update and mamba_ssm's selective_state_update in heads form (A, dt, the dt bias and D
broadcast over the head dim with stride 0, which the kernel special-cases) where installed, else the project's
two-launch Triton step (conv + SSM update + D, then the gated norm). Elsewhere the reference path runs (ssm/ssd.py:
the chunked SSD in closed form). A is one scalar per head, so the in-layer scores need one decay per token and head
(ssm/ssd.py ssd_score): the same PyTorch code on every path, never a float32 copy of x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import backends as probes
from .backends import Backends
from .kernels import causal_conv_silu, causal_conv_update_silu, float32_cached
from .layers import Mixer, MixerContext, MixerOutput, ModelConfig, SSMState
from .ssm.ssd import ssd_scan, ssd_score, ssd_step

SSD_CHUNK = 256  # mamba_ssm's chunk_size for Mamba-2 checkpoints (every published config uses 256)


class GatedRMSNorm(nn.Module):
    """y * silu(z), then RMS-normalised in groups of e / g channels (norm_before_gate=False)."""

    def __init__(self, d: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return self.weight * y.to(self.weight.dtype)


class Mamba2Mixer(Mixer):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, n, g = cfg.d_inner, cfg.d_state, cfg.ngroups
        self.d_inner, self.d_state, self.ngroups, self.headdim, self.d_conv = e, n, g, cfg.headdim, cfg.d_conv
        self.eps = cfg.norm_eps
        self.dt_min = cfg.dt_min
        self.nheads = e // cfg.headdim
        self.conv_dim = e + 2 * g * n
        self.in_proj = nn.Linear(cfg.d_model, 2 * e + 2 * g * n + self.nheads, bias=cfg.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.nheads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(e, e // g, cfg.norm_eps) if cfg.ssm_norm else None
        self.out_proj = nn.Linear(e, cfg.d_model, bias=cfg.bias)
        self.proj_multipliers = tuple(cfg.ssm_proj_multipliers)  # Falcon-H1's, of in_proj's z, x, B, C and dt parts
        self._scales: dict[tuple, torch.Tensor] = {}  # their per-channel vector per device and dtype (not a buffer)

    def _in_proj(self, hidden: torch.Tensor) -> torch.Tensor:
        """in_proj's output (z, xBC, dt), times Falcon-H1's multipliers."""
        zxbcdt = self.in_proj(hidden)
        if not self.proj_multipliers:
            return zxbcdt
        key = (zxbcdt.device, zxbcdt.dtype)
        if key not in self._scales:
            gn = self.ngroups * self.d_state
            sizes = (self.d_inner, self.d_inner, gn, gn, self.nheads)
            self._scales[key] = torch.cat([torch.full((k,), m) for k, m in zip(sizes, self.proj_multipliers)]).to(*key)
        return zxbcdt * self._scales[key]

    def _gate(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The reference's gate (and norm) of the scan's output y (..., e) by z."""
        return self.norm(y, z) if self.norm is not None else y.float() * F.silu(z.float())

    def _split(self, xbc: torch.Tensor):
        e, gn = self.d_inner, self.ngroups * self.d_state
        x, B, C = xbc.split([e, gn, gn], dim=-1)
        return x.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (self.ngroups, -1)), C.unflatten(-1, (self.ngroups, -1))

    def forward(self, hidden: torch.Tensor, ctx: MixerContext) -> MixerOutput:
        """hidden (b, l, d_model). ctx.mask zeroes padding's input (it then cannot reach real tokens)."""
        ssd = ssd_kernel(self, hidden, ctx.backends)
        if ssd is not None:
            return self._forward_fast(hidden, ctx, ssd)
        m = None if ctx.mask is None else ctx.mask.unsqueeze(-1).to(hidden.dtype)
        if m is not None:
            hidden = hidden * m
        z, xbc, dt = self._in_proj(hidden).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xc = F.pad(xbc.transpose(1, 2), (self.d_conv - 1, 0))  # causal conv: k-1 zeros on the left
        xbc = F.silu(F.conv1d(xc, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)).transpose(1, 2)
        if m is not None:
            xbc = xbc * m
        x, B, C = self._split(xbc)
        dt = self._step_size(dt)  # (b, l, h)
        A = -torch.exp(self.A_log.float())  # (h,)
        y, h = ssd_scan(x, dt, A, B, C)
        score = None if ctx.score is None else ssd_score(ctx.score, x, dt, A, B, C, ctx.last)
        y = (y + x.float() * self.D.float()[:, None]).flatten(-2)  # (b, l, e)
        out = self.out_proj(self._gate(y, z).to(hidden.dtype))
        state = SSMState(conv=xc[:, :, -(self.d_conv - 1) :].clone(), ssm=h) if ctx.want_state else None
        return MixerOutput(out, score, state)

    def _forward_fast(self, hidden: torch.Tensor, ctx: MixerContext, ssd: str) -> MixerOutput:
        """forward on CUDA through `ssd` (ssd_kernel's choice: "mamba_ssm" or "triton"). Padding slots (ctx.mask)
        sit before a row's real tokens (or after them, past ctx.last), so the real tokens' outputs and the final
        state are those of the unpadded row, as on the reference path."""
        m = None if ctx.mask is None else ctx.mask.unsqueeze(-1).to(hidden.dtype)
        if m is not None:
            hidden = hidden * m
        z, xbc, dt = self._in_proj(hidden).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        conv_state = None
        if ctx.want_state:  # the last k-1 conv inputs, zero-padded on the left as the reference's padded window
            k1 = self.d_conv - 1
            conv_state = F.pad(xbc[:, -k1:].transpose(1, 2), (max(0, k1 - xbc.shape[1]), 0)).contiguous()
        xbc = causal_conv_silu(xbc.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias).transpose(1, 2)
        if m is not None:
            xbc = xbc * m
        x, B, C = self._split(xbc)
        A, D, dt_bias = self.float_params()
        if ssd == "mamba_ssm":
            chunk_scan, gated_rmsnorm = probes.ssd_kernels()
            y = chunk_scan(x, dt, A, B, C, SSD_CHUNK, D=D, dt_bias=dt_bias, dt_softplus=True,
                           return_final_states=ctx.want_state)  # fmt: skip
            y, h = y if ctx.want_state else (y, None)
            if self.norm is not None:
                y = gated_rmsnorm(y.flatten(-2), self.norm.weight, None, z=z, eps=self.norm.eps,
                                  group_size=self.norm.group_size, norm_before_gate=False)  # fmt: skip
        else:
            ts = probes.triton_ssd()
            y, h = ts.ssd_scan(x, dt, dt_bias, A, B, C, D)
            if self.norm is not None:
                y = ts.gated_rms_norm(y.flatten(-2), z, self.norm.weight, self.norm.group_size, self.norm.eps)
        if self.norm is None:  # Falcon-H1 without mamba_rms_norm: the gate alone
            y = y.flatten(-2) * F.silu(z.to(y.dtype))
        del z
        out = self.out_proj(y.to(hidden.dtype))
        del y  # the score runs in its memory
        score = None
        if ctx.score is not None:
            score = ssd_score(ctx.score, x, F.softplus(dt.float() + dt_bias), A, B, C, ctx.last)
        state = SSMState(conv_state, h.float()) if ctx.want_state else None
        return MixerOutput(out, score, state)

    def _step_size(self, dt: torch.Tensor) -> torch.Tensor:
        """softplus(dt + dt_bias) in float32, at least dt_min (Zamba2's time_step_min; 0: no floor)."""
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return dt.clamp_min(self.dt_min) if self.dt_min else dt

    def float_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A = -exp(A_log), D and the dt bias in float32, per head (kernels.float32_cached)."""
        return float32_cached(self, (self.A_log, self.D, self.dt_bias),
                              lambda a, dd, bias: (-torch.exp(a.float()), dd.float(), bias.float()))  # fmt: skip

    def prepare_step(self) -> None:
        self.float_params()

    def zero_state(self, batch: int, device, dtype: torch.dtype, capacity: int = 0) -> SSMState:  # recurrent: no capacity
        return SSMState(conv=torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
                        ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32))  # fmt: skip

    def step(self, hidden: torch.Tensor, state: SSMState, backends: Backends) -> torch.Tensor:
        """Decode one token, hidden (b, d_model), updating state in place (step_kernels' path: mamba_ssm's and
        causal_conv1d's kernels, the project's Triton step, or the reference step)."""
        path = step_kernels(hidden, backends) if not self.dt_min else None  # the fused steps have no dt floor
        if path is None:
            out, new = self._step_reference(hidden, state)
            state.copy_(new)
            return out
        b, h, p, n = hidden.shape[0], self.nheads, self.headdim, self.d_state
        z, xbc, dt = self._in_proj(hidden).split([self.d_inner, self.conv_dim, h], dim=-1)
        A, D, dt_bias = self.float_params()
        weight = self.conv1d.weight.squeeze(1)  # (conv_dim, k)
        norm = self.norm
        if path == "triton":
            y = probes.triton_ssd().ssd_step(xbc, dt, z, state.conv, weight, self.conv1d.bias, state.ssm, A, D, dt_bias,
                                             None if norm is None else norm.weight, self.d_inner // self.ngroups,
                                             self.eps)  # fmt: skip
        else:
            xbc = causal_conv_update_silu(xbc, state.conv, weight, self.conv1d.bias)
            x, B, C = self._split(xbc)
            y = probes.selective_state_update()(
                state.ssm, x, dt.unsqueeze(-1).expand(b, h, p), A[:, None, None].expand(h, p, n), B, C,
                D[:, None].expand(h, p), z=None, dt_bias=dt_bias[:, None].expand(h, p), dt_softplus=True,
            )  # stride-0 broadcasts over the head dim: the kernel's tied-head-dim path
            if norm is None:
                y = y.flatten(-2) * F.silu(z)
            else:
                _, gated_rmsnorm = probes.ssd_kernels()
                y = gated_rmsnorm(y.flatten(-2), norm.weight, None, z=z, eps=norm.eps, group_size=norm.group_size,
                                  norm_before_gate=False)  # fmt: skip
        return F.linear(y.to(hidden.dtype), self.out_proj.weight, self.out_proj.bias)

    def _step_reference(self, hidden: torch.Tensor, state: SSMState) -> tuple[torch.Tensor, SSMState]:
        z, xbc, dt = self._in_proj(hidden).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        window = torch.cat([state.conv, xbc.unsqueeze(-1)], dim=-1)  # (b, conv_dim, k)
        xbc = (window * self.conv1d.weight.squeeze(1)).sum(-1)
        if self.conv1d.bias is not None:
            xbc = xbc + self.conv1d.bias
        x, B, C = self._split(F.silu(xbc))
        dt = self._step_size(dt)
        y, h = ssd_step(state.ssm, x, dt, -torch.exp(self.A_log.float()), B, C)
        y = (y + x.float() * self.D.float()[:, None]).flatten(-2)
        return self.out_proj(self._gate(y, z).to(hidden.dtype)), SSMState(conv=window[:, :, 1:], ssm=h)


def ssd_kernel(mixer: Mamba2Mixer, hidden: torch.Tensor, backends: Backends) -> str | None:
    """The SSD scan the mixer's fast path runs on `hidden` (backends.scan_path): "mamba_ssm" (its Triton SSD, with a
    backward) where installed, else "triton" (the project's, forward only); None: the reference path."""
    if not backends.on(hidden) or mixer.dt_min:  # the fused scans here take no dt floor: the reference computes it
        return None
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in mixer.parameters()))
    path = backends.scan_path(hidden, probes.ssd_kernels() is not None, needs_grad)
    return None if path == "triton" and probes.triton_ssd() is None else path


def step_kernels(x: torch.Tensor, backends: Backends) -> str | None:
    """Which fused decode step runs on x (backends.step_path): "mamba_ssm" where its selective_state_update and gated
    norm import (the default with causal_conv1d's update kernel too: without it the conv update would be PyTorch's,
    and the Triton step fuses it), "triton" (the project's), or None (the reference step)."""
    mamba = probes.selective_state_update() is not None and probes.ssd_kernels() is not None
    path = backends.step_path(x, mamba, preferred=probes.causal_conv1d_update() is not None)
    return None if path == "triton" and probes.triton_ssd() is None else path
