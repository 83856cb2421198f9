"""Wall-clock prefill on a GPU: the default compressed model vs the same weights dense, in this project and in
mamba_ssm's MambaLMHeadModel (and transformers' MambaForCausalLM / Mamba2ForCausalLM).

    python benchmarks/gpu_prefill.py --out benchmarks/results
    python benchmarks/gpu_prefill.py --models mamba2-2.7b mamba2-1.3b --kernels triton reference --mamba2-kernels \
        --out benchmarks/results --tag _mamba2
    python benchmarks/gpu_prefill.py --smoke --out /tmp/smoke      # the script itself on a CPU, tiny shapes

Random-weight bf16 models shaped like mamba-1.4b (d_model 2048, 48 layers) and mamba-130m (768, 24), or like
state-spaces' mamba2-1.3b (2048, 48) and mamba2-2.7b (2560, 64) (Mamba-2: d_state 128, headdim 64, 1 group, chunks
of 256), vocab 50280, mamba_ssm's initialisation ranges; batch 1 and 8, prompts of 2048 to 32768 tokens. Prefill =
the forward that generate needs: the logits of the last position (ours: last_logits=1; mamba_ssm:
num_last_tokens=1, its fused path: mamba_inner_fn, mamba_split_conv1d_scan_combined for Mamba-2; transformers:
logits_to_keep=1, use_cache=False). Per case: median of --reps CUDA-event timings after --warmup runs (the first
runs compile the Triton kernels), tokens/s, and the peak torch.cuda.max_memory_allocated (weights included: each
implementation is timed with only its own model on the GPU, rebuilt from the same seed, so the weights are the
same).

Schedules (--schedules), at each --flops ratio:
  default    what `simba-compress --flops F` writes: the fast form (schedules.py: keep ratios on a staircase of
             1, 3/4, 1/2 ... 1/16) fitted at --seq-len 1024, here its linear variant (calibration chooses among the
             same staircases, which run alike); flops is its ratio at the prompt length
  exact      the paper's schedule (every layer prunes a little and scores its tokens)
  staircase  the exact schedule with token counts rounded to multiples of 2048 (a quarter of shorter prompts):
             the earlier --granularity workaround
Modes (--modes) of our rows: eager, the forward itself; graph, generate's prefill (generation.prefill: a prompt
shape met again replays a CUDA graph, for batch x length <= GRAPH_PREFILL_TOKENS; timed after the capture, its
peak memory taken over the capture too). mamba_ssm's generate has no prefill graph: its rows are eager.
--kernels adds dense rows of other kernel sets (eager): "triton" (impl ours-triton: the project's own kernels
where mamba_ssm is installed, as without it: Mamba-1's Triton scan, Mamba-2's Triton SSD and gated norm) and
"reference" (ours-reference: the PyTorch path on the GPU, Mamba-2's only before the project had its own SSD;
prompts of at most REFERENCE_TOKENS tokens, it holds (chunk x chunk) tensors per head).
speedup = our dense ms / ms in the same mode; speedup_vs_mamba_ssm = mamba_ssm's dense ms / ms. For the default
schedule at 8192 tokens, score_ms: CUDA events around every score call, and stride_ms: the same widths ranked by
position (no score). --scan-kernels first times the two Mamba-1 scans alone on a mamba-1.4b layer (gpu_scan.json).
--mamba2-kernels times one mamba2-2.7b layer (gpu_mamba2_kernels.json/.md): (a) the SSD scans alone and the whole
mixer at widths just below, at and above multiples of the SSD's 256-token chunk (does a partial chunk cost a whole
one? it decides whether the fast form should keep Mamba-2 widths on whole chunks, layers.SCAN_CHUNKS), (b) the mixer
with each in-layer score against without (the score's share of the layer's time; the issue's bar is 10%).
Writes gpu_prefill{tag}.json (rows) and .md after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simba_compress import MambaLM, ModelConfig, SimbaConfig  # noqa: E402
from simba_compress.bench import mamba_ssm_twin, run_times_ms, transformers_twin  # noqa: E402
from simba_compress.flops import count  # noqa: E402
from simba_compress.generation import GRAPH_PREFILL_TOKENS, prefill  # noqa: E402
from simba_compress.schedules import linear_for_flops  # noqa: E402
from simba_compress.settings import LinearSchedule  # noqa: E402
from simba_compress import backends as probes  # noqa: E402
from simba_compress import mamba1, mamba2  # noqa: E402
from simba_compress.layers import MixerContext  # noqa: E402

DEFAULT_SEQ_LEN = 1024  # the CLI's --seq-len: where `simba-compress --flops F` fits its schedule
# name -> (d_model, n_layer, layer kind); Mamba-2 as state-spaces' mamba2-*: d_state 128, headdim 64, 1 group
SHAPES = {"mamba-1.4b": (2048, 48, "mamba1"), "mamba-130m": (768, 24, "mamba1"),
          "mamba2-1.3b": (2048, 48, "mamba2"), "mamba2-2.7b": (2560, 64, "mamba2")}  # fmt: skip
SMOKE_SHAPES = {"smoke-mamba1": (64, 4, "mamba1"), "smoke-mamba2": (128, 4, "mamba2")}  # --smoke: the script on a CPU
VOCAB = 50280
# the default output at 0.6 against our dense and mamba_ssm's dense: (bar at 4096..32768 tokens, at 2048 or None),
# on one shape per layer kind (issue 13: mamba-1.4b; issue 21: mamba2-2.7b)
TARGETS = {
    "mamba1": ("mamba-1.4b", {"speedup": (1.5, 1.2), "speedup_vs_mamba_ssm": (1.4, 1.2)}),
    "mamba2": ("mamba2-2.7b", {"speedup": (1.5, None), "speedup_vs_mamba_ssm": (1.4, None)}),
}
REFERENCE_TOKENS = 8192  # --kernels reference: batch x prompt up to this (the PyTorch SSD's memory grows with it)
DEVICE = "cuda"  # --smoke: "cpu" (perf_counter timings, no memory figures, no graphs)


def shape_of(name: str) -> tuple[int, int, str]:
    return {**SHAPES, **SMOKE_SHAPES}[name]


def random_lm(name: str, backends: probes.Backends | None = None, device: str | None = None) -> MambaLM:
    """A bf16 model of shape `name` (SHAPES) with mamba_ssm's initialisation ranges: weights N(0, 0.02), dt in
    [1e-3, 0.1]; Mamba-1 A = -(1..n) per channel, Mamba-2 A = -U(1, 16) per head (its A_init_range)."""
    d_model, n_layer, layer = shape_of(name)
    device = device or DEVICE
    torch.manual_seed(0)
    kind = {} if layer == "mamba1" else {"layer": "mamba2", "d_state": 128, "headdim": 64}
    cfg = ModelConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, **kind)
    with torch.device(device):
        m = MambaLM(cfg, backends=backends)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if pname.endswith(("in_proj.weight", "x_proj.weight", "out_proj.weight", "embeddings.weight", "conv1d.weight")):
                p.normal_(0, 0.02)
            elif pname.endswith("dt_proj.weight"):
                p.uniform_(-cfg.dt_rank**-0.5, cfg.dt_rank**-0.5)
        for block in m.backbone.layers:
            mix = block.mixer
            n_dt = cfg.d_inner if layer == "mamba1" else mix.nheads
            dt = torch.exp(torch.rand(n_dt, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            (mix.dt_proj.bias if layer == "mamba1" else mix.dt_bias).copy_(dt + torch.log(-torch.expm1(-dt)))
            if layer == "mamba2":
                mix.A_log.copy_(torch.log(torch.empty(mix.nheads, device=device).uniform_(1, 16)))
    return m.to(torch.bfloat16 if device == "cuda" else torch.float32).eval()  # a CPU (--smoke) is slow in bf16


def schedule(cfg: ModelConfig, kind: str, flops: float, seq: int) -> SimbaConfig:
    """The --schedules kinds at a FLOP ratio: the default fitted where the CLI fits it (--seq-len 1024) and run
    at every prompt length as a saved folder is (SimbaConfig.align splits its 3/4 layers between whole chunks
    at 2048 and 4096 tokens); the others fitted at the prompt length."""
    if kind == "default":
        return linear_for_flops(cfg, LinearSchedule(flops=flops, seq_len=DEFAULT_SEQ_LEN))
    exact = linear_for_flops(cfg, LinearSchedule(flops=flops, seq_len=seq, form="exact"))
    return exact if kind == "exact" else linear_for_flops(
        cfg, LinearSchedule(flops=flops, seq_len=seq, form="exact", granularity=staircase_granularity(seq)))


def staircase_granularity(seq_len: int) -> int:
    """The staircase rows' granularity: mamba_ssm's scan chunk (2048 tokens) where the prompt holds four of
    them, else a quarter of the prompt."""
    return 2048 if seq_len >= 4 * 2048 else max(8, seq_len // 4)


def measure(fn, reps: int, warmup: int, peak_over_warmup: bool = False) -> dict:
    cuda = DEVICE == "cuda"
    if peak_over_warmup and cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        if not peak_over_warmup:
            torch.cuda.reset_peak_memory_stats()
    times = run_times_ms(fn, torch.device(DEVICE), reps)
    return {"ms": statistics.median(times), "ms_all": [round(t, 3) for t in times],
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}  # fmt: skip


def free_memory() -> None:
    """Drop what earlier cases left (closures hold models in reference cycles) so each case's peak is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq)).to(DEVICE)


def add_row(rows: list, base: dict, impl: str, flops: float, fn, args, **extra) -> dict | None:
    """Time fn, append its row (an OOM becomes an error row) and return it. A graph row warms up at least twice
    (the first call of a shape runs eagerly, the second captures) and its peak includes the capture."""
    free_memory()
    t0 = time.time()
    graph = extra.get("mode") == "graph"
    try:
        res = measure(fn, args.reps, max(args.warmup, 2) if graph else args.warmup, peak_over_warmup=graph)
    except torch.cuda.OutOfMemoryError as e:
        free_memory()
        rows.append({**base, "impl": impl, "flops": flops, "error": f"OOM ({str(e)[:80]})"})
        return None
    tokens = base["batch"] * base["seq_len"]
    row = {**base, "impl": impl, "flops": flops, **res, "tokens_per_s": tokens / res["ms"] * 1e3, **extra}
    rows.append(row)
    print(f"{base['model']} b{base['batch']} l{base['seq_len']} {impl} {extra.get('schedule', '')} {extra.get('mode', 'eager')} {flops:.3f}: {res['ms']:.2f} ms, "
          f"peak {res['peak_mem_gb'] or 0:.2f} GB ({time.time() - t0:.1f} s)", flush=True)  # fmt: skip
    return row


def score_ms(fn) -> float:
    """Run fn once with CUDA events around every score call (Mamba-1's Triton kernel or PyTorch twin, Mamba-2's
    ssd_score); the summed score time in ms."""
    tk, pairs = probes.triton_kernels(), []
    patched = [(tk, "global_impact"), (mamba1, "mamba1_score"), (mamba2, "ssd_score")]
    inner = {(mod, name): getattr(mod, name) for mod, name in patched}

    def timing(fn):
        def timed(*a, **k):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = fn(*a, **k)
            e.record()
            pairs.append((s, e))
            return out

        return timed

    for (mod, name), fn_ in inner.items():
        setattr(mod, name, timing(fn_))
    try:
        fn()
        torch.cuda.synchronize()
    finally:
        for (mod, name), fn_ in inner.items():
            setattr(mod, name, fn_)
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
            if probes.mamba_ssm_available():
                fns["mamba_ssm"] = probes.selective_scan_fn()
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


def mamba2_kernels_tables(batches: list[int], reps: int, smoke: bool = False) -> tuple[list[dict], list[dict]]:
    """One layer of `shape` (bf16). (a) widths: the SSD scans alone (mamba_ssm's mamba_chunk_scan_combined and the
    project's Triton SSD, on the layer's own operands) and the whole mixer, at widths just below, at and above
    multiples of the 256-token chunk; (b) scores: the mixer with each in-layer score against without, at 8192.
    smoke: a tiny layer and widths (the code on a CPU)."""
    shape = "smoke-mamba2" if smoke else "mamba2-2.7b"
    m = random_lm(shape, probes.Backends(), DEVICE)
    mixer = m.backbone.layers[0].mixer
    chunk_scan = (probes.ssd_kernels() or (None,))[0]
    ts = probes.triton_ssd() if DEVICE == "cuda" else None
    widths, scores = [], []
    with torch.no_grad():
        for batch in batches:
            for k in (1,) if smoke else (8, 16, 24):  # 2048, 4096, 6144 tokens: whole chunks, +- 8 tokens, half a chunk more
                for width in (256 * k - 8, 256 * k, 256 * k + 8, 256 * k + 128, 256 * (k + 1)):
                    u = torch.randn(batch, width, m.config.d_model, device=DEVICE, dtype=m.lm_head.weight.dtype)
                    z, xbc, dt = mixer.in_proj(u).split([mixer.d_inner, mixer.conv_dim, mixer.nheads], dim=-1)
                    x, B, C = mixer._split(xbc)
                    A, D, bias = mixer.float_params()
                    row = {"model": shape, "batch": batch, "width": width, "chunks": -(-width // 256)}
                    fns = {"mixer": lambda: mixer(u, MixerContext(None, torch.full((batch,), width - 1, device=DEVICE)))}
                    if chunk_scan is not None:
                        fns["mamba_ssm_ssd"] = lambda: chunk_scan(x, dt, A, B, C, 256, D=D, dt_bias=bias, dt_softplus=True)
                    if ts is not None:
                        fns["triton_ssd"] = lambda: ts.ssd_scan(x, dt, bias, A, B, C, D)
                    for name, fn in fns.items():
                        row[f"{name}_ms"] = measure(fn, reps, 2)["ms"]
                    print(json.dumps(row), flush=True)
                    widths.append(row)
                    del u, z, xbc, dt, x, B, C
            width = 512 if smoke else 8192
            u = torch.randn(batch, width, m.config.d_model, device=DEVICE, dtype=m.lm_head.weight.dtype)
            last = torch.full((batch,), width - 1, device=DEVICE)
            row = {"model": shape, "batch": batch, "width": width}
            for criterion in (None, "simba", "share", "deci"):
                row[f"{criterion or 'none'}_ms"] = measure(lambda: mixer(u, MixerContext(None, last, score=criterion)), reps, 2)["ms"]
            for criterion in ("simba", "share", "deci"):
                row[f"{criterion}_share"] = row[f"{criterion}_ms"] / row["none_ms"] - 1
            print(json.dumps(row), flush=True)
            scores.append(row)
            del u
    return widths, scores


def partial_chunk_cost(widths: list[dict], key: str) -> list[str]:
    """What a partial chunk costs in `key`'s time: (t(256k + r) - t(256k)) / (t(256(k+1)) - t(256k)), 0 if it costs its
    tokens' share of a chunk ~r/256, 1 if it costs a whole chunk."""
    notes = []
    for r in widths:
        base = next((o for o in widths if (o["batch"], o["width"]) == (r["batch"], r["width"] - r["width"] % 256)), None)
        nxt = next((o for o in widths if (o["batch"], o["width"]) == (r["batch"], r["width"] - r["width"] % 256 + 256)), None)
        if base is None or nxt is None or r["width"] % 256 == 0 or key not in r or nxt[key] <= base[key]:
            continue
        cost = (r[key] - base[key]) / (nxt[key] - base[key])
        notes.append(f"batch {r['batch']}, {r['width']} tokens ({r['width'] % 256} past a chunk): {cost:.2f} of a whole "
                     f"chunk's {key.removesuffix('_ms')} time (its tokens' share: {(r['width'] % 256) / 256:.2f})")  # fmt: skip
    return notes


def write_mamba2_kernels(out: Path, meta: dict, widths: list[dict], scores: list[dict]) -> None:
    (out / "gpu_mamba2_kernels.json").write_text(json.dumps({"meta": meta, "widths": widths, "scores": scores}, indent=1))
    v = meta["versions"]
    lines = [f"# One Mamba-2 layer ({widths[0]['model'] if widths else 'mamba2-2.7b'} shape, bf16): SSD time by width, and the in-layer scores' share", "",
             f"Device: {v['device']}. Versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if k != "device"), "",
             f"Command: `{meta['command']}`", "", "Median of CUDA-event timings after 2 warm-up runs, ms.", "",
             "## (a) widths around whole 256-token chunks", "",
             "| batch | width | chunks | mamba_ssm SSD | project's Triton SSD | whole mixer |", "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    g = lambda r, k: f"{r[k]:.3f}" if r.get(k) is not None else "n/a"  # noqa: E731
    for r in widths:
        lines.append(f"| {r['batch']} | {r['width']} | {r['chunks']} | {g(r, 'mamba_ssm_ssd_ms')} | {g(r, 'triton_ssd_ms')} "
                     f"| {g(r, 'mixer_ms')} |")  # fmt: skip
    lines += ["", "What a partial chunk costs (0: its tokens' share, 1: a whole chunk; whole-chunk widths pay when it "
              "is near 1 for a few tokens past a chunk):", ""]  # fmt: skip
    for key in ("mamba_ssm_ssd_ms", "triton_ssd_ms", "mixer_ms"):
        lines += [f"- {n}" for n in partial_chunk_cost(widths, key)]
    lines += ["", f"## (b) the in-layer scores' share of the layer ({scores[0]['width'] if scores else 8192} tokens)", "",
              "| batch | no score ms | simba | share | deci |", "|---:|---:|---:|---:|---:|"]
    for r in scores:
        cells = " | ".join(f"{r[f'{c}_ms']:.3f} ({100 * r[f'{c}_share']:+.1f}%)" for c in ("simba", "share", "deci"))
        lines.append(f"| {r['batch']} | {r['none_ms']:.3f} | {cells} |")
    (out / "gpu_mamba2_kernels.md").write_text("\n".join(lines) + "\n")


def versions() -> dict:
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU {platform.machine()} (--smoke)"
    out = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    for mod in ("triton", "mamba_ssm", "causal_conv1d", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable ({type(e).__name__})"
    out["mamba_ssm_scan"] = probes.mamba_ssm_available()
    out["mamba_ssm_ssd"] = probes.describe()["mamba_ssm_ssd"]
    out["causal_conv1d_kernel"] = probes.causal_conv1d_available()
    out["triton_kernels"] = probes.triton_available()
    return out


COLUMNS = ["model", "batch", "seq_len", "impl", "schedule", "mode", "flops", "ms", "speedup", "speedup_vs_mamba_ssm",
           "tokens_per_s", "peak_mem_gb", "score_ms", "stride_ms"]  # fmt: skip


def write(out: Path, rows: list, meta: dict, notes: list[str], scan_rows: list[dict], tag: str = "") -> None:
    (out / f"gpu_prefill{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    fmt = {"ms": "{:.2f}", "speedup": "{:.2f}", "speedup_vs_mamba_ssm": "{:.2f}", "tokens_per_s": "{:.0f}",
           "peak_mem_gb": "{:.2f}", "score_ms": "{:.2f}", "stride_ms": "{:.2f}", "flops": "{:.3f}"}  # fmt: skip
    lines = [
        "# Prefill wall-clock time on a GPU: the default compressed model vs dense (ours, mamba_ssm, transformers)",
        "",
        f"Device: {meta['versions']['device']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if k != "device"),
        "",
        f"Command: `{meta['command']}`",
        "",
        "Random-weight bf16 models (the same seed for every implementation), prefill = the last position's logits "
        f"(ours last_logits=1, mamba_ssm num_last_tokens=1, transformers logits_to_keep=1). Median of {meta['reps']} "
        f"CUDA-event timings after {meta['warmup']} warm-up runs. speedup = our dense ms / ms; speedup_vs_mamba_ssm = "
        "mamba_ssm's MambaLMHeadModel ms / ms. flops = the backbone FLOP ratio at the prompt length. Peak memory: "
        "torch.cuda.max_memory_allocated, weights included, one model on the GPU at a time.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['seq_len']} | {r['impl']} | {r.get('schedule', '')} | | error: {r['error']} |")
            continue
        cells = [fmt[c].format(r[c]) if c in fmt and r.get(c) is not None else str(r.get(c, "")) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if scan_rows:
        (out / "gpu_scan.json").write_text(json.dumps(scan_rows, indent=1))
        lines += ["", "## The scan kernels alone (mamba-1.4b layer: d_inner 4096, d_state 16, bf16)", "",
                  "| batch | tokens | mamba_ssm ms | triton ms | triton / mamba_ssm | max rel diff |", "|---|---|---|---|---|---|"]
        for r in scan_rows:
            g = lambda k, f: (f.format(r[k]) if r.get(k) is not None else "")  # noqa: E731
            lines.append(f"| {r['batch']} | {r['tokens']} | {g('mamba_ssm_ms', '{:.3f}')} | {r['triton_ms']:.3f} "
                         f"| {g('triton_vs_mamba_ssm', '{:.2f}')} | {g('max_rel_diff', '{:.1e}')} |")  # fmt: skip
    lines += ["", "## Targets and where the time goes", ""] + notes
    (out / f"gpu_prefill{tag}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    global DEVICE
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="suffix of the output files (gpu_prefill{tag}.json/.md)")
    ap.add_argument("--models", nargs="*", default=["mamba-1.4b", "mamba-130m"], choices=list(SHAPES) + list(SMOKE_SHAPES),
                    help="shapes to time (none: only --scan-kernels / --mamba2-kernels)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[8192, 2048, 4096, 16384, 32768])
    ap.add_argument("--flops", nargs="+", type=float, default=[0.6])
    ap.add_argument("--schedules", nargs="+", default=["default"], choices=["default", "exact", "staircase"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=230.0, help="skip the cases left after this long")
    ap.add_argument("--twins", nargs="*", default=["mamba_ssm", "transformers"], choices=["mamba_ssm", "transformers"])
    ap.add_argument("--twin-max-tokens", type=int, default=1 << 30,
                    help="transformers' rows only up to this many tokens (batch x prompt): its Mamba-2 without "
                         "kernels holds (chunk x chunk) tensors per head")  # fmt: skip
    ap.add_argument("--kernels", nargs="*", default=[], choices=["triton", "reference"],
                    help="dense rows of other kernel sets (module docstring)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile-at", nargs="*", type=int, default=[2048], help="prompt lengths whose smallest batch "
                    "is profiled (torch.profiler tables by GPU and host time), dense and default")
    ap.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    ap.add_argument("--scan", default="auto", choices=["auto", "triton"], help="triton: the project's scan even "
                    "where mamba_ssm is installed (SIMBA_COMPRESS_SCAN)")
    ap.add_argument("--scan-kernels", action="store_true", help="first time the two scans alone (gpu_scan.json)")
    ap.add_argument("--mamba2-kernels", action="store_true", help="first time one mamba2-2.7b layer by width and "
                    "with each score (gpu_mamba2_kernels.json/.md)")
    ap.add_argument("--smoke", action="store_true", help="the script on a CPU: tiny shapes and prompts, one rep")
    ap.add_argument("--rebuild", help="write the outputs from the lines this script printed to a log, measuring nothing")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rebuild:
        return rebuild(Path(args.rebuild), out)
    if args.smoke:  # every code path of the script (twins where they import) on tiny shapes; CPU timings
        DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
        args.models = list(dict.fromkeys(f"smoke-{shape_of(m)[2]}" for m in args.models))  # the same layer kinds, tiny
        args.seq_lens, args.batches, args.reps, args.warmup = [264, 100], [1, 2], 1, 1
        args.modes = [mo for mo in args.modes if DEVICE == "cuda" or mo == "eager"]
        args.no_profile = args.no_profile or DEVICE != "cuda"
    backends = probes.Backends.from_env().replace(scan=args.scan)
    meta = {"versions": versions(), "command": "python " + " ".join(sys.argv), "reps": args.reps, "warmup": args.warmup,
            "scan": "mamba_ssm" if args.scan == "auto" and probes.mamba_ssm_available() else "triton"}  # fmt: skip
    print(json.dumps(meta), flush=True)
    rows, notes, profiles, t_start = [], [], {}, time.time()
    scan_rows = scan_kernels_table(args.batches, args.reps) if args.scan_kernels else []
    if args.mamba2_kernels:
        widths, scores = mamba2_kernels_tables(args.batches, args.reps, args.smoke)
        write_mamba2_kernels(out, meta, widths, scores)
        free_memory()
    cases = [(seq, batch) for seq in args.seq_lens for batch in args.batches]
    for name in args.models:
        d_model, n_layer, layer = shape_of(name)
        done: list[tuple[int, int]] = []
        m = random_lm(name, backends)
        for seq, batch in cases:
            if time.time() - t_start > args.max_seconds:
                notes.append(f"- {name} batch {batch} seq {seq}: skipped, past --max-seconds {args.max_seconds}")
                continue
            ids = random_ids(batch, seq)
            base = {"model": name, "d_model": d_model, "n_layer": n_layer, "batch": batch, "seq_len": seq}

            def run(simba):
                with torch.no_grad():
                    return m(ids, simba=simba, last_logits=1).logits

            def graphed(simba):
                m.simba = simba
                return lambda: prefill(m, ids).logits

            def drop_graphs():  # each row's peak memory its own: no graph pool of an earlier row
                if m._graphs is not None:
                    m._graphs.prefills = None

            modes = [mo for mo in args.modes if mo == "eager" or batch * seq <= GRAPH_PREFILL_TOKENS]
            dense = {}
            for mode in modes:
                drop_graphs()
                fn = (lambda: run(None)) if mode == "eager" else graphed(None)
                dense[mode] = add_row(rows, base, "ours", 1.0, fn, args, schedule="dense", mode=mode, speedup=1.0)
            if dense.get("eager") is None:
                continue
            done.append((seq, batch))
            for kernels in args.kernels:  # the same dense forward through other kernels
                if kernels == "reference" and batch * seq > REFERENCE_TOKENS:
                    continue
                m.backends = backends.replace(scan="triton") if kernels == "triton" else probes.Backends(fast_path=False)
                r = add_row(rows, base, f"ours-{kernels}", 1.0, lambda: run(None), args, schedule="dense", mode="eager")
                m.backends = backends
                if r is not None:
                    r["speedup"] = dense["eager"]["ms"] / r["ms"]
            for kind in args.schedules:
                for f in args.flops:
                    s = schedule(m.config, kind, f, seq)
                    rep = count(m.config, s, seq)
                    eager = None
                    for mode in modes:
                        if dense.get(mode) is None:
                            continue
                        drop_graphs()
                        fn = (lambda: run(s)) if mode == "eager" else graphed(s)
                        r = add_row(rows, base, "ours", rep.ratio, fn, args, schedule=kind, mode=mode, flops_target=f,
                                    keep=s.keep, pruning_layers=sum(a > b for a, b in zip(rep.tokens, rep.tokens[1:])))
                        if r is None:
                            continue
                        r["speedup"] = dense[mode]["ms"] / r["ms"]
                        if r["peak_mem_gb"] is not None:
                            r["peak_mem_vs_dense"] = r["peak_mem_gb"] / dense[mode]["peak_mem_gb"]
                        eager = r if mode == "eager" else eager
                    m.simba = None
                    if kind == "default" and seq == 8192 and eager is not None and DEVICE == "cuda":  # the score's cost
                        eager["score_ms"] = statistics.median(score_ms(lambda: run(s)) for _ in range(3))
                        stride = SimbaConfig(s.keep, criterion="stride", granularity=s.granularity, align=s.align)
                        eager["stride_ms"] = measure(lambda: run(stride), args.reps, 1)["ms"]
                    if kind == "default" and seq in args.profile_at and not args.no_profile and name in ("mamba-1.4b", "mamba2-2.7b") \
                            and batch == min(args.batches):  # fmt: skip
                        for label, fn in (("dense", lambda: run(None)), (f"default {f}", lambda: run(s))):
                            profiles[f"ours {label}, {name}, batch {batch}, seq {seq}, by GPU time"] = profile_table(fn)
                            profiles[f"ours {label}, {name}, batch {batch}, seq {seq}, by host time"] = profile_table(fn, "cpu")
            drop_graphs()  # the graphs' memory, before the next case
            write(out, rows, meta, notes, scan_rows, args.tag)
            del ids
        m = None
        free_memory()
        for twin in args.twins:  # each with only its own model on the GPU; the same weights (random_lm's seed)
            if twin == "mamba_ssm" and DEVICE != "cuda":
                continue
            m = random_lm(name, backends)
            model = mamba_ssm_twin(m) if twin == "mamba_ssm" else transformers_twin(m)
            m = None
            free_memory()
            if model is None:
                notes.append(f"- {twin}: not installed, no rows")
                continue
            for seq, batch in done:
                if twin == "transformers" and batch * seq > args.twin_max_tokens:
                    continue
                ids = random_ids(batch, seq)
                base = {"model": name, "d_model": d_model, "n_layer": n_layer, "batch": batch, "seq_len": seq}
                if twin == "mamba_ssm":
                    fn = lambda: model(ids, num_last_tokens=1).logits  # noqa: E731
                else:
                    fn = lambda: model(ids, use_cache=False, logits_to_keep=1).logits  # noqa: E731
                with torch.no_grad():
                    r = add_row(rows, base, twin, 1.0, fn, args, schedule="dense")
                if r is not None and twin == "mamba_ssm":
                    for o in rows:
                        if o.get("impl", "").startswith("ours") and (o["model"], o["seq_len"], o["batch"]) == (name, seq, batch) and "ms" in o:
                            o["speedup_vs_mamba_ssm"] = r["ms"] / o["ms"]
                    r["speedup_vs_mamba_ssm"] = 1.0
                write(out, rows, meta, notes, scan_rows, args.tag)
                del ids
            model = None
            free_memory()
    notes += check_targets(rows)
    for title, table in profiles.items():
        notes += ["", f"### torch.profiler, {title} (one forward)", "", "```", table, "```"]
    notes += ["", f"Total benchmark time {time.time() - t_start:.0f} s."]
    write(out, rows, meta, notes, scan_rows, args.tag)
    print("\n".join(notes))


def rebuild(log: Path, out: Path) -> None:
    """gpu_prefill.json/.md from a run's printed lines (meta, one line per case, the notes), for a run whose files
    did not come back from the GPU machine: the rows keep what the lines say (time, peak memory), the speedups are
    recomputed, the score and stride timings are not there."""
    text = log.read_text().splitlines()
    start = max(i for i, line in enumerate(text) if '"command": "python benchmarks/gpu_prefill.py' in line)
    meta, rows, notes = json.loads(text[start]), [], []
    case = re.compile(r"(\S+) b(\d+) l(\d+) (\S+) (\S*) (?:(eager|graph) )?([\d.]+): ([\d.]+) ms, peak ([\d.]+) GB")
    for i, line in enumerate(text[start + 1 :], start + 1):
        if m := case.match(line):
            name, batch, seq, impl, kind, mode, flops, ms, peak = m.groups()
            rows.append({"model": name, "batch": int(batch), "seq_len": int(seq), "impl": impl, "schedule": kind,
                         "mode": mode or "eager",
                         "flops": float(flops), "ms": float(ms), "peak_mem_gb": float(peak),
                         "tokens_per_s": int(batch) * int(seq) / float(ms) * 1e3})  # fmt: skip
        elif line.startswith("### torch.profiler"):
            end = next(j for j in range(i + 1, len(text)) if text[j].startswith("Total benchmark time"))
            notes += [""] + text[i:end]
            break
    for r in rows:
        same = [o for o in rows if (o["model"], o["batch"], o["seq_len"]) == (r["model"], r["batch"], r["seq_len"])]
        dense = {o["impl"]: o["ms"] for o in same if o["schedule"] == "dense" and o["mode"] in ("eager", r["mode"])}
        if r["impl"] == "ours":
            ours = next(o for o in same if o["impl"] == "ours" and o["schedule"] == "dense" and o["mode"] == r["mode"])
            r["speedup"] = ours["ms"] / r["ms"]
            r["peak_mem_vs_dense"] = r["peak_mem_gb"] / ours["peak_mem_gb"]
        if "mamba_ssm" in dense:
            r["speedup_vs_mamba_ssm"] = dense["mamba_ssm"] / r["ms"]
    notes = check_targets(rows) + [f"- written by `--rebuild {log}` from the lines the run printed (its own files did "
                                   "not come back from the GPU machine); score_ms and stride_ms were not printed."] + notes
    tag = re.search(r"--tag (\S+)", meta["command"])
    write(out, rows, meta, notes, [], tag.group(1) if tag else "")


def check_targets(rows: list[dict]) -> list[str]:
    """The default output at 0.6 against our dense and mamba_ssm's (TARGETS: issue 13 on the mamba-1.4b shape, issue 21
    on mamba2-2.7b), peak memory <= dense, for the prefill as generate runs it (the graph row where there is one,
    else the eager one); for Mamba-2 also our dense at least as fast as mamba_ssm's (issue 21)."""
    notes = []
    graphed = {(r["model"], r["batch"], r["seq_len"]) for r in rows if r.get("mode") == "graph" and "error" not in r}
    shapes = {shape: bars for shape, bars in TARGETS.values()}
    for r in rows:
        if r.get("impl") != "ours" or r["model"] not in shapes or "error" in r:
            continue
        if r.get("mode", "eager") == "eager" and (r["model"], r["batch"], r["seq_len"]) in graphed:
            continue
        case = f"{r['model']} batch {r['batch']} seq {r['seq_len']}"
        if r.get("schedule") == "dense":
            if r["model"].startswith("mamba2") and r.get("speedup_vs_mamba_ssm") is not None and r["speedup_vs_mamba_ssm"] < 1.0:
                notes.append(f"- missed: {case}: our dense is {r['speedup_vs_mamba_ssm']:.2f}x mamba_ssm's (at least 1.0)")
            continue
        if r.get("schedule") != "default":
            continue
        for key, (long_bar, short_bar) in shapes[r["model"]].items():
            bar = short_bar if r["seq_len"] < 4096 else long_bar
            if bar is not None and r.get(key) is not None and r[key] < bar:
                notes.append(f"- missed: {case}: {key} {r[key]:.2f} < {bar}")
        if r.get("peak_mem_vs_dense", 0) > 1.0:
            notes.append(f"- missed: {case}: peak memory {r['peak_mem_vs_dense']:.4f} x dense")
    return notes or ["- every target measured here met"]


if __name__ == "__main__":
    main()
