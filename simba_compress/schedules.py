"""Per-layer keep schedules: the paper's linear one, one that meets a FLOP ratio, and explicit lists."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import SimbaError
from .flops import count
from .model import ModelConfig
from .pruning import SimbaConfig

FLOP_TOLERANCE = 0.005  # a schedule for --flops F lands within 0.5% of F


def linear(n_layer: int, final: float) -> list[float]:
    """Simba's schedule: 1.0 at the bottom layer, falling linearly to `final` at the top one."""
    if not 0.0 < final <= 1.0:
        raise SimbaError(f"--final-keep: must be in (0, 1], got {final}")
    if n_layer == 1:
        return [1.0]
    return [1.0 - (1.0 - final) * i / (n_layer - 1) for i in range(n_layer)]


def linear_for_flops(
    cfg: ModelConfig, flops: float, seq_len: int, criterion: str = "simba", protect_last: int = 1, seed: int = 0
) -> SimbaConfig:
    """The linear schedule whose FLOP ratio at seq_len is within FLOP_TOLERANCE of `flops` (bisection)."""
    if not 0.0 < flops <= 1.0:
        raise SimbaError(f"--flops: must be in (0, 1], got {flops}")

    def make(final: float) -> SimbaConfig:
        return SimbaConfig(linear(cfg.n_layer, final), criterion, protect_last, seed)

    if flops >= 1.0 - 1e-12:
        return make(1.0)
    lowest = count(cfg, make(1e-6), seq_len).ratio
    if flops < lowest * (1 - FLOP_TOLERANCE):
        raise SimbaError(
            f"--flops {flops}: below what a linear schedule reaches ({lowest:.3f} at --seq-len {seq_len}); "
            "use a calibrated or explicit schedule"
        )
    lo, hi = 1e-6, 1.0  # the ratio grows with the final keep ratio
    for _ in range(60):
        mid = (lo + hi) / 2
        if count(cfg, make(mid), seq_len).ratio > flops:
            hi = mid
        else:
            lo = mid
    best = min((make(lo), make(hi)), key=lambda s: abs(count(cfg, s, seq_len).ratio - flops))
    ratio = count(cfg, best, seq_len).ratio
    if abs(ratio - flops) > FLOP_TOLERANCE * flops:
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
