"""Fine-tuning memory on the CPU: memory.py's estimate against the measured peak, and the scan's recomputation.

Each case fine-tunes mamba-proxy-d320-l16 pruned to --flops (linear schedule, the last 128 positions
protected and trained) for --steps optimizer steps of one micro-batch of windows of train.txt.xz, in a process
of its own; its peak resident memory (VmHWM) is compared with the estimate the plan would make for it
(memory.py), and the time from the first step's forward to the second's (forward, backward and update). `--old-scan FILE` runs the cases marked
"old" with another ssm/scan.py (the one before recomputation: `git show 81f9649^:simba_compress/ssm/scan.py`).
`--commands` also runs the README's fine-tune command and the bare defaults (40 steps, 3 MB of text) as a
user would, and stops each after --command-steps steps: the peak is reached in the first step.

    git show 81f9649^:simba_compress/ssm/scan.py > /tmp/scan_before.py
    python benchmarks/finetune_memory.py --models ../shared/models --train ../shared/corpus/train.txt.xz \
        --old-scan /tmp/scan_before.py --commands --out benchmarks/results
Writes finetune_memory.json and .md to --out (after every case).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import env  # benchmarks/env.py (this folder is the script's path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASE = "mamba-proxy-d320-l16"
GiB = 1 << 30
# (name, micro-batch, gradient checkpointing, scan): each one optimizer step of `micro` windows
CASES = [
    ("new m1", 1, False, "new"),
    ("new m2", 2, False, "new"),
    ("new m4", 4, False, "new"),
    ("new m4 ckpt", 4, True, "new"),
    ("old m1", 1, False, "old"),
    ("old m2", 2, False, "old"),
]  # micro-batch 8 (the default batch, whole): the command lines below


def peak_rss(pid: int | str = "self") -> int:
    """The peak resident set (VmHWM) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def child(spec: dict) -> dict:
    """One case, in this process: fine-tune, then the peak, the estimate and the step time."""
    import torch

    import simba_compress.finetune as ft
    from simba_compress.memory import parameter_bytes
    from simba_compress import LinearSchedule, compress, load, load_tokenizer

    torch.set_num_threads(os.cpu_count())
    if spec["scan"] == "old":
        import simba_compress.model as model_module

        s = importlib.util.spec_from_file_location("scan_before", spec["old_scan"])
        old = importlib.util.module_from_spec(s)
        s.loader.exec_module(old)
        model_module.selective_scan = old.selective_scan
    models = Path(spec["models"])
    tok = load_tokenizer(models / BASE)
    model = load(models / BASE)
    compress(model, LinearSchedule(flops=spec["flops"], seq_len=spec["seq_len"], protect_last=128))
    m = spec["micro"]
    cfg = ft.FinetuneConfig(steps=spec["steps"], data=spec["train"], batch_size=m, micro_batch_size=m, seq_len=spec["seq_len"],
                            protect=128, gradient_checkpointing=spec["ckpt"], eval_windows=2, eval_every=10**6, save_every=10**6)
    train_w, eval_w = ft.load_finetune_windows(cfg, tok)
    teacher = ft.dense_teacher(model)
    calls = []
    loss = ft._loss

    def timed(*a, **k):  # a training step starts with its forward: the gaps between forwards time the steps
        calls.append(time.perf_counter())
        return loss(*a, **k)

    ft._loss = timed
    before = peak_rss()
    res = ft.finetune(model, teacher, cfg, train_windows=train_w, eval_windows=eval_w, progress=False)
    plan = ft.memory_plan(model, model.simba, cfg, torch.device("cpu"), m, teacher_bytes=parameter_bytes(teacher))
    return {
        "peak_gb": round(peak_rss() / GiB, 3),
        "peak_before_training_gb": round(before / GiB, 3),
        "estimate_gb": round(plan.estimate.total / GiB, 3),
        "estimate": {k: round(v / GiB, 3) for k, v in vars(plan.estimate).items()},
        "step_seconds": [round(b - a, 1) for a, b in zip(calls, calls[1:])],
        "finetune_seconds": res.seconds,
    }


def run_case(name: str, micro: int, ckpt: bool, scan: str, args) -> dict:
    spec = dict(models=args.models, train=args.train, flops=args.flops, seq_len=args.seq_len, steps=args.steps,
                micro=micro, ckpt=ckpt, scan=scan, old_scan=args.old_scan)
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if r.returncode != 0:
        return {"case": name, "error": r.stderr.strip().splitlines()[-1][:300]}
    return {"case": name, "micro_batch": micro, "checkpointing": ckpt, "scan": scan,
            **json.loads(r.stdout.strip().splitlines()[-1])}


def run_command(name: str, argv: list[str], stop_steps: int) -> dict:
    """A command line as a user runs it, stopped once the fine-tune's progress bar shows stop_steps steps."""
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    peak, seen, tail = 0, 0, b""
    os.set_blocking(proc.stderr.fileno(), False)
    while proc.poll() is None:
        chunk = proc.stderr.read() or b""
        tail = (tail + chunk)[-4000:]
        steps = [int(s) for s in re.findall(rb"finetune:[^\r\n]*?\| *(\d+)/\d+", tail)]
        seen = max(steps, default=seen)
        try:
            peak = max(peak, peak_rss(proc.pid))
        except (OSError, RuntimeError):
            pass
        if seen >= stop_steps:
            proc.kill()
            break
        time.sleep(0.5)
    proc.wait()
    out = {"case": name, "command": shlex.join(argv), "peak_gb": round(peak / GiB, 3), "steps_seen": seen,
           "seconds": round(time.time() - t0, 1)}
    if seen < stop_steps:
        out["error"] = tail.decode(errors="replace").strip().splitlines()[-1][:300] if tail else f"exit {proc.returncode}"
    return out



def versions() -> dict:
    return env.versions("torch", "accelerate", "simba-compress")


def write(out: Path, meta: dict, rows: list[dict], commands: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_memory.json").write_text(json.dumps({"meta": meta, "cases": rows, "commands": commands}, indent=1) + "\n")
    lines = [
        "# Fine-tuning memory on the CPU: estimate vs measured peak",
        "",
        f"{meta['machine']}; {', '.join(f'{k} {v}' for k, v in meta['versions'].items() if v)}.",
        f"mamba-proxy-d320-l16 at {meta['flops']} of the backbone FLOPs (linear schedule), windows of {meta['seq_len']} "
        f"tokens of train.txt.xz, the last 128 positions trained (distilled, weight 0.5), float32; {meta['steps']} "
        "optimizer steps of one micro-batch per case, each case in a process of its own. Peak = the process's "
        "VmHWM (resident memory, everything included); estimate = memory.py's for the same settings; step = "
        "the first step's forward, backward and update (the machine is shared with other work: a rough figure). \"old\" = the scan before the per-chunk recomputation.",
        "",
        "| case | micro-batch | checkpointing | scan | peak GB | estimate GB | estimate / peak | step s |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | | | | failed: {r['error']} | | | |")
            continue
        ratio = r["estimate_gb"] / r["peak_gb"]
        step = min(r["step_seconds"]) if r["step_seconds"] else ""  # with more --steps: the least disturbed
        lines.append(f"| {r['case']} | {r['micro_batch']} | {'yes' if r['checkpointing'] else 'no'} | {r['scan']} | "
                     f"{r['peak_gb']:.2f} | {r['estimate_gb']:.2f} | {ratio:.2f} | {step} |")
    if commands:
        lines += ["", "Command lines as a user runs them (stopped after the steps shown; the peak is reached in the "
                  "first step; planned micro-batch and checkpointing: see the command's report when run whole):", "",
                  "| command | steps seen | peak GB |", "| --- | ---: | ---: |"]
        for c in commands:
            lines.append(f"| `{c['command']}` | {c['steps_seen']} | {c['peak_gb']:.2f}" + (f" ({c['error']})" if "error" in c else "") + " |")
    lines += ["", "```", meta["command"], "```", ""]
    (out / "finetune_memory.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=str(REPO.parent / "shared" / "models"))
    ap.add_argument("--train", default=str(REPO.parent / "shared" / "corpus" / "train.txt.xz"))
    ap.add_argument("--flops", type=float, default=0.6)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cases", nargs="*", help="names from CASES (default: all; the old ones need --old-scan)")
    ap.add_argument("--old-scan", help="an ssm/scan.py to run the 'old' cases with")
    ap.add_argument("--commands", action="store_true", help="also the README's command and the bare defaults")
    ap.add_argument("--command-steps", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}", "versions": versions(),
            "command": "python " + shlex.join(sys.argv), "flops": args.flops, "seq_len": args.seq_len, "steps": args.steps}
    rows, commands = [], []
    for name, micro, ckpt, scan in CASES:
        if (args.cases and name not in args.cases) or (scan == "old" and not args.old_scan):
            continue
        rows.append(run_case(name, micro, ckpt, scan, args))
        print(rows[-1], flush=True)
        write(Path(args.out), meta, rows, commands)
    if args.commands:
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(tmp) / "train-3MB.txt"
            with lzma.open(args.train, "rt") as f:
                text.write_text(f.read(3_000_000))
            # --schedule linear in both: the README's schedule search (40 trials, a quarter of an hour here) is not
            # the fine-tune; its memory is that of a pruned forward of 8 windows
            cli = [sys.executable, "-m", "simba_compress.cli", "--model", str(Path(args.models) / BASE), "--flops", "0.6",
                   "--schedule", "linear"]
            for name, argv in (
                ("README", [*cli, "--finetune-steps", "300", "--finetune-data", args.train, "--distill-weight", "0.5",
                            "--output", f"{tmp}/readme"]),
                ("bare defaults", [*cli, "--finetune-steps", "40", "--finetune-data", str(text), "--output", f"{tmp}/defaults"]),
            ):
                commands.append(run_command(name, argv, args.command_steps))
                print(commands[-1], flush=True)
                write(Path(args.out), meta, rows, commands)


if __name__ == "__main__":
    main()
