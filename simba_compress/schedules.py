"""Per-layer keep schedules: the paper's linear one, one that meets a FLOP ratio, and explicit lists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import SimbaError
from .flops import count
from .model import ModelConfig
from .pruning import SimbaConfig

FLOP_TOLERANCE = 0.005  # a schedule for --flops F lands within 0.5% of F
LOWEST_T = 1e-6  # the smallest keep ratio a fitted schedule may reach (ratios must stay > 0)


def flop_tolerance(cfg: ModelConfig, flops: float, seq_len: int, granularity: int = 1) -> float:
    """How close to `flops` a schedule must land: 0.5% of it, or, when token counts come in multiples of
    `granularity`, one such step of one layer (a staircase cannot land between its steps)."""
    return max(FLOP_TOLERANCE * flops, granularity / (seq_len * cfg.n_layer) if granularity > 1 else 0.0)


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
) -> SimbaConfig:
    """The linear schedule whose FLOP ratio at seq_len is within flop_tolerance of `flops`."""
    check_flops(flops)

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
