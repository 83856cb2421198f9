"""The quality bar of issue 3: the calibrated schedule against the paper's linear one, on held-out text.

    python benchmarks/calibrated_quality.py --models ../shared/models --calib ../shared/corpus/train.txt.xz \
        --data ../shared/corpus/valid.txt.xz --out benchmarks/results

For each FLOP ratio F of mamba-proxy-d320-l16, an Optuna study (40 trials, seed 0) calibrates the schedule on
32 x 1024 tokens of the training text; then both schedules are evaluated on 64 windows of 1024 tokens of the
validation text (never seen by the search) with the DESIGN.md headline: the loss on the last 128 positions,
protected. As in quality.py, the FLOP ratio counts the protected continuation. Below the linear family's
reach (F = 0.45) the calibrated l16 is compared with the dense l9 (0.5625) and l6 (0.375). The studies live in
--out/calibrated_quality.optuna.db, so an interrupted run resumes. Writes calibrated_quality.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import simba_compress  # noqa: E402
from simba_compress import load, load_tokenizer  # noqa: E402
from simba_compress.calibrate import CalibrationConfig, calibrate  # noqa: E402
from simba_compress.data import load_windows  # noqa: E402
from simba_compress.errors import SimbaError  # noqa: E402
from simba_compress.evaluate import evaluate  # noqa: E402
from simba_compress.flops import count  # noqa: E402
from simba_compress.schedules import linear_for_flops  # noqa: E402

BASE = "mamba-proxy-d320-l16"
SHALLOW = ("mamba-proxy-d320-l9", "mamba-proxy-d320-l6")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="../shared/models")
    ap.add_argument("--calib", default="../shared/corpus/train.txt.xz")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--data", default="../shared/corpus/valid.txt.xz")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--protect", type=int, default=128)
    ap.add_argument("--flops", type=float, nargs="+", default=[0.75, 0.6, 0.45])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads; 1 when other jobs share the cores (2 threads then slow down 20x and more)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = Path(args.models)
    tok = load_tokenizer(models / BASE)
    calib = load_windows(args.calib, tok, args.seq_len + 1, args.calib_windows)
    valid = load_windows(args.data, tok, args.seq_len + 1, args.windows)
    base = load(models / BASE)
    rows = []

    def add(model: str, method: str, target: float, simba, res, **extra) -> None:
        ratio = 1.0 if simba is None else count(base.config, simba, args.seq_len).ratio
        rows.append(
            dict(model=model, method=method, flops_target=target, flop_ratio=round(ratio, 4), loss=round(res.loss, 4),
                 loss_se=round(res.loss_se, 4), **extra)
        )
        print(rows[-1], flush=True)

    def headline(model, simba):
        return evaluate(model, valid, args.protect, simba=simba, all_positions=False, progress=False)

    add(BASE, "dense", 1.0, None, headline(base, None))
    for name in SHALLOW:
        m = load(models / name)
        res = headline(m, None)
        ratio = m.config.n_layer / base.config.n_layer
        rows.append(dict(model=name, method="dense", flops_target=ratio, flop_ratio=ratio, loss=round(res.loss, 4),
                         loss_se=round(res.loss_se, 4)))
        print(rows[-1], flush=True)
        del m
    for f in args.flops:
        cfg = CalibrationConfig(
            flops=f, seq_len=args.seq_len, protect_last=args.protect, trials=args.trials, seed=args.seed,
            storage=str(out / "calibrated_quality.optuna.db"), study_name=f"l16-F{f}", model_name=BASE, progress=False,
        )
        simba, study = calibrate(base, calib, cfg)
        s = study.summary()
        add(BASE, "calibrated", f, simba, headline(base, simba), calibration_loss=round(s["best"]["loss"], 4),
            trial=s["best"]["trial"], trials_per_minute=s["trials_per_minute"], keep=[round(k, 3) for k in simba.keep])
        try:
            linear = linear_for_flops(base.config, f, args.seq_len, protect_last=args.protect)
        except SimbaError as e:
            print(f"F={f}: {e}", flush=True)
            continue
        add(BASE, "linear (paper)", f, linear, headline(base, linear),
            calibration_loss=round(s["linear"]["loss"], 4) if s["linear"] else None)

    meta = dict(
        command="python " + " ".join(sys.argv),
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        optuna=optuna.__version__,
        simba_compress=simba_compress.__version__,
        seed=args.seed,
        trials=args.trials,
        calib=f"{args.calib_windows} x {args.seq_len} tokens of {args.calib}",
        data=f"{args.windows} x {args.seq_len} tokens of {args.data}",
        protect=args.protect,
        seconds=round(time.time() - t0, 1),
    )
    (out / "calibrated_quality.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    (out / "calibrated_quality.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Calibrated vs linear schedule, held-out text",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['machine']}; torch {meta['torch']} ({meta['torch_threads']} threads), optuna {meta['optuna']}, simba_compress {meta['simba_compress']}; "
        f"seed {meta['seed']}, {meta['trials']} trials per budget; calibration on {meta['calib']}; evaluation on "
        f"{meta['data']}; {meta['seconds']} s.",
        f"Headline: mean loss (nats) on the last {meta['protect']} positions, protected, ± standard error over windows "
        "(the schedules are compared on the same windows, so their difference is resolved better than the ± says).",
        "",
        "| model | method | target | FLOP ratio | headline loss | ± | calibration loss | keep |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cal = "" if r.get("calibration_loss") is None else f"{r['calibration_loss']:.4f}"
        keep = " ".join(f"{k:.2f}" for k in r.get("keep", []))
        lines.append(
            f"| {r['model']} | {r['method']} | {r['flops_target']:.4g} | {r['flop_ratio']:.4f} | {r['loss']:.4f} "
            f"| {r['loss_se']:.4f} | {cal} | {keep} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
