"""Generation end to end on a GPU: the compressed model against what users would run instead, same weights.

    python benchmarks/gpu_generate.py --out benchmarks/results
    python benchmarks/gpu_generate.py --shapes mamba2-2.7b mamba2-1.3b --new-tokens 128 --tag _mamba2
    python benchmarks/gpu_generate.py --smoke --out /tmp/smoke      # the script itself on a CPU, tiny shapes

Random-weight bf16 models shaped like mamba-1.4b (d_model 2048, 48 layers) and mamba-130m (768, 24), or
state-spaces' mamba2-1.3b (2048, 48) and mamba2-2.7b (2560, 64) (gpu_prefill.SHAPES), vocab 50280; prompts of
2048, 8192 and 32768 random tokens, batch 1 and 8, 128 and 1024 greedy new tokens. Rows
(simba_compress.bench, which times every implementation the same way: the median of generate(1 new token) is
the first-token latency, of generate(K) the total, decode per token = (total - first) / (K - 1)):
  mamba_ssm      MambaLMHeadModel.generate(cg=True): its CUDA-graph decode
  transformers   MambaForCausalLM / Mamba2ForCausalLM.generate (its fast path with mamba_ssm and causal_conv1d where
                 installed); K = 128 and prompts up to 8192 only, one timed run: its decode is not graph-captured
                 (~50 ms a token)
  dense          this project, the same weights unpruned
  simba          this project at --flops (0.6), the CLI's default output: the fast form (a staircase of 1, 3/4, 1/2 ... 1/16;
                 here its linear variant, calibration picks among staircases that run alike)
  staircase      the exact schedule with counts rounded to 2048-token multiples (the earlier GPU recipe)
  dense_triton_step  our dense model decoding through the project's fused Triton step kernels
                 (SIMBA_COMPRESS_STEP=triton, what runs without mamba_ssm) instead of mamba_ssm's and
                 causal_conv1d's update kernels (the default where installed): target cases only
  dense_triton   our dense model through the project's own kernels alone (scan and step "triton": the prefill
                 through its Triton scan / SSD too), what a machine without mamba_ssm runs: target cases only
Cases run shape by shape in --shapes order, each shape's target cases first (TARGETS: mamba-1.4b, issue 12;
mamba2-2.7b, issue 21), until --max-seconds; rows are written after every case. --profile adds where the time goes for the target case (torch.profiler, one generate call) and the
eager decode (no CUDA graph) after a dense and after a pruned prefill. --block causal_conv1d hides that package
(a second run measures everything without it).
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import re
import sys
import time
from pathlib import Path


def block(names: list[str]) -> None:
    """Make `names` unimportable in this process (as if not installed), before anything imports them."""

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in names:
                raise ImportError(f"{fullname} blocked by --block")
            return None

    sys.meta_path.insert(0, Blocker())


if "--block" in sys.argv:
    block(sys.argv[sys.argv.index("--block") + 1].split(","))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu_prefill  # noqa: E402
from gpu_prefill import DEFAULT_SEQ_LEN, SHAPES, SMOKE_SHAPES, free_memory, profile_table, random_lm, versions  # noqa: E402

from simba_compress.bench import BenchConfig, BenchRow, generate_with, implementations, schedule, table, time_generation  # noqa: E402
from simba_compress.flops import count  # noqa: E402
from simba_compress.schedules import linear_for_flops  # noqa: E402
from simba_compress.settings import LinearSchedule  # noqa: E402

# vs mamba_ssm's generate(cg=True) at 8192 + 128 tokens, batch 1 and 8: issue 12 on the mamba-1.4b shape, issue 21 on
# mamba2-2.7b (the default output's total, first token and decode per token; our dense first token)
TARGETS = {
    "mamba-1.4b": {"total": 0.85, "first": 0.7, "decode": 1.1, "dense_first": 1.0},
    "mamba2-2.7b": {"total": 0.85, "first": 0.7, "decode": 1.0},
}
TARGET_CASES = [(8192, 1, 128), (8192, 8, 128)]  # (prompt, batch, new tokens)
TARGET_ONLY = ("dense_triton_step", "dense_triton")  # rows measured in the target cases only


def cases(args) -> list[tuple[str, int, int, int]]:
    """(shape, prompt, batch, new tokens): shape by shape in --shapes order, each shape's target cases first."""
    out = []
    for shape in args.shapes:
        rest = [(shape, p, b, k) for k in args.new_tokens for p in args.prompts for b in args.batches]
        first = [(shape, *c) for c in TARGET_CASES] if shape in TARGETS else []
        out += [c for c in first if c in rest] + [c for c in rest if c not in first]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", nargs="+", default=["mamba-1.4b", "mamba-130m"], choices=list(SHAPES) + list(SMOKE_SHAPES))
    ap.add_argument("--prompts", nargs="+", type=int, default=[2048, 8192, 32768])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", nargs="+", type=int, default=[128, 1024])
    ap.add_argument("--flops", type=float, default=0.6)
    ap.add_argument("--impls", nargs="+", default=["mamba_ssm", "transformers", "dense", "simba", "staircase",
                                                  "dense_triton_step", "dense_triton"])  # fmt: skip
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--block", default="", help="comma-separated packages to hide (e.g. causal_conv1d)")
    ap.add_argument("--tag", default="", help="suffix of the output files (gpu_generate{tag}.json/.md)")
    ap.add_argument("--smoke", action="store_true", help="the script on a CPU: tiny shapes and prompts, one rep")
    ap.add_argument("--rebuild", help="write the outputs from the rows this script printed to a log, measuring nothing")
    args = ap.parse_args()
    if args.rebuild:
        return rebuild(Path(args.rebuild), Path(args.out))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda"
    if args.smoke:  # every code path of the script (twins where they import) on tiny shapes
        device = gpu_prefill.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
        args.shapes = list(dict.fromkeys(f"smoke-{gpu_prefill.shape_of(s)[2]}" for s in args.shapes))  # same kinds, tiny
        args.prompts, args.batches, args.new_tokens, args.reps = [200], [1, 2], [4], 1
    meta = {"versions": versions(), "command": "python " + " ".join(sys.argv), "blocked": args.block or None}
    print(json.dumps(meta), flush=True)
    rows: list[dict] = []
    notes: list[str] = []
    t0 = time.time()
    model, shape = None, None
    for name, prompt, batch, k in cases(args):
        if time.time() - t0 > args.max_seconds:
            notes.append(f"- {name} prompt {prompt} batch {batch} new {k}: skipped, past --max-seconds")
            continue
        if shape != name:
            model = None
            free_memory()
            model, shape = random_lm(name), name
            twins = tuple(t for t in ("mamba_ssm", "transformers") if t in args.impls)
            impls = implementations(model, twins)  # twins hold their own copies of the weights
        fast = linear_for_flops(model.config, LinearSchedule(flops=args.flops, seq_len=DEFAULT_SEQ_LEN))  # as the CLI fits it
        stairs = linear_for_flops(model.config, LinearSchedule(flops=args.flops, seq_len=prompt, form="exact",
                                                               granularity=2048 if prompt >= 8192 else prompt // 4))
        cfg = BenchConfig(prompt_len=prompt, new_tokens=k, batch=batch, reps=args.reps if prompt * batch <= 65536 else 1)
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(prompt))
        ids = ids.to(device)
        device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        target_case = (prompt, batch, k) in TARGET_CASES or args.smoke
        for impl in args.impls:
            if impl == "transformers" and (k > 128 or prompt > 8192):  # its decode alone takes minutes there
                continue
            run, weights, simba, impl_cfg = None, model, None, cfg
            if impl in ("simba", "staircase"):
                simba = fast if impl == "simba" else stairs
                run = generate_with(model, simba)
            elif impl in TARGET_ONLY and target_case:
                run = _with_backends(model, step="triton") if impl == "dense_triton_step" else \
                    _with_backends(model, step="triton", scan="triton")  # fmt: skip
            elif impl in impls:
                run, weights = impls[impl]
                if impl == "transformers":  # one timed run (after two warm-ups): its eager decode is slow
                    impl_cfg = BenchConfig(prompt_len=prompt, new_tokens=k, batch=batch, reps=1)
            if run is None:
                continue
            try:
                t = time_generation(run, ids, impl_cfg, weights)
            except torch.cuda.OutOfMemoryError as e:
                rows.append({"model": name, "impl": impl, "batch": batch, "prompt_len": prompt, "new_tokens": k,
                             "error": f"OOM ({str(e)[:60]})"})  # fmt: skip
                free_memory()
                continue
            row = BenchRow(impl, round(count(model.config, simba, prompt).ratio, 4), batch, prompt, k,
                           round(t["first_token_ms"], 3), round(t["decode_ms_per_token"], 4), round(t["total_ms"], 3),
                           None if t["peak_mem_gb"] is None else round(t["peak_mem_gb"], 3), device_name).to_dict()  # fmt: skip
            row["model"] = name
            if simba is not None:
                row["keep"] = simba.keep
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(out, args.tag, meta, rows, notes)
        if args.profile and device == "cuda" and (name, prompt, batch, k) in (("mamba-1.4b", 8192, 1, 128), ("mamba2-2.7b", 8192, 1, 128)):
            notes += profile_notes(model, ids, fast)
        del ids
    notes += check_targets(rows)
    notes.append(f"Total benchmark time {time.time() - t0:.0f} s.")
    write(out, args.tag, meta, rows, notes)
    print("\n".join(notes))


def _with_backends(model, **changes):
    """Dense generate with model.backends changed (Backends.replace(**changes)) for the call."""
    dense = generate_with(model, None)

    def run(ids, n):
        backends, model.backends = model.backends, model.backends.replace(**changes)
        try:
            return dense(ids, n)
        finally:
            model.backends = backends

    return run


def profile_notes(model, ids, simba) -> list[str]:
    """Where the time of the target case goes: one generate call of the pruned model under torch.profiler, and
    the decode per token without the CUDA graph after a dense and after a pruned prefill (the issue's question:
    why the pruned model decoded slower than the dense one)."""
    notes = ["", f"### Where the time goes ({model.config.layer}, 1 x 8192, 128 new tokens, simba)", ""]
    with schedule(model, simba):
        notes += ["```", profile_table(lambda: model.generate(ids, max_new_tokens=128)), "```", ""]
    for label, s in (("dense", None), ("simba", simba)):
        eager = generate_with(model, s, cuda_graph=False)
        t = time_generation(eager, ids, BenchConfig(prompt_len=ids.shape[1], new_tokens=64, reps=2), model)
        notes.append(f"- eager decode (no CUDA graph) after a {label} prefill: {t['decode_ms_per_token']:.2f} ms/token")
    return notes


def check_targets(rows: list[dict]) -> list[str]:
    """The targets (TARGETS) of each measured shape at 8192 + 128 tokens, batch 1 and 8, vs mamba_ssm's generate."""
    notes = []
    for shape, bars in TARGETS.items():
        if not any(r["model"] == shape for r in rows):
            continue
        for prompt, batch, k in TARGET_CASES:
            pick = {r["impl"]: r for r in rows if "error" not in r and (r["model"], r["prompt_len"], r["batch"], r["new_tokens"]) == (shape, prompt, batch, k)}
            ref, simba, dense = pick.get("mamba_ssm"), pick.get("simba"), pick.get("dense")
            if ref is None or simba is None or dense is None:
                notes.append(f"- {shape} batch {batch}: target case not measured")
                continue
            ratios = {"total": ("simba total", simba["total_ms"] / ref["total_ms"]),
                      "first": ("simba first token", simba["first_token_ms"] / ref["first_token_ms"]),
                      "decode": ("simba decode per token", simba["decode_ms_per_token"] / ref["decode_ms_per_token"]),
                      "dense_first": ("dense first token", dense["first_token_ms"] / ref["first_token_ms"])}  # fmt: skip
            for key, bar in bars.items():
                what, ratio = ratios[key]
                notes.append(f"- {shape} batch {batch}: {what} {ratio:.2f}x of mamba_ssm's generate(cg=True) "
                             f"({'met' if ratio <= bar else 'MISSED'}: at most {bar}x)")  # fmt: skip
    return notes


def rebuild(log: Path, out: Path) -> None:
    """The JSON and markdown of every run in `log` (a meta line, then one JSON row per case, as printed), for runs
    whose files did not come back from the GPU machine; the targets are checked again, the profile is not redone."""
    runs: list[tuple[dict, list[dict], list[str]]] = []
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"versions"' in line and '"command": "python benchmarks/gpu_generate.py' in line:
            runs.append((json.loads(line), [], []))
        elif runs and line.startswith('{"impl"'):
            runs[-1][1].append(json.loads(line))
        elif runs and re.match(r"\w*Error: ", line):
            runs[-1][2].append(f"- the run stopped after these rows: {line.strip()}")
    out.mkdir(parents=True, exist_ok=True)
    for meta, rows, errors in runs:
        tag = re.search(r"--tag (\S+)", meta["command"])
        notes = check_targets(rows) + errors + [f"- written by `--rebuild {log}` from the rows the run printed (its own "
                                                 "files did not come back from the GPU machine)."]
        write(out, tag.group(1) if tag else "", meta, rows, notes)


def write(out: Path, tag: str, meta: dict, rows: list[dict], notes: list[str]) -> None:
    (out / f"gpu_generate{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    v = meta["versions"]
    lines = ["# Generation on a GPU: compressed vs dense vs mamba_ssm's generate(cg=True) vs transformers", "",
             f"Device: {v['device']}. Versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if k != "device")
             + (f". Blocked (as if not installed): {meta['blocked']}" if meta["blocked"] else ""), "",
             f"Command: `{meta['command']}`", "",
             "Random-weight bf16 models, the same weights in every row of a shape; greedy decoding of random prompts. "
             "first token = median time of generate(1 new token); total = of generate(K); decode per token = "
             "(total - first) / (K - 1); vs dense = our dense total / total. Peak: memory allocated at the peak of "
             "the K-token runs above what was allocated before them, plus the implementation's weights.", ""]  # fmt: skip
    for name in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {name}", ""]
        ok = [BenchRow(**{k: r[k] for k in BenchRow.__dataclass_fields__}) for r in rows if r["model"] == name and "error" not in r]
        lines.append(table(ok))
        lines += [f"- {r['impl']} batch {r['batch']} prompt {r['prompt_len']} new {r['new_tokens']}: {r['error']}"
                  for r in rows if r["model"] == name and "error" in r]  # fmt: skip
    lines += ["## Targets (issue 12: mamba-1.4b; issue 21: mamba2-2.7b) and notes", ""] + notes
    (out / f"gpu_generate{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
