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
The Mamba-1 step runs through fused kernels (kernels.mamba1_step: mamba_ssm's and causal_conv1d's update kernels
where installed, else the project's Triton kernels for conv + x_proj and dt_proj + the SSM update); other mixers
and the CPU run their reference step.

Sampling is one function for every path (next_token): temperature, top-k, then top-p on what top-k left, drawn
with the Gumbel-max trick from uniform noise drawn outside the graph (so a torch.Generator seeds it, and the
eager and graph paths draw the same tokens).
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass

import torch

from .model import LayerState, MambaLM, MambaMixer, add_norm
from .pruning import padding_side
from .ssm import kernels

EOS_CHECK_EVERY = 16  # decode steps between checks that every row hit eos (each check waits for the GPU)
# prefills of batch x length up to this many tokens replay from a CUDA graph once their shape recurs: longer ones
# keep the GPU busy on their own (mamba-1.4b on the H200 is GPU-bound from 1 x 8192 tokens, gpu_prefill.md)
GRAPH_PREFILL_TOKENS = 16384
PREFILL_GRAPHS = 8  # captured prompt shapes kept per model (least recently used dropped); they share one pool


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
    """The decode step of one model for one batch size and sampling mode: static state and token buffers, the
    per-call constants (A = -exp(A_log) of each Mamba-1 layer), and on CUDA the step captured as a graph."""

    def __init__(self, model: MambaLM, batch: int, cfg: GenerationConfig, graph: bool):
        self.model, self.cfg = model, cfg
        dev, dtype = model.device, model.lm_head.weight.dtype
        layers = model.backbone.layers
        self.states = [_zero_state(block.mixer, batch, dev, dtype) for block in layers]
        self.fused = [isinstance(b.mixer, MambaMixer) and kernels.fused_step_available(model.lm_head.weight) for b in layers]
        self.A = [torch.empty_like(b.mixer.A_log, dtype=torch.float32) if f else None for b, f in zip(layers, self.fused)]
        self._A_source: dict[int, torch.Tensor] = {}  # what each A buffer was last copied from (float_params')
        self.token = torch.zeros(batch, dtype=torch.long, device=dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.eos = torch.tensor(-1 if cfg.eos_token_id is None else cfg.eos_token_id, device=dev)
        self.noise = torch.empty(batch, model.config.vocab_size, device=dev) if cfg.do_sample else None
        self.params = (torch.tensor(float(cfg.temperature), device=dev), torch.tensor(int(cfg.top_k), device=dev),
                       torch.tensor(float(cfg.top_p), device=dev))  # fmt: skip
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph:
            self._capture()

    def prepare(self, states: list[LayerState], cfg: GenerationConfig) -> None:
        """Load the prefill's states and this call's settings into the static buffers."""
        for buf, st in zip(self.states, states):
            buf.conv.copy_(st.conv)
            buf.ssm.copy_(st.ssm)
        for A, block in zip(self.A, self.model.backbone.layers):
            if A is not None:  # the weights may have changed in place since the last call: then A is made anew
                fresh = kernels.float_params(block.mixer)[0]
                if fresh is not self._A_source.get(id(A)):
                    A.copy_(fresh)
                    self._A_source[id(A)] = fresh
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
        m = self.model
        h = m.backbone.embeddings(self.token).to(m._stream_dtype, copy=True)  # the stream, added into in place
        mixed = None
        for i, block in enumerate(m.backbone.layers):
            state = self.states[i]
            h, x = add_norm(block.norm, h, mixed, inplace=True)  # h += the last layer's output, then its norm
            if self.fused[i]:
                mixed = kernels.mamba1_step(block.mixer, x, state.conv, state.ssm, self.A[i])
            else:  # the reference step, its new state written into the static buffers
                mixed, new = block.mixer.step(x, state)
                state.conv.copy_(new.conv)
                state.ssm.copy_(new.ssm)
        logits = m.lm_head(add_norm(m.backbone.norm_f, h, mixed, inplace=True)[1].to(m.lm_head.weight.dtype))
        self._select(logits)

    def _capture(self) -> None:
        """Warm up on a side stream (compiles the Triton kernels, sets up cuBLAS), then capture one step. The
        warm-up steps change the state buffers; prepare() overwrites them before every generation."""
        side = _warmup_stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()


@functools.cache
def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture's warm-up: cuBLAS keeps a workspace (tens of MB) for each
    stream it has run on, for the life of the process, so a new stream per capture would hold one more each time."""
    return torch.cuda.Stream(device)


class PrefillGraph:
    """generate's prefill, model(ids, return_states=True, last_logits=1), for one prompt shape and schedule,
    captured as a CUDA graph over a static ids buffer. Its outputs are static too: the next replay overwrites
    them (generate copies the states into the decoder before that)."""

    def __init__(self, model: MambaLM, batch: int, length: int, pool):
        self.ids = torch.zeros(batch, length, dtype=torch.long, device=model.device)
        run = lambda: model(self.ids, return_states=True, last_logits=1)  # noqa: E731
        side = _warmup_stream(model.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (Triton compiles, cuBLAS sets up) off the capture
            run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = run()

    def __call__(self, input_ids: torch.Tensor):
        self.ids.copy_(input_ids)
        self.graph.replay()
        return self.out


@torch.no_grad()
def prefill(model: MambaLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cuda_graph: bool = True):
    """generate's prefill: model(input_ids, attention_mask, return_states=True, last_logits=1). On CUDA, with
    cuda_graph, a prompt shape met a second time (no padding, batch x length <= GRAPH_PREFILL_TOKENS) is
    captured and replayed from then on; the graphs are cached on the model and dropped when its parameters
    move or its schedule changes. The outputs of a replay are overwritten by the next replay of that shape."""
    b, length = input_ids.shape
    eager = lambda: model(input_ids, attention_mask, return_states=True, last_logits=1)  # noqa: E731
    unpadded = attention_mask is None or bool(attention_mask.bool().all())
    if not (cuda_graph and model.device.type == "cuda" and unpadded and b * length <= GRAPH_PREFILL_TOKENS):
        return eager()
    cache = model.__dict__.setdefault("_prefills", {})
    where = (tuple(p.data_ptr() for p in model.parameters()), repr(model.simba), kernels.SCAN)
    if cache.get("where") != where:
        cache.clear()
        cache.update(where=where, graphs={}, seen=set(), failed=set(), pool=torch.cuda.graph_pool_handle())
    graphs, key = cache["graphs"], (b, length)
    if key not in graphs:
        if key not in cache["seen"] or key in cache["failed"]:  # first sight: eager (a one-off prompt never pays
            cache["seen"].add(key)  # for a capture)
            return eager()
        if len(graphs) >= PREFILL_GRAPHS:
            graphs.pop(next(iter(graphs)))
        try:
            graphs[key] = PrefillGraph(model, b, length, cache["pool"])
        except RuntimeError as e:  # something in the forward cannot be captured (a criterion that syncs, say)
            warnings.warn(f"prefill: this prompt shape runs eagerly, its CUDA graph capture failed ({e})")
            cache["failed"].add(key)
            return eager()
    graphs[key] = graphs.pop(key)  # most recently used last
    return graphs[key](input_ids)


def _zero_state(mixer, batch: int, device, dtype) -> LayerState:
    conv_dim = getattr(mixer, "conv_dim", mixer.d_inner)
    n_state = (mixer.nheads, mixer.headdim, mixer.d_state) if hasattr(mixer, "nheads") else (mixer.d_inner, mixer.d_state)
    return LayerState(
        conv=torch.zeros(batch, conv_dim, mixer.d_conv - 1, device=device, dtype=dtype),
        ssm=torch.zeros(batch, *n_state, device=device, dtype=torch.float32),
    )


def _decoder(model: MambaLM, batch: int, cfg: GenerationConfig) -> Decoder:
    """The model's decoder for this batch size and mode, made (and captured) on first use. Cached on the model and
    dropped when its parameters move (a new dtype or device); in-place updates are read by the graph as they are."""
    graph = cfg.cuda_graph and model.device.type == "cuda"
    where = tuple(p.data_ptr() for p in model.parameters())
    cache = model.__dict__.setdefault("_decoders", {})
    if cache.get("where") != where:
        cache.clear()
        cache["where"] = where
    key = (batch, graph, cfg.do_sample, cfg.filtered, kernels.STEP)  # what the captured step branches on
    if key not in cache:
        cache[key] = Decoder(model, batch, cfg, graph)
    cache[key].cfg = cfg
    return cache[key]


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
    dec = _decoder(model, b, cfg)
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
