"""The parallel layer of Falcon-H1 (FalconH1DecoderLayer): attention and an SSM mixer side by side on the same
normalised input, their outputs summed, with its muP multipliers (ModelConfig: ssm_in/out_multiplier,
attn_in/out_multiplier):

    out = m_ssm_out * ssm(m_ssm_in * x) + m_attn_out * attention(m_attn_in * x)

Both run on the layer's kept tokens: under pruning a dropped token is neither an SSM step nor a key here, as in the
SSM and attention layers of the other hybrids. The layer ranks tokens by its SSM mixer's in-layer score (simba, share,
deci) and by its attention's ("snapkv"); its decode state is both mixers' (layers.ParallelState: the SSM state and
the KV cache of the kept tokens). The two mixers are the model's own (mamba1.py / mamba2.py, attention.py) with
their fast paths; this module only composes them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .attention import AttentionMixer
from .backends import Backends
from .layers import Mixer, MixerContext, MixerOutput, ModelConfig, ParallelState
from .mamba1 import Mamba1Mixer
from .mamba2 import Mamba2Mixer

SSM_MIXERS: dict[str, type[Mixer]] = {"mamba1": Mamba1Mixer, "mamba2": Mamba2Mixer}  # ModelConfig.layer -> class


def _scaled(x: torch.Tensor, multiplier: float) -> torch.Tensor:
    return x if multiplier == 1.0 else x * multiplier


class ParallelMixer(Mixer):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ssm = SSM_MIXERS[cfg.layer](cfg)
        self.attn = AttentionMixer(cfg)
        self.ssm_in, self.ssm_out = cfg.ssm_in_multiplier, cfg.ssm_out_multiplier
        self.attn_in, self.attn_out = cfg.attn_in_multiplier, cfg.attn_out_multiplier

    def forward(self, hidden: torch.Tensor, ctx: MixerContext) -> MixerOutput:
        """hidden (b, w, d_model) on the layer's kept tokens; the score ctx.score asks for comes from the mixer that
        computes it (snapkv: the attention; an SSM score: the SSM mixer)."""
        attn_score = ctx.score == "snapkv"
        s = self.ssm(_scaled(hidden, self.ssm_in), replace(ctx, score=None if attn_score else ctx.score))
        a = self.attn(_scaled(hidden, self.attn_in), replace(ctx, score=ctx.score if attn_score else None))
        out = _scaled(s.out, self.ssm_out) + _scaled(a.out, self.attn_out)
        state = ParallelState(s.state, a.state) if ctx.want_state else None
        return MixerOutput(out, a.score if attn_score else s.score, state)

    def step(self, hidden: torch.Tensor, state: ParallelState, backends: Backends) -> torch.Tensor:
        s = self.ssm.step(_scaled(hidden, self.ssm_in), state.ssm, backends)
        a = self.attn.step(_scaled(hidden, self.attn_in), state.kv, backends)
        return _scaled(s, self.ssm_out) + _scaled(a, self.attn_out)

    def zero_state(self, batch: int, device, dtype: torch.dtype, capacity: int = 0) -> ParallelState:
        return ParallelState(self.ssm.zero_state(batch, device, dtype), self.attn.zero_state(batch, device, dtype, capacity))

    def prepare_step(self) -> None:
        self.ssm.prepare_step()
        self.attn.prepare_step()
