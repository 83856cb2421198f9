"""Generation: a pruned prefill, then a decode loop of one fixed step per token, replayed from a CUDA graph.

    prefill:  model(prompt, return_states=True, last_logits=1)  -> last logits, every layer's state
    decode:   token -> embedding -> [ norm -> mixer.step ] * n_layer -> norm_f -> lm_head -> next token

The prefill is the pruned forward itself (each layer's state is that of the tokens it kept) and builds logits
for the last position only. A short prefill is bound by the host as well: at batch 1 and 2048 tokens the
forward's 400-550 launches (and the pruning's sorts) take longer to issue than the GPU takes to run them. So a
prompt shape seen a second time (batch x length up to GRAPH_PREFILL_TOKENS, no padding) is captured as a CUDA
graph and replayed from then on (PrefillGraph; once-seen shapes run eagerly, so a one-off prompt never pays
for a capture). A new token is never pruned: it runs through every layer. Decoding is bound by
kernel launches, not FLOPs (a 1.4B model moves its 2.8 GB of weights per token in ~0.6 ms on an H200, while a
step is ~350 launches): so on CUDA the whole step, sampling included, is captured once per batch size and
mode into a CUDA graph over static buffers (Decoder) and replayed, as mamba_ssm's generate(cg=True) does.
Generation knows the layers only through the mixer interface (layers.py): each mixer allocates its decode state
(zero_state) and advances it in place (step), through its fused kernels on CUDA (mamba1.py, mamba2.py) and its
reference step elsewhere. An attention layer's state is its KV cache (layers.KVState; a parallel layer's holds one beside
its SSM state, layers.ParallelState): a static buffer sized when
the decoder is made, for the tokens the layer kept of the prompt plus the new ones (rounded up to CACHE_BLOCK so
that prompts of similar lengths share a captured step), with per-row lengths the step advances in place. The graphs a model has captured are typed caches (GraphCaches) kept on the model and
dropped when what they were captured for (the weights' placement, the schedule, the backends) changes.

Sampling is one function for every path (next_token): temperature, top-k, then top-p on what top-k left, drawn
with the Gumbel-max trick from uniform noise drawn outside the graph (so a torch.Generator seeds it, and the
eager and graph paths draw the same tokens).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from .layers import KVState, ParallelState, add_norm
from .model import LMOutput, MambaLM
from .pruning import padding_side

EOS_CHECK_EVERY = 16  # decode steps between checks that every row hit eos (each check waits for the GPU)
# prefills of batch x length up to this many tokens replay from a CUDA graph once their shape recurs: longer ones
# keep the GPU busy on their own (mamba-1.4b on the H200 is GPU-bound from 1 x 8192 tokens, gpu_prefill.md)
GRAPH_PREFILL_TOKENS = 16384
PREFILL_GRAPHS = 8  # captured prompt shapes kept per model (least recently used dropped); they share one pool
CACHE_BLOCK = 256  # KV-cache capacities are rounded up to a multiple of this (a captured step serves them all)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    eos_token_id: int | None = None
    cuda_graph: bool = True  # on CUDA: replay each step (and a recurring short prompt's prefill) from a graph

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not (self.temperature > 0 and self.top_k >= 0 and 0 < self.top_p <= 1):
            raise ValueError("sampling needs temperature > 0, top_k >= 0 and top_p in (0, 1]")

    @property
    def filtered(self) -> bool:
        return self.do_sample and (self.top_k > 0 or self.top_p < 1.0)


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (b, l + new) prompt and new tokens
    new_tokens: int
    first_token_seconds: float  # from the call to the first new token (prefill + its sampling)
    decode_seconds: float  # the remaining new_tokens - 1 tokens


def next_token(logits: torch.Tensor, cfg: GenerationConfig, noise: torch.Tensor | None, params=None) -> torch.Tensor:
    """The next token (b,) from logits (b, vocab): argmax, or a sample (Gumbel-max on `noise`, uniform (b, vocab))
    after temperature, top-k, then top-p on what top-k kept. params: (temperature, top_k, top_p) as tensors (the
    graph's static inputs), else cfg's numbers."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    temperature, top_k, top_p = params if params is not None else (cfg.temperature, cfg.top_k, cfg.top_p)
    logits = logits.float() / temperature
    gumbel = -torch.log(-torch.log(noise.clamp_min(torch.finfo(torch.float32).tiny)))
    if not cfg.filtered:
        return (logits + gumbel).argmax(-1)
    ranked, order = logits.sort(-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(torch.as_tensor(top_k, device=logits.device) > 0, top_k, logits.shape[-1])
    ranked = ranked.masked_fill(rank >= k, float("-inf"))
    probs = ranked.softmax(-1)
    ranked = ranked.masked_fill(probs.cumsum(-1) - probs > top_p, float("-inf"))  # the smallest set reaching top_p
    return order.gather(-1, (ranked + gumbel).argmax(-1, keepdim=True)).squeeze(-1)


class Decoder:
    """The decode step of one model for one batch size and sampling mode: static state and token buffers (each
    mixer's zero_state, an attention layer's KV cache of `capacities[i]` tokens), and on CUDA the step captured as a
    graph."""

    def __init__(self, model: MambaLM, batch: int, cfg: GenerationConfig, graph: bool, capacities: list[int] | None = None):
        self.model, self.cfg, self.backends = model, cfg, model.backends
        dev, dtype = model.device, model.lm_head.weight.dtype
        self.capacities = capacities or [0] * model.config.n_layer
        self.states = [block.mixer.zero_state(batch, dev, dtype, cap)
                       for block, cap in zip(model.backbone.layers, self.capacities)]  # fmt: skip
        self.token = torch.zeros(batch, dtype=torch.long, device=dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.eos = torch.tensor(-1 if cfg.eos_token_id is None else cfg.eos_token_id, device=dev)
        self.noise = torch.empty(batch, model.config.vocab_size, device=dev) if cfg.do_sample else None
        self.params = (torch.tensor(float(cfg.temperature), device=dev), torch.tensor(int(cfg.top_k), device=dev),
                       torch.tensor(float(cfg.top_p), device=dev))  # fmt: skip
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph:
            self.graph, _ = capture(self._step, dev)

    def prepare(self, states: list, cfg: GenerationConfig) -> None:
        """Load the prefill's states and this call's settings into the static buffers; let each mixer refresh what
        its step reads besides its state (the weights may have changed in place since the last call)."""
        for buf, st, block in zip(self.states, states, self.model.backbone.layers):
            if buf is not None:
                buf.copy_(st)
            block.mixer.prepare_step()
        self.done.zero_()
        self.eos.fill_(-1 if cfg.eos_token_id is None else cfg.eos_token_id)
        for buf, v in zip(self.params, (cfg.temperature, cfg.top_k, cfg.top_p)):
            buf.fill_(v)

    def first(self, logits: torch.Tensor, generator: torch.Generator | None) -> None:
        """Select the first new token from the prefill's last logits (eagerly, as the step would)."""
        self._fill_noise(generator)
        self._select(logits)

    def step(self, generator: torch.Generator | None) -> None:
        """Advance every row by one token: self.token holds it afterwards."""
        self._fill_noise(generator)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def _fill_noise(self, generator: torch.Generator | None) -> None:
        if self.noise is not None:
            self.noise.uniform_(generator=generator)

    def _select(self, logits: torch.Tensor) -> None:
        nxt = next_token(logits, self.cfg, self.noise, self.params)
        nxt = torch.where(self.done, self.eos, nxt)  # eos is -1 without an eos_token_id: done stays False
        self.done |= nxt == self.eos
        self.token.copy_(nxt)

    def _step(self) -> None:
        m, be = self.model, self.backends
        emb = m.embed(self.token)  # Zamba2's hybrid layers read it as it was
        h = emb.clone()  # the stream, added into in place (embed may return the embedding's own output)
        mixed = None
        for block, state in zip(m.backbone.layers, self.states):
            h, mixed = block.step(h, mixed, state, be, emb)  # h += the last output, then this block
        self._select(m.head(add_norm(m.backbone.norm_f, h, mixed, inplace=True, backends=be)[1]))


@functools.cache
def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture's warm-up: cuBLAS keeps a workspace (tens of MB) for each
    stream it has run on, for the life of the process, so a new stream per capture would hold one more each time."""
    return torch.cuda.Stream(device)


def capture(fn: Callable[[], object], device: torch.device, pool=None, warmup: int = 2):
    """fn captured as a CUDA graph: (graph, what the captured call returned; static, overwritten by each replay).
    Warmed up first on a side stream (Triton compiles, cuBLAS sets up its workspace), off the capture."""
    side = _warmup_stream(device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class PrefillGraph:
    """generate's prefill, model(ids, return_states=True, last_logits=1), for one prompt shape and schedule,
    captured as a CUDA graph over a static ids buffer. Its outputs are static too: the next replay overwrites
    them (generate copies the states into the decoder before that)."""

    def __init__(self, model: MambaLM, batch: int, length: int, pool):
        self.ids = torch.zeros(batch, length, dtype=torch.long, device=model.device)
        self.graph, self.out = capture(lambda: model(self.ids, return_states=True, last_logits=1), model.device, pool, 1)

    def __call__(self, input_ids: torch.Tensor) -> LMOutput:
        self.ids.copy_(input_ids)
        self.graph.replay()
        return self.out


DecoderKey = tuple  # (batch, graph, do_sample, filtered): what a captured step branches on


@dataclass
class PrefillGraphs:
    """The captured prefills of one schedule: an LRU of prompt shapes sharing one memory pool, the shapes seen once
    (captured at their second sight) and those whose capture failed (eager from then on)."""

    pool: object
    graphs: OrderedDict[tuple[int, int], PrefillGraph] = field(default_factory=OrderedDict)
    seen: set[tuple[int, int]] = field(default_factory=set)
    failed: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class GraphCaches:
    """A model's CUDA graphs (mamba_ssm's DecodingCGCache plays this part there). Valid for one placement of the
    weights and one Backends (`weights`); the prefills also for one schedule (`schedule`). graph_caches() makes
    them anew when either changes; in-place weight updates are read by the graphs as they are."""

    weights: tuple
    decoders: dict[DecoderKey, Decoder] = field(default_factory=dict)
    schedule: str | None = None
    prefills: PrefillGraphs | None = None


def graph_caches(model: MambaLM) -> GraphCaches:
    weights = (tuple(p.data_ptr() for p in model.parameters()), model.backends)
    if model._graphs is None or model._graphs.weights != weights:
        model._graphs = GraphCaches(weights)
    return model._graphs


def _prefill_graphs(model: MambaLM) -> PrefillGraphs:
    caches = graph_caches(model)
    if caches.prefills is None or caches.schedule != repr(model.simba):
        caches.schedule, caches.prefills = repr(model.simba), PrefillGraphs(torch.cuda.graph_pool_handle())
    return caches.prefills


@torch.no_grad()
def prefill(model: MambaLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cuda_graph: bool = True):
    """generate's prefill: model(input_ids, attention_mask, return_states=True, last_logits=1). On CUDA, with
    cuda_graph, a prompt shape met a second time (no padding, batch x length <= GRAPH_PREFILL_TOKENS) is
    captured and replayed from then on; the graphs are cached on the model and dropped when its parameters
    move, its backends or its schedule change. The outputs of a replay are overwritten by the next replay of
    that shape."""
    b, length = input_ids.shape
    eager = lambda: model(input_ids, attention_mask, return_states=True, last_logits=1)  # noqa: E731
    unpadded = attention_mask is None or bool(attention_mask.bool().all())
    if not (cuda_graph and model.device.type == "cuda" and unpadded and b * length <= GRAPH_PREFILL_TOKENS):
        return eager()
    cache, key = _prefill_graphs(model), (b, length)
    if key not in cache.graphs:
        if key not in cache.seen or key in cache.failed:  # first sight: eager (a one-off prompt never pays for a
            cache.seen.add(key)  # capture)
            return eager()
        if len(cache.graphs) >= PREFILL_GRAPHS:
            cache.graphs.popitem(last=False)
        try:
            cache.graphs[key] = PrefillGraph(model, b, length, cache.pool)
        except RuntimeError as e:  # something in the forward cannot be captured (a criterion that syncs, say)
            warnings.warn(f"prefill: this prompt shape runs eagerly, its CUDA graph capture failed ({e})")
            cache.failed.add(key)
            return eager()
    cache.graphs.move_to_end(key)  # most recently used last
    return cache.graphs[key](input_ids)


def cache_capacities(states: list, new_tokens: int) -> list[int]:
    """Per layer, the KV-cache tokens decoding after a prefill whose states are `states` needs (0 for a recurrent
    layer): the prompt tokens the layer kept plus new_tokens, rounded up to CACHE_BLOCK."""
    cached = (KVState, ParallelState)  # the layers with an attention's KV cache
    return [-(-(st.capacity + new_tokens) // CACHE_BLOCK) * CACHE_BLOCK if isinstance(st, cached) else 0 for st in states]


def _decoder(model: MambaLM, batch: int, cfg: GenerationConfig, capacities: list[int]) -> Decoder:
    """The model's decoder for this batch size and mode, made (and captured) on first use (GraphCaches); made anew
    when its KV caches are too small for `capacities` (it replaces the old one, whose buffers are then freed)."""
    graph = cfg.cuda_graph and model.device.type == "cuda"
    decoders = graph_caches(model).decoders
    key = (batch, graph, cfg.do_sample, cfg.filtered)
    if key not in decoders or any(c > have for c, have in zip(capacities, decoders[key].capacities)):
        decoders.pop(key, None)
        decoders[key] = Decoder(model, batch, cfg, graph, capacities)
    decoders[key].cfg = cfg
    return decoders[key]


@torch.no_grad()
def generate(
    model: MambaLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Prefill input_ids (b, l) (left-padded when a batch has rows of different lengths), then decode up to
    config.max_new_tokens tokens. Rows that hit eos are filled with it; the output stops after the step where
    every row has (as a step-by-step loop that checks each step would)."""
    cfg = config or GenerationConfig()
    if attention_mask is not None and not bool(attention_mask.bool().all()) and padding_side(attention_mask) != "left":
        raise ValueError("generate: batched prompts must be left-padded")
    b = input_ids.shape[0]
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    out = prefill(model, input_ids, attention_mask, cfg.cuda_graph)
    dec = _decoder(model, b, cfg, cache_capacities(out.states, cfg.max_new_tokens))
    dec.prepare(out.states, cfg)
    dec.first(out.logits[:, -1], generator)
    del out
    new = torch.empty(b, cfg.max_new_tokens, dtype=torch.long, device=input_ids.device)
    new[:, 0] = dec.token
    sync()
    t1 = time.perf_counter()
    n = 1
    while n < cfg.max_new_tokens:
        if cfg.eos_token_id is not None and n % EOS_CHECK_EVERY == 0 and bool(dec.done.all()):
            break
        dec.step(generator)
        new[:, n] = dec.token
        n += 1
    sync()
    t2 = time.perf_counter()
    new = new[:, :n]
    if cfg.eos_token_id is not None:  # end after the first step at which every row is done
        all_done = (new == cfg.eos_token_id).cummax(1).values.all(0)
        if bool(all_done.any()):
            new = new[:, : int(all_done.nonzero()[0]) + 1]
    return GenerationOutput(torch.cat([input_ids, new], dim=1), new.shape[1], t1 - t0, t2 - t1)
