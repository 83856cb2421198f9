"""Quality vs FLOPs on the pretrained proxies: Simba and baseline criteria, prompt truncation, dense shallower models.

For each FLOP ratio F (of the l16 backbone) and criterion, the linear schedule meeting F (with the scored
continuation protected) prunes mamba-proxy-d320-l16; truncation feeds the dense l16 only the most recent
F * T tokens; the dense l12 / l9 / l6 sit at 0.75 / 0.5625 / 0.375. Headline: the loss on the protected
last 128 positions (the headline, evaluate.py); beside it the all-position loss with only the last position protected
(a stress figure: a pruned position is predicted from the layer where it was dropped).

--calibrate F ... adds the project's default schedule: an Optuna study (simba_compress.calibrate, --trials,
--seed) fits Simba's per-layer schedule to F on --calib text (the training split: never the evaluation
windows), once per --objectives entry; it reaches below the linear family (F = 0.375, the dense l6's ratio).

    python benchmarks/quality.py --models ../shared/models --data ../shared/corpus/valid.txt.xz \
        --seq-len 1024 --windows 64 --calib ../shared/corpus/train.txt.xz --calibrate 0.75 0.6 0.375 \
        --out benchmarks/results
Writes quality_T{seq_len}{tag}.json, .md and .png to --out.

--base prunes another model: a proxy name (found in --models, else through benchmarks/proxies.py: the proxies the
project trains, e.g. mamba2-proxy-d320-l16) or a folder. The Mamba-2 proxy's table (issue 21: dense, the default
output at 0.75 and 0.6 calibrated (fast form, KL), the linear schedule and truncation at the same FLOPs; it has no
shallower twins), at T = 1024 and 4096:

    python benchmarks/quality.py --base mamba2-proxy-d320-l16 --shallow --data ../shared/corpus/valid.txt.xz \
        --seq-len 1024 --windows 64 --flops 0.75 0.6 --criteria simba --forms exact --calibrate 0.75 0.6 \
        --calibrate-forms fast --objectives kl --calib ../shared/corpus/train.txt.xz --trials 40 --seed 0 \
        --tag _mamba2 --out benchmarks/results
    (the same with --seq-len 4096 --batch-size 4)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxies  # noqa: E402  (benchmarks/proxies.py)

import simba_compress  # noqa: E402
from simba_compress import SimbaConfig, load, load_tokenizer  # noqa: E402
from simba_compress.data import load_windows  # noqa: E402
from simba_compress.errors import SimbaError  # noqa: E402
from simba_compress.evaluate import evaluate, evaluate_truncated, position_buckets  # noqa: E402
from simba_compress.schedules import linear_for_flops  # noqa: E402
from simba_compress.settings import CalibratedSchedule, LinearSchedule  # noqa: E402

BASE = "mamba-proxy-d320-l16"
SHALLOW = ["mamba-proxy-d320-l12", "mamba-proxy-d320-l9", "mamba-proxy-d320-l6"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", help="folder holding --base and the --shallow models (default: proxies.py's lookup)")
    ap.add_argument("--base", default=BASE, help="the model pruned: a proxy name or a folder")
    ap.add_argument("--tag", default="", help="suffix of the output files (quality_T{seq_len}{tag}.*)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--protect", type=int, default=128)
    ap.add_argument("--flops", type=float, nargs="*", default=[0.8, 0.7, 0.6])
    ap.add_argument("--criteria", nargs="*", default=["simba", "utr", "l2norm", "random", "stride"])
    ap.add_argument("--no-base", action="store_true", help="no dense l16 row (it is in a --merge file)")
    ap.add_argument("--granularity", type=int, default=1, help="round the linear schedules' token counts to multiples of this (a staircase)")
    ap.add_argument("--forms", nargs="+", default=["exact"], choices=["exact", "fast"],
                    help="schedule forms of the linear and calibrated rows (schedules.py: fast = a staircase of 1, 3/4, 1/2 ... 1/16)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--headline-only", action="store_true", help="no all-position pass (half the forwards: long windows on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shallow", nargs="*", default=SHALLOW, help="dense shallower models to compare with")
    ap.add_argument("--dense-only", action="store_true", help="only the dense shallow models (to --merge elsewhere)")
    ap.add_argument("--merge", nargs="*", default=[], help="JSON outputs of other runs whose rows join this table")
    ap.add_argument("--calibrate", type=float, nargs="*", default=[], help="FLOP ratios to calibrate a schedule for")
    ap.add_argument("--calib", help="calibration text (required with --calibrate)")
    ap.add_argument("--calib-tokens", type=int, default=32 * 1024, help="calibration tokens (windows of --seq-len)")
    ap.add_argument("--objectives", nargs="+", default=["loss"], choices=["loss", "kl"])
    ap.add_argument("--calibrate-forms", nargs="+", choices=["exact", "fast"],
                    help="schedule forms of the calibrated rows (default: --forms)")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    t0 = time.time()
    base_path = locate(args.base, args.models)
    name = args.base_name = base_path.name
    tok = load_tokenizer(base_path)
    win = load_windows(args.data, tok, args.seq_len + 1, args.windows)
    base = load(base_path, device=args.device)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU {platform.machine()}"
    rows = []

    def add(model_name, method, flops_target, res, **extra):
        rows.append(
            dict(
                model=model_name,
                method=method,
                flops_target=flops_target,
                flop_ratio=round(res.flop_ratio, 4),
                loss=round(res.loss, 4),
                loss_se=round(res.loss_se, 4),
                all_position_loss=None if res.all_position_loss is None else round(res.all_position_loss, 4),
                position_buckets=None if res.position_loss is None else position_buckets(res.position_loss),
                device=device_name,
                **extra,
            )
        )
        print({k: v for k, v in rows[-1].items() if k != "position_buckets"}, flush=True)

    def run(model, **kw):
        return evaluate(model, win, protect=args.protect, batch_size=args.batch_size, progress=False,
                        all_positions=not args.headline_only, **kw)

    if not (args.dense_only or args.no_base):
        add(name, "dense", 1.0, run(base, simba=None))
    for shallow in args.shallow:
        m = load(locate(shallow, args.models), device=args.device)
        res = run(m, simba=None)
        res.flop_ratio = m.config.n_layer / base.config.n_layer  # of the l16 backbone
        add(shallow, "dense", res.flop_ratio, res)
        del m
    for f in [] if args.dense_only else args.flops:
        for crit, form in [(c, form) for c in args.criteria for form in args.forms]:
            try:
                sched = linear_for_flops(base.config, LinearSchedule(flops=f, seq_len=args.seq_len, criterion=crit,
                                                                     protect_last=args.protect, form=form))
                # a staircase lands near F, not within 0.5%: its own FLOP ratio is in the row
                sched = replace(sched, granularity=args.granularity)
            except SimbaError as e:
                print(f"skip {crit} ({form}) at {f}: {e}")
                continue
            method = f"{crit} (linear" + (", fast" if form == "fast" else "") + (
                f", granularity {args.granularity})" if args.granularity > 1 else ")")
            add(name, method, f, run(base, simba=replace(sched, protect_last=1)), keep=[round(k, 3) for k in sched.keep])
        add(name, "truncate prompt", f, evaluate_truncated(base, win, f, args.protect, args.batch_size, progress=False))

    write(args, rows, win, device_name, t0)
    if args.calibrate:
        calibrated(args, base, tok, win, add, lambda: write(args, rows, win, device_name, t0))


def locate(name: str, models: str | None) -> Path:
    """A model folder: `name` itself if it is one, else --models/name, else the proxy lookup (proxies.require)."""
    if Path(name).is_dir():
        return Path(name)
    if models:
        return Path(models) / name
    return proxies.require(name)


def write(args, measured: list[dict], win, device_name: str, t0: float) -> None:
    """Write quality_T{seq_len}.json/.md/.png: the rows so far plus --merge's (again after each study, so a
    run cut short keeps what it measured)."""
    rows = list(measured)
    for other in args.merge:
        rows += json.loads(Path(other).read_text())["rows"]
    rows.sort(key=lambda r: (r["method"] != "dense", -r["flops_target"], r["model"], r["method"]))
    meta = dict(
        command="python " + " ".join(sys.argv),
        base=args.base_name,
        device=device_name,
        torch=torch.__version__,
        simba_compress=simba_compress.__version__,
        data=args.data,
        windows=int(win.shape[0]),
        seq_len=args.seq_len,
        protect=args.protect,
        seconds=round(time.time() - t0, 1),
        merged=args.merge,
        calibration=None if not args.calibrate else dict(
            data=args.calib, tokens=args.calib_tokens, trials=args.trials, seed=args.seed, objectives=args.objectives
        ),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality_T{args.seq_len}{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, rows))
    if any(r["method"] != "dense" for r in rows) and any(r["model"] == meta["base"] and r["method"] == "dense" for r in rows):
        plot(rows, stem.with_suffix(".png"), meta)


def calibrated(args, base, tok, win, add, save) -> None:
    """Rows for the calibrated schedule at each --calibrate ratio (one study per objective, in memory)."""
    from simba_compress.calibrate import calibrate

    if not args.calib:
        raise SystemExit("--calibrate needs --calib (calibration text, not the evaluation data)")
    calib = load_windows(args.calib, tok, args.seq_len + 1, max(1, args.calib_tokens // args.seq_len))
    forms = args.calibrate_forms or args.forms
    for f, objective, form in [(f, o, form) for f in args.calibrate for o in args.objectives for form in forms]:
        cfg = CalibratedSchedule(
            flops=f, seq_len=args.seq_len, protect_last=args.protect, trials=args.trials, seed=args.seed,
            objective=objective, form=form,
        )
        sched, study = calibrate(base, calib, cfg, progress=False)
        s = study.summary()
        res = evaluate(base, win, protect=args.protect, batch_size=args.batch_size, progress=False,
                       simba=replace(sched, protect_last=1))
        method = "simba (calibrated" + (", fast" if form == "fast" else "") + ("" if objective == "loss" else f", {objective}") + ")"
        add(args.base_name, method, f, res, keep=[round(k, 3) for k in sched.keep], calibration_loss=s["best"]["loss"],
            linear_calibration_loss=None if s["linear"] is None else s["linear"]["loss"],
            trials_per_minute=s["trials_per_minute"])
        save()


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# Quality vs FLOPs, T = {meta['seq_len']}",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['device']}, torch {meta['torch']}, simba_compress {meta['simba_compress']}; "
        f"{meta['windows']} windows of {meta['seq_len']} tokens of {meta['data']}; {meta['seconds']} s.",
        f"Headline: mean loss (nats) on the last {meta['protect']} positions, protected from pruning, ± standard "
        "error over windows. All-position: every position, only the last protected (a pruned position is "
        "predicted from the layer where it was dropped, so this mostly measures which positions were pruned).",
        *(["", "Rows merged from " + ", ".join(f"`{m}`" for m in meta["merged"]) + " (their commands are in those files)."] if meta.get("merged") else []),
        *(["", "Calibrated: {trials} Optuna trials (seed {seed}) per ratio and objective on {tokens} tokens of "
           "`{data}`; keep ratios per layer below.".format(**meta["calibration"])] if meta.get("calibration") else []),
        "",
        "| model | method | target | FLOP ratio | headline loss | ± | all-position loss | device |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ap = "n/a" if r["all_position_loss"] is None else f"{r['all_position_loss']:.4f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['flops_target']:.4g} | {r['flop_ratio']:.4f} | {r['loss']:.4f} "
            f"| {r['loss_se']:.4f} | {ap} | {r.get('device', meta['device'])} |"
        )
    buckets = [r for r in rows if r.get("position_buckets")]
    if buckets:  # the all-position run's loss by position: does information reach further with highways?
        edges = [(b["start"], b["end"]) for b in buckets[0]["position_buckets"]]
        lines += ["", "Loss by position (the all-position run, only the last token protected):", "",
                  "| model | method | target | " + " | ".join(f"[{a}, {b})" for a, b in edges) + " |",
                  "|---|---|---:|" + "---:|" * len(edges)]
        for r in buckets:
            lines.append(f"| {r['model']} | {r['method']} | {r['flops_target']:.4g} | "
                         + " | ".join(f"{b['loss']:.4f}" for b in r["position_buckets"]) + " |")
    keeps = [r for r in rows if r.get("keep")]
    if keeps:
        lines += ["", "| method | target | calibration loss (linear's) | keep per layer |", "|---|---:|---:|---|"]
        for r in keeps:
            lin = "n/a" if r.get("linear_calibration_loss") is None else f"{r['linear_calibration_loss']:.4f}"
            cal = "n/a" if r.get("calibration_loss") is None else f"{r['calibration_loss']:.4f} ({lin})"
            lines.append(f"| {r['method']} | {r['flops_target']:.4g} | {cal} | "
                         + " ".join(f"{k:.2f}" for k in r["keep"]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = meta["base"]
    methods = sorted({r["method"] for r in rows if r["model"] == base and r["method"] != "dense"})
    dense16 = next(r for r in rows if r["model"] == base and r["method"] == "dense")
    for m in methods:
        pts = sorted([(1.0, dense16["loss"])] + [(r["flop_ratio"], r["loss"]) for r in rows if r["method"] == m])
        ax.plot(*zip(*pts), marker="o", label=f"{base} {m}")
    shallow = sorted((r["flop_ratio"], r["loss"], r["model"]) for r in rows if r["method"] == "dense")
    ax.plot([s[0] for s in shallow], [s[1] for s in shallow], "k--s", label="dense " + " / ".join(s[2] for s in shallow))
    ax.set_xlabel(f"backbone FLOPs (ratio of dense {base})")
    ax.set_ylabel(f"loss on the protected last {meta['protect']} tokens (nats)")
    ax.set_title(f"{base}, T = {meta['seq_len']}, {meta['windows']} windows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
