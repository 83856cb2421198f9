"""The settings of a compression, as objects: one class per kind of schedule, and the recovery fine-tune's.

    compress(model, LinearSchedule(flops=0.6))                                  # the paper's schedule, fitted
    compress(model, CalibratedSchedule(flops=0.6, trials=40), windows=windows)  # an Optuna search (calibrate.py)
    compress(model, ExplicitSchedule(keep=[1.0, 0.9, 0.7, 0.5]))                # given ratios

As in torchao's quantize_(model, Int4WeightOnlyConfig(group_size=32)), the type of the settings object picks
what compress() does with it. The kinds share PruningSettings (how the schedule prunes, whatever chose its
ratios). Each object checks its own fields when it is made, once, and names the field in its one-line
SimbaError; a recipe holds one (recipe.py) and the CLI fills it from its flags, naming the flag instead.

This module is light on purpose (no optuna, no accelerate): `import simba_compress` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Literal

from .errors import SimbaError
from .pruning import ATTENTION_SCORES, CRITERIA, DEFAULT_CRITERION, SimbaConfig

Form = Literal["fast", "exact"]
FORMS = ("fast", "exact")
Criterion = Literal["simba", "query", "recent-query", "share", "deci", "snapkv", "utr", "l2norm", "random", "stride"]
assert set(Criterion.__args__) == set(CRITERIA)
AttentionScore = Literal["carry", "snapkv"]
assert set(AttentionScore.__args__) == set(ATTENTION_SCORES)
# pydantic (the recipe) validates these dataclasses' field types from their annotations and refuses unknown keys
_FORBID = {"extra": "forbid"}


def _number(obj, name: str, lo: float | None = None, hi: float | None = None, *, above: bool = False,
            integer: bool = False, optional: bool = False) -> None:
    """Field `name` of obj is a number (an integer) in [lo, hi] ((lo, hi] when above), or None when optional."""
    v = getattr(obj, name)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise SimbaError(f"{name}: expected {'an integer' if integer else 'a number'}, got {v!r}", name)
    if (lo is not None and (v <= lo if above else v < lo)) or (hi is not None and v > hi):
        low = f"{'>' if above else '>='} {lo}"
        rule = f"in {'(' if above else '['}{lo}, {hi}]" if hi is not None else low
        raise SimbaError(f"{name}: must be {rule}, got {v}", name)


def _choice(obj, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(obj, name)
    if v not in choices:
        raise SimbaError(f"{name}: {v!r} is not one of {', '.join(choices)}", name)


@dataclass(kw_only=True)
class PruningSettings:
    """What every kind of schedule shares: how the schedule prunes (SimbaConfig's fields), and the input length
    its FLOP ratio is counted at."""

    criterion: Criterion = DEFAULT_CRITERION  # how tokens are ranked (pruning.SimbaConfig)
    # hybrids: what an attention layer that prunes ranks by, its own attention's (SnapKV's) or the score of the SSM
    # layer below it carried up (SimbaConfig.attention_score: why "snapkv" is the default); no effect on pure Mamba
    attention_score: AttentionScore = "snapkv"
    protect_last: int = 1  # last tokens never pruned (generation needs >= 1)
    granularity: int = 1  # token counts rounded to multiples of this; a staircase of its own: not with form "fast"
    max_tokens: str | list[int] | None = None  # per-layer token caps (0: none) or "T@L", on top of the schedule
    seq_len: int = 1024  # input length the FLOP ratio is fitted and reported at
    seed: int = 0  # the "random" criterion's, and the search's sampler's

    kind: ClassVar[str] = ""  # a recipe's schedule.kind
    __pydantic_config__ = _FORBID

    def __post_init__(self) -> None:
        _choice(self, "criterion", CRITERIA)
        _choice(self, "attention_score", ATTENTION_SCORES)
        _number(self, "protect_last", 1, integer=True)
        _number(self, "granularity", 1, integer=True)
        _number(self, "seq_len", 2, integer=True)
        _number(self, "seed", integer=True)
        if self.max_tokens is not None and not isinstance(self.max_tokens, (str, list)):
            raise SimbaError(f"max_tokens: expected TOKENS@LAYER or one integer per layer, got {self.max_tokens!r}",
                             "max_tokens")

    def shared(self) -> dict:
        """The PruningSettings fields of this object, to make another kind with them."""
        return {f.name: getattr(self, f.name) for f in fields(PruningSettings)}

    def simba(self, keep: list[float], align: bool = False) -> SimbaConfig:
        """A SimbaConfig of these settings with keep ratios `keep` (token caps apart: a schedule is fitted
        without them; compress() adds them)."""
        try:
            return SimbaConfig(keep, criterion=self.criterion, protect_last=self.protect_last, seed=self.seed,
                               granularity=self.granularity, align=align, attention_score=self.attention_score)
        except ValueError as e:  # SimbaConfig's own checks name the field ("keep: ...")
            raise SimbaError(str(e), str(e).partition(":")[0]) from None


def _check_budget(s: LinearSchedule | CalibratedSchedule) -> None:
    """A FLOP budget and the form the schedule fitted to it takes."""
    _number(s, "flops", 0, 1, above=True)
    _choice(s, "form", FORMS)
    if s.form == "fast" and s.granularity > 1:
        raise SimbaError("granularity: a staircase of its own; use it with form 'exact'", "granularity")


@dataclass(kw_only=True)
class LinearSchedule(PruningSettings):
    """The paper's schedule, keep falling linearly from 1.0 at the bottom layer: fitted to a FLOP budget
    (flops: within 0.5% of it at seq_len; in the fast form, the nearest staircase of 1, 3/4, 1/2 ... 1/16 that
    meets it, schedules.py) or down to a given top-layer ratio (final_keep)."""

    flops: float | None = None  # target backbone FLOP ratio in (0, 1]
    final_keep: float | None = None  # or the top layer's keep ratio
    form: Form = "fast"  # with flops: "fast" (a staircase, fast on a GPU at any prompt length) or "exact"

    kind: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.flops is None) == (self.final_keep is None):
            raise SimbaError("flops: give exactly one of flops and final_keep", "flops")
        if self.flops is not None:
            _check_budget(self)
        else:
            _number(self, "final_keep", 0, 1, above=True)


@dataclass(kw_only=True)
class CalibratedSchedule(PruningSettings):
    """A schedule searched by an Optuna study to minimise the calibration loss at a FLOP budget (calibrate.py)."""

    flops: float  # target backbone FLOP ratio in (0, 1]
    form: Form = "fast"  # "fast": each trial's profile becomes its nearest staircase (schedules.to_fast)
    trials: int = 40  # finished trials the study should hold, over all its workers
    timeout: float | None = None  # seconds after which this process starts no new trial
    # KL to the dense model on the scored tail: lower variance than the next-token loss on the same windows, and
    # better on held-out text at 3 of the 4 budgets that both were measured at (benchmarks/RESULTS.md)
    objective: Literal["loss", "kl"] = "kl"
    protect: int | None = None  # K, the scored continuation of a window; None: min(128, window length // 4)
    knots: int = 4  # parameters of the searched profile
    storage: str | None = None  # Optuna RDB URL, .db/.sqlite file or .log/.journal file; None: in memory
    study_name: str = "simba-calibration"
    batch_size: int = 8  # calibration windows per forward pass

    kind: ClassVar[str] = "calibrated"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_budget(self)
        _number(self, "trials", 1, integer=True)
        _number(self, "timeout", 0, above=True, optional=True)
        _choice(self, "objective", ("loss", "kl"))
        _number(self, "protect", 1, integer=True, optional=True)
        _number(self, "knots", 1, integer=True)
        _number(self, "batch_size", 1, integer=True)
        if not self.study_name:
            raise SimbaError("study_name: must not be empty", "study_name")


@dataclass(kw_only=True)
class ExplicitSchedule(PruningSettings):
    """Given per-layer keep ratios: 1.0 first, never increasing."""

    keep: list[float]

    kind: ClassVar[str] = "explicit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.keep, (list, tuple)) or not self.keep:
            raise SimbaError("keep: must list one ratio per layer", "keep")
        self.keep = self.simba(list(self.keep)).keep  # SimbaConfig's checks, as floats


Schedule = LinearSchedule | CalibratedSchedule | ExplicitSchedule
KINDS: dict[str, type[PruningSettings]] = {c.kind: c for c in (LinearSchedule, CalibratedSchedule, ExplicitSchedule)}


@dataclass(kw_only=True)
class FinetuneConfig:
    """Settings of a recovery fine-tune (finetune.py); also a recipe's `finetune:` section."""

    steps: int = 0  # optimizer steps; 0 = no fine-tuning
    data: str | None = None  # training text: file, folder, "demo" or a datasets name (streamed)
    eval_data: str | None = None  # held-out text; None: the eval_windows after the training part of `data`
    lr: float = 1e-4
    warmup_steps: int | None = None  # linear warm-up (None: 5% of steps), then cosine to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01  # on matrices and embeddings; not on norms, biases, A_log, D
    grad_clip: float = 1.0  # max global gradient norm
    batch_size: int = 8  # windows per optimizer step (over all processes)
    micro_batch_size: int | None = None  # windows per forward/backward; None: planned (memory.py)
    seq_len: int = 1024  # tokens a window is read as (it holds seq_len + 1)
    protect: int | None = None  # scored continuation; None: min(128, seq_len // 4)
    loss_positions: Literal["continuation", "all"] = "continuation"
    distill_weight: float = 0.5  # 0: next-token loss only, 1: KL to the dense model only
    temperature: float = 1.0
    train: Literal["all", "ssm", "norms"] = "all"  # what trains; "ssm": A_log, D, dt, x_proj, conv1d and norms
    gradient_checkpointing: bool | None = None  # recompute each mixer in the backward; None: only if needed to fit
    memory_gb: float | None = None  # cap on the process's peak; None: a share of the free memory
    eval_every: int = 50
    eval_windows: int = 16
    save_every: int = 100  # resumable state every this many steps (and at the end)
    seed: int = 0

    __pydantic_config__ = _FORBID

    def __post_init__(self) -> None:
        for name in ("steps", "warmup_steps"):
            _number(self, name, 0, integer=True, optional=name == "warmup_steps")
        for name in ("batch_size", "eval_every", "eval_windows", "save_every", "micro_batch_size", "protect"):
            _number(self, name, 1, integer=True, optional=name in ("micro_batch_size", "protect"))
        _number(self, "seq_len", 2, integer=True)
        _number(self, "seed", integer=True)
        for name in ("lr", "grad_clip", "temperature", "memory_gb"):
            _number(self, name, 0, above=True, optional=name == "memory_gb")
        _number(self, "weight_decay", 0)
        _number(self, "min_lr_ratio", 0, 1)
        _number(self, "distill_weight", 0, 1)
        _choice(self, "loss_positions", ("continuation", "all"))
        _choice(self, "train", ("all", "ssm", "norms"))
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise SimbaError(f"micro_batch_size: {self.micro_batch_size} does not divide batch_size {self.batch_size}",
                             "micro_batch_size")

    def resolved_warmup(self) -> int:
        return round(0.05 * self.steps) if self.warmup_steps is None else self.warmup_steps

    def resolved_protect(self) -> int:
        from .evaluate import default_protect

        return self.protect or default_protect(self.seq_len)
