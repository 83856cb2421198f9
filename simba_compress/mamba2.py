"""Mamba-2 mixer (mamba_ssm's Mamba2, reference path), with the same interface as model.MambaMixer.

Shapes: b batch, l tokens, e = d_inner, h heads of p = headdim, g groups, n d_state, k d_conv.

    in_proj -> z (e), xBC (e + 2 g n), dt (h);  xBC = silu(causal conv(xBC));  x, B, C = split(xBC)
    y = SSD(x, softplus(dt + dt_bias), A, B, C) + D x;  out = out_proj(rmsnorm_groups(y * silu(z)))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import LayerState, ModelConfig
from .ssm.score import step_norm
from .ssm.ssd import ssd_impact, ssd_scan, ssd_share, ssd_step


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


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, n, g = cfg.d_inner, cfg.d_state, cfg.ngroups
        self.d_inner, self.d_state, self.ngroups, self.headdim, self.d_conv = e, n, g, cfg.headdim, cfg.d_conv
        self.nheads = e // cfg.headdim
        self.conv_dim = e + 2 * g * n
        self.in_proj = nn.Linear(cfg.d_model, 2 * e + 2 * g * n + self.nheads, bias=cfg.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.nheads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(e, e // g, cfg.norm_eps)
        self.out_proj = nn.Linear(e, cfg.d_model, bias=cfg.bias)

    def _split(self, xbc: torch.Tensor):
        e, gn = self.d_inner, self.ngroups * self.d_state
        x, B, C = xbc.split([e, gn, gn], dim=-1)
        return x.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (self.ngroups, -1)), C.unflatten(-1, (self.ngroups, -1))

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        score: str | None = None,
        last: torch.Tensor | None = None,
        want_state: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, LayerState | None]:
        """hidden (b, l, d_model) -> (out, impact, state), as MambaMixer.forward."""
        m = None if mask is None else mask.unsqueeze(-1).to(hidden.dtype)
        if m is not None:
            hidden = hidden * m
        z, xbc, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xc = F.pad(xbc.transpose(1, 2), (self.d_conv - 1, 0))  # causal conv: k-1 zeros on the left
        xbc = F.silu(F.conv1d(xc, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)).transpose(1, 2)
        if m is not None:
            xbc = xbc * m
        x, B, C = self._split(xbc)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, l, h)
        A = -torch.exp(self.A_log.float())  # (h,)
        y, h = ssd_scan(x, dt, A, B, C)
        impact = None
        if score == "simba":
            impact = ssd_impact(x, dt, A, B, C, last)
        elif score == "share":
            impact = ssd_share(x, dt, A, B, C, last)
        elif score == "deci":
            impact = step_norm(dt)
        y = (y + x.float() * self.D.float()[:, None]).flatten(-2)  # (b, l, e)
        out = self.out_proj(self.norm(y, z).to(hidden.dtype))
        state = LayerState(conv=xc[:, :, -(self.d_conv - 1) :].clone(), ssm=h) if want_state else None
        return out, impact, state

    def step(self, hidden: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        """Decode one token: hidden (b, d_model)."""
        z, xbc, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        window = torch.cat([state.conv, xbc.unsqueeze(-1)], dim=-1)  # (b, conv_dim, k)
        xbc = (window * self.conv1d.weight.squeeze(1)).sum(-1)
        if self.conv1d.bias is not None:
            xbc = xbc + self.conv1d.bias
        x, B, C = self._split(F.silu(xbc))
        dt = F.softplus(dt.float() + self.dt_bias.float())
        y, h = ssd_step(state.ssm, x, dt, -torch.exp(self.A_log.float()), B, C)
        y = (y + x.float() * self.D.float()[:, None]).flatten(-2)
        return self.out_proj(self.norm(y, z).to(hidden.dtype)), LayerState(conv=window[:, :, 1:], ssm=h)
