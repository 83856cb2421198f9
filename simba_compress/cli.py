"""simba-compress: the command line, a thin layer over the Python API.

    simba-compress --model state-spaces/mamba-1.4b --flops 0.6 --output out/     (compress is the default)
    simba-compress eval --model out/ --data valid.txt.xz [--json]
    simba-compress info out/ [--json]
    simba-compress compare --model DENSE out1/ out2/ [--flops 0.8 0.6] [--tasks ...] --output cmp/
    simba-compress bench --model out/ [--prompt-len N] [--new-tokens K] [--batch B] [--json]

Bad input prints one line naming the file or flag and exits with code 2 (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import SimbaError

COMMANDS = ("compress", "eval", "info", "compare", "bench")


def _keep_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    from .pruning import CRITERIA, DEFAULT_CRITERION

    ap = argparse.ArgumentParser(prog="simba-compress", description="Token pruning (Simba) for Mamba language models.")
    sub = ap.add_subparsers(dest="command")

    c = sub.add_parser("compress", help="compress a model to a FLOP budget (the default command)")
    c.add_argument("--recipe", help="YAML recipe; flags override its values")
    c.add_argument("--model", help='checkpoint folder, hub id, or "demo" (the embedded model)')
    c.add_argument("--output", help="folder to write (must not exist unless --overwrite)")
    c.add_argument("--flops", type=float, help="target backbone FLOP ratio in (0, 1], e.g. 0.6")
    c.add_argument(
        "--schedule", help="calibrated (default with --flops: an Optuna search), linear (the paper's), or a file of keep ratios"
    )
    c.add_argument("--keep", type=_keep_list, help="explicit per-layer keep ratios, e.g. 1,0.9,0.8")
    c.add_argument("--final-keep", type=float, help="linear schedule down to this keep ratio at the top layer")
    c.add_argument("--criterion", help=", ".join(c + " (default)" * (c == DEFAULT_CRITERION) for c in CRITERIA))
    c.add_argument("--protect-last", type=int, help="last tokens never pruned (default 1)")
    c.add_argument("--form", help="with --flops: fast (default: keep ratios on a staircase of 1, 3/4, 1/2 ... 1/16, fast on a "
                   "GPU at any prompt length) or exact (the paper's smooth schedule: every layer prunes a little)")
    c.add_argument("--granularity", type=int, help="--form exact: round each layer's token count to a multiple of this")
    c.add_argument("--max-tokens", help="cap the tokens layers run on, for prompts longer than the model was trained on: "
                   "T@L (at most T tokens from layer L on) or one integer per layer (0: no cap)")
    c.add_argument("--seq-len", type=int, help="input length the FLOP ratio is computed at (default 1024)")
    c.add_argument("--calib-data", help='calibration text: file, folder, datasets name, or "demo" (default)')
    c.add_argument("--calib-samples", type=int, help="calibration windows (default 16)")
    c.add_argument("--calib-seq-len", type=int, help="calibration window length (default 1024)")
    c.add_argument("--trials", type=int, help="calibrated: finished trials the study should hold (default 40)")
    c.add_argument("--timeout", type=float, help="calibrated: start no new trial after this many seconds")
    c.add_argument("--storage", help="calibrated: Optuna storage URL, .db file or .log/.journal file (shared by workers); "
                   "default OUTPUT.optuna.db, copied to OUTPUT/study.db")
    c.add_argument("--study-name", help="calibrated: the study in --storage (default simba-calibration)")
    c.add_argument("--objective", help="calibrated: kl (default: KL to the dense model on the scored tail) or loss (next-token loss there)")
    c.add_argument("--finetune-steps", type=int, help="recovery fine-tune of the pruned model for N steps (default 0: none)")
    c.add_argument("--finetune-data", help='fine-tuning text: file, folder, datasets name (streamed) or "demo"')
    c.add_argument("--finetune-eval-data", help="held-out text (default: windows held out after the training part)")
    c.add_argument("--distill-weight", type=float, help="0: next-token loss, 1: KL to the dense model (default 0.5)")
    c.add_argument("--finetune-lr", type=float, help="peak learning rate (default 1e-4)")
    c.add_argument("--finetune-batch-size", type=int, help="windows per optimizer step, over all processes (default 8)")
    c.add_argument("--finetune-micro-batch-size", type=int,
                   help="windows per forward/backward, gradients accumulated over the step (default: planned from the free memory)")
    c.add_argument("--finetune-memory", type=float, metavar="GB",
                   help="plan the fine-tune to peak below this many GB (default: half the available RAM, 85%% of a GPU's free memory)")
    c.add_argument("--finetune-seq-len", type=int, help="window length (default 1024)")
    c.add_argument("--finetune-train", help="what trains: all (default), ssm (A_log, D, dt, x_proj, conv1d, norms), norms")
    c.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute mixers in the backward (default: only when the plan needs it to fit)")
    c.add_argument("--finetune-dir", help="resumable fine-tune state (default OUTPUT.finetune); a rerun resumes from it")
    c.add_argument("--tokenizer", help="tokenizer folder or hub id, when the checkpoint has none")
    c.add_argument("--seed", type=int)
    c.add_argument("--device", help="auto (default), cpu, cuda")
    c.add_argument("--dtype", help="auto (default: float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")

    e = sub.add_parser("eval", help="loss and perplexity of a (compressed) model on text")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True, help=".txt, .txt.xz or .jsonl file, folder, or datasets name")
    e.add_argument("--seq-len", type=int, default=1024)
    e.add_argument("--max-windows", type=int, default=64)
    e.add_argument("--protect", type=int, default=128, help="scored continuation at the end of each window")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--dense", action="store_true", help="ignore the model's pruning schedule")
    e.add_argument("--tokenizer")
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    k = sub.add_parser("compare", help="a dense model beside compressed ones: one table and plots")
    k.add_argument("--model", required=True, help="the dense checkpoint")
    k.add_argument("compressed", nargs="*", help="compressed folders")
    k.add_argument("--flops", type=float, nargs="*", default=[], help="also compress the model to these ratios")
    k.add_argument("--data", default="demo")
    k.add_argument("--seq-len", type=int, default=1024)
    k.add_argument("--max-windows", type=int, default=32)
    k.add_argument("--protect", type=int, default=128)
    k.add_argument("--batch-size", type=int, default=8)
    k.add_argument("--tasks", nargs="*", default=[], help="lm-eval tasks (needs the eval extra)")
    k.add_argument("--limit", type=int, help="lm-eval examples per task")
    k.add_argument("--device", default="auto")
    k.add_argument("--dtype", default="auto")
    k.add_argument("--output", required=True, help="folder for compare.json, compare.md and the PNG plots")
    k.add_argument("--json", action="store_true")

    g = sub.add_parser("bench", help="generation speed: the compressed model vs the same weights dense (and mamba_ssm)")
    g.add_argument("--model", required=True, help="a compressed folder (or any checkpoint: then dense only)")
    g.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens per row (default 2048)")
    g.add_argument("--new-tokens", type=int, default=128, help="greedy new tokens (default 128)")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--reps", type=int, default=3, help="timed runs per measurement (the median is reported)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    i = sub.add_parser("info", help="what a checkpoint or compressed folder holds")
    i.add_argument("path")
    i.add_argument("--seq-len", type=int, default=1024)
    i.add_argument("--json", action="store_true")

    for p in (c, e, i, k, g):
        p.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "compress")
    if not argv:
        argv = ["--help"]
    args = _parser().parse_args(argv)
    if getattr(args, "json", False):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        commands = {"compress": _compress, "eval": _eval, "info": _info, "compare": _compare, "bench": _bench}
        return commands[args.command](args)
    except SimbaError as e:
        if args.debug:
            raise
        print(f"simba-compress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("simba-compress: interrupted", file=sys.stderr)
        return 130


def _compress(args) -> int:
    from .compress import run
    from .recipe import build_recipe, read_recipe_file
    from .schedules import read_keep_file

    base, source = {}, "command line"
    if args.recipe:
        base, source = read_recipe_file(args.recipe), args.recipe
    keep = args.keep
    schedule = args.schedule
    if schedule is not None and schedule not in ("calibrated", "linear", "explicit"):
        keep, schedule = read_keep_file(schedule), "explicit"
    overrides = {
        "model": args.model,
        "output": args.output,
        "flops": args.flops,
        "schedule": schedule,
        "keep": keep,
        "final_keep": args.final_keep,
        "criterion": args.criterion,
        "protect_last": args.protect_last,
        "form": args.form,
        "granularity": args.granularity,
        "max_tokens": args.max_tokens,
        "seq_len": args.seq_len,
        "calibration.data": args.calib_data,
        "calibration.samples": args.calib_samples,
        "calibration.seq_len": args.calib_seq_len,
        "trials": args.trials,
        "timeout": args.timeout,
        "storage": args.storage,
        "study_name": args.study_name,
        "objective": args.objective,
        "finetune.steps": args.finetune_steps,
        "finetune.data": args.finetune_data,
        "finetune.eval_data": args.finetune_eval_data,
        "finetune.distill_weight": args.distill_weight,
        "finetune.lr": args.finetune_lr,
        "finetune.batch_size": args.finetune_batch_size,
        "finetune.micro_batch_size": args.finetune_micro_batch_size,
        "finetune.memory_gb": args.finetune_memory,
        "finetune.seq_len": args.finetune_seq_len,
        "finetune.train": args.finetune_train,
        "finetune.gradient_checkpointing": args.gradient_checkpointing,
        "finetune_dir": args.finetune_dir,
        "tokenizer": args.tokenizer,
        "seed": args.seed,
        "device": args.device,
        "dtype": args.dtype,
    }
    if "model" not in base and args.model is None:
        raise SimbaError("--model: required (a checkpoint folder, hub id, or demo)")
    recipe = build_recipe(base, overrides, source)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and the summary say enough
    folder, report = run(recipe, overwrite=args.overwrite, progress=not args.json)
    if folder is None:  # one of several processes (accelerate launch): the main one writes and reports
        return 0
    if args.json:
        print(json.dumps({"output": str(folder), **report}))
    else:
        cal = report["calibration"]
        print(f"wrote {folder}")
        print(
            f"  FLOP ratio {report['flops']['ratio']:.4f} at {report['flops']['seq_len']} tokens "
            f"(criterion {report['schedule']['criterion']})"
        )
        print(
            f"  calibration loss, last {cal['protect']} tokens: dense {cal['dense']['loss']:.4f} -> "
            f"pruned {cal['sparse']['loss']:.4f}; all positions {cal['dense']['all_position_loss']:.4f} -> "
            f"{cal['sparse']['all_position_loss']:.4f}"
        )
        if report["finetune"] is not None:
            f = report["finetune"]
            print(
                f"  fine-tuned {f['steps_done']} steps (kept step {f['best_step']}): held-out loss, last "
                f"{f['before']['protect']} tokens {f['before']['loss']:.4f} -> {f['after']['loss']:.4f}; "
                f"all positions {f['before']['all_position_loss']:.4f} -> {f['after']['all_position_loss']:.4f}"
            )
            mem = f["memory"]
            print(
                f"  {f['processes']} process(es), micro-batches of {mem['micro_batch']} window(s)"
                f"{', gradient checkpointing' if mem['gradient_checkpointing'] else ''}; estimated peak "
                f"{mem['estimated_peak_gb']} GB per process"
            )
        if report["search"] is not None:
            s = report["search"]
            vs = f"linear {s['linear']['loss']:.4f} (trial {s['linear']['trial']})" if s["linear"] else s["linear_note"]
            print(
                f"  calibrated: trial {s['best']['trial']} of {s['trials_complete']}, {s['objective']} "
                f"{s['best']['loss']:.4f} vs {vs}; {s['trials_per_minute']} trials/min here"
            )
    return 0


def _eval(args) -> int:
    from .checkpoints import load, load_tokenizer
    from .compress import resolve_device
    from .data import load_windows
    from .evaluate import evaluate, position_buckets

    if args.seq_len < 2 or args.max_windows < 1 or args.batch_size < 1:
        raise SimbaError("--seq-len must be >= 2, --max-windows and --batch-size >= 1")
    if not 1 <= args.protect <= args.seq_len:
        raise SimbaError(f"--protect: must be in [1, --seq-len {args.seq_len}]")
    device, dtype = resolve_device(args.device, args.dtype)
    model = load(args.model, dtype=dtype, device=device)
    tok = load_tokenizer(args.model, args.tokenizer)
    windows = load_windows(args.data, tok, args.seq_len + 1, args.max_windows)
    batch = max(1, min(args.batch_size, 16384 // args.seq_len))  # bounds the logits' memory at long lengths
    res = evaluate(model, windows, args.protect, batch, simba=None if args.dense else "model", progress=not args.json)
    out = {"model": args.model, "data": args.data, "pruned": model.simba is not None and not args.dense}
    out.update({k: v for k, v in res.to_dict().items() if k != "position_loss"})
    out["position_buckets"] = position_buckets(res.position_loss)
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{args.model}: loss {res.loss:.4f} ± {res.loss_se:.4f} (ppl {res.ppl:.2f}) on the last {res.protect} "
            f"tokens of {res.windows} windows of {res.seq_len}; all positions {res.all_position_loss:.4f}; "
            f"FLOP ratio {res.flop_ratio:.4f}"
        )
        print("  loss by position: " + ", ".join(f"[{b['start']}, {b['end']}) {b['loss']:.3f}" for b in out["position_buckets"]))
    return 0


def _compare(args) -> int:
    from .compare import CompareConfig, compare

    cfg = CompareConfig(
        dense=args.model,
        compressed=args.compressed,
        flops=args.flops,
        data=args.data,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        protect=args.protect,
        batch_size=args.batch_size,
        tasks=args.tasks,
        limit=args.limit,
        device=args.device,
        dtype=args.dtype,
    )
    rows = compare(cfg, args.output)
    if args.json:
        print(json.dumps({"output": args.output, "rows": rows}))
    else:
        print((Path(args.output) / "compare.md").read_text(), end="")
    return 0


def _bench(args) -> int:
    from .bench import BenchConfig, run_bench, table
    from .checkpoints import load
    from .compress import resolve_device

    try:  # BenchConfig's own checks, named by their flags, before the model loads
        cfg = BenchConfig(prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch, reps=args.reps)
    except ValueError as e:
        field, _, problem = str(e).partition(": ")
        raise SimbaError(f"--{field.replace('_', '-')}: {problem}") from None
    device, dtype = resolve_device(args.device, args.dtype)
    model = load(args.model, dtype=dtype, device=device)
    rows = run_bench(model, cfg)
    note = None
    if device.type != "cuda":
        note = ("measured on the CPU (no CUDA device): the PyTorch path, no fused kernels or CUDA graphs; "
                "GPU timings differ, and peak memory is measured on CUDA only")
    elif not any(r.impl == "mamba_ssm" for r in rows):
        note = "mamba_ssm is not installed (with its CUDA extension): no mamba_ssm row"
    if args.json:
        print(json.dumps({"model": args.model, "dtype": str(dtype).replace("torch.", ""), "note": note,
                          "rows": [r.to_dict() for r in rows]}))  # fmt: skip
    else:
        print(f"{args.model} on {rows[0].device}, {str(dtype).replace('torch.', '')}" + (f" ({note})" if note else ""))
        print(table(rows), end="")
    return 0


def _info(args) -> int:
    from .checkpoints import read_checkpoint, resolve
    from .flops import count

    path = resolve(args.path)
    ckpt = read_checkpoint(path)
    flops = count(ckpt.config, ckpt.simba, args.seq_len)
    report_file = Path(path) / "report.json"
    info = {
        "path": str(path),
        "layout": ckpt.layout,
        "config": ckpt.config.to_dict(),
        "simba": None if ckpt.simba is None else ckpt.simba.to_dict(),
        "flops": flops.to_dict(),
        "report": json.loads(report_file.read_text()) if report_file.exists() else None,
    }
    if args.json:
        print(json.dumps(info))
        return 0
    c = ckpt.config
    print(f"{path} ({ckpt.layout} layout)")
    print(f"  Mamba-1: d_model {c.d_model}, {c.n_layer} layers, d_state {c.d_state}, vocab {c.vocab_size}")
    if ckpt.simba is None:
        print("  dense (no pruning schedule)")
    else:
        s = ckpt.simba
        form = f", form {s.extra['form']}" if s.extra.get("form") else ""
        print(f"  criterion {s.criterion}, protect_last {s.protect_last}{form}" + (f", granularity {s.granularity}" if s.granularity > 1 else ""))
        print("  keep " + " ".join(f"{k:.3f}" for k in s.keep))
        if s.max_tokens is not None:
            print("  max tokens " + " ".join(str(c) if c else "-" for c in s.max_tokens))
        print(f"  FLOP ratio {flops.ratio:.4f} at {args.seq_len} tokens (score {flops.score / flops.dense:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
