"""Generation speed as a user meets it: first-token latency, decode time per token, total and peak memory of
the compressed model, the same weights dense, and what a user would run instead (mamba_ssm's
MambaLMHeadModel.generate(cg=True), transformers' MambaForCausalLM / Mamba2ForCausalLM.generate), on this machine.

Every implementation is timed the same way, from outside: generating 1 new token (prefill + its sampling) gives
the first-token latency, generating K gives the total, and decode per token = (total - first) / (K - 1). Each
is the median of `reps` runs after `warmup` runs at that length (the warm-up compiles the kernels and captures
the CUDA graphs: mamba_ssm recaptures when the generation length changes). Greedy decoding of a random prompt
of prompt_len tokens per row, no eos. Peak memory (CUDA only): the peak allocated during the K-token runs above
what was allocated before them, plus the implementation's own weights. A row's spread is how far apart its
runs were ((max - min) / median); reliability() says when a machine's other work makes the figures doubtful.

    rows = run_bench(model, BenchConfig(prompt_len=8192, new_tokens=128, batch=1))
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .flops import count, kv_cache_bytes
from .memory import parameter_bytes
from .model import MambaLM


@dataclass
class BenchConfig:
    prompt_len: int = 2048
    new_tokens: int = 128
    batch: int = 1
    reps: int = 3
    warmup: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_len", "new_tokens", "batch", "reps"):
            if getattr(self, name) < 1 or (name == "new_tokens" and self.new_tokens < 2):
                raise ValueError(f"{name}: must be >= {2 if name == 'new_tokens' else 1}, got {getattr(self, name)}")


@dataclass
class BenchRow:
    impl: str
    flops: float  # backbone FLOP ratio of the prefill vs dense at prompt_len
    batch: int
    prompt_len: int
    new_tokens: int
    first_token_ms: float
    decode_ms_per_token: float
    total_ms: float
    peak_mem_gb: float | None  # CUDA only
    device: str
    spread: float | None = None  # (max - min) / median of the runs of its first-token or total time, the larger
    kv_cache_bytes: int = 0  # the attention layers' KV cache after the prefill, all rows (hybrids; analytic)

    def to_dict(self) -> dict:
        return asdict(self)


Generate = Callable[[torch.Tensor, int], object]  # (prompt ids, new tokens) -> anything; runs to completion


def mamba_ssm_twin(model: MambaLM):
    """mamba_ssm's MambaLMHeadModel with `model`'s weights (its Mamba or Mamba2 layers, and a state-spaces hybrid's
    attention and MLPs), or None where mamba_ssm does not import or cannot hold the model (a transformers hybrid:
    Granite's multipliers and MoE, NemotronH's MLP layers). Its hybrid decode needs flash_attn's kv-cache kernel:
    without it mamba_ssm's MHA attends a decode query to the first cached key only
    (benchmarks/results/cpu/check_mamba_ssm_hybrid.md), so its hybrid generate is timed but not right there."""
    from dataclasses import replace

    from .layouts import from_model, original_config

    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except Exception:  # not installed, or without its CUDA extension
        return None
    if model.config.arch not in ("", "mamba_ssm"):
        return None
    c = replace(model.config, arch="mamba_ssm")
    twin = MambaLMHeadModel(MambaConfig(**original_config(c)), device=model.device, dtype=model.lm_head.weight.dtype).eval()
    twin.load_state_dict(from_model(model.state_dict(), c))
    try:  # Mamba2's fused prefill (mamba_split_conv1d_scan_combined) calls causal_conv1d's CUDA conv
        import causal_conv1d_cuda  # noqa: F401
    except ImportError:
        for module in twin.modules():
            if hasattr(module, "use_mem_eff_path"):
                module.use_mem_eff_path = False  # its other path: PyTorch's conv, the same Triton SSD
    return twin


def transformers_twin(model: MambaLM):
    """transformers' model of `model`'s family with its weights (MambaForCausalLM or Mamba2ForCausalLM built directly,
    the same parameter names; a hybrid through a dense copy saved in its layout and read back by from_pretrained), or
    None where transformers lacks it."""
    try:
        import transformers

        from .checkpoints import hf_config, save
    except Exception:
        return None
    c, dtype = model.config, model.lm_head.weight.dtype
    if c.arch == "mamba_ssm":
        return None
    if not c.arch:
        cfg = hf_config(c)
        arch = cfg.pop("architectures")[0]  # MambaForCausalLM or Mamba2ForCausalLM
        conf = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**cfg)
        with torch.device(model.device):
            hf = getattr(transformers, arch)(conf).to(dtype).eval()
        hf.load_state_dict(model.state_dict(), strict=False)  # lm_head is tied
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp, schedule(model, None):
            save(model, Path(tmp) / "dense", dtype=dtype)
            hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "dense", dtype=dtype).to(model.device).eval()
    hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = None
    return hf


@contextlib.contextmanager
def schedule(model: MambaLM, simba):
    """Run `model` with another pruning schedule (None: dense) for the duration."""
    old, model.simba = model.simba, simba
    try:
        yield
    finally:
        model.simba = old


def generate_with(model: MambaLM, simba, **kwargs) -> Generate:
    """`model.generate` under the schedule `simba` (None: dense), as a Generate; kwargs go to generate."""

    def run(ids: torch.Tensor, n: int):
        with schedule(model, simba):
            return model.generate(ids, max_new_tokens=n, **kwargs)

    return run


def implementations(model: MambaLM, twins: tuple[str, ...] = ("mamba_ssm",)) -> dict[str, tuple[Generate, object]]:
    """name -> (generate function, the object whose weights it uses). "simba" (when the model has a schedule) and
    "dense" run this project's generate; `twins` adds "mamba_ssm" and/or "transformers" where they import."""
    impls: dict[str, tuple[Generate, object]] = {}
    simba = model.simba

    if simba is not None:
        impls["simba"] = (generate_with(model, simba), model)
    impls["dense"] = (generate_with(model, None), model)
    if "mamba_ssm" in twins and model.device.type == "cuda":
        twin = mamba_ssm_twin(model)
        if twin is not None:
            def twin_generate(ids: torch.Tensor, n: int):
                # mamba_ssm reuses its captured graph for any batch up to the one it was captured at, with state
                # buffers of the old batch size (an error at decode): a new batch size starts a new cache
                cache = getattr(twin, "_decoding_cache", None)
                if cache is not None and cache.inference_params.max_batch_size != ids.shape[0]:
                    twin._decoding_cache = None
                return twin.generate(ids, max_length=ids.shape[1] + n, cg=True)

            impls["mamba_ssm"] = (twin_generate, twin)
    if "transformers" in twins:
        hf = transformers_twin(model)
        if hf is not None:
            impls["transformers"] = (
                lambda ids, n: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False), hf
            )
    return impls


def run_times_ms(fn: Callable[[], object], device: torch.device, reps: int) -> list[float]:
    """Milliseconds of each of `reps` calls of fn() (no warm-up): CUDA events on a GPU (the kernels' time, not the
    host's launch), the wall clock elsewhere."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return times


def median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of fn() over `reps` calls after one warm-up (run_times_ms)."""
    fn()
    return statistics.median(run_times_ms(fn, device, reps))


def time_generation(run: Generate, ids: torch.Tensor, cfg: BenchConfig, weights: object,
                    tick: Callable[[], object] = lambda: None) -> dict:
    """first_token_ms, total_ms (medians), decode_ms_per_token, peak_mem_gb and spread for one implementation;
    tick() after every run (progress)."""
    cuda = ids.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    spreads = []

    def timed(n: int) -> float:
        # on CUDA at least two: generate captures a prompt shape's prefill the second time it meets it
        for _ in range(warmups(cfg, cuda)):
            run(ids, n)
            tick()
        sync()
        times = []
        for _ in range(cfg.reps):
            t0 = time.perf_counter()
            run(ids, n)
            sync()
            times.append(1000 * (time.perf_counter() - t0))
            tick()
        spreads.append((max(times) - min(times)) / statistics.median(times))
        return statistics.median(times)

    first = timed(1)
    peak = None
    if cuda:
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    total = timed(cfg.new_tokens)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - before + parameter_bytes(weights)) / 2**30
    return {"first_token_ms": first, "total_ms": total, "decode_ms_per_token": (total - first) / (cfg.new_tokens - 1),
            "peak_mem_gb": peak, "spread": max(spreads)}  # fmt: skip


def warmups(cfg: BenchConfig, cuda: bool) -> int:
    """Untimed runs before a measurement: on CUDA at least two (generate captures a prompt shape's prefill the
    second time it meets it)."""
    return max(cfg.warmup, 2) if cuda else cfg.warmup


def reliability(rows: list[BenchRow], load: float, cpus: int) -> str | None:
    """Why the timings of `rows` should not be trusted, or None: other work on the machine (the load average
    before timing started, against the CPUs) or runs of one measurement far apart (spread over 25%)."""
    why = []
    if load > 0.5 * cpus:
        why.append(f"the machine was busy before timing began (load average {load:.2f} on {cpus} CPUs), and other "
                   "processes take CPU time from the runs")
    worst = max(rows, key=lambda r: r.spread or 0.0)
    if (worst.spread or 0.0) > 0.25:
        why.append(f"the runs of one measurement ({worst.impl}) differed by {100 * worst.spread:.0f}% of their median")
    if not why:
        return None
    return "; ".join(why) + ": rerun on an idle machine, or with more reps (each figure is the median of them)"


@torch.no_grad()
def run_bench(
    model: MambaLM, cfg: BenchConfig, twins: tuple[str, ...] = ("mamba_ssm",), only: list[str] | None = None,
    progress: bool = False,
) -> list[BenchRow]:
    """One row per implementation (implementations()), on the same random prompt; progress: a bar of the runs
    (stderr), which take minutes on a CPU."""
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, model.config.vocab_size, (cfg.batch, cfg.prompt_len), generator=g).to(model.device)
    device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
    rows = []
    impls = {k: v for k, v in implementations(model, twins).items() if only is None or k in only}
    runs = len(impls) * 2 * (warmups(cfg, ids.is_cuda) + cfg.reps)  # two measurements: 1 and new_tokens tokens
    with tqdm(total=runs, desc="bench", unit="run", disable=not progress, leave=False) as bar:
        for name, (run, weights) in impls.items():
            bar.set_postfix_str(name)
            simba = model.simba if name == "simba" else None
            report = count(model.config, simba, cfg.prompt_len)
            kv = kv_cache_bytes(model.config, report.tokens, model.lm_head.weight.dtype.itemsize) * cfg.batch
            t = time_generation(run, ids, cfg, weights, tick=lambda: bar.update(1))
            rows.append(BenchRow(name, round(report.ratio, 4), cfg.batch, cfg.prompt_len, cfg.new_tokens,
                                 round(t["first_token_ms"], 3), round(t["decode_ms_per_token"], 4), round(t["total_ms"], 3),
                                 None if t["peak_mem_gb"] is None else round(t["peak_mem_gb"], 3), device,
                                 kv_cache_bytes=kv, spread=round(t["spread"], 3)))  # fmt: skip
    return rows


def table(rows: list[BenchRow]) -> str:
    """A markdown table of rows, with the ratios against the dense row of the same case."""
    kv = any(r.kv_cache_bytes for r in rows)
    lines = ["| impl | FLOPs | batch | prompt | new | first token ms | decode ms/token | total ms | vs dense (total) | peak GB |"
             + (" KV cache MiB |" if kv else ""), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if kv else "")]  # fmt: skip
    for r in rows:
        dense = next((d for d in rows if d.impl == "dense" and (d.batch, d.prompt_len, d.new_tokens) == (r.batch, r.prompt_len, r.new_tokens)), None)
        vs = f"{dense.total_ms / r.total_ms:.2f}x" if dense else "n/a"
        peak = "n/a" if r.peak_mem_gb is None else f"{r.peak_mem_gb:.2f}"
        lines.append(f"| {r.impl} | {r.flops:.3f} | {r.batch} | {r.prompt_len} | {r.new_tokens} | {r.first_token_ms:.1f} "
                     f"| {r.decode_ms_per_token:.2f} | {r.total_ms:.1f} | {vs} | {peak} |" + (f" {r.kv_cache_bytes / 2**20:.2f} |" if kv else ""))  # fmt: skip
    return "\n".join(lines) + "\n"
