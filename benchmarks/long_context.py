"""Long context (issue 14): does pruning keep far-away information that truncating the prompt throws away?

One run, in priority order, writing long_context.{json,md,png} to --out after every cell (a run cut short
keeps what it measured; a rerun with the same --out skips the cells it has):

1. The passkey proxy: mamba-proxy-d320-l16 fine-tuned to retrieve (benchmarks/passkey_proxy.py build(), at
   most 1024 tokens, training text only), written to --work (a model cannot come back from the GPU machine).
2. Context extension, calibrated on long training windows: for each criterion, the first capped layer and the
   cap (SimbaConfig.max_tokens: every layer from L on runs on at most T tokens) with the lowest loss on the last
   128 tokens of --calib-windows windows of --calib-len tokens of train.txt.xz (never the evaluation text).
3. Passkey retrieval on held-out text (valid.txt.xz haystacks) by prompt length and needle depth, the same
   samples for every method: teacher-forced exact match of the key, question and answer protected from pruning.
4. Loss against context length on valid.txt.xz (the last 128 tokens of --loss-windows windows, protected), for
   the plain and the passkey proxy.
5. The l9 passkey proxy, dense (the shallower model at about the FLOPs of l16 at 0.5625), if time is left;
   then 32K-token passkey cells for the main methods.

Methods (FLOP ratios are of the l16 backbone at each length, the score included): dense; truncation (the dense
model on the last F x L tokens); "window": truncation to the training length; the criteria simba, share, deci,
utr with the linear schedule meeting F (and simba with the calibrated KL schedule of
benchmarks/results/h200/quality_T1024_calibrated.json); two benchmark-only variants of simba's ranking, "mix"
(half of each layer's budget goes to the most recent tokens) and "oracle" (the needle always kept: an upper
bound on what a better score could do); "ext-<criterion>", the calibrated context extension, and "mid-<criterion>", the extension at DeciMamba's placement
(the training length from the middle layer on).

    python benchmarks/long_context.py --models ../shared/models --corpus ../shared/corpus --out out/long_context
    python benchmarks/long_context.py ... --smoke          # tiny lengths and steps, CPU, the l6 proxy: tests the script
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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from passkey_proxy import ProxyConfig, build, device_name, spread_text, valid_stream, versions  # noqa: E402

from simba_compress import SimbaConfig, load, load_tokenizer  # noqa: E402
from simba_compress.checkpoints import read_checkpoint  # noqa: E402
from simba_compress.data import windows  # noqa: E402
from simba_compress.errors import SimbaError  # noqa: E402
from simba_compress.evaluate import default_protect, evaluate, evaluate_truncated  # noqa: E402
from simba_compress.flops import count  # noqa: E402
from simba_compress.passkey import PasskeyTask, evaluate_passkey  # noqa: E402
from simba_compress.pruning import TokenPlan  # noqa: E402
from simba_compress.schedules import linear_for_flops  # noqa: E402

BASE, SHALLOW = "mamba-proxy-d320-l16", "mamba-proxy-d320-l9"
CALIBRATED = Path(__file__).resolve().parent / "results/h200/quality_T1024_calibrated.json"
DEPTHS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
EXT_CRITERIA = ("simba", "share", "deci", "utr")


@dataclass(frozen=True)
class Method:
    name: str  # row label
    kind: str  # dense | truncate | window | pruned | extension
    criterion: str | None = None
    budget: float | None = None  # target FLOP ratio (pruned, truncate)
    calibrated: bool = False  # the calibrated keep list instead of the linear schedule
    variant: str | None = None  # benchmark-only re-ranking on top of the criterion: "mix" or "oracle"
    middle: bool = False  # extension: DeciMamba's placement (the training length from the middle layer on), not calibrated


def methods(budgets: list[float]) -> dict[str, list[Method]]:
    """The methods by priority group."""
    main, variants = [Method("dense", "dense"), Method("window", "window")], []
    for f in budgets:
        main += [Method("truncate", "truncate", budget=f), Method("simba", "pruned", "simba", f),
                 Method("simba-cal", "pruned", "simba", f, calibrated=True), Method("deci", "pruned", "deci", f),
                 Method("utr", "pruned", "utr", f)]
        variants += [Method("share", "pruned", "share", f), Method("mix", "pruned", "simba", f, variant="mix")]
    variants.append(Method("oracle", "pruned", "simba", min(budgets), variant="oracle"))
    extension = [Method(f"ext-{c}", "extension", c) for c in EXT_CRITERIA]
    extension += [Method(f"mid-{c}", "extension", c, middle=True) for c in ("simba", "share", "deci")]
    return {"main": main, "variants": variants, "extension": extension}


# --- benchmark-only re-ranking: slots forced into a layer's kept set on top of the criterion's order ----------


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


# --- schedules ------------------------------------------------------------------------------------------------


def calibrated_keeps(path: Path, n_layer: int) -> dict[float, list[float]]:
    """The calibrated (KL objective) keep lists by FLOP target; resampled over depth when the model has another
    layer count (the smoke test's l6)."""
    rows = json.loads(path.read_text())["rows"]
    out = {}
    for r in rows:
        if r["method"] == "simba (calibrated), kl":
            keep = r["keep"]
            if len(keep) != n_layer:
                keep = np.interp(np.linspace(0, 1, n_layer), np.linspace(0, 1, len(keep)), keep).tolist()
            out[r["flops_target"]] = [1.0] + [min(a, 1.0) for a in keep[1:]]
    return out


def extension(n_layer: int, criterion: str, start: int, cap: int, protect: int) -> SimbaConfig:
    """Context extension: layers below `start` run on every token, the rest on at most `cap` (max_tokens)."""
    return SimbaConfig([1.0] * n_layer, criterion, protect, max_tokens=[0] * start + [cap] * (n_layer - start))


def schedule(m: Method, model, length: int, protect: int, keeps: dict, ext: dict) -> SimbaConfig | None:
    cfg = model.config
    if m.kind == "pruned":
        if m.calibrated:
            return SimbaConfig(keeps[m.budget], m.criterion, protect)
        return linear_for_flops(cfg, m.budget, length, m.criterion, protect_last=protect)
    if m.kind == "extension":
        chosen = ext["middle"] if m.middle else ext[m.criterion]["best"]
        return extension(cfg.n_layer, m.criterion, chosen["start"], chosen["cap"], protect)
    return None


def recent_tokens(m: Method, length: int, train_len: int) -> int | None:
    if m.kind == "truncate":
        return round(m.budget * length)
    if m.kind == "window":
        return min(length, train_len)
    return None


# --- cells ----------------------------------------------------------------------------------------------------


def passkey_cell(model, samples, m: Method, keeps, ext, train_len: int, batch_tokens: int) -> dict:
    protect = max(s.tail for s in samples)
    length = samples[0].length
    simba = schedule(m, model, length, protect, keeps, ext)
    recent = recent_tokens(m, length, train_len)
    if recent is not None:
        recent = max(recent, protect)
    if m.variant == "oracle":  # the needle differs per sample: one sample per forward
        parts = []
        for s in samples:
            with forcing(needle(s.needle)):
                parts.append(evaluate_passkey(model, [s], simba, batch_tokens=batch_tokens))
        correct, kept = [c for p in parts for c in p.correct], [k for p in parts for k in p.needle_kept]
        flops = parts[0].flop_ratio
    else:
        with forcing(recent_half) if m.variant == "mix" else nullcontext():
            r = evaluate_passkey(model, samples, simba, recent=recent, batch_tokens=batch_tokens)
        correct, kept, flops = r.correct, r.needle_kept, r.flop_ratio
    by_depth = {}
    for s, c in zip(samples, correct):
        by_depth.setdefault(str(s.depth), []).append(c)
    return {
        "accuracy": round(sum(correct) / len(correct), 4),
        "correct": "".join("1" if c else "0" for c in correct),  # per sample, in order: paired comparisons
        "by_depth": {d: round(sum(v) / len(v), 4) for d, v in by_depth.items()},
        "needle_kept": round(sum(k == 1.0 for k in kept) / len(kept), 4),  # share of samples with all of it on top
        "flop_ratio": round(flops, 4),
        "samples": len(samples),
        "protect": protect,
    }


def loss_cell(model, wins: torch.Tensor, m: Method, keeps, ext, train_len: int, batch: int) -> dict:
    length = wins.shape[1] - 1
    protect = default_protect(length)  # the last 128 tokens (a quarter of a window shorter than 512)
    recent = recent_tokens(m, length, train_len)
    if recent is not None:
        r = evaluate_truncated(model, wins, max(recent, protect) / length, protect, batch, progress=False)
    else:
        simba = schedule(m, model, length, protect, keeps, ext)
        with forcing(recent_half) if m.variant == "mix" else nullcontext():
            r = evaluate(model, wins, protect, batch, simba=simba, all_positions=False, progress=False)
    return {"loss": round(r.loss, 4), "loss_se": round(r.loss_se, 4), "flop_ratio": round(r.flop_ratio, 4),
            "windows": r.windows}


def calibrate_extension(model, wins: torch.Tensor, criteria: list[str], starts: list[int], caps: list[int], batch: int,
                        log) -> dict:
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


# --- the run ----------------------------------------------------------------------------------------------------


class Results:
    """long_context.json (cells keyed by task, model, method, budget, length) with its markdown and plot."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.file = out / "long_context.json"
        self.data = json.loads(self.file.read_text()) if self.file.exists() else {"cells": [], "proxies": {}, "extension": {}}
        self.data["meta"] = {**self.data.get("meta", {}), **meta}
        self.done = {self.key(c) for c in self.data["cells"]}

    @staticmethod
    def key(c: dict) -> tuple:
        return c["task"], c["model"], c["method"], c["budget"], c["length"]

    def add(self, cell: dict) -> None:
        self.data["cells"].append(cell)
        self.done.add(self.key(cell))
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(self.data, indent=1) + "\n")
        (self.out / "long_context.md").write_text(markdown(self.data))
        try:
            plot(self.data, self.out / "long_context.png")
        except ImportError:  # no matplotlib on this machine: --plot-only redraws it elsewhere
            pass


STAGES = ("passkey", "loss", "shallow", "long")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help=f"folder holding {BASE} and {SHALLOW}")
    ap.add_argument("--corpus", help="folder holding train.txt.xz and valid.txt.xz")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/simba-long-context", help="where the passkey proxies are written")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                    help="passkey: the l16 proxy and its cells; loss: loss against length (the passkey proxy's too "
                    "when the passkey stage ran); shallow: the l9 proxy, dense; long: --long lengths")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--long", type=int, nargs="*", default=[32768], help="passkey lengths run last, if time is left")
    ap.add_argument("--per-depth", type=int, default=12, help="passkey samples per depth (depths 0.1 to 0.9)")
    ap.add_argument("--loss-windows", type=int, default=16)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.6])
    ap.add_argument("--methods", nargs="*", help="only these methods (names as in the tables)")
    ap.add_argument("--train-len", type=int, default=1024, help="the proxies' training length")
    ap.add_argument("--calib-len", type=int, default=8192)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--starts", type=int, nargs="+", default=[1, 2, 4, 6, 8, 10, 12, 14],
                    help="first capped layers the extension calibration tries (caps: 1 and 2 training lengths)")
    ap.add_argument("--steps", type=int, default=ProxyConfig.steps, help="passkey fine-tuning steps")
    ap.add_argument("--train-seconds", type=float, default=120, help="a fine-tune stops after this many seconds")
    ap.add_argument("--batch-tokens", type=int, default=1 << 17, help="tokens per forward")
    ap.add_argument("--max-seconds", type=float, default=330, help="start no new cell after this")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny lengths and steps on the l6 proxy: tests the script")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.plot_only:
        Results(out, {}).save()
        return
    t0 = time.time()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    proxy_cfg = ProxyConfig(steps=args.steps)
    base, shallow, depths = BASE, SHALLOW, DEPTHS
    pieces, chars = 128, 1 << 16
    if args.smoke:
        base = shallow = "mamba-proxy-d320-l6"
        args.lengths, args.long, args.per_depth, args.loss_windows, depths = [128, 256], [384], 1, 2, [0.1, 0.5, 0.9]
        args.train_len, args.calib_len, args.calib_windows, args.budgets, args.starts = 128, 256, 2, [0.6], [2, 4]
        args.max_seconds = max(args.max_seconds, 3600)
        proxy_cfg = ProxyConfig(steps=1, batch=2, lm_batch=1, lengths=(128,), lm_len=128, eval_every=1, eval_samples=1)
        pieces, chars = 4, 1 << 13
    caps = [args.train_len, 2 * args.train_len]
    models, corpus = Path(args.models), Path(args.corpus)
    res = Results(out, dict(
        command="python " + shlex.join(sys.argv), device=device_name(device), dtype=str(dtype).replace("torch.", ""),
        versions=versions(), machine=platform.platform(), train_len=args.train_len, depths=depths,
        per_depth=args.per_depth, loss_windows=args.loss_windows, budgets=args.budgets, calibrated_from=str(CALIBRATED),
    ))

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    def left() -> float:
        return args.max_seconds - (time.time() - t0)

    tok = load_tokenizer(models / base)
    valid = valid_stream(str(corpus / "valid.txt.xz"), tok)
    train_pieces = spread_text(str(corpus / "train.txt.xz"), tok, pieces, chars)
    log(f"text: {valid.numel()} valid tokens, {sum(p.numel() for p in train_pieces)} training tokens")
    base_layers = read_checkpoint(models / base).config.n_layer
    keeps = calibrated_keeps(CALIBRATED, base_layers)
    groups = {g: [m for m in ms if args.methods is None or m.name in args.methods] for g, ms in methods(args.budgets).items()}
    everything = groups["main"] + groups["extension"] + groups["variants"]
    task = PasskeyTask(tok, valid)
    long_pieces = [p for p in train_pieces if p.numel() > args.calib_len + 1]
    spread = np.linspace(0, len(long_pieces) - 1, args.calib_windows).round().astype(int)  # every source, not the first
    calib = torch.stack([long_pieces[i][: args.calib_len + 1] for i in spread])
    batch_for = lambda length: max(1, args.batch_tokens // length)  # noqa: E731
    work = Path(args.work)

    def proxy(name: str) -> Path:
        folder = work / f"{name}-passkey"
        if not (folder / "passkey_proxy.json").exists():
            summary = build(str(models / name), folder, proxy_cfg, train_pieces, valid, tok, device,
                            res.data["meta"]["command"], log, max_seconds=args.train_seconds)
            res.data["proxies"][name] = summary
            res.save()
            out.joinpath(f"MODEL_CARD_{name}.md").write_text((folder / "MODEL_CARD.md").read_text())  # the model stays
        return folder

    def calibrated_extension(name: str, model) -> dict:
        if name not in res.data["extension"]:
            log(f"calibrating the context extension of {name} on {tuple(calib.shape)} training tokens")
            starts = [s for s in args.starts if s < model.config.n_layer]
            criteria = list(dict.fromkeys(m.criterion for m in groups["extension"] if not m.middle))
            res.data["extension"][name] = calibrate_extension(model, calib, criteria, starts, caps, batch_for(args.calib_len), log)
            res.save()
        return res.data["extension"][name]

    def run(task_name: str, model, name: str, ms: list[Method], lengths: list[int], ext: dict) -> bool:
        """Every (length, method) cell not yet in the results; False when time ran out."""
        scale = model.config.n_layer / base_layers  # FLOP ratios of the l16 backbone
        for length in lengths:
            if task_name == "passkey":
                data = task.samples(length, depths, args.per_depth, seed=0)
            else:
                data = windows(valid, length + 1, args.loss_windows)
            for m in ms:
                if task_name == "loss" and m.variant == "oracle":
                    continue
                cell = {"task": task_name, "model": name, "method": m.name, "budget": m.budget, "length": length}
                if Results.key(cell) in res.done:
                    continue
                if left() <= 0:
                    log(f"time is up: skipping {cell}")
                    return False
                t = time.time()
                try:
                    if task_name == "passkey":
                        cell.update(passkey_cell(model, data, m, keeps, ext, args.train_len, args.batch_tokens))
                    else:
                        cell.update(loss_cell(model, data, m, keeps, ext, args.train_len, batch_for(length)))
                    cell["flop_ratio"] = round(cell["flop_ratio"] * scale, 4)
                except SimbaError as e:  # a budget the linear family cannot reach at this length
                    cell["error"] = str(e)
                cell["seconds"] = round(time.time() - t, 2)
                res.add(cell)
                shown = {k: cell.get(k) for k in ("accuracy", "needle_kept", "loss", "flop_ratio", "error") if k in cell}
                log(f"{task_name} {name} {m.name} {m.budget} {length}: {shown} ({cell['seconds']} s)")
        return True

    ok, pk, pk_name, ext_pk = True, None, f"{base}-passkey", {}
    with torch.no_grad():
        if "passkey" in args.stages:
            with torch.enable_grad():
                path = proxy(base)
            pk = load(path, dtype=dtype, device=device)
            ext_pk = calibrated_extension(pk_name, pk)
            ok = run("passkey", pk, pk_name, groups["main"] + groups["extension"], args.lengths, ext_pk)
            ok = ok and run("passkey", pk, pk_name, groups["variants"], args.lengths, ext_pk)
        if ok and "loss" in args.stages:
            if pk is not None:
                ok = run("loss", pk, pk_name, everything, args.lengths, ext_pk)
            plain = load(models / base, dtype=dtype, device=device)
            ok = ok and run("loss", plain, base, everything, args.lengths, calibrated_extension(base, plain))
            del plain
        if ok and "shallow" in args.stages and left() > 60:
            with torch.enable_grad():
                path = proxy(shallow)
            l9 = load(path, dtype=dtype, device=device)
            dense = [m for m in groups["main"] if m.name == "dense"]
            ok = run("passkey", l9, f"{shallow}-passkey", dense, args.lengths, {})
            ok = ok and run("loss", l9, f"{shallow}-passkey", dense, args.lengths, {})
            del l9
        if ok and "long" in args.stages and pk is not None and args.long:
            low = min(args.budgets)
            key = [m for m in groups["main"] + groups["variants"] + groups["extension"]
                   if m.name in ("dense", "window", "truncate", "simba", "share", "oracle") and m.budget in (None, low)
                   or m.kind == "extension"]
            run("passkey", pk, pk_name, key, args.long, ext_pk)
    res.data["meta"]["seconds"] = round(time.time() - t0, 1)
    res.save()
    log(f"done: {len(res.data['cells'])} cells in {out}")


# --- report -------------------------------------------------------------------------------------------------------


def _label(c: dict) -> str:
    return c["method"] if c["budget"] is None else f"{c['method']} {c['budget']:g}"


def _table(cells: list[dict], value: str, fmt: str) -> list[str]:
    lengths = sorted({c["length"] for c in cells})
    rows: dict[str, dict[int, dict]] = {}
    for c in cells:
        rows.setdefault(_label(c), {})[c["length"]] = c
    lines = ["| method | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for label, by_len in rows.items():
        vals = []
        for n in lengths:
            c = by_len.get(n)
            vals.append("" if c is None else "n/a" if value not in c else format(c[value], fmt))
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
    lines += [
        "Methods at FLOP ratio F of the l16 backbone: truncate = the dense model on the last F x L tokens; window = "
        "on the last training-length tokens; simba / share / deci / utr = the linear schedule meeting F with that "
        "criterion; simba-cal = the calibrated KL schedule (T = 1024); mix = simba with half of each layer's budget "
        "given to the most recent tokens; oracle = simba with the needle always kept (an upper bound for a better "
        "score); ext-<criterion> = context extension: every layer from L on runs on at most T tokens, (L, T) "
        "calibrated on long training windows (below); mid-<criterion> = the same at DeciMamba's placement, T = the "
        "training length from the middle layer on. Pruned methods protect the question and answer (passkey) or "
        "the scored last 128 tokens (loss).", ""]
    for name, p in d.get("proxies", {}).items():
        lines.append(f"Passkey proxy from {name}: {p['config']['steps']} steps, {p['seconds']} s; held-out passkey "
                     f"accuracy at {max(p['config']['lengths'])} tokens {p['before']['passkey_accuracy']:.3f} -> "
                     f"{p['after']['passkey_accuracy']:.3f}, valid loss {p['before']['valid_loss']:.4f} -> "
                     f"{p['after']['valid_loss']:.4f} (`MODEL_CARD_{name}.md`).")
    for model in sorted({c["model"] for c in cells if c["task"] == "passkey"}):
        pk = [c for c in cells if c["task"] == "passkey" and c["model"] == model]
        n = pk[0].get("samples", "?")
        lines += ["", f"## Passkey accuracy, {model} ({n} samples per length: depths 0.1-0.9, the same for every method)",
                  "", *_table(pk, "accuracy", ".2f"),
                  "", "Samples whose whole needle reaches the top layer:", "", *_table(pk, "needle_kept", ".2f"),
                  "", "FLOP ratio:", "", *_table(pk, "flop_ratio", ".3f")]
        depths = meta.get("depths", DEPTHS)
        lines += ["", "<details><summary>accuracy by needle depth</summary>", "",
                  "| method | length | " + " | ".join(f"{x:g}" for x in depths) + " |", "|---|---:|" + "---:|" * len(depths)]
        for c in pk:
            if "by_depth" in c:
                lines.append(f"| {_label(c)} | {c['length']} | "
                             + " | ".join(f"{c['by_depth'].get(str(x), float('nan')):.2f}" for x in depths) + " |")
        lines += ["", "</details>"]
    for model in sorted({c["model"] for c in cells if c["task"] == "loss"}):
        ls = [c for c in cells if c["task"] == "loss" and c["model"] == model]
        lines += ["", f"## Loss on the last 128 tokens against context length, {model} (valid.txt.xz, "
                  f"{ls[0].get('windows', '?')} windows per length)", "", *_table(ls, "loss", ".4f"),
                  "", "FLOP ratio:", "", *_table(ls, "flop_ratio", ".3f")]
    for model, e in d.get("extension", {}).items():
        lines += ["", f"## Context extension calibrated for {model} ({e['windows']} training windows of {e['length']}: "
                  f"loss on the last 128; dense {e['dense']:.4f}, truncation to " + ", ".join(
                      f"{k} tokens {v:.4f}" for k, v in e["truncate"].items()) + ")", "",
                  "| criterion | first capped layer | cap | loss | FLOP ratio | best |", "|---|---:|---:|---:|---:|---|"]
        for crit in EXT_CRITERIA:
            if crit in e:
                for g in e[crit]["grid"]:
                    lines.append(f"| {crit} | {g['start']} | {g['cap']} | {g['loss']:.4f} | {g['flop_ratio']:.3f} | "
                                 + ("**best**" if g == e[crit]["best"] else "") + " |")
    return "\n".join(lines) + "\n"


def plot(d: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = d["cells"]
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
        sel = [c for c in cells if c["task"] == task and c["model"] == model and "error" not in c]
        if task == "passkey":  # a budget's methods with dense and window beside them; the extension panel: no budget
            sel = [c for c in sel if c["budget"] == budget
                   or c["budget"] is None and (budget is None or c["method"] in ("dense", "window"))]
        value = "accuracy" if task == "passkey" else "loss"
        for label in dict.fromkeys(_label(c) for c in sel):
            pts = sorted((c["length"], c[value]) for c in sel if _label(c) == label)
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({c["length"] for c in sel})
        ax.set_xticks(ticks, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in ticks])
        if task == "passkey":
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("passkey exact match" if task == "passkey" else "loss, last 128 tokens (nats)")
        ax.set_title(f"{model}: " + (f"passkey, F = {budget:g}" if budget else "passkey, extension" if task == "passkey" else "loss vs length"),
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
