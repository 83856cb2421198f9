"""CPU prefill time and peak memory: the project's reference path vs transformers' own torch fallback.

mamba-proxy-d320-l16, float32, batch 4 x 1024 tokens of the validation text. Each variant runs in its own
process (so peak RSS is its own): one warm-up, then the median of --repeats timed forwards. Peak memory is
the process's peak RSS minus its RSS after loading the model.

    python benchmarks/cpu_forward.py --model ../shared/models/mamba-proxy-d320-l16 \
        --data ../shared/corpus/valid.txt.xz --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ["transformers-dense", "simba-dense", "simba-0.8", "simba-0.6"]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(variant: str, args) -> dict:
    import torch

    from simba_compress import load, load_tokenizer
    from simba_compress.data import load_windows
    from simba_compress.schedules import linear_for_flops
    from simba_compress.settings import LinearSchedule

    torch.set_num_threads(os.cpu_count())
    tok = load_tokenizer(args.model)
    ids = load_windows(args.data, tok, args.seq_len, args.batch)
    model = load(args.model)
    if variant == "transformers-dense":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import to_transformers

        ref = to_transformers(model)
        del model
        fwd = lambda: ref(ids, use_cache=False).logits  # noqa: E731
    else:
        if variant != "simba-dense":
            model.simba = linear_for_flops(model.config, LinearSchedule(flops=float(variant.split("-")[1]),
                                                                      seq_len=args.seq_len, form="exact"))
        fwd = lambda: model(ids).logits  # noqa: E731
    base = rss_mb()
    times = []
    with torch.no_grad():
        fwd()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fwd()
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "seconds": statistics.median(times), "all_seconds": times, "peak_extra_mb": peak - base}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(one(args.variant, args)))
        return
    rows = []
    for v in VARIANTS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", v]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ref = rows[0]["seconds"]
    for r in rows:
        r["speedup_vs_transformers"] = round(ref / r["seconds"], 2)
    import torch
    import transformers

    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "dtype": "float32",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_forward.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# CPU forward: reference path vs transformers' torch fallback",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}; mamba-proxy-d320-l16, "
        f"float32, batch {args.batch} x {args.seq_len} tokens of real text; median of {args.repeats} after a warm-up.",
        "",
        "| variant | seconds | speedup vs transformers | peak extra memory (MB) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['variant']} | {r['seconds']:.2f} | {r['speedup_vs_transformers']:.2f} | {r['peak_extra_mb']:.0f} |" for r in rows]
    (out / "cpu_forward.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
