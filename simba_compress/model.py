"""A Mamba (or hybrid Mamba-attention) language model in plain PyTorch whose forward prunes tokens between layers.

Parameter names follow transformers' MambaForCausalLM / Mamba2ForCausalLM, so a state dict moves between the two
unchanged (the hybrids' layouts are converted on reading and writing: layouts.py). Shapes: b batch, l tokens.

    embeddings -> [ x = x + mixer(norm(x)) (+ mlp(norm2(x))) ] * n_layer -> norm_f -> lm_head

Each layer's mixer (layers.py's interface: mamba1.py, mamba2.py, attention.py, mlp.py's MLP layer) runs on the
tokens it is given. With a SimbaConfig, layer l+1 runs only on the tokens layer l's criterion ranked highest
(pruning.py); a dropped token's residual stream is frozen and scattered back before norm_f, so every position has
logits. A Zamba2 hybrid layer (shared.py) reads the stream un-normalised, and the original embeddings at its tokens;
the shared blocks it uses are held once, by the backbone. In a hybrid, an attention layer's queries and keys are its
kept tokens: a token dropped below is never a
key above, and its KV cache holds only them. A layer that cannot compute the criterion ranks by the scores of the
nearest layer below that did, carried up through the selections between (pruning.score_source).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionMixer
from .backends import Backends
from .kernels import freeze_and_gather
from .layers import Mixer, MixerContext, MixerOutput, ModelConfig, add_norm, make_norm, norm
from .mlp import MLPMixer, make_mlp
from .parallel import SSM_MIXERS, ParallelMixer
from .shared import SharedBlock, SharedMixer
from .pruning import CRITERION_FNS, DEFAULT_CRITERION, IN_LAYER, SimbaConfig, TokenPlan, score_source, scorers

# ModelConfig.kind(i) -> class
MIXERS: dict[str, type[Mixer]] = SSM_MIXERS | {"attention": AttentionMixer, "mlp": MLPMixer, "parallel": ParallelMixer}


class Block(nn.Module):
    """x = x + r mixer(norm(x)), then, where the model has block MLPs (ModelConfig.block_mlp), x = x + r mlp(norm2(x));
    r is Granite's residual_multiplier (1 elsewhere). The last term is returned, not added: the next block's norm (or
    the model) adds it (add_norm: mamba_ssm's fused add-norm)."""

    def __init__(self, cfg: ModelConfig, layer: int, shared: SharedBlock | None = None):
        super().__init__()
        kind = cfg.kind(layer)
        # Zamba2's hybrid layer (shared.py) reads the stream itself: its norm is inside, of the stream plus the term of
        # the shared block it uses (`shared`)
        self.norm = None if kind == "shared" else make_norm(cfg)
        self.mixer = SharedMixer(cfg, shared) if kind == "shared" else MIXERS[kind](cfg)
        self.norm2, self.mlp = (make_norm(cfg), make_mlp(cfg, layer)) if cfg.block_mlp else (None, None)
        self.scale = cfg.residual_multiplier

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.scale == 1.0 else out * self.scale

    def forward(self, h: torch.Tensor, pending, ctx: MixerContext, owned: bool) -> tuple[torch.Tensor, torch.Tensor, MixerOutput]:
        """The block on the stream h (b, w, d), the previous block's output `pending` not yet added: (h + pending (+ this
        block's mixer output when it has an MLP), its output to add next, the mixer's output). In place in h when
        `owned` (h is the caller's to change)."""
        h, x = add_norm(self.norm, h, pending, inplace=owned, backends=ctx.backends)
        res = self.mixer(x, ctx)
        out = self._scaled(res.out)
        if self.mlp is not None:
            h, x = add_norm(self.norm2, h, out, inplace=owned or pending is not None, backends=ctx.backends)
            out = self._scaled(self.mlp(x))
        return h, out, res

    def step(self, h: torch.Tensor, pending, state, backends: Backends, embedding: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """One decode step of the block on the stream h (b, d), ours to change in place: (h + pending (+ ...), output).
        embedding: the token's original embedding (b, d), which a Zamba2 hybrid layer reads."""
        h, x = add_norm(self.norm, h, pending, inplace=True, backends=backends)
        if isinstance(self.mixer, SharedMixer):
            out = self._scaled(self.mixer.step(x, state, backends, embedding))
        else:
            out = self._scaled(self.mixer.step(x, state, backends))
        if self.mlp is not None:
            h, x = add_norm(self.norm2, h, out, inplace=True, backends=backends)
            out = self._scaled(self.mlp(x))
        return h, out


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # Zamba2's shared transformer blocks, owned here; each hybrid layer holds the one it uses by reference (shared.py)
        self.shared = nn.ModuleList(SharedBlock(cfg) for _ in range(cfg.shared_blocks))
        self.layers = nn.ModuleList(
            Block(cfg, i, self.shared[cfg.shared_use(i)[1]] if cfg.kind(i) == "shared" else None) for i in range(cfg.n_layer)
        )
        self.norm_f = make_norm(cfg)


@dataclass
class LMOutput:
    logits: torch.Tensor  # (b, l, vocab), or (b, last_logits, vocab)
    states: list | None = None  # per layer, its decode state after the (pruned) prefill (SSMState for Mamba layers)
    kept: list[torch.Tensor] | None = None  # per layer, the original positions it ran on (b, w); -1 = padding slot


@dataclass
class Prefix:
    """The residual stream after the first `layers` layers ran on every token, and the in-layer scores of the layer
    that ranks the tokens pruned after the last of them (score_source: that layer, or the nearest below it).

    Layer 0 runs on every token under any schedule, so a schedule search computes this once per batch and
    starts each trial's forward from it (forward(prefix=...)) instead of from the embeddings.
    """

    hidden: torch.Tensor  # (b, l, d_model) residual stream, stream dtype
    impact: torch.Tensor | None  # (b, l) the in-layer scores (criterion's) of layer impact_layer, None if none
    layers: int
    criterion: str = DEFAULT_CRITERION
    impact_layer: int = -1


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

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream's start: the embeddings (times Granite's embedding_multiplier), in the stream dtype."""
        h = self.backbone.embeddings(input_ids)
        if self.config.embedding_multiplier != 1.0:
            h = h * self.config.embedding_multiplier
        return h.to(self._stream_dtype)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the normalised stream h (divided by Granite's logits_scaling, times Falcon-H1's
        lm_head_multiplier)."""
        logits = self.lm_head(h.to(self.lm_head.weight.dtype))
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        return logits if self.config.lm_head_multiplier == 1.0 else logits * self.config.lm_head_multiplier

    def _layer(self, i: int, h: torch.Tensor, pending, plan: TokenPlan, score: str | None, want_state: bool, owned: bool,
               window: int = 1, emb: torch.Tensor | None = None):  # fmt: skip
        """Block i on the residual stream h, the previous block's output `pending` not yet added to it: returns
        (h + pending, this block's output, scores of the in-layer criterion `score` or None, state). The add is
        fused into the norm, in h itself when `owned` (add_norm). emb: the original embeddings of every position
        (b, l, d), which a Zamba2 hybrid layer reads at its slots."""
        at = None
        if self.config.kind(i) == "shared":  # padding slots point past the row (plan.idx): any row serves them
            idx = plan.idx.clamp_max(emb.shape[1] - 1)
            at = emb.gather(1, idx.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
        ctx = MixerContext(plan.mask, plan.last, plan.idx, score, want_state, self.backends, plan.offset, window, at)
        h, out, res = self.backbone.layers[i](h, pending, ctx, owned)
        return h, out, res.score, res.state

    @torch.no_grad()
    def prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, layers: int = 1,
        criterion: str = DEFAULT_CRITERION, simba: SimbaConfig | None = None,
    ) -> Prefix:  # fmt: skip
        """Run the first `layers` layers densely; forward(same inputs, prefix=...) continues from there (with a
        schedule of the same criterion: the in-layer scores that rank the tokens after the last prefix layer are kept
        for it). simba: the schedule's other settings that decide which layer scores (attention_score, protect_last);
        its criterion is `criterion`."""
        plan = TokenPlan(attention_mask, *input_ids.shape, None, input_ids.device, self.config.scan_chunks)
        emb, mixed = self.embed(input_ids), None
        h = emb.clone() if self.config.shared_blocks else emb  # the stream changes in place; Zamba2 reads emb as it was
        like = SimbaConfig([1.0] * self.config.n_layer, criterion) if simba is None else simba
        like = SimbaConfig(like.keep, criterion, like.protect_last, attention_score=like.attention_score)
        src = score_source(self.config.kinds, layers - 1, like) if criterion in IN_LAYER else None
        impact = None
        for i in range(layers):
            score = src[1] if src is not None and src[0] == i else None
            h, mixed, scored, _ = self._layer(i, h, mixed, plan, score, False, owned=True, window=like.protect_last, emb=emb)
            impact = scored if scored is not None else impact
        return Prefix(h + mixed, impact, layers, criterion, -1 if src is None else src[0])

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
        n = self.config.n_layer
        prunes = [plan.prunes_after(i) for i in range(n)]
        scoring = scorers(self.config.kinds, prunes, simba)  # layer -> the in-layer criterion it computes
        window = simba.protect_last if simba is not None else 1
        # in-layer scores by the layer that computed them, kept aligned with the current slots until their last use
        carried: dict[int, torch.Tensor] = {}
        last_use = {}  # source layer -> the last layer that prunes by its scores
        for i in range(n):
            src = score_source(self.config.kinds, i, simba) if prunes[i] else None
            if src is not None:
                last_use[src[0]] = i
        states, kept_positions = [], []
        mixed, owned = None, prefix is None  # a prefix's stream is the caller's: the first add makes our own copy
        emb = self.embed(input_ids) if self.config.shared_blocks else None  # what Zamba2's hybrid layers read
        if prefix is None:
            h, start = (self.embed(input_ids) if emb is None else emb.clone()), 0
        else:
            if return_states or return_kept:
                raise ValueError("prefix: return_states and return_kept need the full forward")
            if simba is not None and simba.keep[prefix.layers - 1] < 1.0:
                raise ValueError(f"prefix: simba prunes within its first {prefix.layers} layers")
            if simba is not None and simba.criterion in IN_LAYER and simba.criterion != prefix.criterion:
                raise ValueError(f"prefix: made for criterion {prefix.criterion!r}, not {simba.criterion!r}")
            h, start = prefix.hidden, prefix.layers
            below = {j for j in scoring if j < start}
            if below - {prefix.impact_layer}:
                raise ValueError(f"prefix: the schedule needs the scores of layer {min(below)}, the prefix has "
                                 f"layer {prefix.impact_layer}'s")  # fmt: skip
            if below:
                carried[prefix.impact_layer] = prefix.impact
            if prunes[start - 1]:
                h, frozen = self._prune(start - 1, h, plan, frozen, carried, last_use)
        for i in range(start, n):
            if return_kept:
                kept_positions.append(torch.where(plan.real, plan.idx, -1))
            h, out, impact, state = self._layer(i, h, mixed, plan, scoring.get(i), return_states, owned, window, emb)
            # an add into a stream not ours made a new one (a block with an MLP adds within itself)
            owned = owned or mixed is not None or self.backbone.layers[i].mlp is not None
            mixed = out
            if impact is not None:
                carried[i] = impact
            states.append(state)
            if prunes[i]:  # the criteria see the block's output stream
                h, mixed = h + mixed, None
                h, frozen = self._prune(i, h, plan, frozen, carried, last_use)
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
            logits=self.head(h),
            states=states if return_states else None,
            kept=kept_positions if return_kept else None,
        )

    def _prune(self, layer: int, h: torch.Tensor, plan: TokenPlan, frozen: torch.Tensor | None,
               carried: dict[int, torch.Tensor], last_use: dict[int, int]):  # fmt: skip
        """After `layer`: keep the criterion's top tokens for layer + 1, freeze the stream of those that leave.
        Returns the next layer's stream and the frozen buffer (allocated here on the first call). The in-layer scores
        in `carried` that a later layer still ranks by follow the selection; the others are dropped."""
        simba = plan.simba
        src = score_source(self.config.kinds, layer, simba)
        impact = None if src is None else carried[src[0]]
        scores = CRITERION_FNS[simba.criterion](plan.view(layer, h, impact), simba.seed)
        idx = plan.idx  # the slots' positions before select replaces them
        kept = plan.select(scores, layer + 1)
        for j in list(carried):
            if last_use.get(j, -1) > layer:
                carried[j] = carried[j].gather(1, kept)
            else:
                del carried[j]
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
        emb, mixed = self.embed(token), None
        h = emb.clone() if self.config.shared_blocks else emb  # Zamba2's hybrid layers read emb as it was
        new_states = [None if state is None else state.clone() for state in states]
        for block, state in zip(self.backbone.layers, new_states):
            h, mixed = block.step(h, mixed, state, reference, emb)
        h = norm(self.backbone.norm_f, h + mixed, reference)
        return self.head(h), new_states
