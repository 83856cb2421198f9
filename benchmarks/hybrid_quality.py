"""Quality of pruning a pretrained hybrid (Mamba-2 + attention): the headline metric and passkey retrieval, for the
dense model, Simba's default output, truncation, and SnapKV-style selection at the same FLOPs (issue 22, item 6).

    python benchmarks/hybrid_quality.py --corpus ../shared/corpus --out benchmarks/results [--stages ...]

The model is hybrid-proxy-d320-l16 (benchmarks/proxies.py; --model overrides); the passkey stage needs the proxy
fine-tuned to retrieve, --passkey-model (benchmarks/passkey_proxy.py --base <the hybrid proxy>, the same recipe as
the Mamba-1 passkey proxy). Stages, each writing hybrid_quality.{json,md} to --out when it ends (a rerun with the
same --out skips the rows it has):

  choose    which score an attention layer that prunes ranks by (SimbaConfig.attention_score): the Simba score of
            the Mamba layer below it, carried up ("carry"), or its own attention's, SnapKV's ("snapkv"), measured on
            TRAINING text (the headline protocol on --choose-windows windows of train.txt.xz), never the evaluation
            text, on the step schedule (below), whose one pruning is at the first attention layer: the fast form's
            staircase may step down at Mamba layers only (it does on the proxy at 0.6), where the choice changes
            nothing; the better one is the schedules' choice in the stages below. Both scores run on the same windows,
            so the choice rests on the paired difference and its standard error over windows
  headline  mean loss on the last 128 tokens (protected) of --windows windows of valid.txt.xz at T = 1024 and 4096,
            and beside it the all-position loss with only the last position protected (../shared/DESIGN.md: a stress figure,
            a pruned position is predicted from the layer that dropped it; truncation has none)
  passkey   teacher-forced exact match of a passkey at prompt lengths --passkey-lengths and needle depths 0.1-0.9
            (--per-depth samples each), haystacks of valid.txt.xz: benchmarks/long_context.py's protocol

Methods, at each --flops F (the backbone FLOP ratio, scores included):
  dense             the model as it is
  truncate          the dense model on the most recent tokens, as many as F's FLOPs pay for (attention's cost
                    grows faster than the token count, so a little more than F x T)
  simba             the CLI's default output (fast form; --trials N > 0: the calibrated search of the CLI, KL on
                    --calib-windows windows of train.txt.xz; 0: the linear variant), attention_score as chosen
  simba-linear      with --trials N > 0: the linear fast-form schedule as well
  simba-<other>     the same schedule with the other attention_score, where the schedule prunes at an attention
                    layer (elsewhere the two are the same model)
  snapkv            SnapKV-style selection: every layer up to the first attention layer dense, then one keep ratio
                    meeting F; the tokens the upper layers keep are those the first attention layer's last queries
                    attend to most (criterion "snapkv": SNAPKV_WINDOW = 32 queries or the protected tail, max-pooled
                    over 5 neighbours, max over heads); unlike SnapKV in a transformer, the dropped tokens skip the
                    upper layers' prefill too
  simba-step        the same step schedule with Simba's score, carried from the Mamba layer below to the attention
                    layer that prunes (and simba-step-snapkv: Simba's criterion with attention_score "snapkv", the
                    attention layer's own score there): the two scores on one schedule
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env  # noqa: E402  (benchmarks/env.py)
import proxies  # noqa: E402

from simba_compress import SimbaConfig, load, load_tokenizer  # noqa: E402
from simba_compress.data import load_windows, read_documents, tokenize  # noqa: E402
from simba_compress.errors import SimbaError  # noqa: E402
from simba_compress.evaluate import evaluate, evaluate_truncated  # noqa: E402
from simba_compress.flops import count  # noqa: E402
from simba_compress.passkey import PasskeyTask, evaluate_passkey  # noqa: E402
from simba_compress.schedules import fit_flops, linear_for_flops  # noqa: E402
from simba_compress.settings import CalibratedSchedule, LinearSchedule, PruningSettings  # noqa: E402

STAGES = ("choose", "headline", "passkey")
DEPTHS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
PROTECT = 128


def step_schedule(model, flops: float, seq_len: int, criterion: str, protect: int) -> SimbaConfig:
    """Dense up to and including the first attention layer, one keep ratio above it, meeting `flops` at seq_len."""
    first = model.config.attn_layers[0]
    n = model.config.n_layer

    def make(r: float) -> SimbaConfig:
        return SimbaConfig([1.0] * (first + 1) + [r] * (n - first - 1), criterion, protect)

    s = fit_flops(model.config, make, flops, seq_len)
    if abs(count(model.config, s, seq_len).ratio - flops) > 0.01:
        raise SimbaError(f"the step schedule reaches {count(model.config, s, seq_len).ratio:.3f}, not {flops}")
    return s


def prunes_at_attention(model, simba: SimbaConfig) -> bool:
    """Whether some attention layer ranks the tokens for a next layer that keeps fewer (where attention_score
    matters)."""
    return any(a + 1 < len(simba.keep) and simba.keep[a + 1] < simba.keep[a] for a in model.config.attn_layers)


def schedules(model, flops: float, attention_score: str, calibrated: SimbaConfig | None, seq_len: int) -> dict[str, SimbaConfig]:
    other = "snapkv" if attention_score == "carry" else "carry"
    linear = linear_for_flops(model.config, LinearSchedule(flops=flops, protect_last=PROTECT, attention_score=attention_score))
    simba = calibrated or linear
    step = step_schedule(model, flops, seq_len, "simba", PROTECT)
    out = {"simba": simba}
    if calibrated is not None:
        out["simba-linear"] = linear
    if prunes_at_attention(model, simba):
        out[f"simba-{other}"] = replace(simba, attention_score=other)
    return out | {
        "snapkv": step_schedule(model, flops, seq_len, "snapkv", PROTECT),
        "simba-step": replace(step, attention_score="carry"),
        "simba-step-snapkv": replace(step, attention_score="snapkv"),
    }


def truncated_tokens(model, flops: float, seq_len: int) -> int:
    """The most recent tokens whose dense FLOPs are at most `flops` of the whole window's."""
    dense = count(model.config, None, seq_len).dense
    lo, hi = 1, seq_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(model.config, None, mid).dense <= flops * dense else (lo, mid - 1)
    return lo


def per_window_loss(model, windows: torch.Tensor, simba: SimbaConfig) -> torch.Tensor:
    """The headline loss of each window alone (a paired comparison of two schedules on the same windows)."""
    return torch.tensor([evaluate(model, w[None], PROTECT, 1, simba=simba, all_positions=False, progress=False).loss
                         for w in windows], dtype=torch.float64)  # fmt: skip


def calibrate_default(model, corpus: Path, tok, flops: float, trials: int, windows: int, attention_score: str) -> SimbaConfig:
    """The CLI's default search (calibrate.py: KL, fast form) on training text."""
    from simba_compress.calibrate import calibrate

    w = load_windows(str(corpus / "train.txt.xz"), tok, 1025, windows)
    simba, _ = calibrate(model, w, CalibratedSchedule(flops=flops, trials=trials, attention_score=attention_score),
                         progress=False)
    return simba


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, help="folder with train.txt.xz and valid.txt.xz")
    ap.add_argument("--model", help="the hybrid (default: hybrid-proxy-d320-l16 through benchmarks/proxies.py)")
    ap.add_argument("--passkey-model", help="the hybrid fine-tuned to retrieve (benchmarks/passkey_proxy.py)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--flops", type=float, nargs="+", default=[0.6])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--choose-windows", type=int, default=32)
    ap.add_argument("--trials", type=int, default=0, help="calibrated default schedule: Optuna trials (0: linear fast)")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--passkey-lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--per-depth", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    corpus, out = Path(args.corpus), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "hybrid_quality.json"
    state = json.loads(path.read_text()) if path.exists() else {"rows": [], "choice": None}
    state["meta"] = {"command": "python " + shlex.join(sys.argv), "device": torch.cuda.get_device_name()
                     if args.device.startswith("cuda") else f"CPU {platform.machine()}",
                     "versions": env.versions("torch", "triton", "mamba_ssm", "transformers")}  # fmt: skip
    have = {(r["stage"], r["method"], r.get("flops"), r.get("seq_len"), r.get("length")) for r in state["rows"]}
    model_path = Path(args.model) if args.model else proxies.require("hybrid-proxy-d320-l16")
    model = load(model_path, device=args.device)
    tok = load_tokenizer(model_path)
    t0 = time.time()

    def add(row: dict) -> None:
        state["rows"].append(row)
        print(json.dumps(row), flush=True)
        write(out, state)

    if "choose" in args.stages and state["choice"] is None:
        train = load_windows(str(corpus / "train.txt.xz"), tok, 1025, args.choose_windows)
        step = step_schedule(model, args.flops[0], 1024, "simba", PROTECT)
        losses = {score: per_window_loss(model, train, replace(step, attention_score=score)) for score in ("carry", "snapkv")}
        for score, x in losses.items():
            add({"stage": "choose", "method": f"simba-step ({score})", "flops": args.flops[0], "seq_len": 1024,
                 "loss": round(x.mean().item(), 4), "loss_se": round(x.std().item() / len(x) ** 0.5, 4),
                 "flop_ratio": round(count(model.config, replace(step, attention_score=score), 1024).ratio, 4),
                 "data": "train.txt.xz", "windows": len(x)})  # fmt: skip
        diff = losses["snapkv"] - losses["carry"]
        state["choice_diff"] = {"snapkv_minus_carry": round(diff.mean().item(), 4),
                                "se": round(diff.std().item() / len(diff) ** 0.5, 4), "windows": len(diff)}  # fmt: skip
        state["choice"] = "snapkv" if diff.mean() < 0 else "carry"
        write(out, state)
    choice = state["choice"] or PruningSettings.attention_score  # not chosen here: the project's default

    calibrated = {}
    for f in args.flops if args.trials else []:
        done = state.setdefault("calibrated", {}).get(str(f))  # a rerun with the same --out reuses the search
        if done is None:
            simba = calibrate_default(model, corpus, tok, f, args.trials, args.calib_windows, choice)
            state["calibrated"][str(f)] = done = simba.to_dict()
            write(out, state)
        calibrated[f] = SimbaConfig.from_dict(done)

    if "headline" in args.stages:
        for T in args.seq_lens:
            valid = load_windows(str(corpus / "valid.txt.xz"), tok, T + 1, args.windows)
            batch = max(1, min(args.batch_size, 8192 // T))
            if ("headline", "dense", 1.0, T, None) not in have:
                res = evaluate(model, valid, PROTECT, batch, simba=None, progress=False)
                add({"stage": "headline", "method": "dense", "flops": 1.0, "seq_len": T, "loss": round(res.loss, 4),
                     "loss_se": round(res.loss_se, 4), "all_position_loss": round(res.all_position_loss, 4),
                     "flop_ratio": 1.0})  # fmt: skip
            for f in args.flops:
                if ("headline", "truncate", f, T, None) not in have:
                    kept = truncated_tokens(model, f, T)
                    res = evaluate_truncated(model, valid, kept / T, PROTECT, batch, progress=False)
                    ratio = count(model.config, None, kept).dense / count(model.config, None, T).dense
                    add({"stage": "headline", "method": "truncate", "flops": f, "seq_len": T, "loss": round(res.loss, 4),
                         "loss_se": round(res.loss_se, 4), "flop_ratio": round(ratio, 4), "kept_tokens": kept})
                for name, simba in schedules(model, f, choice, calibrated.get(f), T).items():
                    if ("headline", name, f, T, None) in have:
                        continue
                    # fitted with the scored tail protected; the all-position pass protects the last position only
                    res = evaluate(model, valid, PROTECT, batch, simba=replace(simba, protect_last=1), progress=False)
                    add({"stage": "headline", "method": name, "flops": f, "seq_len": T, "loss": round(res.loss, 4),
                         "loss_se": round(res.loss_se, 4), "all_position_loss": round(res.all_position_loss, 4),
                         "flop_ratio": round(res.flop_ratio, 4), "keep": [round(k, 4) for k in simba.keep],
                         "attention_score": simba.attention_score})  # fmt: skip

    if "passkey" in args.stages:
        if not args.passkey_model:
            state.setdefault("notes", []).append("passkey: no --passkey-model (build it with benchmarks/passkey_proxy.py)")
        else:
            pk = load(args.passkey_model, device=args.device)
            task = PasskeyTask(tok, tokenize(read_documents(str(corpus / "valid.txt.xz")), tok))
            for L in args.passkey_lengths:
                samples = task.samples(L, DEPTHS, args.per_depth, seed=0)
                runs = {"dense": dict()}
                for f in args.flops:
                    runs[f"truncate@{f}"] = dict(recent=max(max(x.tail for x in samples), round(f * L)))
                    for name, simba in schedules(pk, f, choice, calibrated.get(f), L).items():
                        runs[f"{name}@{f}"] = dict(simba=simba)
                for name, kw in runs.items():
                    method, _, f = name.partition("@")
                    if ("passkey", method, float(f) if f else 1.0, None, L) in have:
                        continue
                    res = evaluate_passkey(pk, samples, **kw)
                    by_depth = {str(d): sum(res.correct[i * args.per_depth : (i + 1) * args.per_depth]) / args.per_depth
                                for i, d in enumerate(DEPTHS)}  # fmt: skip
                    add({"stage": "passkey", "method": method, "flops": float(f) if f else 1.0, "length": L,
                         "accuracy": round(res.accuracy, 4), "key_kept": round(sum(res.key_kept) / len(res.key_kept), 4),
                         "flop_ratio": round(res.flop_ratio, 4), "by_depth": by_depth})
    state["meta"]["seconds"] = round(time.time() - t0, 1)
    write(out, state)


def write(out: Path, state: dict) -> None:
    (out / "hybrid_quality.json").write_text(json.dumps(state, indent=1) + "\n")
    m = state["meta"]
    lines = ["# Pruning a pretrained hybrid (benchmarks/hybrid_quality.py)", "",
             f"Device {m['device']}; versions {m['versions']}.", "", f"Command: `{m['command']}`", ""]  # fmt: skip
    rows = state["rows"]
    choose = [r for r in rows if r["stage"] == "choose"]
    if choose:
        lines += ["## The score at attention layers, chosen on training text", "",
                  "| schedule (attention layers rank by) | loss (last 128, train.txt.xz) | ± se | FLOP ratio |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['loss']:.4f} | {r.get('loss_se', float('nan')):.4f} | {r['flop_ratio']:.3f} |"
                  for r in choose]
        d = state.get("choice_diff")
        if d:
            lines += ["", f"Paired over the {d['windows']} windows: snapkv - carry = {d['snapkv_minus_carry']:+.4f} "
                      f"± {d['se']:.4f} (se)."]  # fmt: skip
        lines += ["", f"Chosen: **{state['choice']}**.", ""]
    head = [r for r in rows if r["stage"] == "headline"]
    if head:
        lines += ["## Headline: loss on the protected last 128 tokens (valid.txt.xz)", "",
                  "| method | F | T | loss | ± se | all positions | FLOP ratio | keep |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in head:
            keep = " ".join(f"{k:g}" for k in r.get("keep", [])) or (f"last {r['kept_tokens']} tokens" if "kept_tokens" in r else "")
            every = f"{r['all_position_loss']:.4f}" if r.get("all_position_loss") is not None else "n/a"
            lines.append(f"| {r['method']} | {r['flops']} | {r['seq_len']} | {r['loss']:.4f} | {r['loss_se']:.4f} | "
                         f"{every} | {r['flop_ratio']:.3f} | {keep} |")
        lines.append("")
    pk = [r for r in rows if r["stage"] == "passkey"]
    if pk:
        lengths = sorted({r["length"] for r in pk})
        lines += ["## Passkey exact match by prompt length (valid.txt.xz haystacks)", "",
                  "| method | F | " + " | ".join(str(L) for L in lengths) + " |", "|---|---:|" + "---:|" * len(lengths)]
        for method, f in dict.fromkeys((r["method"], r["flops"]) for r in pk):
            acc = {r["length"]: r["accuracy"] for r in pk if (r["method"], r["flops"]) == (method, f)}
            lines.append(f"| {method} | {f} | " + " | ".join(f"{acc[L]:.2f}" if L in acc else "" for L in lengths) + " |")
        lines.append("")
    lines += [f"- {n}" for n in state.get("notes", [])]
    (out / "hybrid_quality.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
