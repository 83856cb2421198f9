"""How far can a search within the fast form go? Every staircase the fast form offers at a budget, evaluated.

The fast form (schedules.py) keeps ratios on 1, 1/2, 1/4, 1/8, 1/16: at a FLOP ratio F only a handful of
staircases meet it (schedules.fast_candidates). This script evaluates each of them on mamba-proxy-d320-l16 with
the headline (loss on the protected last --protect tokens) on the calibration text (the windows a
search sees: --calib, the training split) and on the validation text (--data). The best validation row is an
oracle bound, not a schedule anyone may pick (it is chosen on the evaluation text): if even it stays behind the
exact schedule, no search within the form can close the gap, and the levels are the limit.

    python benchmarks/fast_form_bound.py --models ../shared/models --data ../shared/corpus/valid.txt.xz \
        --calib ../shared/corpus/train.txt.xz --flops 0.75 0.6 --out benchmarks/results/cpu
Writes fast_form_bound.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import env  # benchmarks/env.py (this folder is the script's path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simba_compress import load, load_tokenizer  # noqa: E402
from simba_compress.data import load_windows  # noqa: E402
from simba_compress.evaluate import evaluate  # noqa: E402
from simba_compress.flops import count  # noqa: E402
from simba_compress.schedules import fast_candidates, linear_for_flops  # noqa: E402
from simba_compress.settings import LinearSchedule  # noqa: E402

BASE = "mamba-proxy-d320-l16"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--data", required=True, help="validation text")
    ap.add_argument("--calib", required=True, help="calibration text (the training split)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib-tokens", type=int, default=32 * 1024)
    ap.add_argument("--protect", type=int, default=128)
    ap.add_argument("--flops", type=float, nargs="+", default=[0.75, 0.6])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(Path(args.models) / BASE, device=device)
    tok = load_tokenizer(Path(args.models) / BASE)
    valid = load_windows(args.data, tok, args.seq_len + 1, args.windows)
    calib = load_windows(args.calib, tok, args.seq_len + 1, max(1, args.calib_tokens // args.seq_len))

    def headline(win: torch.Tensor, simba) -> float:
        return evaluate(model, win, protect=args.protect, batch_size=args.batch_size, simba=simba,
                        all_positions=False, progress=False).loss  # fmt: skip

    rows = [{"flops": 1.0, "keep": None, "calib_loss": headline(calib, None), "valid_loss": headline(valid, None)}]
    print(json.dumps(rows[-1]), flush=True)
    for f in args.flops:
        template = linear_for_flops(model.config, LinearSchedule(flops=f, seq_len=args.seq_len, protect_last=args.protect,
                                                                 form="exact"))
        for keep in fast_candidates(model.config, template, f, args.seq_len):
            simba = replace(template, keep=keep)
            ratio = count(model.config, simba, args.seq_len).ratio
            rows.append({"flops": f, "flop_ratio": round(ratio, 4), "keep": keep,
                         "calib_loss": headline(calib, simba), "valid_loss": headline(valid, simba)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    meta = {"command": "python " + shlex.join(sys.argv), "device": torch.cuda.get_device_name() if device == "cuda"
            else f"CPU {platform.machine()}", "versions": env.versions("torch"), "seconds": round(time.time() - t0, 1),
            "windows": args.windows, "seq_len": args.seq_len, "calib_windows": calib.shape[0], "protect": args.protect}  # fmt: skip
    write(Path(args.out), meta, rows)


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fast_form_bound.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    dense = rows[0]
    lines = ["# Every fast-form staircase at a budget: how far a search within the form can go", "",
             f"{meta['device']}, {', '.join(f'{k} {v}' for k, v in meta['versions'].items() if v)}; "
             f"mamba-proxy-d320-l16, T = {meta['seq_len']}; headline loss on the last {meta['protect']} tokens "
             f"(protected) of {meta['calib_windows']} calibration windows (training text) and {meta['windows']} "
             f"validation windows; {meta['seconds']} s. Dense: calibration {dense['calib_loss']:.4f}, validation "
             f"{dense['valid_loss']:.4f}. Sorted by calibration loss (what a search sees); the best validation row "
             "of each budget is in bold (an oracle bound: chosen on the evaluation text).", ""]  # fmt: skip
    for f in dict.fromkeys(r["flops"] for r in rows[1:]):
        group = sorted((r for r in rows[1:] if r["flops"] == f), key=lambda r: r["calib_loss"])
        best = min(r["valid_loss"] for r in group)
        lines += [f"## F = {f}", "", "| keep per layer | FLOP ratio | calibration loss | validation loss |",
                  "|---|---:|---:|---:|"]
        for r in group:
            v = f"{r['valid_loss']:.4f}"
            lines.append(f"| {' '.join(f'{k:g}' for k in r['keep'])} | {r['flop_ratio']:.4f} | {r['calib_loss']:.4f} | "
                         + (f"**{v}**" if r["valid_loss"] == best else v) + " |")
        lines.append("")
    lines += ["```", meta["command"], "```", ""]
    (out / "fast_form_bound.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
