"""A Mamba language model in plain PyTorch whose forward prunes tokens between layers (Simba).

Parameter names follow transformers' MambaForCausalLM, so a state dict moves between the two unchanged.
Shapes: b batch, l tokens, d d_inner, n d_state, k d_conv, r dt_rank.

    embeddings -> [ x = x + mixer(norm(x)) ] * n_layer -> norm_f -> lm_head

With a SimbaConfig, layer l+1 runs only on the tokens layer l's criterion ranked highest (pruning.py);
a dropped token's residual stream is frozen and scattered back before norm_f, so every position has logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .pruning import CRITERION_FNS, IN_LAYER, SimbaConfig, TokenPlan
from .ssm import channel_share, selective_scan, selective_step, step_norm
from .ssm.kernels import freeze_and_gather, mamba1_forward, rms_norm, scan_kernel


@dataclass
class ModelConfig:
    """Shape of a Mamba model (Mamba-1 by default). vocab_size is the embedding's row count (padded vocab)."""

    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0: ceil(d_model / 16), as mamba_ssm's "auto"
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    rms_norm: bool = True
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    layer: str = "mamba1"  # "mamba1" or "mamba2"
    headdim: int = 64  # Mamba-2: channels per head
    ngroups: int = 1  # Mamba-2: groups sharing B and C

    def __post_init__(self) -> None:
        if self.layer not in ("mamba1", "mamba2"):
            raise ValueError(f"layer: must be mamba1 or mamba2, got {self.layer!r}")
        if self.dt_rank in (0, None, "auto"):
            self.dt_rank = math.ceil(self.d_model / 16)
        for f in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "dt_rank", "headdim", "ngroups"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f}: must be a positive integer, got {v!r}")
        if self.layer == "mamba2" and (self.d_inner % self.headdim or (self.d_inner // self.headdim) % self.ngroups):
            raise ValueError(f"headdim {self.headdim} and ngroups {self.ngroups} must divide d_inner {self.d_inner} into heads")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class RMSNorm(nn.Module):
    """(x * rsqrt(mean(x^2) + eps)) in float32, in the weight's dtype, times the weight (kernels.rms_norm: one
    Triton pass on CUDA). It reads the float32 residual stream as it is, as mamba_ssm's fused add-norm does."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, add)


def norm(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A block's (or the final) norm of the residual stream h: RMSNorm reads h as it is; LayerNorm in its dtype."""
    return module(h) if isinstance(module, RMSNorm) else module(h.to(module.weight.dtype))


def add_norm(module: nn.Module, h: torch.Tensor, add: torch.Tensor | None, inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + add, its norm): the previous block's output joins the stream as this block normalises it. In place
    in h when `inplace` (h is the caller's to change) and no autograd runs: for RMSNorm one Triton pass on CUDA
    that reads the stream once and writes it once (mamba_ssm's fused add-norm)."""
    if add is not None:
        grad = torch.is_grad_enabled() and (h.requires_grad or add.requires_grad)
        if inplace and not grad and isinstance(module, RMSNorm) and h.is_contiguous():
            return h, module(h, add)
        h = h + add  # one kernel: the add promotes add to the stream's dtype
    return h, norm(module, h)


@dataclass
class LayerState:
    """Recurrent state of one layer for decoding: the last k-1 conv inputs and the SSM state."""

    conv: torch.Tensor  # (b, d, k-1)
    ssm: torch.Tensor  # (b, d, n) float32


class MambaMixer(nn.Module):
    """Mamba-1 mixer (mamba_ssm's Mamba, reference path)."""

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

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        score: str | None = None,
        last: torch.Tensor | None = None,
        want_state: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, LayerState | None]:
        """hidden (b, l, d_model) -> (out, scores, state).

        mask (b, l) bool zeroes padding's input (it then cannot reach real tokens). score names an in-layer
        criterion (pruning.IN_LAYER: "simba", each token's global impact on row position last[b], computed inside
        the scan; "share", the same impacts as shares of each channel's total; "deci", the norm of its step sizes)
        whose (b, l) scores are returned; None: no scores.
        """
        m = None if mask is None else mask.unsqueeze(-1).to(hidden.dtype)
        scan = scan_kernel(self, hidden)
        if scan is not None:  # CUDA: channel-major, mamba_ssm's scan or the Triton one, the score from Triton
            out, impact, conv, ssm = mamba1_forward(self, hidden, m, score, last, want_state, scan)
            return out, impact, LayerState(conv=conv, ssm=ssm) if want_state else None
        if m is not None:
            hidden = hidden * m
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, d) each
        xc = F.pad(x.transpose(1, 2), (self.d_conv - 1, 0))  # causal conv: k-1 zeros on the left
        x = F.silu(F.conv1d(xc, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)).transpose(1, 2).contiguous()
        if m is not None:
            x = x * m
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_raw = F.linear(dt, self.dt_proj.weight)  # the bias is added in float32, as mamba_ssm's kernel does
        dt = F.softplus(dt_raw.float() + self.dt_proj.bias.float())  # (b, l, d)
        A = -torch.exp(self.A_log.float())  # (d, n)
        y, h, impact = selective_scan(x, dt, A, B, C, last=last if score == "simba" else None)  # fused score
        if score == "share":
            impact = channel_share(x, dt, A, B, C, last)
        elif score == "deci":
            impact = step_norm(dt)
        y = (y + x.float() * self.D.float()) * F.silu(z.float())
        out = self.out_proj(y.to(hidden.dtype))
        state = LayerState(conv=xc[:, :, -(self.d_conv - 1) :].clone(), ssm=h) if want_state else None
        return out, impact, state

    def step(self, hidden: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        """Decode one token: hidden (b, d_model)."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, d)
        window = torch.cat([state.conv, x.unsqueeze(-1)], dim=-1)  # (b, d, k)
        x = (window * self.conv1d.weight.squeeze(1)).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        y, h = selective_step(state.ssm, x, dt, -torch.exp(self.A_log.float()), B, C)
        y = (y + x.float() * self.D.float()) * F.silu(z.float())
        return self.out_proj(y.to(hidden.dtype)), LayerState(conv=window[:, :, 1:], ssm=h)


class MambaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.rms_norm else nn.LayerNorm(cfg.d_model, cfg.norm_eps)
        if cfg.layer == "mamba2":
            from .mamba2 import Mamba2Mixer  # imports this module: only here

            self.mixer = Mamba2Mixer(cfg)
        else:
            self.mixer = MambaMixer(cfg)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.rms_norm else nn.LayerNorm(cfg.d_model, cfg.norm_eps)


@dataclass
class LMOutput:
    logits: torch.Tensor  # (b, l, vocab), or (b, last_logits, vocab)
    states: list[LayerState] | None = None  # per layer, after the (pruned) prefill
    kept: list[torch.Tensor] | None = None  # per layer, the original positions it ran on (b, w); -1 = padding slot


@dataclass
class Prefix:
    """The residual stream after the first `layers` layers ran on every token, and the last one's global impact.

    Layer 0 runs on every token under any schedule, so a schedule search computes this once per batch and
    starts each trial's forward from it (forward(prefix=...)) instead of from the embeddings.
    """

    hidden: torch.Tensor  # (b, l, d_model) residual stream, stream dtype
    impact: torch.Tensor | None  # (b, l) the last prefix layer's in-layer scores (criterion's), None if it has none
    layers: int
    criterion: str = "simba"


class MambaLM(nn.Module):
    """Mamba causal LM (Mamba-1 or Mamba-2 mixers). `simba` (a SimbaConfig or None) sets how the forward prunes."""

    def __init__(self, cfg: ModelConfig, simba: SimbaConfig | None = None):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.simba = simba

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def _stream_dtype(self) -> torch.dtype:
        return torch.float32 if self.config.residual_in_fp32 else self.lm_head.weight.dtype

    def _layer(self, i: int, h: torch.Tensor, pending, plan: TokenPlan, score: str | None, want_state: bool, owned: bool):
        """Block i on the residual stream h, the previous block's output `pending` not yet added to it: returns
        (h + pending, this block's output, scores of the in-layer criterion `score` or None, state). The add is
        fused into the norm, in h itself when `owned` (add_norm)."""
        block = self.backbone.layers[i]
        h, x = add_norm(block.norm, h, pending, inplace=owned)
        mixed, impact, state = block.mixer(x, plan.mask, score=score, last=plan.last, want_state=want_state)
        return h, mixed, impact, state

    @torch.no_grad()
    def prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, layers: int = 1, criterion: str = "simba"
    ) -> Prefix:
        """Run the first `layers` layers densely; forward(same inputs, prefix=...) continues from there (with a
        schedule of the same criterion: the last prefix layer's in-layer scores are kept for it)."""
        plan = TokenPlan(attention_mask, *input_ids.shape, None, input_ids.device)
        h, mixed = self.backbone.embeddings(input_ids).to(self._stream_dtype), None
        score = criterion if criterion in IN_LAYER else None
        for i in range(layers):
            h, mixed, impact, _ = self._layer(i, h, mixed, plan, score if i == layers - 1 else None, False, owned=True)
        return Prefix(h + mixed, impact, layers, criterion)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        simba: SimbaConfig | None | str = "model",
        return_states: bool = False,
        return_kept: bool = False,
        prefix: Prefix | None = None,
        last_logits: int | None = None,
    ) -> LMOutput:
        """Logits for every position of input_ids (b, l). simba="model" uses self.simba; None runs dense.

        prefix: start after prefix.layers dense layers (from self.prefix on the same inputs); those layers must
        keep every token under `simba`. last_logits: only the last positions' logits (the LM head is costly).
        """
        simba = self.simba if simba == "model" else simba
        if simba is not None and simba.n_layer != self.config.n_layer:
            raise ValueError(f"simba.keep has {simba.n_layer} layers, the model {self.config.n_layer}")
        b, length = input_ids.shape
        plan = TokenPlan(attention_mask, b, length, simba, input_ids.device)
        frozen = None  # (b, l + 1, d_model): allocated at the first pruning, after layer 0's activations are freed
        # Logits of the last positions only, all of them protected (generate's prefill): the dropped tokens'
        # streams are never read, so they are not kept (no frozen buffer, a gather instead of freeze-and-gather)
        plan.freeze = not (last_logits is not None and simba is not None and last_logits <= simba.protect_last
                           and plan.side == "left")  # fmt: skip
        states, kept_positions = [], []
        mixed, owned = None, prefix is None  # a prefix's stream is the caller's: the first add makes our own copy
        if prefix is None:
            h, start = self.backbone.embeddings(input_ids).to(self._stream_dtype), 0
        else:
            if return_states or return_kept:
                raise ValueError("prefix: return_states and return_kept need the full forward")
            if simba is not None and simba.keep[prefix.layers - 1] < 1.0:
                raise ValueError(f"prefix: simba prunes within its first {prefix.layers} layers")
            if simba is not None and simba.criterion in IN_LAYER and simba.criterion != prefix.criterion:
                raise ValueError(f"prefix: made for criterion {prefix.criterion!r}, not {simba.criterion!r}")
            h, start = prefix.hidden, prefix.layers
            if plan.prunes_after(start - 1):
                h, frozen = self._prune(start - 1, h, prefix.impact, plan, frozen)
        for i in range(start, self.config.n_layer):
            if return_kept:
                kept_positions.append(torch.where(plan.real, plan.idx, -1))
            prune = plan.prunes_after(i)
            score = simba.criterion if prune and simba.criterion in IN_LAYER else None
            h, out, impact, state = self._layer(i, h, mixed, plan, score, return_states, owned)
            owned, mixed = owned or mixed is not None, out  # an add into a stream not ours made a new one
            states.append(state)
            if prune:  # the criteria see the block's output stream
                h, mixed = h + mixed, None
                h, frozen = self._prune(i, h, impact, plan, frozen)
        if mixed is not None:
            h = h + mixed
        if frozen is not None:
            frozen.scatter_(1, plan.idx.unsqueeze(-1).expand_as(h), h)
            h = frozen[:, :length]
        # (without it, h holds the kept tokens in order, each row's last real ones in its last slots)
        if last_logits is not None:
            h = h[:, -last_logits:]
        h = norm(self.backbone.norm_f, h)
        return LMOutput(
            logits=self.lm_head(h.to(self.lm_head.weight.dtype)),
            states=states if return_states else None,
            kept=kept_positions if return_kept else None,
        )

    def _prune(self, layer: int, h: torch.Tensor, impact, plan: TokenPlan, frozen: torch.Tensor | None):
        """After `layer`: keep the criterion's top tokens for layer + 1, freeze the stream of those that leave.
        Returns the next layer's stream and the frozen buffer (allocated here on the first call)."""
        simba = plan.simba
        scores = CRITERION_FNS[simba.criterion](plan.view(layer, h, impact), simba.seed)
        idx = plan.idx  # the slots' positions before select replaces them
        kept = plan.select(scores, layer + 1)
        if not plan.freeze:
            return h.gather(1, kept.unsqueeze(-1).expand(-1, -1, h.shape[-1])), None
        if frozen is None:
            frozen = h.new_zeros(h.shape[0], plan.seq_len + 1, h.shape[-1])
        return freeze_and_gather(h, idx, kept, plan.real, frozen), frozen

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        cuda_graph: bool = True,
    ) -> torch.Tensor:
        """Prefill the prompt (pruned as configured), then decode token by token through every layer: on CUDA
        one graph replay a token (generation.py). Prompts in a batch must be left-padded. Returns (b, l + new)
        token ids; rows that hit eos_token_id are padded with it."""
        from .generation import GenerationConfig, generate

        config = GenerationConfig(max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, cuda_graph)
        return generate(self, input_ids, attention_mask, config, generator).sequences

    def step(self, token: torch.Tensor, states: list[LayerState]) -> tuple[torch.Tensor, list[LayerState]]:
        """One decoding step for token (b,), the reference (functional, no kernels): every layer runs on it (a new
        token is never pruned). Returns the logits (b, vocab) and the new states."""
        h = self.backbone.embeddings(token).to(self._stream_dtype)
        new_states = []
        for block, state in zip(self.backbone.layers, states):
            mixed, state = block.mixer.step(norm(block.norm, h), state)
            h = h + mixed
            new_states.append(state)
        h = norm(self.backbone.norm_f, h)
        return self.lm_head(h.to(self.lm_head.weight.dtype)), new_states
