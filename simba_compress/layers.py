"""What every layer of the model shares: the model's shape (ModelConfig), the norms, and the mixer interface.

A block is `x = x + mixer(norm(x))`, and in hybrids that have one, `x = x + mlp(norm2(x))` after it. Each mixer
type (mamba1.py, mamba2.py, attention.py, mlp.py's MLP layer of NemotronH, shared.py's Zamba2 hybrid layer (a use of
a shared transformer block, then Mamba-2; its step also takes the token's embedding, and its block gives it the stream
un-normalised), and parallel.py's attention beside an SSM mixer, Falcon-H1's) implements one interface, so the model (model.py) and the decode runtime (generation.py) know
mixers only through it, as mamba_ssm's modules share `forward` / `step` / `allocate_inference_cache`:

    forward(hidden (b, w, d_model), ctx: MixerContext) -> MixerOutput(out, score, state)
        runs on the w tokens it is given (the kept ones: the model prunes between layers), computes the
        in-layer score ctx.score asks for (pruning.IN_LAYER) from its own quantities, and returns its decode
        state after the last token when ctx.want_state
    step(hidden (b, d_model), state, backends) -> out (b, d_model)
        one new token; updates `state` in place (the decode runtime replays it from a CUDA graph)
    zero_state(batch, device, dtype, capacity=0) -> state
        the decode state's buffers, zeroed; capacity: the tokens the state must hold (an attention layer's KV
        cache: the prompt tokens the layer kept plus the new tokens to generate; a recurrent state ignores it)
    prepare_step()
        refreshes what the step reads besides its state (float32 copies of parameters), outside any graph

This module imports nothing of the package but backends.py and kernels.py: it sits below every mixer and the
model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .backends import Backends
from .kernels import rms_norm

LAYER_KINDS = ("mamba1", "mamba2")  # the SSM layers' kind (ModelConfig.layer)
MIXER_KINDS = LAYER_KINDS + ("attention", "mlp", "parallel", "shared")  # what ModelConfig.kind(i) returns
ATTENTION_KINDS = ("attention", "parallel", "shared")  # the kinds with an attention (a KV cache, SnapKV's score)
ARCHS = ("", "mamba_ssm", "granitemoehybrid", "bamba", "nemotron_h", "jamba", "falcon_h1", "zamba2")  # checkpoint families
MLP_ACTS = ("silu", "relu2", "gelu")


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
    d_inner_size: int = 0  # the SSM's d_inner where it is not expand * d_model (NemotronH: heads x head dim); 0: that
    bcdt_norm: bool = False  # Mamba-1: RMSNorms on dt (before dt_proj), B and C, eps norm_eps (Jamba)
    ssm_norm: bool = True  # Mamba-2: the gated RMSNorm before out_proj; False: y * silu(z) alone (Falcon-H1's default)
    dt_min: float = 0.0  # Mamba-2: softplus(dt + dt_bias) clamped from below in the prefill and the step (Zamba2's
    # time_step_min; its transformers decode step does not clamp, its prefill does: the prefill is the reference)
    # Hybrids (all off by default: a pure Mamba model). Attention layers (attention.py): mamba_ssm's MHA and
    # transformers' GQA attention in one form: a fused qkv in_proj, an optional causal depthwise conv over qkv
    # (mamba_ssm's d_conv), partial or full RoPE (rotate-half convention) or none, out_proj.
    attn_layers: list[int] = field(default_factory=list)
    attn_heads: int = 0
    attn_kv_heads: int = 0  # 0: attn_heads
    attn_head_dim: int = 0  # 0: d_model // attn_heads
    attn_conv: int = 0  # mamba_ssm's attn_cfg.d_conv (0: none)
    rotary_dim: int = 0  # leading dims of each head rotated (0: no positional encoding, NoPE)
    rope_theta: float = 10000.0
    attn_qkv_bias: bool = False
    attn_out_bias: bool = False
    attn_scale: float = 0.0  # softmax scale (0: attn_head_dim ** -0.5; Granite: attention_multiplier)
    attn_parallel: bool = False  # the attention layers run beside an SSM mixer on the same input, summed (Falcon-H1)
    # Zamba2 (shared.py): the attention layers are hybrid layers, each a use of one of shared_blocks transformer blocks
    # (use u: block u % shared_blocks) whose attention reads [stream; original embeddings] (2 d_model), each use with
    # LoRA adapters of rank adapter_rank on the MLP's fc1 (and on q, k, v with attn_adapters) and a d x d linear
    shared_blocks: int = 0
    adapter_rank: int = 0
    attn_adapters: bool = False
    # MLPs (mlp.py): after every block's mixer (block_mlp: mamba_ssm's d_intermediate, Granite's shared MLP, Bamba's
    # feed-forward), or as layers of their own (mlp_layers: NemotronH's '-' layers)
    d_intermediate: int = 0
    block_mlp: bool = False
    mlp_layers: list[int] = field(default_factory=list)
    mlp_gated: bool = True  # act(gate) * up (gate the first half of fc1), or act(fc1 x)
    mlp_act: str = "silu"  # "silu" or "relu2" (NemotronH)
    mlp_bias: bool = False
    n_experts: int = 0  # a mixture of n_experts gated MLPs, each token routed to its top experts_per_token; 0: none
    experts_per_token: int = 0
    expert_intermediate: int = 0
    moe_layers: list[int] = field(default_factory=list)  # the blocks whose MLP is the MoE (default: every block)
    moe_shared: bool = True  # Granite: a shared MLP beside the experts; Jamba: the experts alone
    moe_renormalize: bool = True  # Granite: softmax over the top-k logits; Jamba: the top-k of the softmax over all
    # Granite's scalings: the embedding times embedding_multiplier, each block output times residual_multiplier
    # before it joins the stream, the logits divided by logits_scaling
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # Falcon-H1's muP multipliers: the logits times lm_head_multiplier; a parallel layer's SSM and attention inputs
    # and outputs times ssm_in/out_multiplier and attn_in/out_multiplier; the SSM's in_proj output times one
    # multiplier per part (z, x, B, C, dt: ssm_proj_multipliers, [] for none); the keys times key_multiplier; a
    # gated MLP's gate times mlp_multipliers[0] before the activation and its output times mlp_multipliers[1]
    lm_head_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    attn_in_multiplier: float = 1.0
    attn_out_multiplier: float = 1.0
    key_multiplier: float = 1.0
    ssm_proj_multipliers: list[float] = field(default_factory=list)
    mlp_multipliers: list[float] = field(default_factory=list)
    arch: str = ""  # the checkpoint family the weights are written back in ("": transformers' Mamba / Mamba2)

    def __post_init__(self) -> None:
        if self.layer not in LAYER_KINDS:
            raise ValueError(f"layer: must be one of {', '.join(LAYER_KINDS)}, got {self.layer!r}")
        if self.dt_rank in (0, None, "auto"):
            self.dt_rank = math.ceil(self.d_model / 16)
        for f in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "dt_rank", "headdim", "ngroups"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f}: must be a positive integer, got {v!r}")
        for f in ("d_inner_size", "attn_heads", "attn_kv_heads", "attn_head_dim", "attn_conv", "rotary_dim",
                  "d_intermediate", "n_experts", "experts_per_token", "expert_intermediate", "shared_blocks",
                  "adapter_rank"):  # fmt: skip
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{f}: must be an integer >= 0, got {v!r}")
        if self.layer == "mamba2" and (self.d_inner % self.headdim or (self.d_inner // self.headdim) % self.ngroups):
            raise ValueError(f"headdim {self.headdim} and ngroups {self.ngroups} must divide d_inner {self.d_inner} into heads")
        self.attn_layers, self.mlp_layers = sorted(int(i) for i in self.attn_layers), sorted(int(i) for i in self.mlp_layers)
        self.moe_layers = sorted(int(i) for i in self.moe_layers) or (list(range(self.n_layer)) if self.n_experts else [])
        for name, idx in (("attn_layers", self.attn_layers), ("mlp_layers", self.mlp_layers), ("moe_layers", self.moe_layers)):
            if len(set(idx)) != len(idx) or any(not 0 <= i < self.n_layer for i in idx):
                raise ValueError(f"{name}: distinct layer indices in [0, {self.n_layer}), got {idx}")
        if set(self.attn_layers) & set(self.mlp_layers):
            raise ValueError(f"attn_layers and mlp_layers overlap: {sorted(set(self.attn_layers) & set(self.mlp_layers))}")
        if self.attn_layers:
            if self.attn_heads < 1:
                raise ValueError("attn_heads: attention layers need at least one head")
            self.attn_kv_heads = self.attn_kv_heads or self.attn_heads
            self.attn_head_dim = self.attn_head_dim or self.d_model // self.attn_heads
            if self.attn_heads % self.attn_kv_heads:
                raise ValueError(f"attn_kv_heads {self.attn_kv_heads} must divide attn_heads {self.attn_heads}")
            if self.rotary_dim % 2 or self.rotary_dim > self.attn_head_dim:
                raise ValueError(f"rotary_dim: an even number <= attn_head_dim {self.attn_head_dim}, got {self.rotary_dim}")
        if (self.block_mlp or self.mlp_layers) and self.d_intermediate < 1:
            raise ValueError("d_intermediate: an MLP needs a hidden size >= 1")
        if self.block_mlp and self.mlp_layers:
            raise ValueError("block_mlp and mlp_layers: a model has MLPs after its mixers or as layers, not both")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"mlp_act: one of {', '.join(MLP_ACTS)}, got {self.mlp_act!r}")
        if self.n_experts and not (self.block_mlp and 1 <= self.experts_per_token <= self.n_experts
                                   and self.expert_intermediate >= 1):  # fmt: skip
            raise ValueError("n_experts: experts sit in the block MLPs (block_mlp), with 1 <= experts_per_token <= "
                             "n_experts and expert_intermediate >= 1")
        if self.moe_layers and not self.n_experts:
            raise ValueError("moe_layers: MoE blocks need n_experts >= 1")
        if self.bcdt_norm and self.layer != "mamba1":
            raise ValueError("bcdt_norm: the dt, B and C norms are Mamba-1's (Jamba)")
        if self.attn_parallel and not self.attn_layers:
            raise ValueError("attn_parallel: needs attention layers to run beside the SSM mixers")
        for name, n in (("ssm_proj_multipliers", 5), ("mlp_multipliers", 2)):
            if len(getattr(self, name)) not in (0, n):
                raise ValueError(f"{name}: {n} multipliers or none, got {getattr(self, name)!r}")
        if self.mlp_multipliers and not self.mlp_gated:
            raise ValueError("mlp_multipliers: the gate multiplier needs a gated MLP")
        if self.shared_blocks and not (self.attn_layers and self.layer == "mamba2" and not self.attn_parallel
                                       and self.d_intermediate >= 1 and self.adapter_rank >= 1
                                       and not self.block_mlp and not self.mlp_layers):  # fmt: skip
            raise ValueError("shared_blocks: Zamba2's shared blocks need attention layers (their uses), Mamba-2, "
                             "d_intermediate >= 1, adapter_rank >= 1, and no other MLPs")
        if self.attn_adapters and self.attn_kv_heads != self.attn_heads:
            raise ValueError("attn_adapters: the q, k and v adapters need attn_kv_heads == attn_heads")
        if self.dt_min < 0 or (self.dt_min and self.layer != "mamba2"):
            raise ValueError(f"dt_min: a Mamba-2 step-size floor >= 0, got {self.dt_min!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch: one of {ARCHS}, got {self.arch!r}")

    @property
    def d_inner(self) -> int:
        return self.d_inner_size or self.expand * self.d_model

    @property
    def hybrid(self) -> bool:
        """Whether any layer is not an SSM layer, or a block has an MLP."""
        return bool(self.attn_layers or self.mlp_layers or self.block_mlp)

    def kind(self, layer: int) -> str:
        """The mixer kind of layer `layer`: the SSM kind (`layer`), "attention", "mlp", "parallel" (attention beside
        the SSM mixer) or "shared" (Zamba2's hybrid layer: a shared transformer block's use, then Mamba-2)."""
        if layer in self.attn_layers:
            return "shared" if self.shared_blocks else "parallel" if self.attn_parallel else "attention"
        if layer in self.mlp_layers:
            return "mlp"
        return self.layer

    def shared_use(self, layer: int) -> tuple[int, int]:
        """Zamba2: (u, block) of hybrid layer `layer`: its use's index among the hybrid layers and the shared block
        it uses (u % shared_blocks)."""
        u = self.attn_layers.index(layer)
        return u, u % self.shared_blocks

    def moe(self, layer: int | None) -> bool:
        """Whether block `layer`'s MLP is the MoE (None: a block of the model, the MoE where every block has it)."""
        return bool(self.n_experts) and (len(self.moe_layers) == self.n_layer if layer is None else layer in self.moe_layers)

    @property
    def kinds(self) -> list[str]:
        return [self.kind(i) for i in range(self.n_layer)]

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
    # For attention (the SSM mixers ignore both): offset (b,) the left padding of each row, so a token's RoPE
    # position is positions - offset (transformers' position_ids of a left-padded batch), None where no row is
    # left-padded; window: the trailing queries of each row whose attention ranks the keys ("snapkv": at least the
    # protected tail, pruning.SimbaConfig.protect_last)
    offset: torch.Tensor | None = None
    window: int = 1
    embeddings: torch.Tensor | None = None  # (b, w, d_model) Zamba2's shared blocks: the original embeddings of the slots


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


@dataclass
class KVState:
    """Decode state of an attention layer: the keys and values of the tokens it kept, left-aligned in a buffer of
    `capacity` tokens, each row's entries in use (length) and the RoPE position of its next token; with a conv
    over qkv (mamba_ssm's d_conv) its last k-1 inputs."""

    k: torch.Tensor  # (b, kv heads, capacity, head dim), rotated
    v: torch.Tensor  # (b, kv heads, capacity, head dim)
    length: torch.Tensor  # (b,) int64
    position: torch.Tensor  # (b,) int64
    conv: torch.Tensor | None = None  # (b, qkv dim, k - 1)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def copy_(self, other: "KVState") -> None:
        """Load `other` (a prefill's state, possibly of a smaller capacity) into these buffers."""
        n = other.capacity
        if n > self.capacity:
            raise ValueError(f"KVState: {n} cached tokens do not fit a buffer of {self.capacity}")
        self.k[:, :, :n].copy_(other.k)
        self.v[:, :, :n].copy_(other.v)
        self.length.copy_(other.length)
        self.position.copy_(other.position)
        if self.conv is not None:
            self.conv.copy_(other.conv)

    def clone(self) -> "KVState":
        return KVState(self.k.clone(), self.v.clone(), self.length.clone(), self.position.clone(),
                       None if self.conv is None else self.conv.clone())  # fmt: skip


@dataclass
class ParallelState:
    """Decode state of a parallel layer (parallel.py): its SSM mixer's and its attention's."""

    ssm: SSMState
    kv: KVState

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    def copy_(self, other: "ParallelState") -> None:
        self.ssm.copy_(other.ssm)
        self.kv.copy_(other.kv)

    def clone(self) -> "ParallelState":
        return ParallelState(self.ssm.clone(), self.kv.clone())


class Mixer(nn.Module):
    """The interface every mixer implements (module docstring)."""

    def forward(self, hidden: torch.Tensor, ctx: MixerContext) -> MixerOutput:
        raise NotImplementedError

    def step(self, hidden: torch.Tensor, state, backends: Backends) -> torch.Tensor:
        raise NotImplementedError

    def zero_state(self, batch: int, device, dtype: torch.dtype, capacity: int = 0):
        """The decode state, zeroed. `capacity` (tokens the state must hold) is an extension for the attention
        layers' KV cache: the decode runtime knows the tokens each layer kept of the prompt and how many new ones
        it will generate. A recurrent state has a fixed size and ignores it."""
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
    module: nn.Module | None, h: torch.Tensor, add: torch.Tensor | None, inplace: bool, backends: Backends = Backends()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + add, its norm): the previous block's output joins the stream as this block normalises it. In place
    in h when `inplace` (h is the caller's to change) and no autograd runs: for RMSNorm one Triton pass on CUDA
    that reads the stream once and writes it once (mamba_ssm's fused add-norm)."""
    if add is not None:
        grad = torch.is_grad_enabled() and (h.requires_grad or add.requires_grad)
        if inplace and not grad and isinstance(module, RMSNorm) and h.is_contiguous():
            return h, module(h, add, backends)
        h = h + add  # one kernel: the add promotes add to the stream's dtype
    # module None: a block whose mixer normalises what it reads itself (Zamba2's hybrid layer) gets the stream
    return h, h if module is None else norm(module, h, backends)
