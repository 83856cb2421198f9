"""Wall-clock prefill on a GPU: dense vs Simba-pruned, same kernels, and transformers' MambaForCausalLM dense.

    python benchmarks/gpu_prefill.py --out benchmarks/results

Random-weight bf16 models shaped like mamba-130m (d_model 768, 24 layers) and mamba-1.4b (2048, 48), vocab
50280; batch 1 and 8, sequence 2048 and 8192. Prefill = forward(input_ids, last_logits=1), the call generate
needs (transformers: logits_to_keep=1, use_cache=False). Per case: median of --reps CUDA-event timings after
--warmup runs (the first runs compile the Triton kernels), tokens/s, peak torch.cuda.max_memory_allocated
(weights included), and the score's cost two ways: CUDA events around every score call in one extra run
(score_ms), and the same schedule with criterion "stride" (same kept counts, no score) as the baseline.

Schedules: knots(n_layer, [1.0], level) fitted to the FLOP ratio, i.e. the paper's linear schedule where it
reaches the budget (0.8, 0.6) and the same line clipped at the floor below it (0.4 is below what a linear
schedule reaches: about 0.5 of backbone FLOPs with the score counted). Each ratio runs twice: with exact
token counts (the paper's schedule: every layer prunes a little and scores its tokens), and as a staircase
(SimbaConfig.granularity: counts rounded to multiples of 2048 tokens at 8192, of a quarter of the prompt at
2048), where only a few layers score and every width is a whole number of mamba_ssm's scan chunks.
Every case runs once per scan kernel in --scans: "auto" (mamba_ssm's where installed) and "triton" (the
project's own scan, what runs without mamba_ssm; SIMBA_COMPRESS_SCAN=triton), each against its own dense
time. --scan-kernels first times the two scans alone on a mamba-1.4b layer (d_inner 4096, d_state 16) at
token counts a pruned layer sees (gpu_scan.json): mamba_ssm's kernel works in 2048-token chunks, the Triton
scan in tiles of a few steps.
Writes gpu_prefill.json (rows) and gpu_prefill.md after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simba_compress import MambaLM, ModelConfig, SimbaConfig  # noqa: E402
from simba_compress.flops import count  # noqa: E402
from simba_compress.schedules import fit_flops, knots  # noqa: E402
from simba_compress.ssm import kernels  # noqa: E402

SHAPES = {"mamba-1.4b": (2048, 48), "mamba-130m": (768, 24)}
VOCAB = 50280
TARGET_SPEEDUP, TARGET_SCORE_SHARE = 1.5, 0.05


def random_lm(d_model: int, n_layer: int) -> MambaLM:
    """A bf16 model on the GPU with mamba_ssm's initialisation ranges (A = -(1..n), dt in [1e-3, 0.1])."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB)
    with torch.device("cuda"):
        m = MambaLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("in_proj.weight", "x_proj.weight", "out_proj.weight", "embeddings.weight", "conv1d.weight")):
                p.normal_(0, 0.02)
            elif name.endswith("dt_proj.weight"):
                p.uniform_(-cfg.dt_rank**-0.5, cfg.dt_rank**-0.5)
        for block in m.backbone.layers:
            dt = torch.exp(torch.rand(cfg.d_inner, device="cuda") * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            block.mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    return m.to(torch.bfloat16).eval()


def hf_twin(m: MambaLM):
    """transformers' MambaForCausalLM with the same weights (same parameter names), or None if unavailable."""
    try:
        from transformers import MambaConfig, MambaForCausalLM

        from simba_compress.checkpoints import hf_config

        conf = MambaConfig(**{k: v for k, v in hf_config(m.config).items() if k != "architectures"})
        with torch.device("cuda"):
            hf = MambaForCausalLM(conf).to(torch.bfloat16).eval()
        missing, unexpected = hf.load_state_dict(m.state_dict(), strict=False)
        if missing or unexpected:
            print(f"  transformers twin: {len(missing)} missing, {len(unexpected)} unexpected keys (timing unaffected)")
        return hf
    except Exception as e:  # noqa: BLE001: the comparison is optional
        print(f"  transformers MambaForCausalLM unavailable: {e!r}")
        return None


def schedule(cfg: ModelConfig, flops: float, seq_len: int, granularity: int = 1) -> SimbaConfig:
    return fit_flops(cfg, lambda t: SimbaConfig(knots(cfg.n_layer, [1.0], 2 * t - 1), granularity=granularity), flops, seq_len)


def staircase_granularity(seq_len: int) -> int:
    """The staircase rows' granularity: mamba_ssm's scan chunk (2048 tokens) where the prompt holds four of
    them, else a quarter of the prompt."""
    return 2048 if seq_len >= 4 * 2048 else max(8, seq_len // 4)


def measure(fn, reps: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "ms_all": [round(t, 3) for t in times],
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip


def free_memory() -> None:
    """Drop what earlier cases left (closures hold models in reference cycles) so each case's peak is its own."""
    gc.collect()
    torch.cuda.empty_cache()


def add_row(rows: list, base: dict, impl: str, flops: float, fn, args, **extra) -> dict | None:
    """Time fn, append its row (an OOM becomes an error row) and return it."""
    free_memory()
    t0 = time.time()
    try:
        res = measure(fn, args.reps, args.warmup)
    except torch.cuda.OutOfMemoryError as e:
        free_memory()
        rows.append({**base, "impl": impl, "flops": flops, "error": f"OOM ({str(e)[:80]})"})
        return None
    tokens = base["batch"] * base["seq_len"]
    row = {**base, "impl": impl, "flops": flops, **res, "tokens_per_s": tokens / res["ms"] * 1e3, **extra}
    rows.append(row)
    print(f"{base['model']} {base['scan']} b{base['batch']} l{base['seq_len']} {impl} {flops}: {res['ms']:.2f} ms, "
          f"peak {res['peak_mem_gb']:.2f} GB ({time.time() - t0:.1f} s)", flush=True)  # fmt: skip
    return row


def score_ms(fn) -> float:
    """Run fn once with CUDA events around every score call; the summed score time in ms."""
    inner, pairs = kernels.impact_score, []

    def timed(*a, **k):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = inner(*a, **k)
        e.record()
        pairs.append((s, e))
        return out

    kernels.impact_score = timed
    try:
        fn()
        torch.cuda.synchronize()
    finally:
        kernels.impact_score = inner
    return sum(s.elapsed_time(e) for s, e in pairs)


def profile_table(fn, by: str = "device", rows: int = 14) -> str:
    """One forward under torch.profiler: its top ops by self GPU time (by="device") or self host time ("cpu")."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    keys = ("self_cpu_time_total",) if by == "cpu" else ("self_device_time_total", "self_cuda_time_total")
    for key in keys:
        try:
            return ka.table(sort_by=key, row_limit=rows, max_name_column_width=70)
        except Exception:  # noqa: BLE001: the key's name changed across torch versions
            continue
    return "(profiler table unavailable)"


def scan_kernels_table(batches: list[int], reps: int) -> list[dict]:
    """Both scans alone, bf16 operands as the mixer passes them (views of x_dbl and xz), at token counts of a
    dense layer (8192, 2048) and of pruned ones between whole 2048-token chunks."""
    from simba_compress.ssm import triton_kernels

    d, n, rows = 4096, 16, []
    for batch in batches:
        for length in (2048, 2056, 4096, 4920, 6144, 6152, 8192):
            x = torch.randn(batch, d, length, device="cuda", dtype=torch.bfloat16)
            xz = torch.randn(batch, 2 * d, length, device="cuda", dtype=torch.bfloat16)
            dt = torch.randn(batch, d, length, device="cuda", dtype=torch.bfloat16) - 4
            xdbl = torch.randn(batch, 128 + 2 * n, length, device="cuda", dtype=torch.bfloat16)
            A = -torch.arange(1, n + 1, device="cuda", dtype=torch.float32).repeat(d, 1)
            D, bias = torch.ones(d, device="cuda"), torch.zeros(d, device="cuda")
            args = (x, dt, A, xdbl[:, 128 : 128 + n], xdbl[:, 128 + n :], D)
            kw = dict(z=xz[:, d:], delta_bias=bias, delta_softplus=True, return_last_state=True)
            row = {"batch": batch, "tokens": length, "d_inner": d, "d_state": n}
            fns = {"triton": triton_kernels.selective_scan}
            if kernels.mamba_ssm_available():
                fns["mamba_ssm"] = kernels._mamba_selective_scan()
            for name, fn in fns.items():
                row[f"{name}_ms"] = measure(lambda: fn(*args, **kw), reps, 3)["ms"]
            if "mamba_ssm_ms" in row:
                row["triton_vs_mamba_ssm"] = row["triton_ms"] / row["mamba_ssm_ms"]
                ym = fns["mamba_ssm"](*args, **kw)[0].float()
                row["max_rel_diff"] = ((fns["triton"](*args, **kw)[0].float() - ym).abs().max() / ym.abs().max()).item()
            print(json.dumps(row), flush=True)
            rows.append(row)
            del x, xz, dt, xdbl
    return rows


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version(), "device": torch.cuda.get_device_name()}
    for mod in ("triton", "mamba_ssm", "causal_conv1d", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable ({type(e).__name__})"
    out["mamba_ssm_scan"] = kernels.mamba_ssm_available()
    out["causal_conv1d_kernel"] = kernels.causal_conv1d_available()
    out["triton_score_and_gather"] = kernels.triton_available()
    return out


def write(out: Path, rows: list, meta: dict, notes: list[str], scan_rows: list[dict]) -> None:
    (out / "gpu_prefill.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# Prefill wall-clock time on a GPU: dense vs Simba (same kernels) and transformers' MambaForCausalLM",
        "",
        f"Device: {meta['versions']['device']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if k != "device"),
        "",
        f"Command: `{meta['command']}`",
        "",
        "Random-weight bf16 models, prefill = forward(input_ids, last_logits=1) (transformers: logits_to_keep=1).",
        f"Median of {meta['reps']} CUDA-event timings after {meta['warmup']} warm-up runs. speedup = our dense ms / ms "
        "(for the transformers row below 1 means transformers is slower than our dense path). Peak memory is "
        "torch.cuda.max_memory_allocated, weights included. score_ms: CUDA events around every score call in one "
        "run; stride_ms: the same schedule ranked by position (no score), so ms - stride_ms is the score's cost too.",
        "",
        "| model | batch | seq | scan | impl | flops (actual) | ms | speedup | tokens/s | peak GB | score ms | score share | stride ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['seq_len']} | {r['scan']} | {r['impl']} | {r['flops']} | error: {r['error']} |||||||")
            continue
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "")  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['seq_len']} | {r['scan']} | {r['impl']} | {r['flops']} ({f('flops_actual', '{:.3f}')}) "
            f"| {r['ms']:.2f} | {f('speedup', '{:.2f}')} | {r['tokens_per_s']:.0f} | {r['peak_mem_gb']:.2f} "
            f"| {f('score_ms', '{:.2f}')} | {f('score_share', '{:.1%}')} | {f('stride_ms', '{:.2f}')} |"
        )
    if scan_rows:
        (out / "gpu_scan.json").write_text(json.dumps(scan_rows, indent=1))
        lines += ["", "## The scan kernels alone (mamba-1.4b layer: d_inner 4096, d_state 16, bf16)", "",
                  "| batch | tokens | mamba_ssm ms | triton ms | triton / mamba_ssm | max rel diff |", "|---|---|---|---|---|---|"]
        for r in scan_rows:
            g = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "")  # noqa: E731
            lines.append(f"| {r['batch']} | {r['tokens']} | {g('mamba_ssm_ms', '{:.3f}')} | {r['triton_ms']:.3f} "
                         f"| {g('triton_vs_mamba_ssm', '{:.2f}')} | {g('max_rel_diff', '{:.1e}')} |")  # fmt: skip
    lines += ["", "## Targets and where the time goes", ""] + notes
    (out / "gpu_prefill.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[8192, 2048])
    ap.add_argument("--flops", nargs="+", type=float, default=[0.8, 0.6, 0.4])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=230.0, help="skip the cases left after this long")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--scans", nargs="+", default=["auto", "triton"], choices=["auto", "triton"],
                    help="scan kernels to run every case with (auto: mamba_ssm's where installed)")
    ap.add_argument("--scan-kernels", action="store_true", help="first time the two scans alone (gpu_scan.json)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"versions": versions(), "command": "python " + " ".join(sys.argv), "reps": args.reps, "warmup": args.warmup}
    print(json.dumps(meta["versions"]), flush=True)
    rows, notes, t_start = [], [], time.time()
    profiles: dict[str, str] = {}
    scan_rows = scan_kernels_table(args.batches, args.reps) if args.scan_kernels else []
    scans = {("mamba_ssm" if s == "auto" and kernels.mamba_ssm_available() else "triton"): s for s in args.scans}
    cases = [(name, label) for name in args.models for label in scans]
    for name, scan in cases:
        kernels.SCAN = scans[scan]
        d_model, n_layer = SHAPES[name]
        m = random_lm(d_model, n_layer)
        dense_rows = {}
        for seq in args.seq_lens:
            g = staircase_granularity(seq)
            scheds = {(f, impl): schedule(m.config, f, seq, gran) for f in args.flops
                      for impl, gran in (("simba", 1), (f"simba, granularity {g}", g))}
            for batch in args.batches:
                if time.time() - t_start > args.max_seconds:
                    notes.append(f"- {name} {scan} scan batch {batch} seq {seq}: skipped, past --max-seconds {args.max_seconds}")
                    continue
                ids = torch.randint(0, VOCAB, (batch, seq), device="cuda")
                base = {"model": name, "d_model": d_model, "n_layer": n_layer, "batch": batch, "seq_len": seq, "scan": scan}

                def run(simba):
                    with torch.no_grad():
                        return m(ids, simba=simba, last_logits=1).logits

                dense = add_row(rows, base, "dense", 1.0, lambda: run(None), args, flops_actual=1.0)
                if dense is None:
                    continue
                dense["speedup"] = 1.0
                dense_rows[(seq, batch)] = dense
                for (f, impl), s in scheds.items():
                    rep = count(m.config, s, seq)
                    r = add_row(rows, base, impl, f, lambda: run(s), args, flops_actual=rep.ratio, final_keep=s.keep[-1],
                                granularity=s.granularity, pruning_layers=sum(a > b for a, b in zip(rep.tokens, rep.tokens[1:])))
                    if r is None:
                        continue
                    r["speedup"] = dense["ms"] / r["ms"]
                    r["peak_mem_vs_dense"] = r["peak_mem_gb"] / dense["peak_mem_gb"]
                    r["score_ms"] = statistics.median(score_ms(lambda: run(s)) for _ in range(3))
                    r["score_share"] = r["score_ms"] / r["ms"]
                    stride = SimbaConfig(s.keep, criterion="stride", granularity=s.granularity)
                    r["stride_ms"] = measure(lambda: run(stride), args.reps, 1)["ms"]
                    r["score_share_by_difference"] = (r["ms"] - r["stride_ms"]) / r["ms"]
                    if not args.no_profile and seq == 8192 and abs(f - 0.6) < 1e-9 and batch == min(args.batches):
                        title = f"{{}}, {scan} scan, {name}, batch {batch}, seq {seq}"
                        if name == "mamba-1.4b":  # the target case: every kernel, dense and both schedules
                            if title.format("dense") not in profiles:  # once per case, not per schedule
                                profiles[title.format("dense")] = profile_table(lambda: run(None))
                            profiles[title.format(f"{impl} 0.6")] = profile_table(lambda: run(s))
                        elif scan == "mamba_ssm" and s.granularity > 1:  # a small model: where the host time goes
                            profiles[title.format(f"{impl} 0.6, by host time")] = profile_table(lambda: run(s), "cpu")
                write(out, rows, meta, notes, scan_rows)
                del ids
        if not args.no_transformers and scan == next(iter(scans)) and dense_rows:
            # transformers' model with the same weights, measured once ours is gone (each peak holds one model)
            hf = hf_twin(m)
            del m
            free_memory()
            for (seq, batch), dense in dense_rows.items():
                ids = torch.randint(0, VOCAB, (batch, seq), device="cuda")
                base = {k: dense[k] for k in ("model", "d_model", "n_layer", "batch", "seq_len", "scan")}

                def run_hf():
                    with torch.no_grad():
                        return hf(ids, use_cache=False, logits_to_keep=1).logits

                r = None if hf is None else add_row(rows, base, "transformers-dense", 1.0, run_hf, args, flops_actual=1.0)
                if r is not None:
                    r["speedup"] = dense["ms"] / r["ms"]
                    rows.insert(rows.index(dense) + 1, rows.pop())  # beside our dense row
                del ids
            hf = None
        m = None
        free_memory()
        write(out, rows, meta, notes, scan_rows)
    # targets: 1.5x at 0.6 for mamba-1.4b at 8192; score <= 5% of the pruned forward; peak memory <= dense
    for r in rows:
        if not r.get("impl", "").startswith("simba") or "error" in r:
            continue
        misses = []
        if r["model"] == "mamba-1.4b" and r["seq_len"] == 8192 and abs(r["flops"] - 0.6) < 1e-9 and r["speedup"] < TARGET_SPEEDUP:
            misses.append(f"speedup {r['speedup']:.2f} < {TARGET_SPEEDUP} (ideal {1 / r['flops_actual']:.2f})")
        if r["score_share"] > TARGET_SCORE_SHARE:
            misses.append(f"score {r['score_share']:.1%} of the forward > {TARGET_SCORE_SHARE:.0%}")
        if r["peak_mem_vs_dense"] > 1.0:
            misses.append(f"peak memory {r['peak_mem_vs_dense']:.3f} x dense")
        if misses:
            notes.append(f"- {r['model']} {r['scan']} scan batch {r['batch']} seq {r['seq_len']} {r['impl']} flops {r['flops']}: " + "; ".join(misses)
                         + f" (without the score, stride ranking: {r['stride_ms']:.2f} ms, speedup {r['ms'] / r['stride_ms'] * r['speedup']:.2f})")  # fmt: skip
    if not notes:
        notes.append("- every target met")
    for title, table in profiles.items():
        order = "ops by self host time" if "host time" in title else "kernels by self GPU time"
        notes += ["", f"### torch.profiler, {title} (one forward, {order})", "", "```", table, "```"]
    notes += ["", f"Total benchmark time {time.time() - t_start:.0f} s."]
    write(out, rows, meta, notes, scan_rows)
    print("\n".join(notes))


if __name__ == "__main__":
    main()
