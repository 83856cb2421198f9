"""Long context (issue 14): does pruning keep far-away information that truncating the prompt throws away?

One run, in priority order, writing long_context.{json,md,png} to --out after every cell (a run cut short keeps
what it measured; a rerun with the same --out skips the cells it has):

1. The passkey proxy: the base proxy fine-tuned to retrieve (benchmarks/passkey_proxy.py build(), prompts of at
   most the training length, training text only). Where benchmarks/proxies.py finds it (find("<base>-passkey"):
   a GPU run's copy unpacked with `python benchmarks/proxies.py PART...` into ~/.cache/simba-compress/proxies, or
   $SIMBA_PROXIES) that copy is used; else it is built into --work (minutes on a GPU; the cpu preset's l6 at a
   256-token training length in about half an hour on 2 CPU cores).
2. Calibration on training text only (never the evaluation text): the context extension, i.e. for each criterion
   the first capped layer L and the cap T (SimbaConfig.max_tokens) with the lowest loss on the last 128 tokens of
   long training windows; and the step schedules' L (below) by the same loss at the training length.
3. Passkey retrieval on held-out text (valid.txt.xz haystacks) by prompt length and needle depth, the same samples
   for every method: teacher-forced exact match of the key, the question and answer protected from pruning.
3b. Fact recall (issue 23's second probe, simba_compress/facts.py): a fact stated once in held-out text, asked about at
   the end, the true answer the most likely of 4 candidates; on the recall proxy (passkey_proxy.py --facts: the
   passkey proxies do not recall facts at all), found by benchmarks/proxies.py as "<base>-recall", skipped without it.
4. Which layer's score ranks the key high: in the dense passkey proxy, the rank of the key's tokens under each
   layer's simba, share and deci scores.
5. Loss against context length on valid.txt.xz (the last 128 tokens of each window, protected), for the passkey
   and the plain proxy.
6. The shallower passkey proxy (l9), dense, then longer passkey prompts, if time is left.

Methods (FLOP ratios of the base backbone at each length, the score included): dense; truncate (the dense model on
the last F x L tokens); window (the dense model on its last training-length tokens); simba, share, deci, utr: the
linear schedule meeting F with that criterion; simba-cal: the calibrated KL schedule of
benchmarks/results/h200/quality_T1024_calibrated.json; stepK: every layer below K dense, the rest at one keep ratio
meeting F (simba's score, so layer K - 1 alone decides what the upper layers see); two benchmark-only variants of
simba's ranking: mix (half of each layer's budget to the most recent tokens) and oracle (the needle always kept: what
a perfect score could do); ext-<criterion>: the calibrated context extension; mid-<criterion>: the extension at
DeciMamba's placement (the training length from the middle layer on).

    python benchmarks/long_context.py --models ../shared/models --corpus ../shared/corpus --out out/lc  # H200 preset
    python benchmarks/long_context.py ... --preset cpu     # the l6 proxy at a 256-token training length, on a CPU
    python benchmarks/long_context.py ... --preset smoke   # tiny sizes: tests the script
    python benchmarks/long_context.py --out DIR --plot-only   # redraw the markdown and PNG from DIR/long_context.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import proxies  # noqa: E402
from passkey_proxy import ProxyConfig, build, device_name, spread_text, valid_stream, versions  # noqa: E402

from simba_compress import SimbaConfig, load, load_tokenizer  # noqa: E402
from simba_compress.checkpoints import read_checkpoint  # noqa: E402
from simba_compress.data import windows  # noqa: E402
from simba_compress.errors import SimbaError  # noqa: E402
from simba_compress.evaluate import default_protect, evaluate, evaluate_truncated  # noqa: E402
from simba_compress.facts import FactTask, evaluate_facts  # noqa: E402
from simba_compress.passkey import PasskeyTask, evaluate_passkey  # noqa: E402
from simba_compress.pruning import DEFAULT_CRITERION  # noqa: E402
from simba_compress.pruning import TokenPlan  # noqa: E402
from simba_compress.schedules import fit_flops, linear_for_flops  # noqa: E402
from simba_compress.settings import LinearSchedule  # noqa: E402

CALIBRATED = Path(__file__).resolve().parent / "results/h200/quality_T1024_calibrated.json"
EXT_CRITERIA = ("simba", "share", "deci", "utr")
RANK_CRITERIA = ("simba", "share", "deci")
STAGES = ("passkey", "facts", "ranks", "loss", "shallow", "long")


@dataclass
class Preset:
    base: str = "mamba-proxy-d320-l16"
    shallow: str | None = "mamba-proxy-d320-l9"
    train_len: int = 1024  # the proxies' training length
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    pieces: int = 128  # pieces of `chars` characters of train.txt.xz (spread_text)
    chars: int = 1 << 16
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    long: list[int] = field(default_factory=lambda: [32768])  # passkey lengths run last, if time is left
    depths: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    per_depth: int = 12
    loss_windows: int = 16
    budgets: list[float] = field(default_factory=lambda: [0.75, 0.6])
    calib_len: int = 8192  # extension calibration windows (long)
    calib_windows: int = 8
    starts: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 8, 10, 12, 14])  # extension: first capped layers
    steps: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 10, 12])  # stepK schedules
    step_windows: int = 16  # step calibration windows, at the training length
    rank_lengths: list[int] = field(default_factory=lambda: [1024, 4096])
    rank_per_depth: int = 4
    max_seconds: float = 300
    train_seconds: float = 120  # a fine-tune stops after this


PRESETS = {
    "h200": Preset(),
    "cpu": Preset(
        base="mamba-proxy-d320-l6", shallow=None, train_len=256,
        proxy=ProxyConfig(steps=100, batch=4, lm_batch=4, lengths=(192, 256), lm_len=256, warmup=10, eval_every=50,
                          eval_samples=4),
        pieces=32, chars=1 << 14, lengths=[256, 512, 1024], long=[], depths=[0.1, 0.3, 0.5, 0.7, 0.9], per_depth=6,
        loss_windows=4, calib_len=1024, calib_windows=4, starts=[1, 2, 3, 4, 5], steps=[1, 2, 3, 4, 5],
        step_windows=8, rank_lengths=[256, 512], rank_per_depth=3, max_seconds=36000, train_seconds=36000,
    ),
    "smoke": Preset(
        base="mamba-proxy-d320-l6", shallow="mamba-proxy-d320-l6", train_len=128,
        proxy=ProxyConfig(steps=1, batch=2, lm_batch=1, lengths=(128,), lm_len=128, eval_every=1, eval_samples=1),
        pieces=4, chars=1 << 13, lengths=[128, 256], long=[384], depths=[0.1, 0.5, 0.9], per_depth=1,
        loss_windows=2, budgets=[0.6], calib_len=256, calib_windows=2, starts=[2, 4], steps=[2, 4], step_windows=2,
        rank_lengths=[128], rank_per_depth=1, max_seconds=3600, train_seconds=3600,
    ),
}


@dataclass(frozen=True)
class Method:
    name: str  # row label
    kind: str  # dense | truncate | window | pruned | step | extension
    criterion: str | None = None
    budget: float | None = None  # target FLOP ratio (pruned, step, truncate)
    calibrated: bool = False  # pruned: the calibrated keep list instead of the linear schedule
    variant: str | None = None  # benchmark-only re-ranking on top of the criterion: "mix" or "oracle"
    start: int | None = None  # step: the first pruned layer
    middle: bool = False  # extension: DeciMamba's placement instead of the calibrated one


def methods(p: Preset) -> dict[str, list[Method]]:
    """The methods by priority group."""
    main, variants, step = [Method("dense", "dense"), Method("window", "window")], [], []
    for f in p.budgets:
        main += [Method("truncate", "truncate", budget=f), Method("simba", "pruned", "simba", f),
                 Method("query", "pruned", "query", f), Method("recent-query", "pruned", "recent-query", f),
                 Method("simba-cal", "pruned", "simba", f, calibrated=True), Method("deci", "pruned", "deci", f),
                 Method("utr", "pruned", "utr", f)]
        variants += [Method("share", "pruned", "share", f), Method("mix", "pruned", "simba", f, variant="mix")]
        step += [Method(f"step{k}", "step", "simba", f, start=k) for k in p.steps]
    variants.append(Method("oracle", "pruned", "simba", min(p.budgets), variant="oracle"))
    extension = [Method(f"ext-{c}", "extension", c) for c in EXT_CRITERIA]
    extension += [Method(f"mid-{c}", "extension", c, middle=True) for c in ("simba", "share", "deci")]
    return {"main": main, "extension": extension, "variants": variants, "step": step}


# --- benchmark-only re-ranking: slots forced into a layer's kept set on top of the criterion's order -------------


@contextmanager
def forcing(force):
    """While active, TokenPlan.select keeps the slots force(plan, layer) -> (b, w) bool first (with the protected
    tail), then the criterion's top ones. Benchmark-only: the variants it serves are measured, not shipped."""
    select = TokenPlan.select

    def forced(plan, scores, layer):
        return select(plan, scores.float().masked_fill(force(plan, layer), float("inf")), layer)

    TokenPlan.select = forced
    try:
        yield
    finally:
        TokenPlan.select = select


def recent_half(plan: TokenPlan, layer: int) -> torch.Tensor:
    """The most recent half of the tokens the layer keeps."""
    from_end = plan.real.flip(1).cumsum(1).flip(1)  # real slots at or after each slot
    return plan.real & (from_end <= torch.ceil(plan.counts[layer] / 2)[:, None])


def needle(span: tuple[int, int]):
    return lambda plan, layer: plan.real & (plan.idx >= span[0]) & (plan.idx < span[1])


# --- schedules ----------------------------------------------------------------------------------------------------


def calibrated_keeps(path: Path, n_layer: int) -> dict[float, list[float]]:
    """The calibrated (KL objective) keep lists by FLOP target; resampled over depth for another layer count."""
    out = {}
    for r in json.loads(path.read_text())["rows"]:
        if r["method"] == "simba (calibrated), kl":
            keep = r["keep"]
            if len(keep) != n_layer:
                keep = np.interp(np.linspace(0, 1, n_layer), np.linspace(0, 1, len(keep)), keep).tolist()
            out[r["flops_target"]] = [1.0] + [min(a, 1.0) for a in keep[1:]]
    return out


def extension(n_layer: int, criterion: str, start: int, cap: int, protect: int) -> SimbaConfig:
    """Context extension: layers below `start` run on every token, the rest on at most `cap` (max_tokens)."""
    return SimbaConfig([1.0] * n_layer, criterion=criterion, protect_last=protect,
                       max_tokens=[0] * start + [cap] * (n_layer - start))


def step(cfg, criterion: str, start: int, flops: float, length: int, protect: int) -> SimbaConfig:
    """Layers below `start` dense, the rest at the one keep ratio that meets `flops` at `length`."""
    make = lambda t: SimbaConfig([1.0] * start + [t] * (cfg.n_layer - start), criterion=criterion, protect_last=protect)  # noqa: E731
    s = fit_flops(cfg, make, flops, length)
    if abs(s.keep[-1] - 1.0) < 1e-9 or s.keep[-1] <= 1e-5:
        raise SimbaError(f"step {start}: {flops} is out of reach with layers 0-{start - 1} dense")
    return s


@dataclass
class Context:
    """What a cell needs besides the model and its samples."""

    keeps: dict  # calibrated keep lists by budget
    ext: dict  # the model's extension calibration
    train_len: int
    batch_tokens: int


def schedule(m: Method, cfg, length: int, protect: int, ctx: Context) -> SimbaConfig | None:
    if m.kind == "pruned":
        if m.calibrated:
            return SimbaConfig(ctx.keeps[m.budget], criterion=m.criterion, protect_last=protect)
        return linear_for_flops(cfg, LinearSchedule(flops=m.budget, seq_len=length, criterion=m.criterion, protect_last=protect,
                                                    form="exact"))
    if m.kind == "step":
        return step(cfg, m.criterion, m.start, m.budget, length, protect)
    if m.kind == "extension":
        chosen = ctx.ext["middle"] if m.middle else ctx.ext[m.criterion]["best"]
        return extension(cfg.n_layer, m.criterion, chosen["start"], chosen["cap"], protect)
    return None


def recent_tokens(m: Method, length: int, train_len: int) -> int | None:
    if m.kind == "truncate":
        return round(m.budget * length)
    if m.kind == "window":
        return min(length, train_len)
    return None


# --- cells ----------------------------------------------------------------------------------------------------------


def probe_setup(model, samples, m: Method, ctx: Context) -> tuple[int, SimbaConfig | None, int | None]:
    """(the protected tail, m's schedule, the tokens truncation reads) for probe samples of one length."""
    protect, length = max(s.tail for s in samples), samples[0].length
    recent = recent_tokens(m, length, ctx.train_len)
    return protect, schedule(m, model.config, length, protect, ctx), None if recent is None else max(recent, protect)


def passkey_cell(model, samples, m: Method, ctx: Context) -> dict:
    protect, simba, recent = probe_setup(model, samples, m, ctx)
    if m.variant == "oracle":  # the needle differs per sample: one sample per forward
        parts = []
        for s in samples:
            with forcing(needle(s.needle)):
                parts.append(evaluate_passkey(model, [s], simba, batch_tokens=ctx.batch_tokens))
        correct, kept = [c for p in parts for c in p.correct], [k for p in parts for k in p.key_kept]
        flops = parts[0].flop_ratio
    else:
        with forcing(recent_half) if m.variant == "mix" else nullcontext():
            r = evaluate_passkey(model, samples, simba, recent=recent, batch_tokens=ctx.batch_tokens)
        correct, kept, flops = r.correct, r.key_kept, r.flop_ratio
    return {**summary(samples, correct, [s.depth for s in samples], flops, protect),
            "key_kept": round(sum(kept) / len(kept), 4)}  # samples with a copy of the key whole in the top layer


def summary(samples, correct: list[bool], depths: list[float], flops: float, protect: int) -> dict:
    by_depth = {}
    for d, c in zip(depths, correct):
        by_depth.setdefault(str(d), []).append(c)
    return {
        "accuracy": round(sum(correct) / len(correct), 4),
        "correct": "".join("1" if c else "0" for c in correct),  # per sample, in order: paired comparisons
        "by_depth": {d: round(sum(v) / len(v), 4) for d, v in by_depth.items()},
        "flop_ratio": round(flops, 4),
        "samples": len(samples),
        "protect": protect,
    }


def facts_cell(model, samples, m: Method, ctx: Context, depths: list[float]) -> dict:
    """Fact recall (simba_compress.facts): the true answer the most likely of the candidates, the question protected.
    `depths`: the depth each sample was asked for (a fact sits at the sentence boundary nearest to it)."""
    protect, simba, recent = probe_setup(model, samples, m, ctx)
    correct, logprob = [], []
    for s in samples:  # one prefill a sample, then each answer from its states
        with forcing(needle(s.fact)) if m.variant == "oracle" else forcing(recent_half) if m.variant == "mix" \
                else nullcontext():
            r = evaluate_facts(model, [s], simba, recent=recent)
        correct += r.correct
        logprob += r.logprob
    return {**summary(samples, correct, depths, r.flop_ratio, protect),
            "logprob": round(sum(logprob) / len(logprob), 4)}  # the true answer's mean log-likelihood


def loss_cell(model, wins: torch.Tensor, m: Method, ctx: Context, batch: int) -> dict:
    length = wins.shape[1] - 1
    protect = default_protect(length)  # the last 128 tokens (a quarter of a window shorter than 512)
    recent = recent_tokens(m, length, ctx.train_len)
    if recent is not None:
        r = evaluate_truncated(model, wins, max(recent, protect) / length, protect, batch, progress=False)
    else:
        simba = schedule(m, model.config, length, protect, ctx)
        with forcing(recent_half) if m.variant == "mix" else nullcontext():
            r = evaluate(model, wins, protect, batch, simba=simba, all_positions=False, progress=False)
    return {"loss": round(r.loss, 4), "loss_se": round(r.loss_se, 4), "flop_ratio": round(r.flop_ratio, 4),
            "windows": r.windows}


@torch.no_grad()
def rank_cell(model, samples, criterion: str) -> dict:
    """Where each layer's `criterion` score ranks the key in the dense model: per layer, the mean over samples of
    the rank quantile of the key's worst-ranked token (0 = the top token of the row, 1 = the bottom; the tail
    excluded), and the share of samples with every key token in the top fifth."""
    ids = torch.stack([s.ids for s in samples]).to(model.device)
    quantiles, top = [], []
    for k in range(1, model.config.n_layer + 1):
        scores = model.prefix(ids, layers=k, criterion=criterion).impact.float().cpu()  # layer k - 1's scores
        q = []
        for r, s in enumerate(samples):
            n = s.length - s.tail
            order = scores[r, :n].argsort(descending=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(n)
            lo, hi = s.keys[0]
            q.append(rank[lo:hi].max().item() / n)
        quantiles.append(round(sum(q) / len(q), 3))
        top.append(round(sum(x < 0.2 for x in q) / len(q), 3))
    return {"quantile": quantiles, "top_fifth": top, "samples": len(samples)}


def calibrate_extension(model, wins: torch.Tensor, criteria, starts: list[int], caps: list[int], batch: int, log) -> dict:
    """Per criterion: the loss on the last 128 tokens of long training windows for every (first capped layer, cap),
    and the best pair. The dense model and truncation to each cap are measured beside them."""
    length = wins.shape[1] - 1
    out = {"length": length, "windows": int(wins.shape[0]), "middle": {"start": model.config.n_layer // 2, "cap": caps[0]},
           "dense": round(evaluate(model, wins, 128, batch, simba=None, all_positions=False, progress=False).loss, 4),
           "truncate": {str(c): round(evaluate_truncated(model, wins, c / length, 128, batch, progress=False).loss, 4)
                        for c in caps}}
    for crit in criteria:
        grid = []
        for start in starts:
            for cap in caps:
                simba = extension(model.config.n_layer, crit, start, cap, 128)
                r = evaluate(model, wins, 128, batch, simba=simba, all_positions=False, progress=False)
                grid.append({"start": start, "cap": cap, "loss": round(r.loss, 4), "flop_ratio": round(r.flop_ratio, 4)})
        out[crit] = {"grid": grid, "best": min(grid, key=lambda g: g["loss"])}
        log(f"  extension {crit}: best {out[crit]['best']} (dense {out['dense']})")
    return out


def calibrate_steps(model, wins: torch.Tensor, budgets: list[float], starts: list[int], batch: int, log) -> dict:
    """Per budget: the loss on the last 128 tokens of training windows for every stepK that reaches it; the best K."""
    length, protect = wins.shape[1] - 1, default_protect(wins.shape[1] - 1)
    out = {"length": length, "windows": int(wins.shape[0])}
    for f in budgets:
        grid = []
        for k in starts:
            try:
                simba = step(model.config, "simba", k, f, length, protect)
            except SimbaError:
                continue
            r = evaluate(model, wins, protect, batch, simba=simba, all_positions=False, progress=False)
            grid.append({"start": k, "keep": round(simba.keep[-1], 4), "loss": round(r.loss, 4),
                         "flop_ratio": round(r.flop_ratio, 4)})
        out[str(f)] = {"grid": grid, "best": min(grid, key=lambda g: g["loss"])["start"] if grid else None}
        log(f"  step schedules at {f}: best K {out[str(f)]['best']}")
    return out


# --- the run --------------------------------------------------------------------------------------------------------


class Results:
    """long_context.json (cells keyed by task, model, method, budget, length) with its markdown and plot."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.file = out / "long_context.json"
        empty = {"cells": [], "proxies": {}, "extension": {}, "step": {}}
        self.data = {**empty, **(json.loads(self.file.read_text()) if self.file.exists() else {})}
        self.data["meta"] = {**self.data.get("meta", {}), **meta}
        self.done = {self.key(c) for c in self.data["cells"]}

    @staticmethod
    def key(c: dict) -> tuple:
        return c["task"], c["model"], c["method"], c["budget"], c["length"]

    def add(self, cell: dict) -> None:
        self.data["cells"].append(cell)
        self.done.add(self.key(cell))
        self.save()

    def save(self, figure: bool = False) -> None:
        """The JSON and the markdown; the figure too when asked (it takes a second: at the end of the run)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(self.data, indent=1) + "\n")
        (self.out / "long_context.md").write_text(markdown(self.data))
        if figure:
            try:
                plot(self.data, self.out / "long_context.png")
            except ImportError:  # no matplotlib on this machine: --plot-only redraws it elsewhere
                print("no matplotlib: no long_context.png (--plot-only draws it from the JSON)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="folder holding the proxies (../shared/models)")
    ap.add_argument("--corpus", help="folder holding train.txt.xz and valid.txt.xz")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/simba-long-context", help="where the passkey proxies are written")
    ap.add_argument("--preset", default="h200", choices=sorted(PRESETS), help="sizes: h200 (default), cpu, smoke")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                    help="passkey: the proxy, the calibrations and the passkey cells; facts: fact recall on the recall "
                    "proxy (benchmarks/proxies.py: <base>-recall); ranks: which layer ranks the key "
                    "high; loss: loss against length (the passkey proxy's too when the passkey stage ran); shallow: "
                    "the shallower proxy, dense; long: the preset's longer passkey prompts")
    ap.add_argument("--facts-model", help="the facts stage on this model folder instead of the recall proxy (to show "
                    "whether a model recalls facts at all)")
    ap.add_argument("--methods", nargs="*", help="only these methods (names as in the tables)")
    ap.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (default: the preset's)")
    ap.add_argument("--loss-windows", type=int)
    ap.add_argument("--per-depth", type=int, help="passkey samples per depth")
    ap.add_argument("--budgets", type=float, nargs="+")
    ap.add_argument("--calib-len", type=int)
    ap.add_argument("--calib-windows", type=int)
    ap.add_argument("--starts", type=int, nargs="+", help="first capped layers the extension calibration tries")
    ap.add_argument("--steps", type=int, help="passkey fine-tuning steps")
    ap.add_argument("--batch-tokens", type=int, default=1 << 17, help="tokens per forward")
    ap.add_argument("--max-seconds", type=float, help="start no new cell after this (h200: 300)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--merge", metavar="DIR", help="add the cells of DIR/long_context.json (another run) to --out's, each "
                    "labelled with its run's device and its model suffixed with --merge-label; the default criterion's "
                    "rows become '<criterion> (default)'; then redraw")
    ap.add_argument("--merge-label", default="", help="what tells the merged run's model apart (e.g. 'rebuilt')")
    args = ap.parse_args()
    out = Path(args.out)
    if args.merge:
        merge(out, Path(args.merge), args.merge_label)
        return
    if args.plot_only:
        Results(out, {}).save(figure=True)
        return
    p = PRESETS[args.preset]
    for name in ("lengths", "loss_windows", "per_depth", "budgets", "calib_len", "calib_windows", "starts", "max_seconds"):
        if getattr(args, name) is not None:
            setattr(p, name, getattr(args, name))
    if args.steps is not None:
        p.proxy = replace(p.proxy, steps=args.steps)
    run(p, args, out)


def merge(out: Path, other: Path, label: str) -> None:
    """--merge: other's cells into out's results, labelled by device (and model label), the default criterion marked."""
    res, src = Results(out, {}), json.loads((other / "long_context.json").read_text())
    device = src["meta"].get("device", "?")
    for c in res.data["cells"]:
        c.setdefault("device", res.data["meta"].get("device", "?"))
    added = 0
    for c in src["cells"]:
        c = {**c, "device": device, "model": f"{c['model']} ({label})" if label else c["model"]}
        if c["method"] == DEFAULT_CRITERION and c["budget"] is not None:
            c["method"] = f"{DEFAULT_CRITERION} (default)"
        if Results.key(c) not in res.done:
            res.add(c)
            added += 1
    res.data["meta"].setdefault("merged", [])
    res.data["meta"]["merged"] = [m for m in res.data["meta"]["merged"] if m.get("from") != str(other)]
    res.data["meta"]["merged"].append({"from": str(other), "label": label, "cells": added, **src["meta"]})
    res.save(figure=True)
    print(f"{added} cells of {other} merged into {out}")


def run(p: Preset, args, out: Path) -> None:
    t0 = time.time()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    caps = [p.train_len, 2 * p.train_len]
    models, corpus, work = Path(args.models), Path(args.corpus), Path(args.work)
    res = Results(out, dict(
        command="python " + shlex.join(sys.argv), device=device_name(device), dtype=str(dtype).replace("torch.", ""),
        versions=versions(), machine=platform.platform(), preset=args.preset, train_len=p.train_len, depths=p.depths,
        per_depth=p.per_depth, loss_windows=p.loss_windows, budgets=p.budgets, calibrated_from=str(CALIBRATED),
    ))

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    def left() -> float:
        return p.max_seconds - (time.time() - t0)

    tok = load_tokenizer(models / p.base)
    valid = valid_stream(str(corpus / "valid.txt.xz"), tok)
    # the training text: its pieces saved by passkey_proxy.py --save-pieces when they travel instead of the corpus
    train = corpus / "train_pieces.pt" if (corpus / "train_pieces.pt").exists() else corpus / "train.txt.xz"
    train_pieces = spread_text(str(train), tok, p.pieces, p.chars)
    res.data["meta"]["train_text"] = train.name
    log(f"text: {valid.numel()} valid tokens, {sum(x.numel() for x in train_pieces)} training tokens from {train.name}")
    base_layers = read_checkpoint(models / p.base).config.n_layer
    keeps = calibrated_keeps(CALIBRATED, base_layers)
    groups = {g: [m for m in ms if args.methods is None or m.name in args.methods] for g, ms in methods(p).items()}
    task = PasskeyTask(tok, valid)

    def training_windows(length: int, n: int) -> torch.Tensor:
        """n windows of length + 1 tokens from pieces spread over the training text (every source, not the first)."""
        long_enough = [x for x in train_pieces if x.numel() > length + 1]
        picks = np.linspace(0, len(long_enough) - 1, n).round().astype(int)
        return torch.stack([long_enough[i][: length + 1] for i in picks])

    def batch_for(length: int) -> int:
        return max(1, args.batch_tokens // length)

    def proxy(name: str) -> Path:
        """The passkey proxy of base `name`: the copy benchmarks/proxies.py finds (a GPU run's, unpacked), else the
        one built into --work by an earlier run, else built now."""
        folder = proxies.find(f"{name}-passkey") or work / f"{name}-passkey"
        if not (folder / "passkey_proxy.json").exists():
            with torch.enable_grad():
                build(str(models / name), folder, p.proxy, train_pieces, valid, tok, device, res.data["meta"]["command"],
                      log, max_seconds=p.train_seconds)
        if name not in res.data["proxies"]:
            res.data["proxies"][name] = json.loads((folder / "passkey_proxy.json").read_text())
            out.mkdir(parents=True, exist_ok=True)
            out.joinpath(f"MODEL_CARD_{name}.md").write_text((folder / "MODEL_CARD.md").read_text())  # the model stays
            res.save()
        return folder

    def calibrated(name: str, model) -> Context:
        if name not in res.data["extension"] and groups["extension"]:
            log(f"calibrating the context extension of {name}")
            criteria = list(dict.fromkeys(m.criterion for m in groups["extension"] if not m.middle))
            starts = [s for s in p.starts if s < model.config.n_layer]
            res.data["extension"][name] = calibrate_extension(
                model, training_windows(p.calib_len, p.calib_windows), criteria, starts, caps, batch_for(p.calib_len), log)
            res.save()
        if name not in res.data["step"] and groups["step"]:
            log(f"calibrating the step schedules of {name}")
            res.data["step"][name] = calibrate_steps(model, training_windows(p.train_len, p.step_windows), p.budgets,
                                                     p.steps, batch_for(p.train_len), log)
            res.save()
        return Context(keeps, res.data["extension"].get(name, {}), p.train_len, args.batch_tokens)

    def cells(kind: str, model, name: str, ms: list[Method], lengths: list[int], ctx: Context | None) -> bool:
        """Every (length, method) cell not yet in the results; False when time ran out."""
        scale = model.config.n_layer / base_layers  # FLOP ratios of the base backbone
        for length in lengths:
            if kind == "passkey":
                data = task.samples(length, p.depths, p.per_depth, seed=0)
            elif kind == "facts":
                data = FactTask(tok, valid).samples(length, p.depths, p.per_depth, seed=0)
            elif kind == "ranks":
                data = task.samples(length, p.depths, p.rank_per_depth, seed=1)
            else:
                data = windows(valid, length + 1, p.loss_windows)
            for m in ms:
                if kind == "loss" and m.variant == "oracle":
                    continue
                cell = {"task": kind, "model": name, "method": m.name, "budget": m.budget, "length": length}
                if Results.key(cell) in res.done:
                    continue
                if left() <= 0:
                    log(f"time is up: skipping {cell}")
                    return False
                t = time.time()
                try:
                    if kind == "passkey":
                        cell.update(passkey_cell(model, data, m, ctx))
                    elif kind == "facts":
                        cell.update(facts_cell(model, data, m, ctx, [d for d in p.depths for _ in range(p.per_depth)]))
                    elif kind == "ranks":
                        cell.update(rank_cell(model, data, m.criterion))
                    else:
                        cell.update(loss_cell(model, data, m, ctx, batch_for(length)))
                    if "flop_ratio" in cell:
                        cell["flop_ratio"] = round(cell["flop_ratio"] * scale, 4)
                except SimbaError as e:  # a budget out of a schedule family's reach at this length
                    cell["error"] = str(e)
                cell["seconds"] = round(time.time() - t, 2)
                res.add(cell)
                shown = {k: cell[k] for k in ("accuracy", "key_kept", "loss", "flop_ratio", "quantile", "error")
                         if k in cell}
                log(f"{kind} {name} {m.name} {m.budget} {length}: {shown} ({cell['seconds']} s)")
        return True

    everything = groups["main"] + groups["extension"] + groups["variants"] + groups["step"]
    ok, pk, pk_name, pk_ctx = True, None, f"{p.base}-passkey", None
    with torch.no_grad():
        if "passkey" in args.stages:
            pk = load(proxy(p.base), dtype=dtype, device=device)
            pk_ctx = calibrated(pk_name, pk)
            for group in ("main", "extension", "variants", "step"):
                ok = ok and cells("passkey", pk, pk_name, groups[group], p.lengths, pk_ctx)
        if ok and "facts" in args.stages:  # the second probe needs a proxy that recalls facts at all (passkey_proxy.py --facts)
            recall = Path(args.facts_model) if args.facts_model else proxies.find(f"{p.base}-recall")
            if recall is None:
                log(f"no {p.base}-recall proxy: the facts stage is skipped ({proxies.REBUILD.get(f'{p.base}-recall', '')})")
            else:
                fr = load(recall, dtype=dtype, device=device)
                fr_ctx = Context(keeps, {}, p.train_len, args.batch_tokens)
                for group in ("main", "variants"):
                    ok = ok and cells("facts", fr, recall.name, groups[group], p.lengths, fr_ctx)
                del fr
        if ok and "ranks" in args.stages and pk is not None:
            ok = cells("ranks", pk, pk_name, [Method(c, "ranks", c) for c in RANK_CRITERIA], p.rank_lengths, None)
        if ok and "loss" in args.stages:
            if pk is not None:
                ok = cells("loss", pk, pk_name, everything, p.lengths, pk_ctx)
            plain = load(models / p.base, dtype=dtype, device=device)
            ok = ok and cells("loss", plain, p.base, everything, p.lengths, calibrated(p.base, plain))
            del plain
        if ok and "shallow" in args.stages and p.shallow and left() > 60:
            shallow = load(proxy(p.shallow), dtype=dtype, device=device)
            dense, ctx = [m for m in groups["main"] if m.name == "dense"], Context(keeps, {}, p.train_len, args.batch_tokens)
            ok = cells("passkey", shallow, f"{p.shallow}-passkey", dense, p.lengths, ctx)
            ok = ok and cells("loss", shallow, f"{p.shallow}-passkey", dense, p.lengths, ctx)
            del shallow
        if ok and "long" in args.stages and pk is not None and p.long:
            low = min(p.budgets)
            key = [m for m in everything if m.kind == "extension"
                   or m.name in ("dense", "window", "truncate", "simba", "share", "oracle") and m.budget in (None, low)]
            cells("passkey", pk, pk_name, key, p.long, pk_ctx)
    res.data["meta"]["seconds"] = round(time.time() - t0, 1)
    res.save(figure=True)
    log(f"done: {len(res.data['cells'])} cells in {out}")


# --- report ---------------------------------------------------------------------------------------------------------


def _label(c: dict) -> str:
    return c["method"] if c["budget"] is None else f"{c['method']} {c['budget']:g}"


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _table(cells: list[dict], value: str, fmt: str) -> list[str]:
    lengths = sorted({c["length"] for c in cells})
    rows: dict[str, dict[int, dict]] = {}
    for c in cells:
        rows.setdefault(_label(c), {})[c["length"]] = c
    lines = ["| method | " + " | ".join(_length(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for label, by_len in rows.items():
        vals = ["" if by_len.get(n) is None else "n/a" if value not in by_len[n] else format(by_len[n][value], fmt)
                for n in lengths]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return lines


def markdown(d: dict) -> str:
    meta, cells = d.get("meta", {}), d["cells"]
    lines = ["# Long context: passkey retrieval and loss against length", ""]
    if meta.get("command"):
        v = meta.get("versions", {})
        lines += [f"`{meta['command']}`", "",
                  f"{meta.get('device')}, {meta.get('dtype')}; " + ", ".join(f"{k} {x}" for k, x in v.items() if x)
                  + (f"; {meta['seconds']} s" if "seconds" in meta else " (incomplete run)") + ".", ""]
    for m in meta.get("merged", []):
        v = m.get("versions", {})
        lines += [f"Merged from another run ({m['cells']} cells; their model is labelled \"({m['label']})\", their rows "
                  f"carry its device): `{m.get('command')}`; {m.get('device')}, {m.get('dtype')}; "
                  + ", ".join(f"{k} {x}" for k, x in v.items() if x) + ".", ""]
    lines += [
        "Methods at FLOP ratio F of the base backbone: truncate = the dense model on the last F x L tokens; window = on "
        "its last training-length tokens; simba / query / share / deci / utr = the linear schedule meeting F with that "
        "criterion (query: the attention the prompt's last 32 tokens pay each token through the layer's residual "
        "stream, pruning.query_attention; '(default)': the criterion --flops uses); simba-cal = the calibrated KL schedule (T = 1024); stepK = layers below K dense, the rest at one "
        "keep ratio (simba's score); mix = simba with half of each layer's budget given to the most recent tokens; "
        "oracle = simba with the needle always kept (what a perfect score could do); ext-<criterion> = context "
        "extension: every layer from L on runs on at most T tokens, (L, T) calibrated on long training windows "
        "(below); mid-<criterion> = the same at DeciMamba's placement, T = the training length from the middle layer "
        "on. Pruned methods protect the question and answer (passkey) or the scored last 128 tokens (loss). "
        "Key kept: samples where a copy of the key reaches the top layer whole.", ""]
    for name, pr in d.get("proxies", {}).items():
        lines.append(f"Passkey proxy from {name}: {pr.get('steps_done', pr['config']['steps'])} steps, {pr['seconds']} s; "
                     f"held-out passkey accuracy at {max(pr['config']['lengths'])} tokens "
                     f"{pr['before']['passkey_accuracy']:.3f} -> {pr['after']['passkey_accuracy']:.3f}, valid loss "
                     f"{pr['before']['valid_loss']:.4f} -> {pr['after']['valid_loss']:.4f} (`MODEL_CARD_{name}.md`).")
    depths = meta.get("depths", [])
    for model in sorted({c["model"] for c in cells if c["task"] == "passkey"}):
        pk = [c for c in cells if c["task"] == "passkey" and c["model"] == model]
        n = next((c["samples"] for c in pk if "samples" in c), "?")
        lines += ["", f"## Passkey accuracy, {model} ({n} samples per length over depths "
                  f"{', '.join(f'{x:g}' for x in depths)}, the same for every method)", "", *_table(pk, "accuracy", ".2f"),
                  "", "Key kept to the top layer:", "", *_table(pk, "key_kept", ".2f"),
                  "", "FLOP ratio:", "", *_table(pk, "flop_ratio", ".3f"),
                  "", "<details><summary>accuracy by needle depth</summary>", "",
                  "| method | length | " + " | ".join(f"{x:g}" for x in depths) + " |", "|---|---:|" + "---:|" * len(depths)]
        for c in pk:
            if "by_depth" in c:
                lines.append(f"| {_label(c)} | {c['length']} | "
                             + " | ".join(f"{c['by_depth'].get(str(x), float('nan')):.2f}" for x in depths) + " |")
        lines += ["", "</details>"]
    for model in sorted({c["model"] for c in cells if c["task"] == "facts"}):
        fr = [c for c in cells if c["task"] == "facts" and c["model"] == model]
        n = next((c["samples"] for c in fr if "samples" in c), "?")
        lines += ["", f"## Fact recall, {model} ({n} samples per length over depths {', '.join(f'{x:g}' for x in depths)}; "
                  "the true answer the most likely of 4 candidates, chance 0.25; simba_compress/facts.py)", "",
                  *_table(fr, "accuracy", ".2f"), "", "The true answer's mean log-likelihood (nats):", "",
                  *_table(fr, "logprob", ".2f")]
    ranks = [c for c in cells if c["task"] == "ranks" and "quantile" in c]
    if ranks:
        lines += ["", f"## Where each layer's score ranks the key, dense {ranks[0]['model']}", "",
                  "Mean over samples of the rank quantile of the key's worst-ranked token under layer l's score (0: "
                  "the row's top token, 1: its last; the question and answer excluded), then the share of samples "
                  "with every key token in the top fifth. Pruning after layer l keeps by this ranking.", "",
                  "| layer | " + " | ".join(f"{c['method']} {_length(c['length'])}" for c in ranks) + " |",
                  "|---:|" + "---:|" * len(ranks)]
        for layer in range(len(ranks[0]["quantile"])):
            lines.append(f"| {layer} | " + " | ".join(f"{c['quantile'][layer]:.2f} ({c['top_fifth'][layer]:.2f})"
                                                      for c in ranks) + " |")
    for model in sorted({c["model"] for c in cells if c["task"] == "loss"}):
        ls = [c for c in cells if c["task"] == "loss" and c["model"] == model]
        nw = next((c["windows"] for c in ls if "windows" in c), "?")
        lines += ["", f"## Loss on the last 128 tokens against context length, {model} (valid.txt.xz, {nw} windows per "
                  "length)", "", *_table(ls, "loss", ".4f"), "", "FLOP ratio:", "", *_table(ls, "flop_ratio", ".3f")]
    for model, e in d.get("extension", {}).items():
        lines += ["", f"## Context extension calibrated for {model} ({e['windows']} training windows of {e['length']}: "
                  f"loss on the last 128; dense {e['dense']:.4f}, truncation to "
                  + ", ".join(f"{k} tokens {v:.4f}" for k, v in e["truncate"].items()) + ")", "",
                  "| criterion | first capped layer | cap | loss | FLOP ratio | best |", "|---|---:|---:|---:|---:|---|"]
        for crit in EXT_CRITERIA:
            for g in e.get(crit, {}).get("grid", []):
                lines.append(f"| {crit} | {g['start']} | {g['cap']} | {g['loss']:.4f} | {g['flop_ratio']:.3f} | "
                             + ("**best**" if g == e[crit]["best"] else "") + " |")
    for model, st in d.get("step", {}).items():
        lines += ["", f"## Step schedules calibrated for {model} ({st['windows']} training windows of {st['length']}: "
                  "loss on the scored tail, the last min(128, length / 4) tokens)", "",
                  "| F | K (first pruned layer) | keep above | loss | FLOP ratio | best |",
                  "|---:|---:|---:|---:|---:|---|"]
        for f, entry in st.items():
            if isinstance(entry, dict):
                for g in entry["grid"]:
                    lines.append(f"| {f} | {g['start']} | {g['keep']:.3f} | {g['loss']:.4f} | {g['flop_ratio']:.3f} | "
                                 + ("**best**" if g["start"] == entry["best"] else "") + " |")
    return "\n".join(lines) + "\n"


def plot(d: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in d["cells"] if "error" not in c and c["task"] in ("passkey", "loss")]
    budgets = d.get("meta", {}).get("budgets") or sorted({c["budget"] for c in cells if c["budget"] is not None}, reverse=True)
    pk_models = sorted({c["model"] for c in cells if c["task"] == "passkey"})
    loss_models = sorted({c["model"] for c in cells if c["task"] == "loss"})
    panels = [("passkey", m, b) for m in pk_models[:1] for b in [*budgets, None]] + [("loss", m, None) for m in loss_models]
    if not panels:
        return
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, (task, model, budget) in zip(axes.flat, panels):
        sel = [c for c in cells if c["task"] == task and c["model"] == model and not c["method"].startswith("step")]
        if task == "passkey":  # a budget's methods with dense and window beside them; the extension panel: no budget
            sel = [c for c in sel if c["budget"] == budget
                   or c["budget"] is None and (budget is None or c["method"] in ("dense", "window"))]
        value = "accuracy" if task == "passkey" else "loss"
        for label in dict.fromkeys(_label(c) for c in sel):
            pts = sorted((c["length"], c[value]) for c in sel if _label(c) == label)
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({c["length"] for c in sel})
        ax.set_xticks(ticks, [_length(n) for n in ticks])
        if task == "passkey":
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("passkey exact match" if task == "passkey" else "loss, last 128 tokens (nats)")
        title = (f"passkey, F = {budget:g}" if budget else "passkey, extension") if task == "passkey" else "loss vs length"
        ax.set_title(f"{model}: {title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
