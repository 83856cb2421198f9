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
import contextlib
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


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with "(default: ...)" where an option has a default to show (not None or a flag's False)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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
    c.add_argument("--attention-score", help="hybrids: what an attention layer that prunes ranks by: snapkv (default: its "
                   "own attention's, SnapKV's) or carry (the score of the Mamba layer below it)")
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

    shown = {"formatter_class": _Defaults}
    e = sub.add_parser("eval", help="loss and perplexity of a (compressed) model on text", **shown,
                       description="Loss and perplexity of a model on text: the mean next-token loss on the last --protect "
                       "tokens of each window (protected from pruning), and over all positions.")
    e.add_argument("--model", required=True, help="a compressed folder or any checkpoint (folder, hub id, demo)")
    e.add_argument("--data", required=True, help=".txt, .txt.xz or .jsonl file, folder, datasets name, or demo")
    e.add_argument("--seq-len", type=int, default=1024, help="tokens per window")
    e.add_argument("--max-windows", type=int, default=64, help="windows read, evenly spread over the text")
    e.add_argument("--protect", type=int, default=128, help="scored continuation at the end of each window")
    e.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    e.add_argument("--dense", action="store_true", help="ignore the model's pruning schedule")
    e.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the checkpoint's own)")
    e.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    e.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    k = sub.add_parser("compare", help="a dense model beside compressed ones: one table and plots", **shown)
    k.add_argument("--model", required=True, help="the dense checkpoint")
    k.add_argument("compressed", nargs="*", help="compressed folders")
    k.add_argument("--flops", type=float, nargs="*", default=[], help="also compress the model to these ratios (linear)")
    k.add_argument("--data", default="demo", help="evaluation text, as eval --data")
    k.add_argument("--seq-len", type=int, default=1024, help="tokens per window")
    k.add_argument("--max-windows", type=int, default=32, help="windows read")
    k.add_argument("--protect", type=int, default=128, help="scored continuation at the end of each window")
    k.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    k.add_argument("--tasks", nargs="*", default=[], help="lm-eval tasks (needs the eval extra)")
    k.add_argument("--limit", type=int, help="lm-eval examples per task (default: all)")
    k.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    k.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
    k.add_argument("--output", required=True, help="folder for compare.json, compare.md and the PNG plots")
    k.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    g = sub.add_parser("bench", help="generation speed: the compressed model vs the same weights dense (and mamba_ssm)",
                       **shown, description="Time first-token latency, decode time per token, total and peak memory "
                       "(CUDA) of greedy generation from a random prompt: the compressed model, the same weights dense, "
                       "and mamba_ssm where installed. Each figure is the median of --reps runs; the output says when "
                       "the machine was busy or the runs disagreed.")
    g.add_argument("--model", required=True, help="a compressed folder (or any checkpoint: then dense only)")
    g.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens per row")
    g.add_argument("--new-tokens", type=int, default=128, help="greedy new tokens (at least 2)")
    g.add_argument("--batch", type=int, default=1, help="prompts per batch")
    g.add_argument("--reps", type=int, default=3, help="timed runs per measurement (the median is reported)")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    i = sub.add_parser("info", help="what a checkpoint or compressed folder holds", **shown,
                       description="What a checkpoint or compressed folder holds: its shape, its pruning schedule and "
                       "FLOP ratio, its report; and that its weights can be read.")
    i.add_argument("path", help="a checkpoint folder, hub id, or demo")
    i.add_argument("--seq-len", type=int, default=1024, help="input length the FLOP ratio is computed at")
    i.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    for p in (c, e, i, k, g):
        p.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


# compress: the recipe field (recipe.py) each flag fills, by the flag's argparse name; errors about a field name
# the flag ("--" and the name with dashes) when the flag gave it
RECIPE_FIELDS = {
    "model": "model", "output": "output", "tokenizer": "tokenizer", "flops": "schedule.flops",
    "schedule": "schedule.kind", "keep": "schedule.keep", "final_keep": "schedule.final_keep",
    "criterion": "schedule.criterion", "attention_score": "schedule.attention_score",
    "protect_last": "schedule.protect_last", "form": "schedule.form",
    "granularity": "schedule.granularity", "max_tokens": "schedule.max_tokens", "seq_len": "schedule.seq_len",
    "seed": "schedule.seed", "trials": "schedule.trials", "timeout": "schedule.timeout", "storage": "schedule.storage",
    "study_name": "schedule.study_name", "objective": "schedule.objective", "calib_data": "calibration.data",
    "calib_samples": "calibration.samples", "calib_seq_len": "calibration.seq_len", "finetune_steps": "finetune.steps",
    "finetune_data": "finetune.data", "finetune_eval_data": "finetune.eval_data",
    "distill_weight": "finetune.distill_weight", "finetune_lr": "finetune.lr",
    "finetune_batch_size": "finetune.batch_size", "finetune_micro_batch_size": "finetune.micro_batch_size",
    "finetune_memory": "finetune.memory_gb", "finetune_seq_len": "finetune.seq_len", "finetune_train": "finetune.train",
    "gradient_checkpointing": "finetune.gradient_checkpointing", "finetune_dir": "finetune_dir", "device": "device",
    "dtype": "dtype",
}  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "compress")
    if not argv:
        argv = ["--help"]
    args = _parser().parse_args(argv)
    if getattr(args, "json", False):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args.names = {}  # field -> how this command line names it (_compress fills it); else the field's flag
    try:
        commands = {"compress": _compress, "eval": _eval, "info": _info, "compare": _compare, "bench": _bench}
        code = commands[args.command](args)
        sys.stdout.flush()  # here, where a reader that went away is caught (below), not at the interpreter's exit
        return code
    except SimbaError as e:
        if args.debug:
            raise
        if e.field is not None:
            e = e.renamed(args.names.get(e.field, e.field if args.command == "compress" else _flag(e.field)))
        print(f"simba-compress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("simba-compress: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (info --json | head): end quietly, as Unix tools do; stdout goes to /dev/null so
        # that the interpreter's last flush does not raise again
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _compress(args) -> int:
    from .checkpoints import check_output
    from .compress import run
    from .recipe import build_recipe, read_recipe_file
    from .schedules import read_keep_file

    base, source = {}, "command line"
    if args.recipe:
        base, source = read_recipe_file(args.recipe), args.recipe
    values = {dest: getattr(args, dest) for dest in RECIPE_FIELDS}
    if values["schedule"] is not None and values["schedule"] not in ("calibrated", "linear", "explicit"):
        values["keep"], values["schedule"] = read_keep_file(args.schedule), "explicit"  # --schedule FILE
    overrides = {RECIPE_FIELDS[dest]: v for dest, v in values.items()}
    given = {RECIPE_FIELDS[dest] for dest, v in values.items() if v is not None}
    # a field the command line gave is named by its flag; one the recipe file gave (or left at its default), there
    args.names = {f: _flag(dest) if f in given or not args.recipe else f"{args.recipe}: {f}"
                  for dest, f in RECIPE_FIELDS.items()}
    if args.keep is None and args.schedule is not None and "schedule.keep" in given:
        args.names["schedule.keep"] = args.schedule  # the ratios of --schedule FILE
    if "model" not in base and args.model is None:
        raise SimbaError("--model: required (a checkpoint folder, hub id, or demo)")
    if not args.recipe and not given & {"schedule.flops", "schedule.keep", "schedule.final_keep"}:
        raise SimbaError("give a target: --flops F, --final-keep R, --keep LIST or --schedule FILE")
    recipe = build_recipe(base, overrides, source)
    if recipe.output is not None:
        check_output(Path(recipe.output), args.overwrite, "--overwrite")  # run() checks too, naming overwrite=True
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and the summary say enough
    folder, report = run(recipe, overwrite=args.overwrite, progress=not args.json)
    if folder is None:  # one of several processes (accelerate launch): the main one writes and reports
        return 0
    if args.json:
        print(json.dumps({"output": str(folder), **report}))
    else:
        print(_summary(folder, report), end="")
    return 0


def _summary(folder: Path, report: dict) -> str:
    """What a compress run prints: where, the FLOP ratio, the losses, the fine-tune and the search."""
    cal = report["calibration"]
    lines = [
        f"wrote {folder}",
        f"  FLOP ratio {report['flops']['ratio']:.4f} at {report['flops']['seq_len']} tokens "
        f"(criterion {report['schedule']['criterion']})",
        *(["  " + _kv_line(report["flops"])] if report["flops"]["kv_cache_dense_bytes"] else []),
        f"  calibration loss, last {cal['protect']} tokens (protected, as generated text is): dense "
        f"{cal['dense']['loss']:.4f} -> pruned {cal['sparse']['loss']:.4f}",
        f"  all positions {cal['dense']['all_position_loss']:.4f} -> {cal['sparse']['all_position_loss']:.4f} (a stress "
        "figure: a pruned position is predicted from the layer that dropped it, so this rises by design)",
    ]
    if report["finetune"] is not None:
        f, mem = report["finetune"], report["finetune"]["memory"]
        lines += [
            f"  fine-tuned {f['steps_done']} steps (kept step {f['best_step']}): held-out loss, last "
            f"{f['before']['protect']} tokens {f['before']['loss']:.4f} -> {f['after']['loss']:.4f}; "
            f"all positions {f['before']['all_position_loss']:.4f} -> {f['after']['all_position_loss']:.4f}",
            f"  {f['processes']} process(es), micro-batches of {mem['micro_batch']} window(s)"
            f"{', gradient checkpointing' if mem['gradient_checkpointing'] else ''}; estimated peak "
            f"{mem['estimated_peak_gb']} GB per process",
        ]
    if report["search"] is not None:
        s = report["search"]
        vs = f"linear {s['linear']['loss']:.4f} (trial {s['linear']['trial']})" if s["linear"] else s["linear_note"]
        resumed = f", {s['trials_before_this_run']} of them done before this run" if s["trials_before_this_run"] else ""
        lines.append(
            f"  calibrated: trial {s['best']['trial']} of {s['trials_complete']} ({s['distinct_schedules']} distinct "
            f"schedules{resumed}), {s['objective']} {s['best']['loss']:.4f} vs {vs}; {s['trials_per_minute']} trials/min here"
        )
    return "\n".join(lines) + "\n"


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
    from .bench import BenchConfig, reliability, run_bench, table
    from .checkpoints import load
    from .compress import resolve_device

    try:  # BenchConfig's own checks, named by their flags, before the model loads
        cfg = BenchConfig(prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch, reps=args.reps)
    except ValueError as e:
        field, _, problem = str(e).partition(": ")
        raise SimbaError(f"--{field.replace('_', '-')}: {problem}") from None
    device, dtype = resolve_device(args.device, args.dtype)
    model = load(args.model, dtype=dtype, device=device)
    load_before = os.getloadavg()[0]  # what else runs here (this process has not started timing)
    rows = run_bench(model, cfg, progress=not args.json)
    load_after = os.getloadavg()[0]
    note = None
    if device.type != "cuda":
        note = ("measured on the CPU (no CUDA device): the PyTorch path, no fused kernels or CUDA graphs; "
                "GPU timings differ, and peak memory is measured on CUDA only")
    elif not any(r.impl == "mamba_ssm" for r in rows):
        note = "mamba_ssm is not installed (with its CUDA extension): no mamba_ssm row"
    warning = reliability(rows, load_before, os.cpu_count() or 1)
    if args.json:
        print(json.dumps({"model": args.model, "dtype": str(dtype).replace("torch.", ""), "note": note,
                          "unreliable": warning, "load_average": {"before": load_before, "after": load_after},
                          "cpus": os.cpu_count(), "rows": [r.to_dict() for r in rows]}))  # fmt: skip
    else:
        print(f"{args.model} on {rows[0].device}, {str(dtype).replace('torch.', '')}" + (f" ({note})" if note else ""))
        print(table(rows), end="")
        print(f"  each figure: the median of {cfg.reps} runs; load average {load_before:.2f} before, {load_after:.2f} "
              f"after, on {os.cpu_count()} CPUs")
        if warning:
            print(f"  unreliable: {warning}")
    return 0


def _kv_line(flops: dict) -> str:
    mib = 2**20
    return (f"KV cache at {flops['seq_len']} tokens: {flops['kv_cache_bytes'] / mib:.2f} MiB a sequence, dense "
            f"{flops['kv_cache_dense_bytes'] / mib:.2f} MiB ({flops['kv_cache_dtype']})")  # fmt: skip


def _describe(c) -> list[str]:
    """What the model is, in a few lines (info)."""
    kind = "Mamba-1" if c.layer == "mamba1" else f"Mamba-2 (headdim {c.headdim}, {c.ngroups} groups)"
    kind += " with dt, B and C normalised" if c.bcdt_norm else ""
    lines = [f"  {kind}: d_model {c.d_model}, {c.n_layer} layers, d_state {c.d_state}, vocab {c.vocab_size}"
             + (f" ({c.arch})" if c.arch else "")]  # fmt: skip
    if c.attn_layers:
        pos = f"RoPE on {c.rotary_dim} of {c.attn_head_dim} dims" if c.rotary_dim else "no positional encoding"
        conv = f", conv {c.attn_conv} over qkv" if c.attn_conv else ""
        where = "beside the SSM mixer in" if c.attn_parallel else "at"
        lines.append(f"  attention {where} layers {', '.join(map(str, c.attn_layers))}: {c.attn_heads} heads, "
                     f"{c.attn_kv_heads} kv heads of {c.attn_head_dim}, {pos}{conv}")  # fmt: skip
    if c.mlp_layers:
        lines.append(f"  MLP layers {', '.join(map(str, c.mlp_layers))}: {c.d_intermediate} hidden, {c.mlp_act}")
    if c.block_mlp:
        moe = f", MoE of {c.n_experts} experts (top {c.experts_per_token}) of {c.expert_intermediate}" if c.n_experts else ""
        if c.n_experts and len(c.moe_layers) < c.n_layer:
            moe += f" at layers {', '.join(map(str, c.moe_layers))}" + ("" if c.moe_shared else " instead of the MLP")
        lines.append(f"  an MLP after every mixer: {c.d_intermediate} hidden{moe}")
    return lines


def _info(args) -> int:
    from .checkpoints import check_weights, read_checkpoint, resolve
    from .flops import count

    path = resolve(args.path)
    ckpt = read_checkpoint(path)
    weights, params = check_weights(ckpt)  # the weights it describes can be read, and fit the config
    flops = count(ckpt.config, ckpt.simba, args.seq_len)
    report_file = Path(path) / "report.json"
    info = {
        "path": str(path),
        "layout": ckpt.layout,
        "config": ckpt.config.to_dict(),
        "weights": {"file": weights.name, "parameters": params, "readable": True},
        "simba": None if ckpt.simba is None else ckpt.simba.to_dict(),
        "flops": flops.to_dict(),
        "report": json.loads(report_file.read_text()) if report_file.exists() else None,
    }
    if args.json:
        print(json.dumps(info))
        return 0
    c = ckpt.config
    print(f"{path} ({ckpt.layout} layout)")
    print("\n".join(_describe(c)))
    print(f"  weights: {weights.name}, {params / 1e6:.1f}M parameters, every tensor the config implies, readable")
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
    if flops.kv_cache_dense_bytes:
        print("  " + _kv_line(flops.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
