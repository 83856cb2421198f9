"""Quality of a (pruned) model on token windows: the protected-continuation loss and the all-position loss.

Each window holds seq_len + 1 tokens: the model reads the first seq_len and predicts the next token at
every position. Headline (README, How quality is measured): the mean loss over the last `protect` positions, with those positions
protected from pruning, i.e. a continuation given the pruned prompt before it, as in generation and
lm-eval. Beside it, the all-position loss with only the model's own protected tail: a stress figure, since
a pruned position's prediction comes from the layer where it was dropped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .flops import count
from .model import MambaLM
from .pruning import SimbaConfig


@dataclass
class EvalResult:
    windows: int
    seq_len: int
    protect: int
    loss: float  # headline: mean loss over the protected last `protect` positions
    loss_se: float  # its standard error over windows
    ppl: float  # exp(loss)
    all_position_loss: float | None  # every position, only the model's own tail protected
    flop_ratio: float  # backbone FLOPs vs dense, at seq_len with `protect` protected
    position_loss: list[float] | None = None  # mean loss at each position (all-position pass)

    def to_dict(self) -> dict:
        return asdict(self)


def default_protect(seq_len: int) -> int:
    """The scored continuation of the headline: 128 tokens, at most a quarter of a window."""
    return max(1, min(128, seq_len // 4))


def protected(simba: SimbaConfig | None, protect: int) -> SimbaConfig | None:
    """`simba` with the last `protect` positions never pruned: how the headline runs a schedule."""
    return None if simba is None else replace(simba, protect_last=max(simba.protect_last, protect))


def _token_losses(model: MambaLM, inputs: torch.Tensor, targets: torch.Tensor, simba, last: int | None = None):
    """Next-token losses (b, l), or of the last `last` positions only (the LM head runs on those alone)."""
    logits = model(inputs.to(model.device), simba=simba, last_logits=last).logits.float()
    targets = targets if last is None else targets[:, -last:]
    return F.cross_entropy(logits.transpose(1, 2), targets.to(model.device), reduction="none").cpu()


def _batches(windows: torch.Tensor, batch_size: int, desc: str, progress: bool):
    starts = range(0, windows.shape[0], batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        w = windows[s : s + batch_size]
        yield w[:, :-1], w[:, 1:]


def _mean_se(per_window: list[torch.Tensor]) -> tuple[float, float]:
    """Mean of the per-window losses and its standard error over windows."""
    x = torch.cat(per_window).double()
    return x.mean().item(), (x.std().item() / math.sqrt(len(x)) if len(x) > 1 else float("nan"))


@torch.no_grad()
def evaluate(
    model: MambaLM,
    windows: torch.Tensor,
    protect: int = 128,
    batch_size: int = 8,
    simba: SimbaConfig | None | str = "model",
    all_positions: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Headline and all-position loss of `model` (pruned as `simba`, default its own) on windows (n, l + 1)."""
    simba = model.simba if simba == "model" else simba
    seq_len = windows.shape[1] - 1
    if not 1 <= protect <= seq_len:
        raise ValueError(f"protect: must be in [1, {seq_len}], got {protect}")
    head_simba = protected(simba, protect)
    head, full = [], []
    for x, y in _batches(windows, batch_size, "eval", progress):
        losses = _token_losses(model, x, y, head_simba, None if all_positions and simba is None else protect)
        head.append(losses[:, -protect:].mean(1))
        if all_positions:
            full.append(losses if simba is None else _token_losses(model, x, y, simba))
    loss, se = _mean_se(head)
    full_t = torch.cat(full).double() if all_positions else None
    return EvalResult(
        windows=windows.shape[0],
        seq_len=seq_len,
        protect=protect,
        loss=loss,
        loss_se=se,
        ppl=math.exp(loss),
        all_position_loss=None if full_t is None else full_t.mean().item(),
        flop_ratio=count(model.config, head_simba, seq_len).ratio,
        position_loss=None if full_t is None else full_t.mean(0).tolist(),
    )


@torch.no_grad()
def evaluate_truncated(
    model: MambaLM, windows: torch.Tensor, flops: float, protect: int = 128, batch_size: int = 8, progress: bool = True
) -> EvalResult:
    """The cheapest way to spend fewer FLOPs: the dense model on only the most recent round(flops * l) tokens."""
    seq_len = windows.shape[1] - 1
    keep = max(protect, round(flops * seq_len))
    head = []
    for x, y in _batches(windows, batch_size, "eval truncated", progress):
        head.append(_token_losses(model, x[:, -keep:], y[:, -keep:], None, protect).mean(1))
    loss, se = _mean_se(head)
    return EvalResult(
        windows=windows.shape[0],
        seq_len=seq_len,
        protect=protect,
        loss=loss,
        loss_se=se,
        ppl=math.exp(loss),
        all_position_loss=None,
        flop_ratio=keep / seq_len,
    )


def position_buckets(position_loss: list[float]) -> list[dict]:
    """Mean loss over positions [0, 64), [64, 128), [128, 256), ... (doubling): does information flow further?"""
    out, start, end = [], 0, 64
    while start < len(position_loss):
        part = position_loss[start:end]
        out.append({"start": start, "end": start + len(part), "loss": round(sum(part) / len(part), 4)})
        start, end = end, end * 2
    return out
