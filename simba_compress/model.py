"""A Mamba language model in plain PyTorch whose forward prunes tokens between layers (Simba).

Parameter names follow transformers' MambaForCausalLM / Mamba2ForCausalLM, so a state dict moves between the two
unchanged. Shapes: b batch, l tokens.

    embeddings -> [ x = x + mixer(norm(x)) ] * n_layer -> norm_f -> lm_head

Each layer's mixer (layers.py's interface: mamba1.py, mamba2.py) runs on the tokens it is given. With a
SimbaConfig, layer l+1 runs only on the tokens layer l's criterion ranked highest (pruning.py); a dropped token's
residual stream is frozen and scattered back before norm_f, so every position has logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backends import Backends
from .kernels import freeze_and_gather
from .layers import Mixer, MixerContext, ModelConfig, add_norm, make_norm, norm
from .mamba1 import Mamba1Mixer
from .mamba2 import Mamba2Mixer
from .pruning import CRITERION_FNS, DEFAULT_CRITERION, IN_LAYER, SimbaConfig, TokenPlan

MIXERS: dict[str, type[Mixer]] = {"mamba1": Mamba1Mixer, "mamba2": Mamba2Mixer}  # ModelConfig.kind(i) -> class


class Block(nn.Module):
    """x = x + mixer(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm = make_norm(cfg)
        self.mixer = MIXERS[cfg.kind(layer)](cfg)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)


@dataclass
class LMOutput:
    logits: torch.Tensor  # (b, l, vocab), or (b, last_logits, vocab)
    states: list | None = None  # per layer, its decode state after the (pruned) prefill (SSMState for Mamba layers)
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
    criterion: str = DEFAULT_CRITERION


class MambaLM(nn.Module):
    """Mamba causal LM (Mamba-1 or Mamba-2 mixers). `simba` (a SimbaConfig or None) sets how the forward prunes;
    `backends` which kernels run (backends.py; the environment's defaults unless given)."""

    def __init__(self, cfg: ModelConfig, simba: SimbaConfig | None = None, backends: Backends | None = None):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.simba = simba
        self.backends = backends or Backends.from_env()
        self._graphs = None  # generation.GraphCaches: the CUDA graphs generate captured for this model

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
        h, x = add_norm(block.norm, h, pending, inplace=owned, backends=self.backends)
        res = block.mixer(x, MixerContext(plan.mask, plan.last, plan.idx, score, want_state, self.backends))
        return h, res.out, res.score, res.state

    @torch.no_grad()
    def prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, layers: int = 1, criterion: str = DEFAULT_CRITERION
    ) -> Prefix:
        """Run the first `layers` layers densely; forward(same inputs, prefix=...) continues from there (with a
        schedule of the same criterion: the last prefix layer's in-layer scores are kept for it)."""
        plan = TokenPlan(attention_mask, *input_ids.shape, None, input_ids.device, self.config.scan_chunks)
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
        plan = TokenPlan(attention_mask, b, length, simba, input_ids.device, self.config.scan_chunks)
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
        h = norm(self.backbone.norm_f, h, self.backends)
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
        return freeze_and_gather(h, idx, kept, plan.real, frozen, self.backends), frozen

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

    def step(self, token: torch.Tensor, states: list) -> tuple[torch.Tensor, list]:
        """One decoding step for token (b,), the reference (functional: `states` are left as they were; no kernels):
        every layer runs on it (a new token is never pruned). Returns the logits (b, vocab) and the new states."""
        reference = Backends(fast_path=False)
        h = self.backbone.embeddings(token).to(self._stream_dtype)
        new_states = [state.clone() for state in states]
        for block, state in zip(self.backbone.layers, new_states):
            h = h + block.mixer.step(norm(block.norm, h, reference), state, reference)
        h = norm(self.backbone.norm_f, h, reference)
        return self.lm_head(h.to(self.lm_head.weight.dtype)), new_states
