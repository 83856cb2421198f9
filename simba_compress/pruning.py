"""Token pruning between layers: the settings, the criteria that rank tokens, and which tokens each layer sees.

After layer l has run on its tokens, a criterion scores them and layer l+1 keeps the top
ceil(keep[l+1] * n) of each row (n = the row's real length) in their original order. The last
`protect_last` real tokens of a row are always kept; a dropped token's residual stream is frozen.

Batches may be padded on one side (attention_mask). A row that keeps fewer tokens than the widest row
is filled with masked slots on its padding side, so its real tokens see exactly what they would see
unpadded: masked slots carry zero input to the SSM, and they sit before (left padding) or after
(right padding) every real token, where they cannot change a real token's state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import SimbaError
from .layers import ATTENTION_KINDS, SCAN_CHUNKS, ScanChunks

CRITERIA = ("simba", "query", "recent-query", "share", "deci", "snapkv", "utr", "l2norm", "random", "stride")
DEFAULT_CRITERION = "simba"  # what --flops, compress(), recipes and SimbaConfig use unless told (README, What to expect)
# criteria whose scores a layer computes from its own quantities while it runs (LayerView.impact): the SSM layers'
# (from their SSM inputs) and the attention layers' (snapkv: from their attention probabilities)
SSM_SCORES = ("simba", "share", "deci")
IN_LAYER = SSM_SCORES + ("snapkv",)
ATTENTION_SCORES = ("carry", "snapkv")  # SimbaConfig.attention_score
SIMBA_FORMAT_VERSION = 1


@dataclass
class SimbaConfig:
    """How a model prunes tokens.

    keep: per-layer fraction of the input's real tokens that each layer runs on; keep[0] = 1.0 and it
        never increases with depth.
    criterion: how tokens are ranked: "simba" (global impact through the layer's own recurrence), "query" (the
        attention the prompt's end pays each token, through the layer's own residual stream: query_attention),
        "recent-query" (half of each layer's budget to the most recent tokens, the rest by query), "share" (the
        same impacts as shares of each channel's total: the largest share a token holds of any channel), "deci"
        (DeciMamba's: the L2 norm over channels of the step size softplus(dt)), "snapkv" (hybrids: SnapKV's, the
        attention the last queries pay each key, attention.py), "utr" (clipped-activation sum of the block output),
        "l2norm" (block output norm), "random", "stride". In a hybrid, a layer that cannot compute the criterion
        itself ranks by the scores of the nearest layer below that can, carried up (score_source).
    attention_score: with an SSM criterion, what an attention layer that prunes ranks by: "snapkv" (its own
        attention's, SnapKV's; the default: 0.0275 ± 0.0040 nats better than "carry" on the hybrid proxy at
        F = 0.6, paired over 24 windows of training text, benchmarks/results/cpu/hybrid_quality.md) or "carry" (the
        SSM score of the nearest SSM layer below it, carried up). A parallel layer (Falcon-H1) has an SSM mixer of
        its own and ranks by its score.
    protect_last: the last real tokens of every row that are always kept (at least 1).
    seed: seeds the "random" criterion.
    granularity: each pruned layer's token count is rounded to the nearest multiple of this (1: exact). With
        a granularity of 2048 on 8192-token prompts a schedule becomes a staircase: the GPU scores tokens only
        where the count drops, and every width is one that mamba_ssm's scan (2048-token chunks) and the
        GEMMs run at full speed (README, GPU speed). A row shorter than the granularity is not pruned.
    max_tokens: per-layer cap on the tokens of a row a layer runs on (0: no cap), or None. Context extension:
        capping the upper layers near the training length keeps their state in the range they were trained on
        when the prompt is longer (README, Long context); the cap binds only on prompts longer than it.
    align: widths on whole chunks of the model's fused scan (the fast form sets it, schedules.py; layers.ScanChunks,
        ModelConfig.scan_chunks). Mamba-1: in a row of more than 1024 tokens mamba_ssm's scan works in 2048-token
        chunks, and a width between two multiples of 2048 costs the scan of the larger one: 3/4 of 4096 tokens
        scans 4096. So a run of layers whose width falls between two whole-chunk widths is split between them, the
        upper layers of the run at the lower width, the run's tokens kept (to the nearest layer): 15 layers at 3072
        of 4096 tokens run as 8 at 4096 and 7 at 2048. Widths of 1024 tokens or fewer stay as they are. Mamba-2's
        SSD has no such cost (every width is kept).
    """

    keep: list[float]
    criterion: str = DEFAULT_CRITERION
    protect_last: int = 1
    seed: int = 0
    granularity: int = 1
    extra: dict = field(default_factory=dict)  # provenance a writer may attach (schedule name, FLOP target)
    max_tokens: list[int] | None = None
    align: bool = False
    attention_score: str = "snapkv"

    def __post_init__(self) -> None:
        self.keep = [float(k) for k in self.keep]
        if not self.keep:
            raise ValueError("keep: the schedule is empty")
        if abs(self.keep[0] - 1.0) > 1e-9:
            raise ValueError(f"keep: the first layer must keep 1.0, got {self.keep[0]}")
        for i, (a, b) in enumerate(zip(self.keep, self.keep[1:])):
            if not 0.0 < b <= a + 1e-12:
                raise ValueError(f"keep: layer {i + 1} has {b}; ratios must be in (0, 1] and never increase")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion: unknown {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.attention_score not in ATTENTION_SCORES:
            raise ValueError(f"attention_score: one of {', '.join(ATTENTION_SCORES)}, got {self.attention_score!r}")
        if int(self.protect_last) < 1:
            raise ValueError(f"protect_last: must be >= 1, got {self.protect_last}")
        self.protect_last = int(self.protect_last)
        if int(self.granularity) < 1:
            raise ValueError(f"granularity: must be >= 1, got {self.granularity}")
        self.granularity = int(self.granularity)
        if self.max_tokens is not None:
            self.max_tokens = [int(c) for c in self.max_tokens]
            caps = [c or math.inf for c in self.max_tokens]
            if len(caps) != len(self.keep) or caps[0] != math.inf or min(caps) < 1:
                raise ValueError(
                    f"max_tokens: one cap >= 1 per layer (0: none), none on the first layer; got {self.max_tokens}"
                )
            if any(b > a for a, b in zip(caps, caps[1:])):
                raise ValueError(f"max_tokens: a cap may not loosen with depth; got {self.max_tokens}")

    @property
    def n_layer(self) -> int:
        return len(self.keep)

    def counts(self, n_real: torch.Tensor, chunks: ScanChunks | None = None) -> torch.Tensor:
        """Tokens each layer runs on, per row: (n_layer, b) from real lengths (b,); `chunks`: the model's scan chunks
        (ModelConfig.scan_chunks: the widths align keeps; the model passes its own, None means Mamba-1's)."""
        keep = torch.tensor(self.keep, dtype=torch.float64, device=n_real.device)
        n = n_real.to(torch.float64)
        # round before ceil so 0.6 * 1000 = 600.0000000001 counts as 600
        k = torch.ceil(torch.round(keep[:, None] * n[None, :], decimals=6)).long()
        if self.granularity > 1:  # nearest multiple (never 0); a layer that keeps every token stays dense
            g = self.granularity
            k = torch.where(k < n_real[None, :], torch.clamp(torch.round(k / g).long() * g, min=g), k)
        if self.align:
            chunks = chunks or SCAN_CHUNKS["mamba1"]
            k = torch.stack([_align_row(k[:, j].tolist(), int(n), chunks) for j, n in enumerate(n_real.tolist())], 1).to(k)
        if self.max_tokens is not None:
            caps = torch.tensor([c or torch.iinfo(torch.long).max for c in self.max_tokens], device=n_real.device)
            k = torch.minimum(k, caps[:, None])
        floor = torch.clamp(n_real, max=self.protect_last)[None, :]
        return torch.minimum(torch.maximum(k, floor), n_real[None, :])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = SIMBA_FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SimbaConfig":
        d = dict(d)
        d.pop("version", None)
        # a folder states its criterion; one that does not was saved when "simba" was every schedule's default, and
        # keeps it whatever DEFAULT_CRITERION says now
        d.setdefault("criterion", "simba")
        return cls(**d)


def score_source(kinds: list[str], layer: int, simba: SimbaConfig) -> tuple[int, str] | None:
    """Which layer computes the in-layer scores that rank the tokens kept after `layer`, and which criterion:
    (layer j <= `layer`, criterion), or None for a criterion that reads the block output (utr, l2norm, ...).

    An SSM criterion (simba, share, deci) is computed by an SSM layer: `layer` itself, or else the nearest SSM layer
    below it, whose scores of the same tokens are carried up (an attention layer with attention_score "snapkv"
    computes SnapKV's instead; one with no SSM layer below it does too). "snapkv" is computed by an attention
    layer: `layer` or the nearest below it. A parallel layer (Falcon-H1: attention beside an SSM mixer) is both: its
    SSM mixer computes the SSM criteria, its attention "snapkv"; so is a Zamba2 hybrid layer ("shared": its Mamba-2 and
its use of a shared block's attention). kinds: ModelConfig.kinds."""
    c = simba.criterion
    if c not in IN_LAYER:
        return None
    ssm = tuple(k for k in kinds if k not in ("attention", "mlp"))
    if c in SSM_SCORES and kinds[layer] == "attention" and simba.attention_score == "snapkv":
        return layer, "snapkv"
    want = ATTENTION_KINDS if c == "snapkv" else ssm
    for j in range(layer, -1, -1):
        if kinds[j] in want:
            return j, c
    if c in SSM_SCORES:  # no SSM layer at or below: the nearest attention layer's own score
        for j in range(layer, -1, -1):
            if kinds[j] in ATTENTION_KINDS:
                return j, "snapkv"
    # a schedule the model cannot run (snapkv pruning below the first attention layer, or on a pure Mamba model)
    raise SimbaError(f"{c!r}: layer {layer} prunes, but no layer at or below it can compute that score"
                     + (" (an attention layer's)" if c == "snapkv" else ""), "criterion")


def scorers(kinds: list[str], prunes: list[bool], simba: SimbaConfig | None) -> dict[int, str]:
    """layer -> the in-layer criterion it computes in a forward where `prunes[i]` says whether layer i prunes."""
    out: dict[int, str] = {}
    if simba is None:
        return out
    for i, p in enumerate(prunes):
        src = score_source(kinds, i, simba) if p else None
        if src is not None:
            if out.get(src[0], src[1]) != src[1]:
                raise ValueError(f"layer {src[0]} would compute two scores ({out[src[0]]!r} and {src[1]!r})")
            out[src[0]] = src[1]
    return out


def _align_row(widths: list[int], n: int, chunks: ScanChunks) -> torch.Tensor:
    """SimbaConfig.align for one row of n tokens: widths (non-increasing, per layer) with every run of equal
    widths that chunks.keeps_width does not keep split between the neighbouring kept widths (the whole-chunk
    widths around it, or the largest short chunk), bounded by the widths around the run."""
    out, i = list(widths), 0
    while i < len(widths):
        j = i
        while j < len(widths) and widths[j] == widths[i]:
            j += 1
        w = widths[i]
        if not chunks.keeps_width(w):
            above = out[i - 1] if i > 0 else n
            below = widths[j] if j < len(widths) else 0
            hi = min(chunks.scan_length(w), above)
            lo = max(chunks.below(w), below)
            if lo < w < hi:
                upper = int(math.floor((j - i) * (w - lo) / (hi - lo) + 0.5))  # layers of the run at hi
                out[i:j] = [hi] * upper + [lo] * (j - i - upper)
        i = j
    return torch.tensor(out)


@dataclass
class LayerView:
    """What a criterion may look at after a layer ran on its current tokens (w = slots in the batch)."""

    layer: int
    hidden: torch.Tensor  # (b, w, d_model) the block output (residual stream)
    impact: torch.Tensor | None  # (b, w) an in-layer criterion's scores (IN_LAYER), computed while the layer ran
    last: torch.Tensor  # (b,) slot of each row's last real token
    real: torch.Tensor  # (b, w) bool: slot holds a real token
    target: torch.Tensor | int  # (b, 1) how many tokens the next layer keeps, or one int for every row
    positions: torch.Tensor  # (b, w) each slot's position in the input row (padding slots: the row length)
    end: torch.Tensor  # (b,) one past each row's last real position


# The "query" criterion (query_attention). SnapKV ranks an attention layer's keys by the attention that the last 32
# prompt tokens (its observation window) pay them, pooled so that a kept key keeps its neighbours; the same here
# with the layer's own residual stream as queries and keys, since an SSM layer has no attention of its own to read.
QUERY_WINDOW = 32  # the prompt's end: its last 32 tokens (SnapKV's window), the question a prompt ends with
QUERY_TEMPERATURE = 0.05  # softmax over cosine similarities: 0.05 apart in cosine is a factor e in attention
QUERY_POOL = 8  # max-pooled over +-8 tokens: a sentence around a token the question attends to


def query_attention(
    hidden: torch.Tensor,
    real: torch.Tensor,
    query: torch.Tensor,
    window: int = QUERY_WINDOW,
    temperature: float = QUERY_TEMPERATURE,
    pool: int = QUERY_POOL,
) -> torch.Tensor:
    """Scores (b, w) float32 of the slots of hidden (b, w, d_model): the attention the query slots (b, w) bool pay
    each real slot, summed over the queries and max-pooled over +-pool slots; -inf on padding.

        a_q(t) = softmax_t(cos(h_q, h_t) / temperature) over the real slots t,   s(t) = max_{|t' - t| <= pool} sum_q a_q(t')

    The query slots are each row's last real slots (at most `window` of them: the model protects the prompt's end,
    so they are the row's last ones in every layer). What the prompt's end resembles, in the representation the
    layer built (its tokens at the bottom, their context higher up), is what it will read: a needle that a question
    names ranks high wherever it sits, where Simba's impact decays with its distance from the end.
    """
    b, w, d = hidden.shape
    h = F.normalize(hidden.float(), dim=-1)
    last = torch.where(real, torch.arange(w, device=real.device), -1).amax(1)  # (b,) each row's last real slot
    slots = last[:, None] - window + 1 + torch.arange(window, device=real.device)  # (b, window)
    valid = (slots >= 0) & query.gather(1, slots.clamp_min(0))
    q = h.gather(1, slots.clamp_min(0)[..., None].expand(-1, -1, d))  # (b, window, d)
    logits = torch.einsum("bqd,bwd->bqw", q, h).div_(temperature).masked_fill_(~real[:, None, :], float("-inf"))
    attention = logits.softmax(-1).mul_(valid[..., None]).sum(1)  # (b, w)
    scores = attention.masked_fill_(~real, float("-inf"))
    return F.max_pool1d(scores[:, None], 2 * pool + 1, stride=1, padding=pool)[:, 0].masked_fill_(~real, float("-inf"))


def _query(view: LayerView, seed: int) -> torch.Tensor:
    query = view.real & (view.positions >= (view.end - QUERY_WINDOW)[:, None])  # the row's last QUERY_WINDOW tokens
    return query_attention(view.hidden, view.real, query)


def _recent_query(view: LayerView, seed: int) -> torch.Tensor:
    # Half of the next layer's budget to the most recent tokens (what a continuation reads: truncation's choice, the
    # best plain-text ranking measured, benchmarks/RESULTS.md), the other half by the query's attention (what the
    # question reads, wherever it sits): query alone keeps the needle but costs plain text (issue 23).
    from_end = view.real.flip(1).cumsum(1).flip(1)  # real slots at or after each slot
    half = torch.div(torch.as_tensor(view.target, device=view.real.device) + 1, 2, rounding_mode="floor")  # ceil(k/2)
    return _query(view, seed).masked_fill(view.real & (from_end <= half), float("inf"))


def _in_layer(view: LayerView, seed: int) -> torch.Tensor:
    # simba: fused into the scan (ssm.scan; ssm.score.global_impact is its reference); share: ssm.score.channel_share
    # (Mamba-2: ssm.ssd.ssd_share); deci: ssm.score.step_norm; snapkv: attention.snapkv_score
    return view.impact


def _utr(view: LayerView, seed: int) -> torch.Tensor:
    return view.hidden.float().clamp(min=0).sum(-1)


def _l2norm(view: LayerView, seed: int) -> torch.Tensor:
    return view.hidden.float().norm(dim=-1)


def _random(view: LayerView, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=view.hidden.device).manual_seed(seed * 1_000_003 + view.layer)
    return torch.rand(view.real.shape, generator=gen, device=view.hidden.device)


def _stride(view: LayerView, seed: int) -> torch.Tensor:
    # Bresenham: of r real tokens, rank j is chosen when floor((j+1) k / r) > floor(j k / r): k evenly spaced.
    rank = torch.cumsum(view.real.long(), dim=1) - 1
    r = view.real.sum(1, keepdim=True).clamp_min(1)
    k = view.target
    chosen = torch.div((rank + 1) * k, r, rounding_mode="floor") > torch.div(rank * k, r, rounding_mode="floor")
    return chosen.float()


CRITERION_FNS: dict[str, Callable[[LayerView, int], torch.Tensor]] = {
    "simba": _in_layer,
    "query": _query,
    "recent-query": _recent_query,
    "share": _in_layer,
    "deci": _in_layer,
    "snapkv": _in_layer,  # attention.snapkv_score
    "utr": _utr,
    "l2norm": _l2norm,
    "random": _random,
    "stride": _stride,
}


def padding_side(attention_mask: torch.Tensor) -> str:
    """'left' or 'right' for a 0/1 mask padded on one side; raises on holes inside a row."""
    m = attention_mask.bool()
    n = m.sum(1)
    if (n == 0).any():
        raise ValueError("attention_mask: a row has no real token")
    pos = torch.arange(m.shape[1], device=m.device)[None, :]
    right = (m == (pos < n[:, None])).all()
    left = (m == (pos >= m.shape[1] - n[:, None])).all()
    if left:
        return "left"
    if right:
        return "right"
    raise ValueError("attention_mask: padding must be on one side of every row (all left or all right)")


class TokenPlan:
    """The positions each layer runs on for one batch, and the selection that moves to the next layer.

    idx (b, w): original position of each slot; masked fill slots point at position `seq_len`, a scratch
    row of the frozen residual buffer. real (b, w): slot holds a real token. None of the tensors has a
    time loop; one `select` is a sort of the slots.
    """

    def __init__(
        self, attention_mask: torch.Tensor | None, batch: int, seq_len: int, simba: SimbaConfig | None, device,
        chunks: ScanChunks,
    ):
        b = batch
        self.seq_len = seq_len
        self.simba = simba
        positions = torch.arange(seq_len, device=device)
        if attention_mask is None or bool(attention_mask.bool().all()):
            self.side = "left"
            self.n_real = torch.full((b,), seq_len, device=device, dtype=torch.long)
            self.real = torch.ones(b, seq_len, dtype=torch.bool, device=device)
            self.padded = False
        else:
            self.side = padding_side(attention_mask)
            self.n_real = attention_mask.bool().sum(1).long()
            self.real = attention_mask.bool().clone()
            self.padded = True
        self.idx = positions.expand(self.real.shape[0], seq_len).clone()
        # (b,) left padding of each row (an attention layer's RoPE positions are idx - offset), None without any
        self.offset = seq_len - self.n_real if self.padded and self.side == "left" else None
        # the row's real tokens end at `end`: the last protect_last positions before it are protected
        self.end = torch.full_like(self.n_real, seq_len) if self.side == "left" else self.n_real.clone()
        # on the host: per-layer decisions (prune or not, the kept width) need no device sync on a GPU; the
        # device copy is made at the first pruning, outside the dense layers' peak (a pruned forward's peak
        # memory stays at the dense forward's)
        n_real_host = torch.full((b,), seq_len) if not self.padded else self.n_real.cpu()
        self.counts_host = simba.counts(n_real_host, chunks) if simba is not None else None
        self._counts: torch.Tensor | None = None
        self.freeze = True  # keep the dropped tokens' streams (for logits at every position); the forward decides
        # (b,) slot of each row's last real token, the position Simba scores against; kept up to date by select
        # (made here, before any layer, so a scoring layer allocates nothing at its peak that a dense one does not)
        self.last = self._last_real_slot()

    @property
    def counts(self) -> torch.Tensor | None:
        """(n_layer, b) tokens each layer runs on, per row, on the batch's device (SimbaConfig.counts)."""
        if self._counts is None and self.counts_host is not None:
            host = self.counts_host
            if self.idx.is_cuda:  # pinned and non-blocking: a pageable copy would wait for every queued layer, and
                host = host.pin_memory()  # the host, no longer ahead of the GPU, would stall the narrow layers after it
            self._counts = host.to(self.idx.device, non_blocking=True)
        return self._counts

    @property
    def mask(self) -> torch.Tensor | None:
        """(b, w) bool mask of real slots, or None when no slot is padding (the fast path)."""
        return self.real if self.padded else None

    def prunes_after(self, layer: int) -> bool:
        if self.counts_host is None or layer + 1 >= self.counts_host.shape[0]:
            return False
        return bool((self.counts_host[layer + 1] < self.counts_host[layer]).any())

    def _last_real_slot(self) -> torch.Tensor:
        """(b,) slot of each row's last real token."""
        w = self.idx.shape[1]
        slots = torch.arange(w, device=self.idx.device).expand_as(self.idx)
        return torch.where(self.real, slots, -1).amax(dim=1)

    def target(self, layer: int) -> torch.Tensor | int:
        """Tokens `layer` keeps per row, to compare with (b, w) slots: (b, 1) on the device, or an int when every row
        keeps the same (no padding): then the forward copies nothing from the host and can be captured in a CUDA
        graph (generation.py)."""
        if not self.padded:
            return int(self.counts_host[layer, 0])
        return self.counts[layer][:, None]

    def view(self, layer: int, hidden: torch.Tensor, impact: torch.Tensor | None) -> LayerView:
        return LayerView(layer, hidden, impact, self.last, self.real, self.target(layer + 1), self.idx, self.end)

    def select(self, scores: torch.Tensor, layer: int) -> torch.Tensor:
        """Keep the top-scoring tokens for `layer`; returns the kept slots (b, w') to gather with."""
        target = self.target(layer)
        protected = self.real & (self.idx >= (self.end - self.simba.protect_last)[:, None])
        scores = scores.float().masked_fill(~self.real, float("-inf")).masked_fill(protected, float("inf"))
        w = scores.shape[1]
        slots = torch.arange(w, device=scores.device).expand_as(scores)
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, slots)
        chosen = rank < target
        width = int(self.counts_host[layer].max())
        # chosen slots keep their order; the rest go to the padding side and fill the row up to `width`
        if self.side == "left":
            key = torch.where(chosen, slots, -1)
            kept = torch.sort(key, dim=1, stable=True).indices[:, w - width :]
        else:
            key = torch.where(chosen, slots, w)
            kept = torch.sort(key, dim=1, stable=True).indices[:, :width]
        self.real = chosen.gather(1, kept)
        self.padded = self.padded or bool((self.counts_host[layer] < width).any())
        self.idx = torch.where(self.real, self.idx.gather(1, kept), self.seq_len)
        self.last = self._last_real_slot()
        return kept
