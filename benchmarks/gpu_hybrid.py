"""Hybrid SSM-attention models on a GPU: prefill, decode per token, total, peak memory and KV cache of the default
compressed output (F = 0.6) against the same weights dense, mamba_ssm's prefill, and transformers' generate.

    python benchmarks/gpu_hybrid.py --out $OUT                 # on the GPU: one call, < 10 minutes, 2 files in $OUT
    python benchmarks/gpu_hybrid.py --smoke --out /tmp/smoke   # tiny shapes on the CPU (tests/test_hybrid.py runs it)

Shapes (random bf16 weights, mamba_ssm's initialisation ranges; the same weights in every row of a shape):
  mamba2attn-2.7b     state-spaces/mamba2attn-2.7b's config: d_model 2560, 64 layers of Mamba-2 (d_state 128,
                      head dim 64), attention at 9, 18, 27, 36, 45, 56 (30 heads of 128, no GQA, a conv of 4 over qkv,
                      RoPE on 64 dims), vocab 50277 padded to 50288, no MLP
  granite-4.0-h-micro GraniteMoeHybridConfig as ibm-granite/granite-4.0-h-micro's config.json gives it (as published
                      configs quote it; not checked against the hub here, which this project cannot reach):
                      hidden 2048, 40 layers, attention at 5, 15, 25, 35 (32 heads of 64, 8 kv heads, NoPE), Mamba-2
                      (64 heads of 64, d_state 128, 1 group), a dense shared MLP of 8192 after every mixer, no experts,
                      its multipliers (embedding 12, residual 0.22, attention 1/64, logits 8), vocab 100352
Rows, per shape, prompt length (8192 to 65536) and batch (1, 8), 128 greedy new tokens:
  dense / simba     this project's generate, the weights dense and as the CLI's default output at --flops 0.6 (the
                    fast form, fitted at --seq-len 1024; its linear variant: calibration picks among the same
                    staircases): first token (prefill + its sample), decode per token, total (generation.generate's
                    own timings, median of --reps after a warm-up that captures the decode graph), prefill alone
                    (the forward generate runs, CUDA events), peak memory over the timed runs (weights included),
                    the KV cache the prefill leaves (analytic, bf16) and the decoder's KV buffers (allocated)
  *_matmul          the same with the decode step's attention as two batched matmuls (Backends.attention_decode)
                    instead of SDPA's masked kernel, in the target cases: which is faster is measured, not assumed
  mamba_ssm         mamba2attn shape only: MambaLMHeadModel's prefill (num_last_tokens=1). Its decode is not timed:
                    mamba_ssm's MHA decodes through flash_attn's kv-cache kernel, and flash_attn is not installed
                    on the GPU machine; without it mamba_ssm falls back to SDPA with is_causal=True for one query,
                    which attends the first cached key only (and with d_conv it keeps the conv's outputs as conv
                    state): wrong tokens (benchmarks/results/cpu/check_mamba_ssm_hybrid.md)
  transformers      granite shape only, prompts up to 8192 at batch 1: GraniteMoeHybridForCausalLM.generate
                    (its decode is not graph-captured: tens of ms a token)
Cases run in order of priority (the issue's targets first) until --max-seconds; the files are rewritten after each.
Targets (issue 22, mamba2attn-2.7b shape, default output at 0.6): prefill at least 1.7x our dense at 32768 tokens;
at 8 x 32768 + 128 new tokens decode per token at most 0.8x and total at most 0.7x of our dense.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env  # noqa: E402  (benchmarks/env.py)

from simba_compress import MambaLM, ModelConfig  # noqa: E402
from simba_compress.backends import Backends  # noqa: E402
from simba_compress.bench import BenchConfig, mamba_ssm_twin, median_ms, time_generation, transformers_twin  # noqa: E402
from simba_compress.flops import count, kv_cache_bytes  # noqa: E402
from simba_compress.generation import GenerationConfig, generate  # noqa: E402
from simba_compress.layers import KVState  # noqa: E402
from simba_compress.schedules import linear_for_flops  # noqa: E402
from simba_compress.settings import LinearSchedule  # noqa: E402

DEFAULT_SEQ_LEN = 1024  # where `simba-compress --flops F` fits its schedule
SHAPES = {
    "mamba2attn-2.7b": dict(d_model=2560, n_layer=64, vocab_size=50288, layer="mamba2", d_state=128, headdim=64,
                            attn_layers=[9, 18, 27, 36, 45, 56], attn_heads=30, attn_kv_heads=30, attn_head_dim=128,
                            attn_conv=4, rotary_dim=64, arch="mamba_ssm"),
    "granite-4.0-h-micro": dict(d_model=2048, n_layer=40, vocab_size=100352, layer="mamba2", d_state=128, headdim=64,
                                norm_eps=1e-5, residual_in_fp32=False, attn_layers=[5, 15, 25, 35], attn_heads=32,
                                attn_kv_heads=8, attn_head_dim=64, attn_scale=0.015625, d_intermediate=8192,
                                block_mlp=True, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0,
                                arch="granitemoehybrid"),
}  # fmt: skip
SMOKE = {  # the same structure, tiny, for the CPU
    "mamba2attn-2.7b": dict(SHAPES["mamba2attn-2.7b"], d_model=64, n_layer=8, vocab_size=256, d_state=16, headdim=16,
                            attn_layers=[2, 5], attn_heads=2, attn_kv_heads=2, attn_head_dim=32, rotary_dim=16),
    "granite-4.0-h-micro": dict(SHAPES["granite-4.0-h-micro"], d_model=64, n_layer=8, vocab_size=256, d_state=16,
                                headdim=16, attn_layers=[2, 6], attn_heads=4, attn_kv_heads=2, attn_head_dim=16,
                                d_intermediate=128),
}  # fmt: skip
TARGETS = {"prefill_speedup": 1.7, "decode": 0.8, "total": 0.7}
NEW_TOKENS = 128


def random_model(kw: dict, device: torch.device, dtype: torch.dtype) -> MambaLM:
    """Random weights in mamba_ssm's initialisation ranges (A = -(1..heads), dt in [1e-3, 0.1], matrices N(0, 0.02))."""
    torch.manual_seed(0)
    cfg = ModelConfig(**kw)
    with torch.device(device):
        m = MambaLM(cfg, backends=Backends())
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
        for block in m.backbone.layers:
            mix = block.mixer
            if hasattr(mix, "A_log"):
                mix.A_log.copy_(torch.log(torch.arange(1, mix.nheads + 1, device=device, dtype=torch.float32)))
                dt = torch.exp(torch.rand(mix.nheads, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                mix.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    return m.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decoder_kv_gb(model: MambaLM) -> float:
    """GB of the KV-cache buffers the model's decoders hold (what generate allocated)."""
    caches = model._graphs
    if caches is None:
        return 0.0
    total = sum(st.k.numel() * st.k.element_size() * 2 for dec in caches.decoders.values() for st in dec.states
                if isinstance(st, KVState))  # fmt: skip
    return total / 2**30


def ours(model: MambaLM, simba, ids: torch.Tensor, reps: int, decode: str) -> dict:
    """generate's own timings (first token, decode per token, total), the prefill alone, peak memory, the KV cache."""
    device = ids.device
    old, old_backends = model.simba, model.backends
    model.simba, model.backends = simba, model.backends.replace(attention_decode=decode)
    model._graphs = None  # every row captures its own decode graph and KV buffers
    free_memory()
    try:
        cfg = GenerationConfig(max_new_tokens=NEW_TOKENS)
        generate(model, ids, None, cfg)  # warm-up: compiles, captures the decode graph, allocates the KV buffers
        sync(device)
        if device.type == "cuda":
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        runs = [generate(model, ids, None, cfg) for _ in range(reps)]
        peak = None
        if device.type == "cuda":
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            peak = (torch.cuda.max_memory_allocated() - before + weights) / 2**30
        first = statistics.median(r.first_token_seconds for r in runs) * 1e3
        decode_ms = statistics.median(r.decode_seconds / (r.new_tokens - 1) for r in runs) * 1e3
        kv_buffers = decoder_kv_gb(model)
        model._graphs = None
        free_memory()
        with torch.no_grad():
            prefill = median_ms(lambda: model(ids, return_states=True, last_logits=1), device, reps)
    finally:
        model.simba, model.backends = old, old_backends
    report = count(model.config, simba, ids.shape[1])
    return {"prefill_ms": round(prefill, 2), "first_token_ms": round(first, 2), "decode_ms_per_token": round(decode_ms, 3),
            "total_ms": round(first + decode_ms * (NEW_TOKENS - 1), 2), "peak_mem_gb": None if peak is None else round(peak, 3),
            "kv_cache_gb": round(kv_cache_bytes(model.config, report.tokens) * ids.shape[0] / 2**30, 4),
            "kv_buffers_gb": round(kv_buffers, 4), "flops": round(report.ratio, 4)}  # fmt: skip


def cases(args) -> list[tuple[str, int, int]]:
    first = [("mamba2attn-2.7b", 32768, 1), ("mamba2attn-2.7b", 32768, 8)]
    rest = [(s, p, b) for s in args.shapes for p in args.prompts for b in args.batches]
    return [c for c in first if c in rest] + [c for c in rest if c not in first]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--prompts", nargs="+", type=int, default=[8192, 16384, 32768, 65536])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--impls", nargs="+", default=["dense", "simba", "dense_matmul", "simba_matmul", "mamba_ssm", "transformers"])
    ap.add_argument("--flops", type=float, default=0.6)
    ap.add_argument("--reps", type=int, default=3, help="timed runs of the cases up to 65536 tokens in all (1 above)")
    ap.add_argument("--max-seconds", type=float, default=480.0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, short prompts, on the CPU")
    args = ap.parse_args()
    global NEW_TOKENS
    shapes = SMOKE if args.smoke else SHAPES
    if args.smoke:
        args.prompts, args.batches, NEW_TOKENS, args.reps = [48], [2], 4, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "versions": env.versions("torch", "triton", "mamba_ssm", "causal_conv1d", "transformers", "flash_attn"),
            "dtype": str(dtype).replace("torch.", ""), "new_tokens": NEW_TOKENS, "flops": args.flops}  # fmt: skip
    print(json.dumps(meta), flush=True)
    rows: list[dict] = []
    notes: list[str] = []
    t0 = time.time()
    model = name = twin = hf = None
    for shape, prompt, batch in cases(args):
        if time.time() - t0 > args.max_seconds:
            notes.append(f"- {shape} {batch} x {prompt}: not measured (past --max-seconds {args.max_seconds:.0f})")
            continue
        if name != shape:
            model = twin = hf = None
            free_memory()
            model, name = random_model(shapes[shape], device, dtype), shape
            simba = linear_for_flops(model.config, LinearSchedule(flops=args.flops, seq_len=DEFAULT_SEQ_LEN))  # as the CLI
            notes.append(f"- {shape}: the default output at {args.flops}: keep {simba.keep}")
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(prompt)).to(device)
        reps = args.reps if batch * prompt <= 65536 else 1
        base = {"model": shape, "batch": batch, "prompt_len": prompt, "new_tokens": NEW_TOKENS}
        target = (shape, prompt, batch) in (("mamba2attn-2.7b", 32768, 1), ("mamba2attn-2.7b", 32768, 8)) or args.smoke
        for impl in args.impls:
            if impl.endswith("_matmul") and not target:
                continue
            try:
                if impl in ("dense", "simba", "dense_matmul", "simba_matmul"):
                    s = simba if impl.startswith("simba") else None
                    row = ours(model, s, ids, reps, "matmul" if impl.endswith("_matmul") else "sdpa")
                elif impl == "mamba_ssm" and model.config.arch == "mamba_ssm" and device.type == "cuda":
                    twin = twin or mamba_ssm_twin(model)
                    if twin is None:
                        continue
                    with torch.no_grad():
                        ms = median_ms(lambda: twin(ids, num_last_tokens=1), device, reps)
                    row = {"prefill_ms": round(ms, 2), "flops": 1.0,
                           "note": "prefill only: its decode needs flash_attn (absent)"}  # fmt: skip
                elif impl == "transformers" and model.config.arch == "granitemoehybrid" and prompt <= 8192 and (batch == 1 or args.smoke):
                    hf = hf or transformers_twin(model)
                    if hf is None:
                        continue
                    t = time_generation(lambda x, n: hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False),
                                        ids, BenchConfig(prompt_len=prompt, new_tokens=NEW_TOKENS, batch=batch, reps=1), hf)
                    row = {k: round(v, 3) if v is not None else None for k, v in t.items()} | {"flops": 1.0}
                else:
                    continue
            except torch.cuda.OutOfMemoryError as e:
                row = {"error": f"OOM ({str(e)[:80]})"}
                free_memory()
            row = {**base, "impl": impl, **row}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(out, args.tag, meta, rows, notes + check_targets(rows))
    notes.append(f"- total benchmark time {time.time() - t0:.0f} s")
    write(out, args.tag, meta, rows, notes + check_targets(rows))
    print("\n".join(check_targets(rows)))


def check_targets(rows: list[dict]) -> list[str]:
    pick = {(r["impl"], r["batch"], r["prompt_len"]): r for r in rows if r["model"] == "mamba2attn-2.7b" and "error" not in r}
    notes = []
    for batch in (1, 8):
        d, s = pick.get(("dense", batch, 32768)), pick.get(("simba", batch, 32768))
        if d and s:
            x = d["prefill_ms"] / s["prefill_ms"]
            notes.append(f"- mamba2attn-2.7b {batch} x 32768: prefill {x:.2f}x our dense "
                         f"({'met' if x >= TARGETS['prefill_speedup'] else 'MISSED'}: at least {TARGETS['prefill_speedup']}x)")
    for variant in ("", "_matmul"):
        d, s = pick.get((f"dense{variant}", 8, 32768)), pick.get((f"simba{variant}", 8, 32768))
        if d and s:
            dec, tot = s["decode_ms_per_token"] / d["decode_ms_per_token"], s["total_ms"] / d["total_ms"]
            notes.append(f"- mamba2attn-2.7b 8 x 32768 + {NEW_TOKENS}{' (matmul decode)' if variant else ''}: decode per "
                         f"token {dec:.2f}x ({'met' if dec <= TARGETS['decode'] else 'MISSED'}: at most {TARGETS['decode']}x), "
                         f"total {tot:.2f}x ({'met' if tot <= TARGETS['total'] else 'MISSED'}: at most {TARGETS['total']}x) "
                         f"of our dense; KV cache {s['kv_cache_gb']:.2f} GB against {d['kv_cache_gb']:.2f} GB")
    return notes or ["- target cases not measured"]


def write(out: Path, tag: str, meta: dict, rows: list[dict], notes: list[str]) -> None:
    (out / f"gpu_hybrid{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows, "notes": notes}, indent=1) + "\n")
    lines = ["# Hybrid SSM-attention models on a GPU (benchmarks/gpu_hybrid.py)", "",
             f"Device: {meta['device']}, {meta['dtype']}. Versions: {meta['versions']}.", "",
             f"Command: `{meta['command']}`", "",
             f"{meta['new_tokens']} greedy new tokens. prefill: the forward generate runs (CUDA events); first token, "
             "decode per token and total: generate's own timings; peak: over the timed generate runs, weights included; "
             "KV cache: what the prefill leaves (analytic, bf16), KV buffers: the decoder's allocation (kept tokens + "
             "new tokens, rounded up to 256). vs dense: our dense / this row, same case.", ""]  # fmt: skip
    cols = ("prefill_ms", "first_token_ms", "decode_ms_per_token", "total_ms", "peak_mem_gb", "kv_cache_gb", "kv_buffers_gb")
    for shape in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {shape}", "", "| impl | batch | prompt | FLOPs | " + " | ".join(cols) + " | prefill vs dense | total vs dense |",
                  "|---|---:|---:|---:|" + "---:|" * (len(cols) + 2)]  # fmt: skip
        for r in rows:
            if r["model"] != shape:
                continue
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['batch']} | {r['prompt_len']} | {r['error']} |")
                continue
            d = next((x for x in rows if x["model"] == shape and x["impl"] == "dense" and x["batch"] == r["batch"]
                      and x["prompt_len"] == r["prompt_len"] and "error" not in x), None)  # fmt: skip
            vs = [f"{d[c] / r[c]:.2f}x" if d and r.get(c) else "" for c in ("prefill_ms", "total_ms")]
            lines.append(f"| {r['impl']} | {r['batch']} | {r['prompt_len']} | {r.get('flops', '')} | "
                         + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + f" | {vs[0]} | {vs[1]} |")
        lines.append("")
    lines += ["## Targets (issue 22) and notes", ""] + notes
    (out / f"gpu_hybrid{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
