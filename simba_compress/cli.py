"""simba-compress: the command line, a thin layer over the Python API.

    simba-compress --model state-spaces/mamba-1.4b --flops 0.6 --output out/     (compress is the default)
    simba-compress eval --model out/ --data valid.txt.xz [--json]
    simba-compress info out/ [--json]

Bad input prints one line naming the file or flag and exits with code 2 (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import SimbaError

COMMANDS = ("compress", "eval", "info")


def _keep_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="simba-compress", description="Token pruning (Simba) for Mamba language models.")
    sub = ap.add_subparsers(dest="command")

    c = sub.add_parser("compress", help="compress a model to a FLOP budget (the default command)")
    c.add_argument("--recipe", help="YAML recipe; flags override its values")
    c.add_argument("--model", help='checkpoint folder, hub id, or "demo" (the embedded model)')
    c.add_argument("--output", help="folder to write (must not exist unless --overwrite)")
    c.add_argument("--flops", type=float, help="target backbone FLOP ratio in (0, 1], e.g. 0.6")
    c.add_argument("--schedule", help="linear (default), or a file of per-layer keep ratios (JSON list or text)")
    c.add_argument("--keep", type=_keep_list, help="explicit per-layer keep ratios, e.g. 1,0.9,0.8")
    c.add_argument("--final-keep", type=float, help="linear schedule down to this keep ratio at the top layer")
    c.add_argument("--criterion", help="simba (default), utr, l2norm, random, stride")
    c.add_argument("--protect-last", type=int, help="last tokens never pruned (default 1)")
    c.add_argument("--seq-len", type=int, help="input length the FLOP ratio is computed at (default 1024)")
    c.add_argument("--calib-data", help='calibration text: file, folder, datasets name, or "demo" (default)')
    c.add_argument("--calib-samples", type=int, help="calibration windows (default 16)")
    c.add_argument("--calib-seq-len", type=int, help="calibration window length (default 1024)")
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

    i = sub.add_parser("info", help="what a checkpoint or compressed folder holds")
    i.add_argument("path")
    i.add_argument("--seq-len", type=int, default=1024)
    i.add_argument("--json", action="store_true")

    for p in (c, e, i):
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
        return {"compress": _compress, "eval": _eval, "info": _info}[args.command](args)
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
    if schedule is not None and schedule not in ("linear", "explicit"):
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
        "seq_len": args.seq_len,
        "calibration.data": args.calib_data,
        "calibration.samples": args.calib_samples,
        "calibration.seq_len": args.calib_seq_len,
        "tokenizer": args.tokenizer,
        "seed": args.seed,
        "device": args.device,
        "dtype": args.dtype,
    }
    if "model" not in base and args.model is None:
        raise SimbaError("--model: required (a checkpoint folder, hub id, or demo)")
    recipe = build_recipe(base, overrides, source)
    folder, report = run(recipe, overwrite=args.overwrite, progress=not args.json)
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
    return 0


def _eval(args) -> int:
    from .checkpoints import load, load_tokenizer
    from .compress import resolve_device
    from .data import load_windows
    from .evaluate import evaluate

    if args.seq_len < 2 or args.max_windows < 1 or args.batch_size < 1:
        raise SimbaError("--seq-len must be >= 2, --max-windows and --batch-size >= 1")
    if not 1 <= args.protect <= args.seq_len:
        raise SimbaError(f"--protect: must be in [1, --seq-len {args.seq_len}]")
    device, dtype = resolve_device(args.device, args.dtype)
    model = load(args.model, dtype=dtype, device=device)
    tok = load_tokenizer(args.model, args.tokenizer)
    windows = load_windows(args.data, tok, args.seq_len + 1, args.max_windows)
    res = evaluate(model, windows, args.protect, args.batch_size, simba=None if args.dense else "model", progress=not args.json)
    out = {"model": args.model, "data": args.data, "pruned": model.simba is not None and not args.dense}
    out.update({k: v for k, v in res.to_dict().items() if k != "position_loss"})
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{args.model}: loss {res.loss:.4f} ± {res.loss_se:.4f} (ppl {res.ppl:.2f}) on the last {res.protect} "
            f"tokens of {res.windows} windows of {res.seq_len}; all positions {res.all_position_loss:.4f}; "
            f"FLOP ratio {res.flop_ratio:.4f}"
        )
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
        print(f"  criterion {s.criterion}, protect_last {s.protect_last}")
        print("  keep " + " ".join(f"{k:.3f}" for k in s.keep))
        print(f"  FLOP ratio {flops.ratio:.4f} at {args.seq_len} tokens (score {flops.score / flops.dense:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
