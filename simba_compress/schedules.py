"""Per-layer keep schedules: the paper's linear one, one that meets a FLOP ratio, explicit lists, and the
fast form every --flops schedule takes by default.

The fast form. A schedule is fast on a GPU when (a) few layers score (a score pass costs about one scan
pass, and the paper's exact schedule scores after every layer) and (b) every pruned width is one that the
scan kernel and the GEMMs run at full speed. So the fast form keeps a few ratios only, FAST_LEVELS: a
staircase in which a layer scores only where the ratio steps down. Being relative to the prompt, one schedule
serves every prompt length and batch size. The levels are 1, 3/4 and the powers of two 1/2 ... 1/16: the
widths T/2, T/4, ... of a prompt of T tokens are whole chunks of mamba_ssm's scan whenever T is, 3T/4 is
from T = 8192 on; below that (or for any width between chunks) the GPU mixer pads the scan's operands to
whole chunks (ModelConfig.scan_chunks) while its projections run on the kept tokens only, and the FLOP count
includes the padded steps. Without 3/4, the form's best staircase at 0.6 on the l16 proxy was 0.0041 nats
behind the exact schedule (benchmarks/results/cpu/fast_form_bound.md): halving is too coarse a first step.
A continuous profile (the linear schedule, or a calibration trial's) becomes the staircase closest to it in
log2(keep) among those meeting the FLOP budget (to_fast, a dynamic programme over layers and FLOPs).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .errors import SimbaError
from .flops import count, layer_flops
from .layers import ModelConfig
from .pruning import SimbaConfig

if TYPE_CHECKING:
    from .settings import CalibratedSchedule, LinearSchedule

FLOP_TOLERANCE = 0.005  # a schedule for --flops F lands within 0.5% of F
LOWEST_T = 1e-6  # the smallest keep ratio a fitted schedule may reach (ratios must stay > 0)
FAST_LEVELS = (1.0, 0.75, 0.5, 0.25, 0.125, 0.0625)  # the fast form's keep ratios, falling


def flop_tolerance(cfg: ModelConfig, flops: float, seq_len: int, granularity: int = 1) -> float:
    """How close to `flops` a schedule must land: 0.5% of it, or, when token counts come in multiples of
    `granularity`, one such step of one layer (a staircase cannot land between its steps)."""
    return max(FLOP_TOLERANCE * flops, granularity / (seq_len * cfg.n_layer) if granularity > 1 else 0.0)


def _fast_tokens(simba: SimbaConfig, seq_len: int) -> np.ndarray:
    """Tokens a layer at each fast level runs on, for a row of seq_len (SimbaConfig.counts: the protected tail
    can make the lowest levels equal)."""
    plain = replace(simba, keep=list(FAST_LEVELS), max_tokens=None, align=False)
    return plain.counts(torch.tensor([seq_len]))[:, 0].long().numpy()


def _usable(cfg: ModelConfig, tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Levels whose widths SimbaConfig.align leaves as they are at seq_len (ScanChunks.keeps_width, or the row): a
    staircase on the others would run as a different one (split between whole chunks), so the form's search at
    seq_len offers only these (Mamba-1: 3/4 is out at 2048 and 4096 tokens)."""
    return cfg.scan_chunks.keeps_width(tokens) | (tokens == seq_len)


def fast_tolerance(cfg: ModelConfig, simba: SimbaConfig, flops: float, seq_len: int) -> float:
    """flop_tolerance of the fast form: at least half its smallest step (one layer moving between the two
    closest distinct levels), since its staircases cannot land between their steps."""
    steps = np.diff(np.unique(_fast_tokens(simba, seq_len)))
    smallest = steps.min() if steps.size else seq_len
    return max(flop_tolerance(cfg, flops, seq_len), 0.5 * float(smallest) / (seq_len * cfg.n_layer))


def _level_costs(cfg: ModelConfig, simba: SimbaConfig, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per fast level: tokens, FLOPs of a layer on them, FLOPs of scoring them after it; and the dense model's."""
    tokens = _fast_tokens(simba, seq_len)
    layer = np.array([layer_flops(cfg, int(t)) for t in tokens], dtype=np.float64)
    score = np.array([layer_flops(cfg, int(t), simba.criterion) for t in tokens], dtype=np.float64) - layer
    return tokens, layer, score, count(cfg, None, seq_len).dense


def deepest_fast(simba: SimbaConfig) -> SimbaConfig:
    """`simba` on the fast form's cheapest staircase: the first layer dense, every other at the lowest level."""
    return replace(simba, keep=[1.0] + [FAST_LEVELS[-1]] * (simba.n_layer - 1), align=True)


@functools.cache
def _staircases(n_layer: int, n_levels: int) -> np.ndarray:
    """Every staircase of n_layer layers over n_levels levels: (m, n_levels) layer counts per level, level 0
    holding at least the first layer. Stars and bars: C(n_layer - 2 + n_levels, n_levels - 1) rows (for few
    layers only: fast_form_bound.py and the tests enumerate them)."""
    depth = n_levels - 1
    rows = []
    for bars in itertools.combinations(range(n_layer - 1 + depth), depth):
        edges = (-1, *bars, n_layer - 1 + depth)
        rows.append([edges[j + 1] - edges[j] - 1 for j in range(depth + 1)])
    counts = np.asarray(rows, dtype=np.int64)
    counts[:, 0] += 1
    return counts


def fast_candidates(cfg: ModelConfig, simba: SimbaConfig, flops: float, seq_len: int) -> list[list[float]]:
    """Every fast-form staircase (keep per layer) whose FLOP ratio at seq_len, with simba's criterion and protected
    tail, is within fast_tolerance of `flops`: the whole space the form offers at that budget. By enumeration:
    for models of a few layers (to_fast searches without it)."""
    counts = _staircases(cfg.n_layer, len(FAST_LEVELS))  # (m, levels)
    tokens, layer, score, dense = _level_costs(cfg, simba, seq_len)
    counts = counts[(counts[:, ~_usable(cfg, tokens, seq_len)] == 0).all(1)]
    # a level scores its tokens once, at its last layer, when the next nonempty level keeps fewer
    nonempty = counts > 0
    following = np.full(len(counts), np.inf)  # tokens of the next nonempty level, walking up from the top
    scores = np.zeros(counts.shape, dtype=bool)
    for j in range(len(FAST_LEVELS) - 1, -1, -1):
        scores[:, j] = nonempty[:, j] & (following < tokens[j])
        following = np.where(nonempty[:, j], tokens[j], following)
    ratio = (counts @ layer + scores @ score) / dense
    ok = np.abs(ratio - flops) <= fast_tolerance(cfg, simba, flops, seq_len)
    return [[lv for lv, c in zip(FAST_LEVELS, row) for _ in range(int(c))] for row in counts[ok]]


def to_fast(cfg: ModelConfig, simba: SimbaConfig, flops: float, seq_len: int) -> SimbaConfig | None:
    """`simba` on the fast-form staircase closest to simba.keep (sum over layers of the squared log2 keep distance)
    among those whose FLOP ratio at seq_len is within fast_tolerance of `flops` (align set, as the form runs);
    None when there is none.

    A dynamic programme over layers, levels and FLOPs spent so far, in buckets of tol * dense / (2 n_layer)
    FLOPs: the rounding adds at most a quarter of the tolerance, and every path the buckets may misplace is
    checked with count() before it is returned. Each layer adds its level's FLOPs, plus the score of the layer
    below when the level steps down to fewer tokens.
    """
    n, levels = cfg.n_layer, np.asarray(FAST_LEVELS)
    tol = fast_tolerance(cfg, simba, flops, seq_len)
    tokens, layer, score, dense = _level_costs(cfg, simba, seq_len)
    q = tol * dense / (2 * n)
    n_buckets = int(math.ceil((flops + 1.5 * tol) * dense / q)) + 1
    target = -np.log2(np.clip(np.asarray(simba.keep, dtype=np.float64), levels[-1], 1.0))  # (n,)
    dist = (-np.log2(levels)[None, :] - target[:, None]) ** 2  # (n, levels)
    dist[:, ~_usable(cfg, tokens, seq_len)] = np.inf
    L = len(levels)
    best = np.full((L, n_buckets), np.inf)
    first = int(round(layer[0] / q))
    if first >= n_buckets:
        return None
    best[0, first] = dist[0, 0]
    # buckets a layer at level j adds after one at level jp (its own FLOPs, and the score below where it steps down)
    steps = np.rint((layer[None, :] + np.where(tokens[None, :] < tokens[:, None], score[:, None], 0.0)) / q).astype(int)
    back = np.zeros((n, L, n_buckets), dtype=np.int8)  # the level of layer i - 1 on the best path
    for i in range(1, n):
        new = np.full((L, n_buckets), np.inf)
        for j in range(L):
            for jp in range(j + 1):
                step = steps[jp, j]
                if step >= n_buckets:
                    continue
                cand = np.full(n_buckets, np.inf)
                cand[step:] = best[jp, : n_buckets - step] + dist[i, j]
                better = cand < new[j]
                new[j][better] = cand[better]
                back[i, j][better] = jp
        best = new
    # end points near the budget, nearest profile first; each is rebuilt and counted exactly
    ratio = np.arange(n_buckets) * q / dense
    near = np.abs(ratio - flops) <= 1.5 * tol
    ends = [(best[j, b], j, b) for j in range(L) for b in np.flatnonzero(near & np.isfinite(best[j]))]
    for _, j, b in sorted(ends):
        path = [j]
        for i in range(n - 1, 0, -1):
            jp = int(back[i, path[-1], b])
            b -= steps[jp, path[-1]]
            path.append(jp)
        fast = replace(simba, keep=[float(levels[k]) for k in reversed(path)], align=True)
        if abs(count(cfg, fast, seq_len).ratio - flops) <= tol:
            return fast
    return None


def linear(n_layer: int, final: float) -> list[float]:
    """Simba's schedule: 1.0 at the bottom layer, falling linearly to `final` at the top one."""
    if not 0.0 < final <= 1.0:
        raise SimbaError(f"final_keep: must be in (0, 1], got {final}", "final_keep")
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


def linear_for_flops(cfg: ModelConfig, schedule: LinearSchedule | CalibratedSchedule) -> SimbaConfig:
    """The linear schedule whose FLOP ratio at schedule.seq_len is within flop_tolerance of schedule.flops (its
    other settings as given); in the fast form, the staircase closest to it that meets the budget (to_fast)."""
    s = schedule
    if s.form == "fast":
        return fast_for_flops(cfg, linear_for_flops(cfg, replace(s, form="exact")), s.flops, s.seq_len)

    def make(final: float) -> SimbaConfig:
        return s.simba(linear(cfg.n_layer, final))

    if s.flops >= 1.0 - 1e-12:
        return make(1.0)
    tol = flop_tolerance(cfg, s.flops, s.seq_len, s.granularity)
    lowest = count(cfg, make(LOWEST_T), s.seq_len).ratio
    if s.flops < lowest - tol:  # the same tolerance as the fit's below, and as the search's (calibrate.py)
        raise SimbaError(
            f"flops {s.flops}: below what a linear schedule reaches ({lowest:.3f} at seq_len {s.seq_len}); "
            "use a calibrated or explicit schedule", "flops"
        )
    best = fit_flops(cfg, make, s.flops, s.seq_len)
    ratio = count(cfg, best, s.seq_len).ratio
    if abs(ratio - s.flops) > tol:
        raise SimbaError(f"flops {s.flops}: the closest linear schedule gives {ratio:.4f} at seq_len {s.seq_len}", "flops")
    return best


def fast_for_flops(cfg: ModelConfig, simba: SimbaConfig, flops: float, seq_len: int) -> SimbaConfig:
    """`simba` (any profile) in the fast form at `flops`, or a SimbaError that says how far the form reaches."""
    fast = to_fast(cfg, simba, flops, seq_len)
    if fast is None:
        lo = count(cfg, deepest_fast(simba), seq_len).ratio
        raise SimbaError(
            f"flops {flops}: no fast-form schedule of {cfg.n_layer} layers lands within "
            f"{fast_tolerance(cfg, simba, flops, seq_len):.3g} of it at seq_len {seq_len} (the form reaches "
            f"{lo:.3f} to 1.0 in steps); use form 'exact'", "flops"
        )
    return fast


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
    where = f"max_tokens {spec}"
    try:
        if isinstance(spec, str) and "@" in spec:
            tokens, layer = (int(v) for v in spec.split("@"))
            if not 1 <= layer < n_layer:
                raise SimbaError(f"{where}: the first capped layer must be in [1, {n_layer - 1}]", "max_tokens")
            return [0] * layer + [tokens] * (n_layer - layer)
        caps = [int(v) for v in (spec.replace(",", " ").split() if isinstance(spec, str) else spec)]
    except ValueError:
        raise SimbaError(f"{where}: expected TOKENS@LAYER or one integer per layer", "max_tokens") from None
    if len(caps) != n_layer:
        raise SimbaError(f"{where}: {len(caps)} caps for a model of {n_layer} layers", "max_tokens")
    return caps
