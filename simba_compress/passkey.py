"""Passkey retrieval, the long-context probe of DeciMamba and its predecessors: a key hidden in real text.

A sample of `length` tokens:

    task line | haystack (real text) with the needle inserted at `depth` | question | answer
    needle:   "The pass key is X. Remember it. X is the pass key."        X: 5 random digits
    question: "What is the pass key? The pass key is"                     answer: " X"

Scoring is teacher-forced exact match: the model reads the whole sample, and every answer token must be the
argmax of the logits before it. The question and the answer (`tail` tokens) are the continuation a user
sees, so a pruned model runs them through every layer (protect_last >= tail), as the headline protects its
scored continuation. Samples are a pure function of (text stream, length, depth, seed): build training
samples from the training text and evaluation samples from held-out text, never the other way round.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from .flops import count
from .model import MambaLM
from .pruning import SimbaConfig

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    ids: torch.Tensor  # (length,) the whole sample, answer included
    key: str
    depth: float  # where the needle sits in the haystack: 0 at its start, 1 at its end
    needle: tuple[int, int]  # [start, end) of the needle sentence in ids
    keys: tuple[tuple[int, int], ...]  # [start, end) of each copy of the key's tokens in the needle
    answer: int  # the answer is the last `answer` tokens of ids
    tail: int  # question + answer: the tokens a pruned model must keep

    @property
    def length(self) -> int:
        return self.ids.numel()


class PasskeyTask:
    """Builds passkey samples whose haystacks are slices of `stream` (token ids of real text; eos tokens, the
    document separators, are dropped so that no haystack tells the model to forget what came before)."""

    def __init__(self, tokenizer, stream: torch.Tensor):
        self._tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.stream = stream if eos is None else stream[stream != eos]
        self.task = self._encode(TASK + "\n")
        self.question = self._encode("\n" + QUESTION)

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def sample(self, length: int, depth: float, seed: int | str) -> PasskeySample:
        """One sample of exactly `length` tokens, the needle at `depth` in [0, 1] of the haystack."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth: must be in [0, 1], got {depth}")
        rng = random.Random(f"passkey:{seed}:{length}:{depth}")
        key = str(rng.randint(10000, 99999))
        needle = self._encode("\n" + NEEDLE.format(key=key) + "\n")
        answer = self._encode(" " + key)
        fixed = len(self.task) + len(needle) + len(self.question) + len(answer)
        hay = length - fixed
        if hay < 0:
            raise ValueError(f"length: {length} tokens cannot hold the {fixed} tokens of task, needle, question and answer")
        if hay > self.stream.numel():
            raise ValueError(f"length: the text has {self.stream.numel()} tokens, a {length}-token sample needs {hay}")
        start = rng.randrange(self.stream.numel() - hay + 1)
        haystack = self.stream[start : start + hay].tolist()
        at = round(depth * hay)
        ids = self.task + haystack[:at] + needle + haystack[at:] + self.question + answer
        n0 = len(self.task) + at
        a = len(answer)
        keys = tuple((n0 + i, n0 + i + a) for i in range(len(needle) - a + 1) if needle[i : i + a] == answer)
        return PasskeySample(
            torch.tensor(ids, dtype=torch.long), key, depth, (n0, n0 + len(needle)), keys, a, len(self.question) + a
        )

    def samples(self, length: int, depths: list[float], per_depth: int, seed: int = 0) -> list[PasskeySample]:
        """per_depth samples at each depth, all `length` tokens long (one batch shape)."""
        return [self.sample(length, d, f"{seed}:{i}") for d in depths for i in range(per_depth)]


def exact_match(logits: torch.Tensor, samples: list[PasskeySample]) -> torch.Tensor:
    """(b,) bool: every answer token of sample r is the argmax of logits (b, k, vocab), the logits of the
    last k positions of each sample (k > the longest answer)."""
    k = logits.shape[1]
    out = []
    for r, s in enumerate(samples):
        if k <= s.answer:
            raise ValueError(f"logits: {k} positions cannot score a {s.answer}-token answer")
        predicted = logits[r, k - s.answer - 1 : k - 1].argmax(-1)
        out.append(bool(torch.equal(predicted.cpu(), s.ids[-s.answer :])))
    return torch.tensor(out)


@dataclass
class PasskeyResult:
    correct: list[bool]  # per sample
    key_kept: list[bool]  # per sample: a copy of the key reaches the top layer whole (pruning or truncation)
    flop_ratio: float  # backbone FLOPs against the dense model on the whole sample
    protect: int  # tokens protected at the end of every sample

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def protected_prompt(samples: list, simba: SimbaConfig | None, recent: int | None, tail: str):
    """What a probe over samples of one length (each with its .length and its protected .tail) runs: (length, the
    protected tail, simba with that tail protected, the first token read: length - recent for truncation)."""
    length = samples[0].length
    if any(s.length != length for s in samples):
        raise ValueError("samples: evaluate one length at a time")
    protect = max(s.tail for s in samples)
    if simba is not None:
        simba = replace(simba, protect_last=max(simba.protect_last, protect))
    start = 0 if recent is None else length - recent
    if not 0 <= start <= length - protect:
        raise ValueError(f"recent: must keep at least the {protect}-token {tail}, got {recent}")
    return length, protect, simba, start


@torch.no_grad()
def evaluate_passkey(
    model: MambaLM,
    samples: list[PasskeySample],
    simba: SimbaConfig | None = None,
    recent: int | None = None,
    batch_tokens: int = 1 << 17,
) -> PasskeyResult:
    """Exact-match accuracy of `model` on samples of one length, dense (simba None) or pruned by `simba` with
    the longest tail protected; recent=N is the truncation baseline: the dense model reads the last N tokens."""
    length, protect, simba, start = protected_prompt(samples, simba, recent, "tail")
    k = max(s.answer for s in samples) + 1
    correct, key_kept = [], []
    per_batch = max(1, batch_tokens // length)
    for b0 in range(0, len(samples), per_batch):
        part = samples[b0 : b0 + per_batch]
        ids = torch.stack([s.ids[start:] for s in part]).to(model.device)
        out = model(ids, simba=simba, return_kept=simba is not None, last_logits=k)
        correct += exact_match(out.logits, part).tolist()
        top = out.kept[-1].cpu() + start if simba is not None else torch.arange(start, length).expand(len(part), -1)
        for s, kept in zip(part, top):
            key_kept.append(any(bool(torch.isin(torch.arange(lo, hi), kept).all()) for lo, hi in s.keys))
    flops = (length - start) / length if simba is None else count(model.config, simba, length).ratio
    return PasskeyResult(correct, key_kept, flops, protect)
