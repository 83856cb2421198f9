"""What a new user waits for on a CPU: the README's quick start, timed as a user runs it.

Runs, in a fresh folder, the README's two quick-start commands (`simba-compress` is `python -m simba_compress.cli`
here, so the copy of the package on the path is the one timed):

    simba-compress --model demo --flops 0.6 --output out/demo-0.6     # compress the embedded demo model
    simba-compress bench --model out/demo-0.6                         # its generation speed beside dense

--repeats times, and records each command's wall time, the 1-minute load average before it (other work on the
machine: the figures are only as good as the machine was idle), and bench's own figures and verdict on them.
--cpus N runs the commands on N CPUs of the machine (sched_setaffinity; torch takes as many threads), to stand
for a smaller machine on a larger idle one.

    python benchmarks/cpu_quickstart.py --repeats 2 --out benchmarks/results/cpu --name quickstart_2core
Writes {name}.json and {name}.md to --out (--name, default quickstart).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import versions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMPRESS = ["--model", "demo", "--flops", "0.6", "--output", "out/demo-0.6"]
BENCH = ["bench", "--model", "out/demo-0.6"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(args: list[str], cwd: Path, cpus: list[int] | None) -> tuple[float, float, str]:
    """(wall seconds, load average before, stdout) of `simba-compress ARGS` run in cwd."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "simba_compress.cli", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"simba-compress {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return seconds, load, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpus", type=int, help="run the commands on this many CPUs (default: all)")
    ap.add_argument("--out", default="benchmarks/results/cpu")
    ap.add_argument("--name", default="quickstart")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))[: args.cpus] if args.cpus else None
    runs = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="simba-quickstart-") as tmp:
            c_s, c_load, c_out = timed(COMPRESS + ["--json"], Path(tmp), cpus)
            b_s, b_load, b_out = timed(BENCH + ["--json"], Path(tmp), cpus)
        report, bench = json.loads(c_out), json.loads(b_out)
        rows = {r["impl"]: r for r in bench["rows"]}
        runs.append({
            "compress_s": round(c_s, 1), "compress_load": c_load, "bench_s": round(b_s, 1), "bench_load": b_load,
            "flop_ratio": report["flops"]["ratio"], "search_trials_per_minute": report["search"]["trials_per_minute"],
            "bench_total_ms": {k: r["total_ms"] for k, r in rows.items()},
            "bench_first_token_ms": {k: r["first_token_ms"] for k, r in rows.items()},
            "bench_speedup_total": round(rows["dense"]["total_ms"] / rows["simba"]["total_ms"], 3),
            "bench_unreliable": bench["unreliable"],
        })  # fmt: skip
        print(json.dumps(runs[-1]), flush=True)
    median = {k: statistics.median(r[k] for r in runs) for k in ("compress_s", "bench_s", "bench_speedup_total")}
    result = {
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpus_used": len(cpus) if cpus else os.cpu_count(),
                    "cpus_on_machine": os.cpu_count()},
        "versions": versions("torch", "transformers", "optuna", "simba-compress"),
        "commands": ["simba-compress " + " ".join(COMPRESS), "simba-compress " + " ".join(BENCH)],
        "runs": runs,
        "median": median,
        "command": "python benchmarks/cpu_quickstart.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    m, v = result["machine"], result["versions"]
    lines = [
        f"# The README's quick start on a CPU ({m['cpus_used']} of {m['cpus_on_machine']} CPUs)", "",
        f"{m['cpu']}, {m['platform']}; python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"optuna {v['optuna']}. Each run in a fresh folder; wall time of each command as a user runs it (bench: "
        "the demo at 0.6 of its FLOPs and dense, 2048 prompt tokens, 128 new, median of 3 runs each). Load: the "
        "1-minute load average before the command, from other work on the machine.", "",
        "| run | compress s | load | bench s | load | bench: dense / pruned total time | bench's verdict |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['compress_s']:.0f} | {r['compress_load']:.2f} | {r['bench_s']:.0f} | {r['bench_load']:.2f} | "
                     f"{r['bench_speedup_total']:.2f}x | {r['bench_unreliable'] or 'no warning'} |")
    lines += [f"| median | {median['compress_s']:.0f} | | {median['bench_s']:.0f} | | {median['bench_speedup_total']:.2f}x | |",
              "", "```", *result["commands"], result["command"], "```", ""]  # fmt: skip
    (out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
