"""What every layer of the model shares: the model's shape (ModelConfig), the norms, and the mixer interface.

A block is `x = x + mixer(norm(x))`. Each mixer type (mamba1.py, mamba2.py) implements one interface, so the
model (model.py) and the decode runtime (generation.py) know mixers only through it, as mamba_ssm's modules
share `forward` / `step` / `allocate_inference_cache`:

    forward(hidden (b, w, d_model), ctx: MixerContext) -> MixerOutput(out, score, state)
        runs on the w tokens it is given (the kept ones: the model prunes between layers), computes the
        in-layer score ctx.score asks for (pruning.IN_LAYER) from its own quantities, and returns its decode
        state after the last token when ctx.want_state
    step(hidden (b, d_model), state, backends) -> out (b, d_model)
        one new token; updates `state` in place (the decode runtime replays it from a CUDA graph)
    zero_state(batch, device, dtype) -> state
        the decode state's buffers, zeroed
    prepare_step()
        refreshes what the step reads besides its state (float32 copies of parameters), outside any graph

This module imports nothing of the package but backends.py and kernels.py: it sits below every mixer and the
model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .backends import Backends
from .kernels import rms_norm

LAYER_KINDS = ("mamba1", "mamba2")


@dataclass(frozen=True)
class ScanChunks:
    """How a fused prefill kernel walks a row: one chunk for rows up to short[-1] tokens (the smallest of `short`
    that holds the row), whole `chunk`-token chunks beyond. A row that is not a whole number of chunks costs the
    chunks it rounds up to (mamba_ssm's Mamba-1 scan takes a slower path on it: 1.2-1.5x the time of the whole
    chunks on the H200, benchmarks/results/gpu_scan.json; its SSD computes a partial chunk as a whole one). So the
    mixers pad a row to scan_length (exact: zero inputs leave the state at zero), flops.count counts those
    steps, and SimbaConfig.align keeps pruned widths on keeps_width."""

    chunk: int
    short: tuple[int, ...]

    def scan_length(self, tokens: int) -> int:
        for size in self.short:
            if tokens <= size:
                return size
        return -(-tokens // self.chunk) * self.chunk

    def keeps_width(self, tokens):
        """Whether align leaves a width as it is (an int, or an array elementwise): one short chunk, or whole chunks."""
        return (tokens <= self.short[-1]) | (tokens % self.chunk == 0)

    def below(self, tokens: int) -> int:
        """The largest width align keeps at or below `tokens` (not below the largest short chunk)."""
        return max(tokens // self.chunk * self.chunk, self.short[-1])


# How each kind's fused prefill walks a row. Mamba-1: mamba_ssm's selective scan, one chunk of 128, 256, 512 or 1024
# steps for short rows, 2048-step chunks beyond. Mamba-2: mamba_ssm's Triton SSD (and the project's) masks a partial
# last chunk instead of taking a slower path, so its rows are not padded and every width is counted at its own tokens
# (chunks of one token); whether a partial 256-token chunk costs a whole one on the GPU is what
# benchmarks/gpu_prefill.py --mamba2-kernels measures (if it does: ScanChunks(chunk=256, short=(256,)) here).
SCAN_CHUNKS = {"mamba1": ScanChunks(chunk=2048, short=(128, 256, 512, 1024)), "mamba2": ScanChunks(chunk=1, short=(1,))}


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
    layer: str = "mamba1"  # the SSM layers' kind: "mamba1" or "mamba2"
    headdim: int = 64  # Mamba-2: channels per head
    ngroups: int = 1  # Mamba-2: groups sharing B and C

    def __post_init__(self) -> None:
        if self.layer not in LAYER_KINDS:
            raise ValueError(f"layer: must be one of {', '.join(LAYER_KINDS)}, got {self.layer!r}")
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

    def kind(self, layer: int) -> str:
        """The mixer kind of layer `layer`."""
        return self.layer

    @property
    def scan_chunks(self) -> ScanChunks:
        """How the SSM layers' fused prefill walks a row (padding counted in FLOPs, widths SimbaConfig.align keeps)."""
        return SCAN_CHUNKS[self.layer]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class MixerContext:
    """What the model tells a mixer about the tokens it runs on (w slots per row)."""

    mask: torch.Tensor | None  # (b, w) bool: slot holds a real token; None when no slot is padding
    last: torch.Tensor  # (b,) slot of each row's last real token: the position an in-layer score is taken against
    positions: torch.Tensor | None = None  # (b, w) each slot's position in the input row (padding slots: its length)
    score: str | None = None  # the in-layer criterion to compute (pruning.IN_LAYER), or None
    want_state: bool = False  # return the decode state after the row's last slot
    backends: Backends = Backends()


@dataclass
class MixerOutput:
    out: torch.Tensor  # (b, w, d_model)
    score: torch.Tensor | None = None  # (b, w) float32, the in-layer criterion's scores
    state: object | None = None  # the mixer's decode state (SSMState for the Mamba mixers)


@dataclass
class SSMState:
    """Decode state of a Mamba layer: the last k-1 conv inputs and the SSM state (float32)."""

    conv: torch.Tensor  # (b, conv channels, k - 1)
    ssm: torch.Tensor  # Mamba-1 (b, d_inner, d_state); Mamba-2 (b, heads, headdim, d_state)

    def copy_(self, other: "SSMState") -> None:
        self.conv.copy_(other.conv)
        self.ssm.copy_(other.ssm)

    def clone(self) -> "SSMState":
        return SSMState(self.conv.clone(), self.ssm.clone())


class Mixer(nn.Module):
    """The interface every mixer implements (module docstring)."""

    def forward(self, hidden: torch.Tensor, ctx: MixerContext) -> MixerOutput:
        raise NotImplementedError

    def step(self, hidden: torch.Tensor, state, backends: Backends) -> torch.Tensor:
        raise NotImplementedError

    def zero_state(self, batch: int, device, dtype: torch.dtype):
        raise NotImplementedError

    def prepare_step(self) -> None:
        """Refresh what the step reads besides its state; nothing by default."""


class RMSNorm(nn.Module):
    """(x * rsqrt(mean(x^2) + eps)) in float32, in the weight's dtype, times the weight (kernels.rms_norm: one
    Triton pass on CUDA). It reads the float32 residual stream as it is, as mamba_ssm's fused add-norm does."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None, backends: Backends = Backends()) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, add, backends)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.rms_norm else nn.LayerNorm(cfg.d_model, cfg.norm_eps)


def norm(module: nn.Module, h: torch.Tensor, backends: Backends = Backends()) -> torch.Tensor:
    """A block's (or the final) norm of the residual stream h: RMSNorm reads h as it is; LayerNorm in its dtype."""
    return module(h, backends=backends) if isinstance(module, RMSNorm) else module(h.to(module.weight.dtype))


def add_norm(
    module: nn.Module, h: torch.Tensor, add: torch.Tensor | None, inplace: bool, backends: Backends = Backends()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + add, its norm): the previous block's output joins the stream as this block normalises it. In place
    in h when `inplace` (h is the caller's to change) and no autograd runs: for RMSNorm one Triton pass on CUDA
    that reads the stream once and writes it once (mamba_ssm's fused add-norm)."""
    if add is not None:
        grad = torch.is_grad_enabled() and (h.requires_grad or add.requires_grad)
        if inplace and not grad and isinstance(module, RMSNorm) and h.is_contiguous():
            return h, module(h, add, backends)
        h = h + add  # one kernel: the add promotes add to the stream's dtype
    return h, norm(module, h, backends)
