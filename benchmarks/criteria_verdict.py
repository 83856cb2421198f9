"""Issue 23's verdict: each candidate criterion against the issue's targets, from runs already made.

Reads the passkey (and fact-recall) cells of long_context.py runs and the rows of quality.py runs, all on the same
samples, and writes criteria_verdict.{json,md}: per prompt length, each method's accuracy with its standard error,
its paired difference to truncation (the same samples, so the paired standard error), the issue's passkey target
(half of the gap between truncation and the oracle closed), and each criterion's plain-text loss against Simba's
(the target: within 0.005 nats). A criterion meets the issue when it passes every target measured; what was not
measured is said, not assumed.

    python benchmarks/criteria_verdict.py --passkey DIR [DIR ...] --quality FILE.json [...] --budget 0.6 \\
        --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

LOSS_MARGIN = 0.005  # nats: the most a criterion may cost on plain text against Simba (issue 23)
FACTS_MARGIN = 0.15  # the second probe: at least this far above truncation


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def paired(a: str, b: str) -> tuple[float, float]:
    """Mean and standard error of the per-sample difference a - b (strings of 0/1 over the same samples)."""
    d = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var / n)


def probe_rows(cells: list[dict], task: str, budget: float, methods: list[str], judged: list[str]) -> list[dict]:
    """Per length: each method's accuracy, its standard error and its paired difference to truncation; the methods
    in `judged` also against the target."""
    rows = []
    for model, length in sorted({(c["model"], c["length"]) for c in cells if c["task"] == task}):
        at = {c["method"]: c for c in cells if c["task"] == task and c["model"] == model and c["length"] == length
              and "correct" in c and c["budget"] in (budget, None)}
        trunc, oracle = at.get("truncate"), at.get("oracle")
        for m in methods:
            if m not in at:
                continue
            c = at[m]
            row = {"task": task, "model": model, "length": length, "method": m, "samples": c["samples"], "accuracy": c["accuracy"],
                   "se": round(_se(c["accuracy"], c["samples"]), 4), "flop_ratio": c.get("flop_ratio")}
            if trunc is not None and len(trunc["correct"]) == len(c["correct"]):
                diff, se = paired(c["correct"], trunc["correct"])
                row.update(vs_truncate=round(diff, 4), vs_truncate_se=round(se, 4))
            if m not in judged:
                pass
            elif task == "passkey" and trunc is not None and oracle is not None:
                row["target"] = round(trunc["accuracy"] + (oracle["accuracy"] - trunc["accuracy"]) / 2, 4)
            elif task == "facts" and trunc is not None:
                row["target"] = round(trunc["accuracy"] + FACTS_MARGIN, 4)
            if "target" in row:
                row["meets"] = c["accuracy"] >= row["target"]
            rows.append(row)
    return rows


def loss_rows(files: list[Path], budget: float, criteria: list[str]) -> list[dict]:
    """Per sequence length (the rows of every file at that length, the same windows): each criterion's headline and
    all-position loss, and its gap to Simba's."""
    by_len: dict[int, dict[str, tuple[dict, str]]] = {}
    for f in files:
        d = json.loads(f.read_text())
        at = by_len.setdefault(d["meta"]["seq_len"], {})
        for r in d["rows"]:
            crit = r["method"].split(" ")[0]
            if r["method"] == "dense" and r["flops_target"] == 1.0:
                at["dense"] = (r, f.name)
            elif r.get("flops_target") == budget and r["method"] == "truncate prompt":
                at["truncate"] = (r, f.name)
            elif r.get("flops_target") == budget and crit in criteria and "(linear)" in r["method"]:
                at[crit] = (r, f.name)
    rows = []
    for seq, at in sorted(by_len.items()):
        simba = at.get("simba", (None,))[0]
        for m, (r, name) in at.items():
            row = {"task": "loss", "seq_len": seq, "method": m, "loss": r["loss"], "loss_se": r["loss_se"],
                   "all_position_loss": r.get("all_position_loss"), "flop_ratio": r["flop_ratio"], "file": name}
            if simba is not None and m in criteria and m != "simba":
                row["vs_simba"] = round(r["loss"] - simba["loss"], 4)
                row["meets"] = row["vs_simba"] <= LOSS_MARGIN
            rows.append(row)
    return rows


def verdict(rows: list[dict], criteria: list[str]) -> dict[str, str]:
    """Per criterion: the targets it misses, or that it meets every one measured; the probes not measured named."""
    out = {}
    for c in criteria:
        mine = [r for r in rows if r["method"] == c and "meets" in r]
        failed = [r for r in mine if not r["meets"]]
        missing = [t for t in ("passkey", "facts", "loss") if t not in {r["task"] for r in mine}]
        if not mine:
            text = "no target measured"
        elif failed:
            text = "misses: " + "; ".join(
                f"{r['task']} {r.get('length') or r.get('seq_len')}: "
                + (f"{r['accuracy']:.2f} < {r['target']:.2f}" if "target" in r else f"+{r['vs_simba']:.4f} nats")
                for r in failed)
        else:
            text = "meets every target measured"
        out[c] = text + (f" (not measured: {', '.join(missing)})" if missing and c != "simba" else "")
    return out


def markdown(d: dict) -> str:
    lines = ["# Issue 23: candidate criteria against the targets", "", f"`{d['command']}`", "",
             f"Budget F = {d['budget']}. Passkey: teacher-forced exact match of the key on the fine-tuned l16 passkey "
             "proxy, the same samples for every method; se = binomial standard error; vs truncate = the paired "
             "difference on the same samples (± its standard error); target = truncation + half the gap to the oracle "
             f"(passkey) or truncation + {FACTS_MARGIN} (fact recall). Loss: quality.py's headline (the protected last "
             f"128 of T) beside the all-position loss; the target: within {LOSS_MARGIN} nats of Simba's.", "",
             "Runs read: " + ", ".join(f"`{s}`" for s in d["sources"]), ""]
    for task in ("passkey", "facts"):
        rs = [r for r in d["rows"] if r["task"] == task]
        if not rs:
            continue
        lines += [f"## {task}", "", "| model | length | method | samples | accuracy ± se | vs truncate | target | meets | "
                  "FLOP ratio |", "|---|---:|---|---:|---:|---:|---:|---|---:|"]
        for r in rs:
            vs = f"{r['vs_truncate']:+.3f} ± {r['vs_truncate_se']:.3f}" if "vs_truncate" in r else ""
            lines.append(f"| {r['model']} | {r['length']} | {r['method']} | {r['samples']} | {r['accuracy']:.3f} ± {r['se']:.3f} | {vs} | "
                         f"{r.get('target', '')} | {'yes' if r.get('meets') else 'no' if 'meets' in r else ''} | "
                         f"{r['flop_ratio']} |")
        lines.append("")
    rs = [r for r in d["rows"] if r["task"] == "loss"]
    if rs:
        lines += ["## Plain-text loss (valid.txt.xz)", "",
                  "| T | method | headline loss ± se | vs simba | meets | all-position loss | FLOP ratio |",
                  "|---:|---|---:|---:|---|---:|---:|"]
        for r in rs:
            vs = f"{r['vs_simba']:+.4f}" if "vs_simba" in r else ""
            ap = "" if r["all_position_loss"] is None else f"{r['all_position_loss']:.4f}"
            lines.append(f"| {r['seq_len']} | {r['method']} | {r['loss']:.4f} ± {r['loss_se']:.4f} | {vs} | "
                         f"{'yes' if r.get('meets') else 'no' if 'meets' in r else ''} | {ap} | {r['flop_ratio']} |")
        lines.append("")
    lines += ["## Verdict", ""] + [f"- **{c}**: {v}" for c, v in d["verdict"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passkey", nargs="+", default=[], help="long_context.py --out folders (their long_context.json)")
    ap.add_argument("--quality", nargs="*", default=[], help="quality.py JSON outputs")
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--criteria", nargs="+", default=["simba", "query", "utr"], help="the candidates judged")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    cells, meta = [], []
    for folder in args.passkey:
        d = json.loads((Path(folder) / "long_context.json").read_text())
        cells += d["cells"]
        meta.append({k: d["meta"].get(k) for k in ("command", "device", "machine", "versions", "seconds", "per_depth")})
    methods = ["dense", "truncate", *args.criteria, "oracle"]
    rows = [r for task in ("passkey", "facts") for r in probe_rows(cells, task, args.budget, methods, args.criteria)]
    rows += loss_rows([Path(f) for f in args.quality], args.budget, args.criteria)
    out = {"command": "python " + shlex.join(sys.argv), "budget": args.budget, "runs": meta,
           "sources": [*args.passkey, *args.quality], "rows": rows, "verdict": verdict(rows, args.criteria)}
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    stem = f"criteria_verdict_F{args.budget:g}{args.tag}"
    (dest / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    (dest / f"{stem}.md").write_text(markdown(out))
    print((dest / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
