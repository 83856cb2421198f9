"""Recovery fine-tuning on the proxies: does a short fine-tune of the pruned l16 win back what pruning cost?

Rows, on the validation text (64 windows of 1024, the last 128 protected and scored: the DESIGN.md headline,
beside it the all-position loss under the same schedule, a stress figure; as benchmarks/quality.py): dense l16, dense l9 (the same backbone FLOPs as l16 at
0.5625), Simba l16 at F training-free (linear-for-FLOPs schedule, or --keep-file), and Simba l16 at F after
--steps of fine-tuning on the train text for each --distill-weights value (0: next-token loss, 1: KL to the
dense l16). The fine-tune selects its weights on windows held out after the training part of --train, never
on --valid.

    python benchmarks/finetune_quality.py --models ../shared/models --train ../shared/corpus/train.txt.xz \
        --valid ../shared/corpus/valid.txt.xz --flops 0.6 --steps 300 --batch-size 16 --out benchmarks/results
Writes finetune_quality.json and .md to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simba_compress import compress, load, load_tokenizer  # noqa: E402
from simba_compress.data import load_windows  # noqa: E402
from simba_compress.evaluate import evaluate  # noqa: E402
from simba_compress.finetune import FinetuneConfig, dense_teacher, finetune, load_finetune_windows  # noqa: E402
from simba_compress.schedules import read_keep_file  # noqa: E402

BASE = "mamba-proxy-d320-l16"
SHALLOW = "mamba-proxy-d320-l9"


def _versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "accelerate", "mamba_ssm", "simba-compress"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, help=f"folder holding {BASE} (and {SHALLOW}, for its row)")
    ap.add_argument("--train", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--tokenizer", help="default: the one beside the l16 checkpoint")
    ap.add_argument("--flops", type=float, default=0.6)
    ap.add_argument("--keep-file", help="a calibrated schedule (schedule.json or keep list) instead of the linear one")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train-subset", default="all", choices=["all", "ssm", "norms"])
    ap.add_argument("--distill-weights", type=float, nargs="+", default=[0.5])
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out windows of --train that select the weights")
    ap.add_argument("--windows", type=int, default=64, help="validation windows")
    ap.add_argument("--protect", type=int, default=128)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    t0 = time.time()
    models = Path(args.models)
    tok = load_tokenizer(models / BASE, args.tokenizer)
    valid = load_windows(args.valid, tok, args.seq_len + 1, args.windows)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU {platform.machine()}"
    rows = []

    def add(name: str, model, extra: dict | None = None, simba="model", flop_ratio: float | None = None) -> None:
        t = time.time()
        r = evaluate(model, valid, args.protect, batch_size=max(1, 8192 // args.seq_len), simba=simba, progress=False)
        rows.append(
            dict(model=name, flop_ratio=round(r.flop_ratio if flop_ratio is None else flop_ratio, 4), loss=round(r.loss, 4), loss_se=round(r.loss_se, 4),
                 all_position_loss=round(r.all_position_loss, 4), eval_seconds=round(time.time() - t, 1), **(extra or {}))
        )
        print(rows[-1], flush=True)

    def pruned():
        m = load(models / BASE, device=args.device)
        if args.keep_file:
            compress(m, keep=read_keep_file(args.keep_file), seq_len=args.seq_len, protect_last=args.protect)
        else:
            compress(m, flops=args.flops, seq_len=args.seq_len, protect_last=args.protect)  # as quality.py: F with the tail protected
        return m

    base = load(models / BASE, device=args.device)
    n16 = base.config.n_layer
    add("dense l16", base, simba=None)
    del base
    if (models / SHALLOW).is_dir():  # optional: benchmarks/quality.py has the same row on the same windows
        shallow = load(models / SHALLOW, device=args.device)
        add("dense l9", shallow, simba=None, flop_ratio=shallow.config.n_layer / n16)  # of l16's backbone (DESIGN.md)
        del shallow
    else:
        print(f"{models / SHALLOW} not found: no dense l9 row", flush=True)
    schedule = "keep file" if args.keep_file else "linear"
    add(f"Simba l16 {args.flops} ({schedule}), training-free", pruned())

    cfg0 = FinetuneConfig(
        steps=args.steps, data=args.train, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
        protect=args.protect, train=args.train_subset, eval_every=args.eval_every, eval_windows=args.eval_windows,
        save_every=10**9, gradient_checkpointing=args.gradient_checkpointing,
    )
    t = time.time()
    train_w, held_w = load_finetune_windows(cfg0, tok)
    print(f"fine-tuning text: {train_w.shape[0]} windows + {held_w.shape[0]} held out ({time.time() - t:.1f} s)", flush=True)
    runs = []

    def save() -> None:
        """Write the JSON and markdown (after every run, so a run cut short keeps what it measured)."""
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "python " + shlex.join(sys.argv)
        meta = dict(device=device_name, versions=_versions(), command=command, seconds=round(time.time() - t0, 1),
                    valid_windows=args.windows, seq_len=args.seq_len, protect=args.protect,
                    finetune={k: v for k, v in dataclasses.asdict(cfg0).items() if k != "distill_weight"}, train_windows=int(train_w.shape[0]))
        (out / "finetune_quality.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1) + "\n")
        lines = [
            f"# Recovery fine-tuning: mamba-proxy-d320-l16 at {args.flops} of the backbone FLOPs",
            "",
            f"{device_name}; {', '.join(f'{k} {v}' for k, v in meta['versions'].items() if v)}; {meta['seconds']} s in all.",
            f"Validation: {args.windows} windows of {args.seq_len} tokens of {args.valid}; loss = mean over the last "
            f"{args.protect} positions (protected: a continuation after the pruned prompt); all-position loss = every "
            "position, same schedule (a stress figure: a pruned position is predicted from the layer where it was dropped).",
            f"Fine-tune: {args.steps} steps x {args.batch_size} windows of {args.seq_len} tokens of {args.train}, lr "
            f"{args.lr}, trains {args.train_subset}; weights selected on {args.eval_windows} windows held out of the training text.",
            "",
            f"| model | FLOP ratio | loss (last {args.protect}) | ± se | all-position loss | train s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            lines.append(f"| {r['model']} | {r['flop_ratio']:.4f} | {r['loss']:.4f} | {r['loss_se']:.4f} | "
                         f"{r['all_position_loss']:.4f} | {r.get('train_seconds', '')} |")
        lines += ["", "```", command, "```", ""]
        (out / "finetune_quality.md").write_text("\n".join(lines))
        print("\n".join(lines))

    save()
    for w in args.distill_weights:
        cfg = dataclasses.replace(cfg0, distill_weight=w)
        model = pruned()
        teacher = dense_teacher(model) if w > 0 else None
        res = finetune(model, teacher, cfg, train_windows=train_w, eval_windows=held_w, progress=True)
        del teacher
        runs.append({"distill_weight": w, **res.to_dict()})
        add(f"Simba l16 {args.flops} ({schedule}), fine-tuned, distill {w}", model,
            {"train_seconds": res.seconds, "best_step": res.best_step, "held_out_before": round(res.before["loss"], 4),
             "held_out_after": round(res.after["loss"], 4)})
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        save()


if __name__ == "__main__":
    main()
