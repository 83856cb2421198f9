"""Per-layer keep schedules: the paper's linear one, one that meets a FLOP ratio, explicit lists, and the
fast form every --flops schedule takes by default.

The fast form. A schedule is fast on a GPU when (a) few layers score (a score pass costs about one scan
pass, and the paper's exact schedule scores after every layer) and (b) every pruned width is one that the
scan kernel and the GEMMs run at full speed. mamba_ssm's scan is fast only on whole chunks (a multiple of
2048 tokens, or 128/256/512/1024 for shorter rows: its kernel takes a slower path on any other length,
1.5-2.3x slower per token on the H200, benchmarks/results/gpu_scan.json). So the fast form keeps ratios that
are powers of two, 1, 1/2, 1/4, ... down to 1/2**FAST_DEPTH: a staircase whose widths are the prompt length
halved, which are whole chunks whenever the prompt is (and a layer scores only where the ratio halves). Being
relative to the prompt, one schedule serves every prompt length and batch size. A continuous profile (the
linear schedule, or a calibration trial's) becomes the staircase closest to it in log2(keep) among those
meeting the FLOP budget (to_fast).
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from .errors import SimbaError
from .flops import block_flops, count, score_flops
from .model import ModelConfig
from .pruning import SimbaConfig

FLOP_TOLERANCE = 0.005  # a schedule for --flops F lands within 0.5% of F
LOWEST_T = 1e-6  # the smallest keep ratio a fitted schedule may reach (ratios must stay > 0)
Form = Literal["fast", "exact"]
FORMS = ("fast", "exact")
FAST_DEPTH = 4  # the fast form's lowest level: keep 1/16


def flop_tolerance(cfg: ModelConfig, flops: float, seq_len: int, granularity: int = 1) -> float:
    """How close to `flops` a schedule must land: 0.5% of it, or, when token counts come in multiples of
    `granularity`, one such step of one layer (a staircase cannot land between its steps)."""
    return max(FLOP_TOLERANCE * flops, granularity / (seq_len * cfg.n_layer) if granularity > 1 else 0.0)


def _fast_tokens(simba: SimbaConfig, seq_len: int) -> np.ndarray:
    """Tokens a layer at each fast level 2**-j runs on, for a row of seq_len (SimbaConfig.counts: the protected
    tail can make the lowest levels equal)."""
    levels = [2.0**-j for j in range(FAST_DEPTH + 1)]
    return replace(simba, keep=levels).counts(torch.tensor([seq_len]))[:, 0].double().numpy()


def fast_tolerance(cfg: ModelConfig, simba: SimbaConfig, flops: float, seq_len: int) -> float:
    """flop_tolerance of the fast form: at least half its smallest step (one layer moving between the two
    lowest distinct levels), since its staircases cannot land between their steps."""
    steps = np.diff(np.unique(_fast_tokens(simba, seq_len)))
    smallest = steps.min() if steps.size else seq_len
    return max(flop_tolerance(cfg, flops, seq_len), 0.5 * float(smallest) / (seq_len * cfg.n_layer))


@functools.cache
def _staircases(n_layer: int, depth: int) -> np.ndarray:
    """Every fast-form staircase of n_layer layers: (m, depth + 1) layer counts per level 2**-j, level 0
    (keep 1) holding at least the first layer. Stars and bars: C(n_layer - 1 + depth, depth) rows."""
    rows = []
    for bars in itertools.combinations(range(n_layer - 1 + depth), depth):
        edges = (-1, *bars, n_layer - 1 + depth)
        rows.append([edges[j + 1] - edges[j] - 1 for j in range(depth + 1)])
    counts = np.asarray(rows, dtype=np.int64)
    counts[:, 0] += 1
    return counts


def deepest_fast(n_layer: int) -> list[float]:
    """The fast form's cheapest staircase: the first layer dense, every other at the lowest level."""
    return [1.0] + [2.0**-FAST_DEPTH] * (n_layer - 1)


def fast_candidates(cfg: ModelConfig, simba: SimbaConfig, flops: float, seq_len: int) -> list[list[float]]:
    """Every fast-form staircase (keep per layer) whose FLOP ratio at seq_len, with simba's criterion and protected
    tail, is within fast_tolerance of `flops`: the whole space the fast form can offer at that budget."""
    depth = FAST_DEPTH
    counts = _staircases(cfg.n_layer, depth)  # (m, depth + 1)
    per_token, score = sum(block_flops(cfg).values()), score_flops(cfg, simba.criterion)
    tokens = _fast_tokens(simba, seq_len)
    # a level scores its tokens once, at its last layer, when the next nonempty level keeps fewer
    nonempty = counts > 0
    following = np.full(len(counts), np.inf)  # tokens of the next nonempty level, walking up from the top
    scores = np.zeros(counts.shape, dtype=bool)
    for j in range(depth, -1, -1):
        scores[:, j] = nonempty[:, j] & (following < tokens[j])
        following = np.where(nonempty[:, j], tokens[j], following)
    ratio = (counts @ (tokens * per_token) + scores @ (tokens * score)) / (seq_len * cfg.n_layer * per_token)
    ok = np.abs(ratio - flops) <= fast_tolerance(cfg, simba, flops, seq_len)
    return [[2.0**-j for j in range(depth + 1) for _ in range(int(c[j]))] for c in counts[ok]]


def to_fast(cfg: ModelConfig, simba: SimbaConfig, flops: float, seq_len: int) -> list[float] | None:
    """The fast-form staircase closest to simba.keep (sum over layers of the squared log2 keep distance) among
    fast_candidates; None when there is none."""
    candidates = fast_candidates(cfg, simba, flops, seq_len)
    if not candidates:
        return None
    target = -np.log2(np.clip(np.asarray(simba.keep, dtype=np.float64), 2.0**-FAST_DEPTH, 1.0))  # (n_layer,)
    distance = ((-np.log2(np.asarray(candidates)) - target) ** 2).sum(1)
    return candidates[int(np.argmin(distance))]


def linear(n_layer: int, final: float) -> list[float]:
    """Simba's schedule: 1.0 at the bottom layer, falling linearly to `final` at the top one."""
    if not 0.0 < final <= 1.0:
        raise SimbaError(f"--final-keep: must be in (0, 1], got {final}")
    if n_layer == 1:
        return [1.0]
    return [1.0 - (1.0 - final) * i / (n_layer - 1) for i in range(n_layer)]


def knots(n_layer: int, increments: list[float], level: float) -> list[float]:
    """A monotone profile over relative depth: keep = max(LOWEST_T, 1 - c * shape(layer / (n_layer - 1))).

    shape rises from 0 at the bottom to 1 at the top, piecewise linearly through len(increments) evenly spaced
    knots; increment j (>= 0, normalised by their sum) is how much of the total drop happens in segment j.
    level in (-1, 1] sets the depth of the drop: for level >= 0, c = 1 - level and the top layer keeps `level`
    (equal increments give linear(n_layer, level)); below 0, c = 1 / (1 + level) > 1 and the upper layers reach
    the floor, which is how budgets below the linear schedule's reach are met. A few numbers describe any depth.
    """
    if n_layer == 1:
        return [1.0]
    inc = np.asarray(increments, dtype=np.float64)
    if inc.sum() <= 0:
        inc = np.ones_like(inc)
    knot_shape = np.concatenate([[0.0], np.cumsum(inc) / inc.sum()])
    depth = np.arange(n_layer) / (n_layer - 1)
    shape = np.interp(depth, np.linspace(0.0, 1.0, len(inc) + 1), knot_shape)
    c = 1.0 - level if level >= 0 else 1.0 / (1.0 + level)
    return [max(LOWEST_T, 1.0 - c * float(v)) for v in shape]


def fit_flops(
    cfg: ModelConfig, make: Callable[[float], SimbaConfig], flops: float, seq_len: int, lo: float = LOWEST_T
) -> SimbaConfig:
    """The schedule make(t), t in [lo, 1], whose FLOP ratio at seq_len is closest to `flops` (bisection).

    The ratio must not decrease with t. When even make(lo) is above `flops`, that is the answer: the caller
    compares its ratio with the target.
    """
    hi = 1.0
    if count(cfg, make(lo), seq_len).ratio >= flops:
        return make(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        if count(cfg, make(mid), seq_len).ratio > flops:
            hi = mid
        else:
            lo = mid
    return min((make(lo), make(hi)), key=lambda s: abs(count(cfg, s, seq_len).ratio - flops))


def check_flops(flops: float) -> None:
    if not 0.0 < flops <= 1.0:
        raise SimbaError(f"--flops: must be in (0, 1], got {flops}")


def linear_for_flops(
    cfg: ModelConfig,
    flops: float,
    seq_len: int,
    criterion: str = "simba",
    protect_last: int = 1,
    seed: int = 0,
    granularity: int = 1,
    form: Form = "exact",
) -> SimbaConfig:
    """The linear schedule whose FLOP ratio at seq_len is within flop_tolerance of `flops`; in the fast form,
    the staircase closest to it that meets `flops` (to_fast)."""
    check_flops(flops)
    if form == "fast":
        exact = linear_for_flops(cfg, flops, seq_len, criterion, protect_last, seed, granularity)
        return fast_for_flops(cfg, exact, flops, seq_len)

    def make(final: float) -> SimbaConfig:
        return SimbaConfig(linear(cfg.n_layer, final), criterion, protect_last, seed, granularity)

    if flops >= 1.0 - 1e-12:
        return make(1.0)
    tol = flop_tolerance(cfg, flops, seq_len, granularity)
    lowest = count(cfg, make(LOWEST_T), seq_len).ratio
    if flops < lowest - tol:  # the same tolerance as the fit's below, and as the search's (calibrate.py)
        raise SimbaError(
            f"--flops {flops}: below what a linear schedule reaches ({lowest:.3f} at --seq-len {seq_len}); "
            "use a calibrated or explicit schedule"
        )
    best = fit_flops(cfg, make, flops, seq_len)
    ratio = count(cfg, best, seq_len).ratio
    if abs(ratio - flops) > tol:
        raise SimbaError(f"--flops {flops}: the closest linear schedule gives {ratio:.4f} at --seq-len {seq_len}")
    return best


def fast_for_flops(cfg: ModelConfig, simba: SimbaConfig, flops: float, seq_len: int) -> SimbaConfig:
    """`simba` (any profile) in the fast form at `flops`, or a SimbaError that says how far the form reaches."""
    keep = to_fast(cfg, simba, flops, seq_len)
    if keep is None:
        lo = count(cfg, replace(simba, keep=deepest_fast(cfg.n_layer)), seq_len).ratio
        raise SimbaError(
            f"--flops {flops}: no fast-form schedule of {cfg.n_layer} layers lands within "
            f"{fast_tolerance(cfg, simba, flops, seq_len):.3g} of it at --seq-len {seq_len} (the form reaches "
            f"{lo:.3f} to 1.0 in steps); use --form exact"
        )
    return replace(simba, keep=keep)


def read_keep_file(path: str | Path) -> list[float]:
    """Per-layer keep ratios from a file: a JSON list, a JSON object with "keep", or numbers split by spaces/commas."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SimbaError(f"{path}: cannot read the schedule file ({e.strerror})") from None
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("keep", data.get("simba", {}).get("keep"))
    except json.JSONDecodeError:
        data = text.replace(",", " ").split()
    try:
        return [float(v) for v in data]
    except (TypeError, ValueError):
        raise SimbaError(f"{path}: expected a list of per-layer keep ratios") from None


def max_tokens_list(spec: str | list[int], n_layer: int) -> list[int]:
    """Per-layer token caps (SimbaConfig.max_tokens) from "T@L" (at most T tokens from layer L on: context
    extension, README Long context), a comma-separated list, or a list; 0 means no cap."""
    where = f"--max-tokens {spec}"
    try:
        if isinstance(spec, str) and "@" in spec:
            tokens, layer = (int(v) for v in spec.split("@"))
            if not 1 <= layer < n_layer:
                raise SimbaError(f"{where}: the first capped layer must be in [1, {n_layer - 1}]")
            return [0] * layer + [tokens] * (n_layer - layer)
        caps = [int(v) for v in (spec.replace(",", " ").split() if isinstance(spec, str) else spec)]
    except ValueError:
        raise SimbaError(f"{where}: expected TOKENS@LAYER or one integer per layer") from None
    if len(caps) != n_layer:
        raise SimbaError(f"{where}: {len(caps)} caps for a model of {n_layer} layers")
    return caps
