"""Mamba-1 mixer (mamba_ssm's Mamba): the PyTorch reference path and the CUDA fast path, in one module.

Parameter names follow transformers' MambaMixer, so a state dict moves between the two unchanged.
Shapes: b batch, l tokens, d d_inner, n d_state, k d_conv, r dt_rank.

    x, z = in_proj(u);  x = silu(causal conv(x));  dt, B, C = x_proj(x);  dt = softplus(dt_proj(dt))
    y = scan(x, dt, A = -exp(A_log), B, C) + D x;   out = out_proj(y * silu(z))

Jamba's Mamba-1 (ModelConfig.bcdt_norm) normalises dt, B and C after x_proj, each by an RMSNorm of its own
(dt_layernorm, b_layernorm, c_layernorm: transformers' JambaMambaMixer), on every path: the reference, the fast
prefill (on the channel-major operands) and both fused steps (the Triton step's x_proj partial sums are summed and
normalised between its two kernels, then passed on as one block of sums).

On CUDA the mixer works channel-major, (b, d, l), the layout of the scan kernels, so no activation is transposed
or copied: in_proj is one GEMM that writes x and z as (b, d, l) views (as mamba_ssm's Mamba does), x_proj and
dt_proj are batched GEMMs whose outputs B, C (b, n, l) and dt (b, d, l) are already the kernel's operands, and
the kernel applies softplus(dt + bias), D and the silu(z) gate itself. The scan is mamba_ssm's selective_scan_fn
where its CUDA extension is built, else the project's Triton scan (forward only); the global-impact score is a
Triton kernel. The decode step runs through mamba_ssm's selective_state_update and causal_conv1d's update where
both are installed, else the project's two Triton step kernels (backends.py says how to choose).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import backends as probes
from .backends import Backends
from .kernels import ALIGN_TOKENS, batched, causal_conv_silu, causal_conv_update_silu, float32_cached, zero_left
from .layers import SCAN_CHUNKS, Mixer, MixerContext, MixerOutput, ModelConfig, RMSNorm, SSMState
from .ssm.scan import selective_scan, selective_step
from .ssm.score import mamba1_score

CHUNKS = SCAN_CHUNKS["mamba1"]  # mamba_ssm's selective scan pads rows to whole chunks of these


class Mamba1Mixer(Mixer):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d, n, r, cfg.d_conv
        self.in_proj = nn.Linear(cfg.d_model, 2 * d, bias=cfg.bias)
        self.conv1d = nn.Conv1d(d, d, cfg.d_conv, groups=d, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, cfg.d_model, bias=cfg.bias)
        self.bcdt_norm = cfg.bcdt_norm
        if cfg.bcdt_norm:  # Jamba
            self.dt_layernorm, self.b_layernorm, self.c_layernorm = (RMSNorm(k, cfg.norm_eps) for k in (r, n, n))

    def _normed(self, dt, B, C, backends: Backends = Backends()):
        """dt (the low-rank step before dt_proj), B and C token-major (..., r) / (..., n), through Jamba's norms
        (unchanged without them)."""
        if not self.bcdt_norm:
            return dt, B, C
        return (self.dt_layernorm(dt, backends=backends), self.b_layernorm(B, backends=backends),
                self.c_layernorm(C, backends=backends))  # fmt: skip

    def forward(self, hidden: torch.Tensor, ctx: MixerContext) -> MixerOutput:
        """hidden (b, l, d_model). ctx.mask zeroes padding's input (it then cannot reach real tokens)."""
        scan = scan_kernel(self, hidden, ctx.backends)
        if scan is not None:
            return self._forward_fast(hidden, ctx, scan)
        m = None if ctx.mask is None else ctx.mask.unsqueeze(-1).to(hidden.dtype)
        if m is not None:
            hidden = hidden * m
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, d) each
        xc = F.pad(x.transpose(1, 2), (self.d_conv - 1, 0))  # causal conv: k-1 zeros on the left
        x = F.silu(F.conv1d(xc, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)).transpose(1, 2).contiguous()
        if m is not None:
            x = x * m
        dt, B, C = self._normed(*self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1))
        dt_raw = F.linear(dt, self.dt_proj.weight)  # the bias is added in float32, as mamba_ssm's kernel does
        dt = F.softplus(dt_raw.float() + self.dt_proj.bias.float())  # (b, l, d)
        A = -torch.exp(self.A_log.float())  # (d, n)
        fused = ctx.score == "simba"  # the score fused into the scan (ssm.scan; ssm.score.global_impact is its twin)
        y, h, score = selective_scan(x, dt, A, B, C, last=ctx.last if fused else None)
        if ctx.score is not None and not fused:
            score = mamba1_score(ctx.score, x, dt, A, B, C, ctx.last)
        y = (y + x.float() * self.D.float()) * F.silu(z.float())
        out = self.out_proj(y.to(hidden.dtype))
        state = SSMState(conv=xc[:, :, -(self.d_conv - 1) :].clone(), ssm=h) if ctx.want_state else None
        return MixerOutput(out, score, state)

    def _forward_fast(self, hidden: torch.Tensor, ctx: MixerContext, scan) -> MixerOutput:
        """forward on CUDA through `scan` (scan_kernel's choice), channel-major. Equal to the reference path up to
        float rounding: the kernel computes dt, the scan, D x and the gate in float32, as the reference does."""
        d, n, r, k = self.d_inner, self.d_state, self.dt_rank, self.d_conv
        mask = None if ctx.mask is None else ctx.mask.unsqueeze(-1).to(hidden.dtype)
        if mask is not None:
            hidden = hidden * mask
        # Zero inputs on the left leave the state at zero, so the real tokens' outputs and the final state (decoding's)
        # are those of the unpadded row. Two paddings use that: (a) the GEMMs run on a multiple of ALIGN_TOKENS
        # tokens (a row stride that is not a multiple of 8 bf16 values misses the tensor-core kernels: 2-3x slower on
        # the H200), (b) mamba_ssm's scan runs on whole chunks (CHUNKS.scan_length): its operands are padded after
        # in_proj, so the projections run on the real tokens only.
        true_length = hidden.shape[1]
        gemm_pad = (-true_length) % ALIGN_TOKENS
        length = true_length + gemm_pad  # the GEMMs' tokens
        scan_len = CHUNKS.scan_length(length) if scan is probes.selective_scan_fn() else length
        pad = scan_len - true_length  # every left zero the scan sees
        if gemm_pad:
            hidden = F.pad(hidden, (0, 0, gemm_pad, 0))
        if mask is not None:
            mask = F.pad(mask, (0, 0, pad, 0))
        last = ctx.last + pad
        b, dm = hidden.shape[0], hidden.shape[2]
        # one GEMM (2d, dm) @ (dm, b l) read as (b, 2d, l): x and z are views with unit stride along l
        xz = (self.in_proj.weight @ hidden.reshape(b * length, dm).t()).view(2 * d, b, length).permute(1, 0, 2)
        if self.in_proj.bias is not None:
            xz = zero_left(xz + self.in_proj.bias.view(1, -1, 1), gemm_pad)  # the padding's input stays zero
        if scan_len > length:
            xz = F.pad(xz, (scan_len - length, 0))
        x, z = xz[:, :d], xz[:, d:]
        conv_state = None
        if ctx.want_state:  # the last k-1 conv inputs, zero-padded on the left as the reference's padded window
            conv_state = F.pad(x[:, :, -(k - 1) :], (max(0, k - 1 - scan_len), 0)).contiguous()
        x = zero_left(causal_conv_silu(x, self.conv1d.weight.squeeze(1), self.conv1d.bias), pad)  # silu(bias) there
        if mask is not None:
            x = x * mask.transpose(1, 2)
        x_dbl = batched(self.x_proj.weight, x)  # (b, r + 2n, L)
        dt_low, B, C = x_dbl[:, :r], x_dbl[:, r : r + n], x_dbl[:, r + n :]  # (b, r or n, L) views
        if self.bcdt_norm:  # normalised token-major, handed back channel-major (small: r + 2n channels)
            dt_low, B, C = (t.mT.contiguous() for t in self._normed(dt_low.mT, B.mT, C.mT, ctx.backends))
        dt_raw = batched(self.dt_proj.weight, dt_low)  # (b, d, L), bias added in float32 by the kernels
        A, D, dt_bias = self.float_params()
        y, h = scan(x, dt_raw, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True, return_last_state=True)
        # y (b, d, L) = (scan + D x) * silu(z) in hidden's dtype; out_proj reads its last `length` tokens transposed,
        # without a copy (an offset that is a multiple of 8, as the GEMM's alignment wants)
        y = y[:, :, scan_len - length :]
        out = torch.bmm(y.transpose(1, 2), self.out_proj.weight.t().unsqueeze(0).expand(b, -1, -1))
        del y, xz, z  # the score runs in their memory: a pruned layer's peak stays at the dense layer's
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        score = None
        if ctx.score == "simba" and ctx.backends.use_triton(x):
            score = probes.triton_kernels().global_impact(x, dt_raw, dt_bias, A, B, C, last)
        elif ctx.score is not None:
            dt = F.softplus(dt_raw.float() + dt_bias[:, None])  # (b, d, L)
            score = mamba1_score(ctx.score, x.mT, dt.mT, A, B.mT, C.mT, last)
        state = SSMState(conv_state, h.float().contiguous()) if ctx.want_state else None
        return MixerOutput(out[:, gemm_pad:], None if score is None else score[:, pad:], state)

    def float_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A = -exp(A_log), D and the dt bias in float32, as the kernels take them (kernels.float32_cached)."""
        return float32_cached(self, (self.A_log, self.D, self.dt_proj.bias),
                              lambda a, dd, bias: (-torch.exp(a.float()), dd.float(), bias.float()))  # fmt: skip

    def prepare_step(self) -> None:
        self.float_params()

    def zero_state(self, batch: int, device, dtype: torch.dtype, capacity: int = 0) -> SSMState:  # recurrent: no capacity
        return SSMState(conv=torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
                        ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32))  # fmt: skip

    def step(self, hidden: torch.Tensor, state: SSMState, backends: Backends) -> torch.Tensor:
        """Decode one token, hidden (b, d_model), updating state in place. On CUDA through fused kernels:
        backends.step "mamba_ssm" (the default where installed): causal_conv1d_update, x_proj, dt_proj and
        mamba_ssm's selective_state_update, as mamba_ssm's own step; "triton" (the default otherwise): the
        project's two kernels for conv + x_proj and dt_proj + the SSM update, between in_proj and out_proj."""
        path = step_kernels(hidden, backends)
        if path is None:
            out, new = self._step_reference(hidden, state)
            state.copy_(new)
            return out
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        xz = F.linear(hidden, self.in_proj.weight, self.in_proj.bias)  # (b, 2d)
        x, z = xz[:, :d], xz[:, d:]
        weight = self.conv1d.weight.squeeze(1)  # (d, k)
        A = self.float_params()[0]
        if path == "mamba_ssm":
            x = causal_conv_update_silu(x, state.conv, weight, self.conv1d.bias)
            dt, B, C = self._normed(*F.linear(x, self.x_proj.weight).split([r, n, n], dim=-1), backends)  # (b, r + 2n)
            dt_raw = F.linear(dt, self.dt_proj.weight)  # (b, d); the bias is added in float32 by the kernel
            y = probes.selective_state_update()(state.ssm, x, dt_raw, A, B, C, self.D, z=z, dt_bias=self.dt_proj.bias,
                                                dt_softplus=True)  # fmt: skip
        else:
            tk = probes.triton_kernels()
            x, parts = tk.conv_xproj_step(x, state.conv, weight, self.conv1d.bias, self.x_proj.weight)
            if self.bcdt_norm:  # x_proj's output (in x's dtype, as ssm_step rounds it), normalised: one block of sums
                normed = self._normed(*parts.sum(1).to(x.dtype).split([r, n, n], dim=-1), backends)
                parts = torch.cat(normed, dim=-1).float().unsqueeze(1)
            y = tk.ssm_step(state.ssm, x, parts, self.dt_proj.weight, self.dt_proj.bias, A, self.D, z)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)

    def _step_reference(self, hidden: torch.Tensor, state: SSMState) -> tuple[torch.Tensor, SSMState]:
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, d)
        window = torch.cat([state.conv, x.unsqueeze(-1)], dim=-1)  # (b, d, k)
        x = (window * self.conv1d.weight.squeeze(1)).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, B, C = self._normed(*self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1))
        dt = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        y, h = selective_step(state.ssm, x, dt, -torch.exp(self.A_log.float()), B, C)
        y = (y + x.float() * self.D.float()) * F.silu(z.float())
        return self.out_proj(y.to(hidden.dtype)), SSMState(conv=window[:, :, 1:], ssm=h)


def scan_kernel(mixer: Mamba1Mixer, hidden: torch.Tensor, backends: Backends):
    """The selective scan the mixer's fast path runs on `hidden` (backends.scan_path): mamba_ssm's selective_scan_fn
    where its CUDA extension is built, else the Triton scan (same contract, forward only); None means the reference
    path (CPU, fast path off, or training without mamba_ssm)."""
    if not backends.on(hidden):
        return None
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in mixer.parameters()))
    path = backends.scan_path(hidden, probes.selective_scan_fn() is not None, needs_grad)
    if path is None:
        return None
    return probes.selective_scan_fn() if path == "mamba_ssm" else probes.triton_kernels().selective_scan


def step_kernels(x: torch.Tensor, backends: Backends) -> str | None:
    """Which fused decode step runs on x: "mamba_ssm" (its and causal_conv1d's update kernels), "triton" (the
    project's), or None (the reference step: CPU, fast path off, or neither installed)."""
    mamba = probes.selective_state_update() is not None and probes.causal_conv1d_update() is not None
    return backends.step_path(x, mamba)
