"""`simba-compress compare`: a dense model beside its compressed versions, in one table and two plots.

What a user puts in a model card: FLOP ratio, the headline loss (last `protect` tokens protected) and
perplexity, the all-position loss, loss by position bucket, chosen lm-eval tasks, and prefill latency
when on a GPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .bench import median_ms
from .checkpoints import load, load_tokenizer
from .compress import compress, resolve_device
from .data import load_windows
from .settings import LinearSchedule
from .errors import SimbaError
from .evaluate import evaluate, position_buckets


@dataclass
class CompareConfig:
    dense: str  # the dense checkpoint
    compressed: list[str] = field(default_factory=list)  # compressed folders
    flops: list[float] = field(default_factory=list)  # or targets to compress the dense model to here
    data: str = "demo"
    seq_len: int = 1024
    max_windows: int = 32
    protect: int = 128
    batch_size: int = 8
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks (needs the eval extra)
    limit: int | None = None  # lm-eval examples per task
    device: str = "auto"
    dtype: str = "auto"


def _latency_ms(model, windows: torch.Tensor) -> float | None:
    """Median prefill time of one batch on a GPU (CUDA events, after a warm-up); None on a CPU."""
    if model.device.type != "cuda":
        return None
    x = windows[:, :-1].to(model.device)
    with torch.no_grad():
        return median_ms(lambda: model(x), model.device, 3)


def _tasks(model, tokenizer, cfg: CompareConfig) -> dict[str, float]:
    if not cfg.tasks:
        return {}
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SimbaError("tasks: lm-eval is not installed (pip install 'simba-compress[eval]')", "tasks") from None
    from .harness import SimbaLM

    manager = TaskManager()
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        raise SimbaError(f"tasks: unknown lm-eval task {unknown[0]!r} (see `lm_eval ls tasks`)", "tasks")
    res = lm_eval.simple_evaluate(model=SimbaLM.wrap(model, tokenizer), tasks=cfg.tasks, limit=cfg.limit)
    out = {}
    for task, metrics in res["results"].items():
        for name, value in metrics.items():
            if isinstance(value, float) and not name.endswith("_stderr,none"):
                out[f"{task}/{name.removesuffix(',none')}"] = round(value, 4)
    return out


def compare(cfg: CompareConfig, out: str | Path | None = None) -> list[dict]:
    """Evaluate the dense model and every compressed one on the same windows; write table and plots to `out`."""
    if not cfg.compressed and not cfg.flops:
        raise SimbaError("compressed: give compressed folders or flops targets", "compressed")
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    tokenizer = load_tokenizer(cfg.dense)
    windows = load_windows(cfg.data, tokenizer, cfg.seq_len + 1, cfg.max_windows)
    if not 1 <= cfg.protect <= cfg.seq_len:
        raise SimbaError(f"protect: must be in [1, seq_len {cfg.seq_len}]", "protect")
    models = [("dense", lambda: load(cfg.dense, dtype=dtype, device=device))]
    models += [(str(p), lambda p=p: load(p, dtype=dtype, device=device)) for p in cfg.compressed]
    for f in cfg.flops:
        def make(f=f):
            m = load(cfg.dense, dtype=dtype, device=device)
            compress(m, LinearSchedule(flops=f, seq_len=cfg.seq_len))
            return m

        models.append((f"flops={f}", make))
    rows = []
    for name, make in models:
        t0 = time.time()
        model = make()
        res = evaluate(model, windows, cfg.protect, cfg.batch_size, progress=True)
        rows.append(
            {
                "model": name,
                "flop_ratio": round(res.flop_ratio, 4),
                "loss": round(res.loss, 4),
                "loss_se": round(res.loss_se, 4),
                "ppl": round(res.ppl, 3),
                "all_position_loss": round(res.all_position_loss, 4),
                "latency_ms": _latency_ms(model, windows[: cfg.batch_size]),
                "tasks": _tasks(model, tokenizer, cfg),
                "position_buckets": position_buckets(res.position_loss),
                "seconds": round(time.time() - t0, 1),
            }
        )
        del model
    if out is not None:
        write(rows, cfg, Path(out))
    return rows


def write(rows: list[dict], cfg: CompareConfig, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"config": cfg.__dict__, "rows": rows}, indent=2) + "\n")
    tasks = sorted({t for r in rows for t in r["tasks"]})
    head = ["model", "FLOP ratio", f"loss (last {cfg.protect})", "ppl", "all-position loss", "latency ms", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['flop_ratio']:.4f}", f"{r['loss']:.4f} ± {r['loss_se']:.4f}", f"{r['ppl']:.2f}"]
        cells += [f"{r['all_position_loss']:.4f}", "n/a" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}"]
        cells += [str(r["tasks"].get(t, "")) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "compare.md").write_text(
        f"{len(rows)} models on {cfg.max_windows} windows of {cfg.seq_len} tokens of {cfg.data}; loss in nats.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.errorbar(r["flop_ratio"], r["loss"], yerr=r["loss_se"], fmt="o", label=r["model"])
    ax.set(xlabel="backbone FLOP ratio", ylabel=f"loss on the protected last {cfg.protect} tokens", title="loss vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_flops.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        b = r["position_buckets"]
        ax.plot([x["end"] for x in b], [x["loss"] for x in b], marker="o", label=r["model"])
    ax.set(xscale="log", xlabel="position (bucket end)", ylabel="all-position loss", title="loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_by_position.png", dpi=120)
