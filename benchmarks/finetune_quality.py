"""Recovery fine-tuning on the proxies: does a short fine-tune of the pruned l16 win back what pruning cost?

Rows, on the validation text at each --eval-seq-lens T (--windows windows of T tokens, the last --protect
protected and scored: the headline, evaluate.py): dense l16; the dense shallower proxies present under --models
(--shallow); dense l16 reading only the most recent F x T tokens (truncation, the same FLOPs); and for each
budget F the pruned l16 training-free and after --steps of fine-tuning on the train text, for each --lrs and
--distill-weights value (0: next-token loss, 1: KL to the dense l16). The schedule at F is the paper's linear
one, or the calibrated one a benchmarks/quality.py run found (--schedules-from its JSON, --objective). The
fine-tune selects its weights on windows held out after the training part of --train, never on --valid;
"gap closed" = (training-free - fine-tuned) / (training-free - dense l16) at the same T.

--timing-batches B...: before the fine-tunes, time --timing-steps training steps of B windows of --seq-len at
the first budget, through mamba_ssm's scan kernel where it is installed and through the reference PyTorch
scan (ssm/scan.py: what fine-tuning on CUDA without mamba_ssm runs), with the micro-batch the memory plan
picks and the peak GPU memory. --max-seconds: no fine-tune starts that the time left cannot hold (estimated
from the previous one); results are written after every row. --smoke: tiny sizes, to test the script on a CPU.

The H200 run of the issue-15 results (calibrated 0.45 and 0.375, T = 1024 and 4096):
    python benchmarks/finetune_quality.py --models .carry/models --train .carry/corpus/train.txt.xz \
        --valid .carry/corpus/valid.txt.xz --flops 0.45 0.375 \
        --schedules-from benchmarks/results/h200/quality_T1024_calibrated.json --eval-seq-lens 1024 4096 \
        --steps 200 --batch-size 16 --lrs 3e-4 1e-3 --timing-batches 8 32 --max-seconds 200 --out $OUT
The 0.6 run of the README (linear schedule, 300 steps, lr 1e-4, distill weights 0.5 0.0 1.0) is the same script
with --flops 0.6 --steps 300 --distill-weights 0.5 0.0 1.0. Writes finetune_quality.json and .md to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import env  # benchmarks/env.py (this folder is the script's path)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import simba_compress.finetune as ft  # noqa: E402
from simba_compress import ExplicitSchedule, LinearSchedule, compress, load, load_tokenizer  # noqa: E402
from simba_compress.data import load_windows  # noqa: E402
from simba_compress.evaluate import evaluate, evaluate_truncated  # noqa: E402
from simba_compress.schedules import LOWEST_T  # noqa: E402
from simba_compress import backends as probes  # noqa: E402

BASE = "mamba-proxy-d320-l16"
SHALLOW = ["mamba-proxy-d320-l9", "mamba-proxy-d320-l6"]



def versions() -> dict:
    return env.versions("torch", "transformers", "accelerate", "mamba_ssm", "simba-compress")


def calibrated_keep(path: str, flops: float, objective: str) -> list[float]:
    """The keep list of the calibrated schedule at `flops` in a benchmarks/quality.py result. The file rounds
    ratios to 3 decimals: a layer at the search's floor (LOWEST_T) reads 0.0 there and gets the floor back
    (it runs on the protected tail either way)."""
    method = "simba (calibrated)" + ("" if objective == "loss" else f", {objective}")
    rows = [r for r in json.loads(Path(path).read_text())["rows"] if r["method"] == method and r["flops_target"] == flops]
    if not rows:
        raise SystemExit(f"{path}: no '{method}' row at flops {flops}")
    return [max(k, LOWEST_T) for k in rows[0]["keep"]]


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True, help=f"folder holding {BASE} (and the --shallow proxies, for their rows)")
    ap.add_argument("--train", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--tokenizer", help="default: the one beside the l16 checkpoint")
    ap.add_argument("--flops", type=float, nargs="+", default=[0.6])
    ap.add_argument("--schedules-from", help="a benchmarks/quality.py JSON: its calibrated schedule at each --flops")
    ap.add_argument("--objective", default="kl", choices=["kl", "loss"], help="which calibrated rows of --schedules-from")
    ap.add_argument("--shallow", nargs="*", default=SHALLOW, help="dense shallower proxies to add where present")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024, help="training window length")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4])
    ap.add_argument("--distill-weights", type=float, nargs="+", default=[0.5])
    ap.add_argument("--train-subset", default="all", choices=["all", "ssm", "norms"])
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out windows of --train that select the weights")
    ap.add_argument("--windows", type=int, default=64, help="validation windows")
    ap.add_argument("--eval-seq-lens", type=int, nargs="+", help="validation window lengths T (default: --seq-len)")
    ap.add_argument("--protect", type=int, default=128)
    ap.add_argument("--timing-batches", type=int, nargs="*", default=[])
    ap.add_argument("--timing-steps", type=int, default=4)
    ap.add_argument("--max-seconds", type=float, default=float("inf"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU): windows 2, T 128 and 256, 2 steps of 2")
    args = ap.parse_args()
    if args.smoke:
        args.windows, args.seq_len, args.eval_seq_lens, args.protect = 2, 128, [128, 256], 32
        args.steps, args.batch_size, args.eval_every, args.eval_windows = 2, 2, 1, 2
        args.timing_batches, args.timing_steps = [2], 2
    args.eval_seq_lens = args.eval_seq_lens or [args.seq_len]
    return args


def main() -> None:
    args = parse()
    t0 = time.time()
    models = Path(args.models)
    tok = load_tokenizer(models / BASE, args.tokenizer)
    valid = {T: load_windows(args.valid, tok, T + 1, args.windows) for T in args.eval_seq_lens}
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else f"CPU {platform.machine()}"
    rows, runs, timing = [], [], []
    keeps = {F: calibrated_keep(args.schedules_from, F, args.objective) if args.schedules_from else None for F in args.flops}
    schedule = f"calibrated, {args.objective}" if args.schedules_from else "linear"
    cfg0 = ft.FinetuneConfig(
        steps=args.steps, data=args.train, batch_size=args.batch_size, seq_len=args.seq_len, protect=args.protect,
        train=args.train_subset, eval_every=args.eval_every, eval_windows=args.eval_windows, save_every=10**9,
    )

    def pruned(F: float):
        m = load(models / BASE, device=args.device)
        if keeps[F] is None:  # as quality.py: the linear schedule at F with the tail protected
            compress(m, LinearSchedule(flops=F, seq_len=args.seq_len, protect_last=args.protect))
        else:
            compress(m, ExplicitSchedule(keep=keeps[F], seq_len=args.seq_len, protect_last=args.protect))
        return m

    def add(name: str, flops: float | None, per_T: dict, extra: dict | None = None) -> None:
        rows.append({"model": name, "flops": flops, **{f"T{T}": r for T, r in per_T.items()}, **(extra or {})})
        print(json.dumps(rows[-1]), flush=True)
        save()

    def evals(model, simba="model", truncate: float | None = None) -> dict:
        out = {}
        for T, w in valid.items():
            batch = max(1, 8192 // T)
            r = (evaluate_truncated(model, w, truncate, args.protect, batch, progress=False) if truncate is not None
                 else evaluate(model, w, args.protect, batch, simba=simba, all_positions=False, progress=False))
            out[T] = {"loss": round(r.loss, 4), "se": round(r.loss_se, 4), "flop_ratio": round(r.flop_ratio, 4)}
        return out

    def save() -> None:
        """The JSON and the markdown, after every row: a run cut short keeps what it measured."""
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "python " + shlex.join(sys.argv)
        meta = dict(device=device_name, versions=versions(), command=command, seconds=round(time.time() - t0, 1),
                    valid=args.valid, valid_windows=args.windows, eval_seq_lens=args.eval_seq_lens, protect=args.protect,
                    schedule=schedule, keeps={str(F): k for F, k in keeps.items()},
                    finetune={k: v for k, v in dataclasses.asdict(cfg0).items() if k not in ("lr", "distill_weight")})
        (out / "finetune_quality.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs, "timing": timing}, indent=1) + "\n")
        (out / "finetune_quality.md").write_text(markdown(args, meta, rows, timing))

    save()
    for b in args.timing_batches:  # first: the speed claim of issue 15 (item 1) must not wait on the fine-tunes
        for path in ("mamba_ssm", "reference"):
            if path == "mamba_ssm" and not (cuda and probes.mamba_ssm_available()):
                continue
            timing.append({"batch": b, "scan": path, **time_training(args, pruned(args.flops[0]), tok, b, path)})
            print(json.dumps(timing[-1]), flush=True)
            save()

    base = load(models / BASE, device=args.device)
    add("dense l16", 1.0, evals(base, simba=None))
    for F in args.flops:
        add(f"l16, truncated to the last {F} x T tokens", F, evals(base, truncate=F))
    del base
    for name in args.shallow:
        if (models / name).is_dir():
            m = load(models / name, device=args.device)
            add(f"dense {name.rsplit('-', 1)[1]}", None, evals(m, simba=None))
            del m
    free = {}
    for F in args.flops:
        m = pruned(F)
        free[F] = evals(m)
        add(f"Simba l16 {F} ({schedule}), training-free", F, free[F])
        del m
    train_w, held_w = ft.load_finetune_windows(cfg0, tok)
    print(f"fine-tuning text: {train_w.shape[0]} windows + {held_w.shape[0]} held out", flush=True)
    dense = rows[0]
    last = 0.0
    for lr in args.lrs:
        for w in args.distill_weights:
            for F in args.flops:
                left = args.max_seconds - (time.time() - t0)
                if last > left:
                    runs.append({"flops": F, "lr": lr, "distill_weight": w, "skipped": f"{left:.0f} s left, the last took {last:.0f} s"})
                    save()
                    continue
                model = pruned(F)
                teacher = ft.dense_teacher(model) if w > 0 else None
                cfg = dataclasses.replace(cfg0, lr=lr, distill_weight=w)
                res = ft.finetune(model, teacher, cfg, train_windows=train_w, eval_windows=held_w, progress=not args.smoke)
                last = res.seconds
                del teacher
                runs.append({"flops": F, "lr": lr, "distill_weight": w, **res.to_dict()})
                tuned = evals(model)
                closed = {f"gap_closed_T{T}": round((free[F][T]["loss"] - r["loss"]) / (free[F][T]["loss"] - dense[f"T{T}"]["loss"]), 3)
                          if free[F][T]["loss"] != dense[f"T{T}"]["loss"] else None for T, r in tuned.items()}
                add(f"Simba l16 {F} ({schedule}), fine-tuned, lr {lr}, distill {w}", F, tuned,
                    {"train_seconds": res.seconds, "best_step": res.best_step, "memory": res.memory,
                     "held_out_before": round(res.before["loss"], 4), "held_out_after": round(res.after["loss"], 4), **closed})
                del model
                if cuda:
                    torch.cuda.empty_cache()


def time_training(args, model, tok, batch: int, path: str) -> dict:
    """Seconds per training step of `batch` windows (distilled, as the fine-tunes) through mamba_ssm's scan or the
    reference scan (mamba_ssm hidden from the dispatch: the path of a CUDA machine without it)."""
    cfg = ft.FinetuneConfig(steps=args.timing_steps + 1, data=args.train, batch_size=batch, seq_len=args.seq_len,
                            protect=args.protect, eval_windows=1, eval_every=10**9, save_every=10**9)
    train_w, held_w = ft.load_finetune_windows(cfg, tok)
    starts, loss = [], ft._loss

    def timed(*a, **k):  # each micro-batch begins with its forward; the loss is read (synchronised) every step
        starts.append(time.perf_counter())
        return loss(*a, **k)

    hidden = probes.selective_scan_fn
    ft._loss = timed
    if path == "reference":
        probes.selective_scan_fn = lambda: None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        res = ft.finetune(model, ft.dense_teacher(model), cfg, train_windows=train_w, eval_windows=held_w, progress=False)
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e).splitlines()[0][:200]}"}
    finally:
        ft._loss, probes.selective_scan_fn = loss, hidden
    parts = batch // res.memory["micro_batch"]
    steps = [b - a for a, b in zip(starts[::parts], starts[parts::parts])][1:]  # the first step warms up
    return {"step_seconds": round(sum(steps) / len(steps), 3) if steps else None, "steps_timed": len(steps),
            "memory_plan": res.memory, "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}


def markdown(args, meta: dict, rows: list[dict], timing: list[dict]) -> str:
    Ts = args.eval_seq_lens
    v = meta["versions"]
    lines = [
        f"# Recovery fine-tuning: mamba-proxy-d320-l16 at {', '.join(map(str, args.flops))} of the backbone FLOPs",
        "",
        f"{meta['device']}; {', '.join(f'{k} {x}' for k, x in v.items() if x)}; {meta['seconds']} s in all.",
        f"Validation: {args.windows} windows of T tokens of {args.valid}; loss = mean over the last {args.protect} positions "
        "(protected: a continuation after the pruned prompt), ± its standard error over windows. Schedules: "
        f"{meta['schedule']}{' (keep lists from ' + args.schedules_from + ')' if args.schedules_from else ''}. "
        f"Fine-tune: {args.steps} steps x {args.batch_size} windows of {args.seq_len} tokens of {args.train}, trains "
        f"{args.train_subset}, warm-up then cosine; weights selected on {args.eval_windows} windows held out of the "
        "training text. Gap closed: (training-free - fine-tuned) / (training-free - dense l16), same T.",
        "",
        "| model | " + " | ".join(f"FLOP ratio T={T} | loss T={T} | ± se | gap closed T={T}" for T in Ts) + " | train s |",
        "| --- | " + " | ".join("---: | ---: | ---: | ---:" for _ in Ts) + " | ---: |",
    ]
    for r in rows:
        cells = []
        for T in Ts:
            x = r[f"T{T}"]
            gap = r.get(f"gap_closed_T{T}")
            cells.append(f"{x['flop_ratio']:.4f} | {x['loss']:.4f} | {x['se']:.4f} | {'' if gap is None else f'{gap:.0%}'}")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r.get('train_seconds', '')} |")
    if timing:
        lines += ["", f"Training step time, {args.seq_len}-token windows, distilled (student forward and backward, "
                  "teacher forward, update), the first step excluded:", "",
                  "| batch | scan | s / step | micro-batch | checkpointing | peak GPU GB |", "| ---: | --- | ---: | ---: | --- | ---: |"]
        for t in timing:
            if "error" in t:
                lines.append(f"| {t['batch']} | {t['scan']} | {t['error']} | | | |")
                continue
            p = t["memory_plan"]
            lines.append(f"| {t['batch']} | {t['scan']} | {t['step_seconds']} | {p['micro_batch']} | "
                         f"{'yes' if p['gradient_checkpointing'] else 'no'} | {t['peak_gpu_gb'] if t['peak_gpu_gb'] is not None else ''} |")
    lines += ["", "```", meta["command"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
