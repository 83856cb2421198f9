"""How fast the schedule search runs: mamba-proxy-d320-l16, 32 x 1024 calibration tokens, 40 trials, CPU.

    python benchmarks/calibration_speed.py --model ../shared/models/mamba-proxy-d320-l16 \
        --data ../shared/corpus/train.txt.xz --out benchmarks/results

Times the whole search (the one-off cache of layer 0 included), each trial, and, to say what bounds a trial,
one objective evaluation alone (the pruned forward from the cached layer 0 plus the LM head on the scored
tail) and one dense forward of the same windows. The load average is recorded: other jobs share the cores.
Writes calibration_speed.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import simba_compress  # noqa: E402
from simba_compress import load, load_tokenizer  # noqa: E402
from simba_compress.calibrate import _Scorer, calibrate  # noqa: E402
from simba_compress.data import load_windows  # noqa: E402
from simba_compress.evaluate import default_protect  # noqa: E402
from simba_compress.schedules import linear_for_flops  # noqa: E402
from simba_compress.settings import CalibratedSchedule, LinearSchedule  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="../shared/models/mamba-proxy-d320-l16")
    ap.add_argument("--data", default="../shared/corpus/train.txt.xz")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--flops", type=float, default=0.6)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads; 1 when other jobs share the cores (2 threads then slow down 20x and more)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    load_start = os.getloadavg()
    model = load(args.model)
    windows = load_windows(args.data, load_tokenizer(args.model), args.seq_len + 1, args.windows)
    cfg = CalibratedSchedule(flops=args.flops, seq_len=args.seq_len, trials=args.trials, seed=args.seed)
    t0 = time.time()
    simba, res = calibrate(model, windows, cfg, progress=False)
    total = time.time() - t0
    load_search = os.getloadavg()

    # what one trial is made of
    protect = default_protect(args.seq_len)
    scorer = _Scorer(model, windows, protect, "loss", cfg.batch_size, cfg.criterion)
    linear = linear_for_flops(model.config, LinearSchedule(flops=args.flops, seq_len=args.seq_len, form="exact"))
    t = time.time()
    scorer(linear)
    objective_s = time.time() - t
    t = time.time()
    with torch.no_grad():
        for s in range(0, windows.shape[0], cfg.batch_size):
            model(windows[s : s + cfg.batch_size, :-1], simba=None)
    dense_s = time.time() - t

    durations = [r.seconds for r in res.trials if r.seconds is not None]
    summary = res.summary()
    meta = dict(
        command="python " + " ".join(sys.argv),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        optuna=optuna.__version__,
        simba_compress=simba_compress.__version__,
        seed=args.seed,
        model=args.model,
        data=args.data,
        windows=args.windows,
        seq_len=args.seq_len,
        flops=args.flops,
        trials=args.trials,
        loadavg_before=load_start,
        loadavg_after_search=load_search,
    )
    result = dict(
        total_seconds=round(total, 1),
        setup_seconds=summary["setup_seconds"],
        search_seconds=summary["search_seconds"],
        trials_per_minute=summary["trials_per_minute"],
        trial_seconds_median=round(statistics.median(durations), 2),
        trial_seconds_max=round(max(durations), 2),
        objective_only_seconds=round(objective_s, 2),
        dense_forward_seconds=round(dense_s, 2),
        sampler_and_storage_seconds_per_trial=round(statistics.median(durations) - objective_s, 2),
        best_loss=summary["best"]["loss"],
        linear_loss=summary["linear"]["loss"] if summary["linear"] else None,
        best_keep=[round(k, 4) for k in simba.keep],
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration_speed.json").write_text(json.dumps(dict(meta=meta, result=result), indent=2) + "\n")
    (out / "calibration_speed.md").write_text(markdown(meta, result))
    print(markdown(meta, result))


def markdown(meta: dict, r: dict) -> str:
    per_trial, rest = r["trial_seconds_median"], r["sampler_and_storage_seconds_per_trial"]
    bound = (
        f"A trial takes {per_trial} s (median); the objective alone, one pruned forward of the {meta['windows']} "
        f"windows from the cached layer 0 with the LM head on the scored tail only, takes {r['objective_only_seconds']} s "
        f"(timed once, after the search), and a dense forward of the same windows with all logits "
        f"{r['dense_forward_seconds']} s: the forward pass bounds the search. "
        + (f"The sampler and the storage take the rest, ~{rest} s a trial." if rest >= 0 else
           "The sampler and the storage are below the timing noise here: the single objective timing ran under "
           "heavier load than the median trial.")
    )
    return "\n".join(
        [
            "# Calibration speed",
            "",
            f"`{meta['command']}`",
            "",
            f"{meta['machine']}; torch {meta['torch']} ({meta['torch_threads']} threads), optuna {meta['optuna']}, "
            f"simba_compress {meta['simba_compress']}; seed {meta['seed']}. Load average before "
            f"{tuple(round(x, 2) for x in meta['loadavg_before'])}, after the search "
            f"{tuple(round(x, 2) for x in meta['loadavg_after_search'])} (other jobs share these cores).",
            "",
            f"{meta['model']}, {meta['windows']} x {meta['seq_len']} tokens of {meta['data']}, FLOP ratio "
            f"{meta['flops']}, {meta['trials']} trials.",
            "",
            "| total s | cache s | search s | trials/min | trial s (median / max) | objective only s | dense forward s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {r['total_seconds']} | {r['setup_seconds']} | {r['search_seconds']} | {r['trials_per_minute']} | "
            f"{r['trial_seconds_median']} / {r['trial_seconds_max']} | {r['objective_only_seconds']} | "
            f"{r['dense_forward_seconds']} |",
            "",
            bound,
            "",
            f"Calibration loss: chosen {r['best_loss']:.4f}, linear {r['linear_loss']:.4f}.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
