"""The GPU path (mamba1.py's fast path, kernels.py, ssm/triton_kernels.py) against the CPU reference.

Relative error = max |gpu - reference| / max |reference|, as benchmarks/gpu_check.py. Tolerances: 1e-4 in
float32, 1e-2 in bf16, where the reference is the float32 CPU forward of the same bf16-rounded weights.
Whole-model bf16 logits are compared norm-wise, ||gpu - reference|| / ||reference||: the max-abs ratio of a
bf16 forward through 16 layers sits at the bar by rounding alone (the CPU's own bf16 forward of the proxy is
0.008 from its float32 forward, max-abs; 0.005 norm-wise; the GPU's measured 0.0107 once, through the Triton
scan; benchmarks/bf16_floor.py), so the max-abs bar would flip with the kernels' summation order rather than
catch an error.
In bf16 two tokens' scores can differ by less than the rounding of the two paths, so a near-tie may keep a
different token and change the logits legitimately; bf16 is therefore checked (a) on the
score itself, same inputs into both implementations, and (b) on pruned logits with the kept tokens fixed by
position (criterion "stride"), so the pruned forward, the freeze/gather and the kernels are compared on equal
kept sets. Float32 compares Simba-pruned logits directly and asserts the kept sets are equal.

Three groups: (1) the channel-major mixer path on CPU with a PyTorch stand-in for the scan kernel (runs
everywhere: checks layouts, masks, decode states); (2) the Triton kernels through Triton's interpreter on CPU
(skips without triton); (3) everything on CUDA (skips without a GPU; mamba_ssm tests also skip without it).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import simba_compress.mamba1 as mamba1
from simba_compress import SimbaConfig, load
from simba_compress import backends as probes
from simba_compress.layers import SCAN_CHUNKS
from simba_compress.schedules import linear
from simba_compress.ssm.scan import selective_scan
from simba_compress.ssm.score import global_impact

from conftest import REPO, fused_step_logits, random_model, run_in_triton_interpreter

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
needs_mamba_ssm = pytest.mark.skipif(not probes.mamba_ssm_available(), reason="mamba_ssm (with CUDA) not installed")
needs_triton = pytest.mark.skipif(not probes.triton_available(), reason="triton (with CUDA) not available")


def proxy_path() -> Path | None:
    """The l16 proxy: $SIMBA_PROXY_MODEL, the GPU machine's .carry copy, or ../shared."""
    for p in (os.environ.get("SIMBA_PROXY_MODEL"), REPO / ".carry/models/mamba-proxy-d320-l16",
              REPO.parent / "shared/models/mamba-proxy-d320-l16"):  # fmt: skip
        if p and (Path(p) / "config.json").exists():
            return Path(p)
    return None


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return ((a - ref).abs().max() / ref.abs().max()).item()


def rel_norm(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return ((a - ref).norm() / ref.norm()).item()


TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
PRUNE = SimbaConfig(linear(4, 0.25))
STRIDE = SimbaConfig(linear(4, 0.25), criterion="stride")
DECI = SimbaConfig(linear(4, 0.25), criterion="deci")
SHARE = SimbaConfig(linear(4, 0.25), criterion="share")
QUERY = SimbaConfig(linear(4, 0.25), criterion="query")
RECENT_QUERY = SimbaConfig(linear(4, 0.25), criterion="recent-query")


def scan_reference(u, delta, A, B, C, D, z, delta_bias) -> tuple[torch.Tensor, torch.Tensor]:
    """mamba_ssm's selective_scan_fn contract (channel-major operands, softplus, D, the silu(z) gate) through the
    reference scan: y (b, d, l) and the final state (b, d, n), both float32."""
    dt = F.softplus(delta.float() + delta_bias.float()[:, None])
    y, h, _ = selective_scan(u.mT, dt.mT, A, B.mT, C.mT)
    return (y.mT + u.float() * D[:, None]) * F.silu(z.float()), h


def scan_stand_in(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=True, return_last_state=False):
    """scan_reference in the kernels' calling convention (y in u's dtype), for the CPU layout check."""
    y, h = scan_reference(u, delta, A, B, C, D, z, delta_bias)
    return (y.to(u.dtype), h) if return_last_state else y.to(u.dtype)


# (1) the channel-major mixer path on CPU -------------------------------------------------------------------


@pytest.fixture
def kernel_path_on_cpu(monkeypatch):
    monkeypatch.setattr(mamba1, "scan_kernel", lambda mixer, hidden, backends: scan_stand_in)
    monkeypatch.setattr(probes, "causal_conv1d_fn", lambda: None)


@pytest.mark.parametrize("chunked", [False, True])
def test_kernel_layout_matches_reference_on_cpu(kernel_path_on_cpu, monkeypatch, chunked):
    """chunked: the stand-in takes the place of mamba_ssm's scan, whose operands the mixer left-pads to whole
    chunks (ScanChunks.scan_length) after the projections: the outputs stay the reference's."""
    lengths = []
    if chunked:
        def chunked_scan(u, *args, **kw):
            lengths.append(u.shape[-1])
            return scan_stand_in(u, *args, **kw)

        monkeypatch.setattr(mamba1, "scan_kernel", lambda mixer, hidden, backends: chunked_scan)
        monkeypatch.setattr(probes, "selective_scan_fn", lambda: chunked_scan)
    m = random_model(n_layer=4, d_model=16, d_state=4)
    ids = torch.randint(0, 64, (3, 21))
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    outs = {}
    for path in ("kernel", "reference"):
        if path == "reference":
            monkeypatch.setattr(mamba1, "scan_kernel", lambda mixer, hidden, backends: None)
        with torch.no_grad():
            outs[path] = [
                m(ids, simba=None, return_states=True),
                m(ids, simba=PRUNE, return_kept=True),
                m(ids, mask, simba=PRUNE, return_kept=True),
                m(ids, mask, simba=DECI, return_kept=True),
                m(ids, mask, simba=SHARE, return_kept=True),
                m(ids, mask, simba=QUERY, return_kept=True),
                m(ids, mask, simba=RECENT_QUERY, return_kept=True),
                m(ids[:, :2], simba=None, return_states=True),  # shorter than the conv window
            ]
    for k, r in zip(outs["kernel"], outs["reference"]):
        assert rel(k.logits, r.logits) < 1e-5
        for sk, sr in zip(k.states or [], r.states or []):
            assert sk.conv.shape == sr.conv.shape and rel(sk.conv, sr.conv) < 1e-6 and rel(sk.ssm, sr.ssm) < 1e-5
        for a, b in zip(k.kept or [], r.kept or []):
            assert torch.equal(a, b)
    assert set(lengths) == ({128} if chunked else set())  # rows of 21 tokens or fewer: one 128-step chunk


def test_scan_length_is_whole_chunks_of_mamba_ssms_kernel():
    assert [SCAN_CHUNKS["mamba1"].scan_length(t) for t in (1, 128, 129, 700, 1024, 1025, 2048, 3000, 6144, 6152)] == [
        128, 128, 256, 1024, 1024, 2048, 2048, 4096, 6144, 8192]


# (2) the Triton kernels through Triton's interpreter on CPU ------------------------------------------------

INTERPRET_CHECK = r"""
from simba_compress.ssm import triton_kernels as tk
from simba_compress.ssm.score import global_impact
torch.manual_seed(0)
out = {}
for dtype in (torch.float32, torch.bfloat16):
    b, d, l, n = 2, 80, 150, 4   # d and l not multiples of the blocks; several time segments
    x = torch.randn(b, d, l).to(dtype)
    dt_raw = (torch.randn(b, d, l) - 2).to(dtype)
    bias = torch.randn(d)
    A = -torch.exp(torch.rand(d, n) * 3)
    xdbl = torch.randn(b, 3 + 2 * n, l).to(dtype)
    B, C = xdbl[:, 3:3 + n], xdbl[:, 3 + n:]   # views, as the GPU path passes them
    last = torch.tensor([l - 1, 97])
    s = tk.global_impact(x, dt_raw, bias, A, B, C, last)
    dt = F.softplus(dt_raw.float() + bias[:, None])
    ref = global_impact(x.mT, dt.mT, A, B.mT, C.mT, last)
    out[str(dtype)] = ((s - ref).abs().max() / ref.abs().max()).item()
    out[str(dtype) + "_after_last_zero"] = bool((s[1, 98:] == 0).all())
# the selective scan against the reference (mamba_ssm's contract: softplus, D, the gate), operands as views
from simba_compress.ssm.scan import selective_scan
b, d, l, n = 2, 20, 37, 5   # several time tiles, a partial last one, d and n off the block sizes
for dtype in (torch.float32, torch.bfloat16):
    u = torch.randn(b, d, l).to(dtype)
    z = torch.randn(b, 2 * d, l).to(dtype)[:, d:]
    dt_raw = (torch.randn(b, d, l) - 1).to(dtype)
    bias, D = torch.randn(d), torch.randn(d)
    A = -torch.exp(torch.rand(d, n) * 4)
    xdbl = torch.randn(b, 3 + 2 * n, l).to(dtype)
    B, C = xdbl[:, 3:3 + n], xdbl[:, 3 + n:]
    y, hl = tk.selective_scan(u, dt_raw, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
    dt = F.softplus(dt_raw.float() + bias[:, None])
    yr, hr, _ = selective_scan(u.mT, dt.mT, A, B.mT, C.mT)
    yr = (yr.mT + u.float() * D[:, None]) * F.silu(z.float())
    out["scan_" + str(dtype)] = max(((y.float() - yr).abs().max() / yr.abs().max()).item(),
                                    ((hl - hr).abs().max() / hr.abs().max()).item())
    out["scan_dtype_" + str(dtype)] = y.dtype == dtype and hl.dtype == torch.float32
h = torch.randn(2, 10, 6)
idx = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
kept = torch.tensor([[1, 3, 5, 9], [0, 2, 8, 9]])
stays = torch.tensor([[True, True, True, True], [False, True, False, True]])
fr = torch.zeros(2, 11, 6)
got = tk.freeze_and_gather(h, idx, kept, stays, fr)
ref = torch.zeros(2, 11, 6).scatter_(1, idx.unsqueeze(-1).expand_as(h), h)
leaves = ~torch.zeros(2, 10, dtype=torch.bool).scatter_(1, kept, stays)
out["gather"] = torch.equal(got, h.gather(1, kept.unsqueeze(-1).expand(-1, -1, 6)))
out["frozen"] = all(torch.equal(fr[r, idx[r][leaves[r]]], ref[r, idx[r][leaves[r]]]) for r in range(2))
print(json.dumps(out))
"""


def test_triton_kernels_in_interpreter():
    out = run_in_triton_interpreter(INTERPRET_CHECK)
    assert out["torch.float32"] < 1e-5 and out["torch.bfloat16"] < 1e-5, out
    assert out["torch.float32_after_last_zero"] and out["torch.bfloat16_after_last_zero"]
    assert out["gather"] and out["frozen"], out
    # the interpreter casts float32 to bf16 by truncation (the GPU rounds to nearest): bf16 gets bf16's tolerance
    assert out["scan_torch.float32"] < 1e-5 and out["scan_torch.bfloat16"] < 1e-2, out
    assert out["scan_dtype_torch.float32"] and out["scan_dtype_torch.bfloat16"], out


# (3) on CUDA -------------------------------------------------------------------------------------------------


def gpu_model(dtype):
    """(CPU reference, GPU model): a random model scaled like a trained one (weights ~ 0.3 / sqrt(fan_in);
    conftest's N(0, 0.3) weights lose 25% of their logits to bf16 rounding). The reference is the float32
    forward of the same (dtype-rounded) weights, so the error measured is the GPU path's alone."""
    m = random_model(n_layer=4, d_model=64, d_state=16, vocab=128)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("in_proj.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight", "conv1d.weight")):
                p.div_(math.sqrt(p[0].numel()))
    return copy.deepcopy(m).to(dtype).float(), m.to("cuda", dtype)  # Module.to moves in place: copy first


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_score_kernel_matches_reference(dtype):
    torch.manual_seed(0)
    b, d, l, n = 3, 300, 1000, 16
    x = torch.randn(b, d, l, device="cuda").to(dtype)
    dt_raw = (torch.randn(b, d, l, device="cuda") - 3).to(dtype)
    bias = torch.randn(d, device="cuda")
    A = -torch.exp(torch.rand(d, n, device="cuda") * 3)
    xdbl = torch.randn(b, 8 + 2 * n, l, device="cuda").to(dtype)
    B, C = xdbl[:, 8 : 8 + n], xdbl[:, 8 + n :]
    last = torch.tensor([l - 1, 500, 3], device="cuda")
    got = probes.triton_kernels().global_impact(x, dt_raw, bias, A, B, C, last)
    dt = F.softplus(dt_raw.float() + bias[:, None])
    ref = global_impact(*(t.cpu() for t in (x.mT, dt.mT, A, B.mT, C.mT, last)))
    assert rel(got, ref) < TOL[dtype]
    assert (got[1, 501:] == 0).all() and (got[2, 4:] == 0).all()


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_scan_matches_reference(dtype):
    """The Triton selective scan (the GPU path without mamba_ssm) against the CPU reference, on a long row with
    decays strong enough that the reference needs float64 chunks (A up to -e^5, dt up to ~e^1)."""
    from simba_compress.ssm import triton_kernels

    torch.manual_seed(0)
    b, d, l, n = 2, 300, 3000, 16
    u = torch.randn(b, d, l, device="cuda").to(dtype)
    z = torch.randn(b, 2 * d, l, device="cuda").to(dtype)[:, d:]
    dt_raw = (torch.randn(b, d, l, device="cuda") - 2).to(dtype)
    bias, D = torch.randn(d, device="cuda"), torch.randn(d, device="cuda")
    A = -torch.exp(torch.rand(d, n, device="cuda") * 5)
    xdbl = torch.randn(b, 8 + 2 * n, l, device="cuda").to(dtype)
    B, C = xdbl[:, 8 : 8 + n], xdbl[:, 8 + n :]
    y, h = triton_kernels.selective_scan(u, dt_raw, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True,
                                         return_last_state=True)  # fmt: skip
    u, z, dt_raw, bias, D, A, B, C = (t.cpu() for t in (u, z, dt_raw, bias, D, A, B, C))
    yr, hr = scan_reference(u, dt_raw, A, B, C, D, z, bias)
    assert y.dtype == dtype and rel(y, yr) < TOL[dtype] and rel(h, hr) < 1e-4
    if probes.mamba_ssm_available():  # and against mamba_ssm's own kernel, same operands
        ym = probes.selective_scan_fn()(*(t.cuda() for t in (u, dt_raw, A, B, C, D)), z=z.cuda(),
                                             delta_bias=bias.cuda(), delta_softplus=True)  # fmt: skip
        assert rel(y, ym) < TOL[dtype]


def _compare(gpu_m, cpu_m, ids, mask, simba, dtype, check_kept: bool):
    with torch.no_grad():
        g = gpu_m(ids.cuda(), None if mask is None else mask.cuda(), simba=simba, return_kept=True)
        r = cpu_m(ids, mask, simba=simba, return_kept=True)
    if check_kept:
        for a, b in zip(g.kept, r.kept):
            assert torch.equal(a.cpu(), b), "kept tokens differ (a near-tie in the score?)"
    err = rel(g.logits, r.logits) if dtype == torch.float32 else rel_norm(g.logits, r.logits)
    assert err < TOL[dtype]


def use_scan(path: str, monkeypatch) -> None:
    """Route the GPU mixer through one scan: "mamba_ssm", "triton" (the project's own GPU path, as without
    mamba_ssm) or "reference" (the PyTorch chunked scan on CUDA)."""
    if path == "mamba_ssm" and not probes.mamba_ssm_available():
        pytest.skip("mamba_ssm not installed")
    if path == "triton":
        if not probes.triton_available():
            pytest.skip("triton not available")
        monkeypatch.setattr(probes, "selective_scan_fn", lambda: None)
    if path == "reference":
        monkeypatch.setattr(mamba1, "scan_kernel", lambda mixer, hidden, backends: None)


SCANS = ["mamba_ssm", "triton", "reference"]


@needs_cuda
@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_model_matches_cpu(dtype, scan, monkeypatch):
    use_scan(scan, monkeypatch)
    cpu_m, gpu_m = gpu_model(dtype)
    ids = torch.randint(0, 128, (2, 300))
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[0, :37] = 0
    _compare(gpu_m, cpu_m, ids, None, None, dtype, False)
    _compare(gpu_m, cpu_m, ids, None, STRIDE, dtype, True)
    _compare(gpu_m, cpu_m, ids, mask, STRIDE, dtype, True)
    if dtype == torch.float32:
        _compare(gpu_m, cpu_m, ids, None, PRUNE, dtype, True)
        _compare(gpu_m, cpu_m, ids, mask, PRUNE, dtype, True)
        _compare(gpu_m, cpu_m, ids, mask, DECI, dtype, True)
        _compare(gpu_m, cpu_m, ids, mask, SHARE, dtype, True)
        _compare(gpu_m, cpu_m, ids, mask, QUERY, dtype, True)
        _compare(gpu_m, cpu_m, ids, mask, RECENT_QUERY, dtype, True)


@needs_cuda
def test_query_attention_on_cuda_matches_the_reference():
    """The query criterion's scores on CUDA (bf16 stream, as a bf16 model's) equal the CPU's from the same stream."""
    from simba_compress.pruning import query_attention

    torch.manual_seed(0)
    b, w, d = 3, 5000, 256
    hidden = (torch.randn(b, w, d) + torch.randn(d)).bfloat16()
    real = torch.ones(b, w, dtype=torch.bool)
    real[1, :700] = False  # left padding
    query = real & (torch.arange(w) >= w - 20)
    got = query_attention(hidden.cuda(), real.cuda(), query.cuda())
    ref = query_attention(hidden, real, query)
    assert torch.equal(torch.isinf(got).cpu(), torch.isinf(ref)) and rel(got[real].cpu(), ref[real]) < 1e-4


@needs_cuda
@needs_mamba_ssm
def test_decode_states_and_generate_match_cpu():
    cpu_m, gpu_m = gpu_model(torch.float32)
    ids = torch.randint(0, 128, (2, 50))
    with torch.no_grad():
        g = gpu_m(ids.cuda(), simba=PRUNE, return_states=True)
        r = cpu_m(ids, simba=PRUNE, return_states=True)
    for sg, sr in zip(g.states, r.states):
        assert rel(sg.conv, sr.conv) < 1e-4 and rel(sg.ssm, sr.ssm) < 1e-4
    gpu_m.simba = cpu_m.simba = PRUNE
    assert torch.equal(gpu_m.generate(ids.cuda(), max_new_tokens=8).cpu(), cpu_m.generate(ids, max_new_tokens=8))


@needs_cuda
@pytest.mark.parametrize("scan", ["mamba_ssm", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_proxy_matches_cpu(dtype, scan, monkeypatch):
    use_scan(scan, monkeypatch)
    path = proxy_path()
    if path is None:
        pytest.skip("proxy checkpoint not found (set SIMBA_PROXY_MODEL)")
    cpu_m, gpu_m = load(path, dtype=dtype).float(), load(path, dtype=dtype, device="cuda")
    torch.manual_seed(0)
    ids = torch.randint(0, cpu_m.config.vocab_size, (2, 512))
    keep = linear(cpu_m.config.n_layer, 0.2)
    _compare(gpu_m, cpu_m, ids, None, None, dtype, False)
    _compare(gpu_m, cpu_m, ids, None, SimbaConfig(keep, criterion="stride"), dtype, True)
    if dtype == torch.float32:
        _compare(gpu_m, cpu_m, ids, None, SimbaConfig(keep), dtype, True)


@needs_cuda
@pytest.mark.parametrize("with_mamba_ssm", [True, False])
def test_pruned_gradients_match_cpu(with_mamba_ssm, monkeypatch):
    """Fine-tuning on CUDA: gradients of a pruned forward equal the CPU reference's. The Triton gather and
    scan have no backward: under autograd the PyTorch gather runs, and without mamba_ssm the reference scan."""
    if with_mamba_ssm and not probes.mamba_ssm_available():
        pytest.skip("mamba_ssm not installed")
    if not with_mamba_ssm:
        monkeypatch.setattr(probes, "selective_scan_fn", lambda: None)
        m = gpu_model(torch.float32)[1]
        assert mamba1.scan_kernel(m.backbone.layers[0].mixer, torch.zeros(1, device="cuda"), m.backends) is None
    cpu_m, gpu_m = gpu_model(torch.float32)
    ids = torch.randint(0, 128, (2, 200))
    grads = []
    for m, x in ((gpu_m, ids.cuda()), (cpu_m, ids)):
        m.zero_grad()
        logits = m(x, simba=PRUNE).logits
        F.cross_entropy(logits[:, -16:-1].flatten(0, 1).float(), x[:, -15:].flatten()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    first = "backbone.layers.0.mixer.in_proj.weight"
    assert grads[0][first] is not None and grads[0][first].abs().sum() > 0
    for name, ref in grads[1].items():
        assert rel(grads[0][name], ref) < 1e-3, name


# (4) Mamba-2 on CUDA: mamba_ssm's SSD prefill and heads-form step against the CPU reference and mamba_ssm --------


def mamba2_pair(dtype, n_layer=4):
    """(CPU float32 reference of the dtype-rounded weights, the same model on CUDA): trained-like ranges, d_state 64,
    headdim 32, 2 groups (as Codestral's grouped B and C)."""
    torch.manual_seed(0)
    from simba_compress import MambaLM, ModelConfig

    cfg = ModelConfig(d_model=128, n_layer=n_layer, vocab_size=256, d_state=64, layer="mamba2", headdim=32, ngroups=2)
    m = MambaLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 1.0 / math.sqrt(p[0].numel()))
        for block in m.backbone.layers:
            block.mixer.A_log.uniform_(0, 2.5)
            block.mixer.dt_bias.uniform_(-5, -1)
    return copy.deepcopy(m).to(dtype).float(), m.to("cuda", dtype)


needs_ssd = pytest.mark.skipif(not (CUDA and probes.ssd_kernels() is not None), reason="mamba_ssm's Triton SSD not importable")


def kernel_backends(path: str, mamba_ssm: bool, missing: str) -> probes.Backends:
    """Backends through one set of kernels, "mamba_ssm" (skipped unless `mamba_ssm`: `missing` says what is absent)
    or "triton" (the project's: the path without mamba_ssm)."""
    if path == "mamba_ssm" and not mamba_ssm:
        pytest.skip(missing)
    if path == "triton" and not probes.triton_available():
        pytest.skip("triton not available")
    return probes.Backends(scan="triton" if path == "triton" else "auto", step=path)


def mamba2_backends(path: str) -> probes.Backends:
    """Route a Mamba-2 model through one set of kernels: "mamba_ssm" (its SSD, gated norm and heads-form step, with
    causal_conv1d's where installed) or "triton" (the project's SSD, norm and step: the path without mamba_ssm)."""
    return kernel_backends(path, probes.ssd_kernels() is not None, "mamba_ssm's Triton SSD not importable")


@needs_cuda
@pytest.mark.parametrize("path", ["mamba_ssm", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba2_fast_path_matches_cpu(dtype, path):
    """Dense, pruned (simba and the fixed-position stride) and left-padded logits, decode states, then generate
    (a pruned, left-padded batch decoded from the CUDA graph: greedy tokens equal the CPU reference's)."""
    from simba_compress import mamba2

    backends = mamba2_backends(path)
    cpu_m, gpu_m = mamba2_pair(dtype)
    gpu_m.backends = backends
    ids = torch.randint(0, 256, (2, 600))  # several SSD chunks, a partial last one
    mask = torch.ones(2, 600, dtype=torch.long)
    mask[0, :45] = 0
    with torch.no_grad():
        assert mamba2.ssd_kernel(gpu_m.backbone.layers[0].mixer, ids.cuda(), backends) == path
    assert mamba2.step_kernels(ids.cuda(), backends) == path
    _compare(gpu_m, cpu_m, ids, None, None, dtype, False)
    _compare(gpu_m, cpu_m, ids, mask, STRIDE, dtype, True)
    if dtype == torch.float32:
        _compare(gpu_m, cpu_m, ids, None, PRUNE, dtype, True)
        _compare(gpu_m, cpu_m, ids, mask, SHARE, dtype, True)
        _compare(gpu_m, cpu_m, ids, mask, DECI, dtype, True)
        _compare(gpu_m, cpu_m, ids, mask, QUERY, dtype, True)
        _compare(gpu_m, cpu_m, ids, mask, RECENT_QUERY, dtype, True)
        with torch.no_grad():
            g = gpu_m(ids.cuda(), mask.cuda(), simba=PRUNE, return_states=True)
            r = cpu_m(ids, mask, simba=PRUNE, return_states=True)
        for sg, sr in zip(g.states, r.states):
            assert rel(sg.conv, sr.conv) < 1e-4 and rel(sg.ssm, sr.ssm) < 1e-4
        gpu_m.simba = cpu_m.simba = PRUNE
        assert torch.equal(gpu_m.generate(ids[:, :300].cuda(), mask[:, :300].cuda(), max_new_tokens=16).cpu(),
                           cpu_m.generate(ids[:, :300], mask[:, :300], max_new_tokens=16))  # fmt: skip
        assert gpu_m._graphs.decoders[(2, True, False, False)].graph is not None  # the CUDA-graph decode ran
        from simba_compress.generation import GenerationConfig, generate

        sampled = GenerationConfig(max_new_tokens=16, do_sample=True, top_k=20, top_p=0.9)
        eager = GenerationConfig(**{**sampled.__dict__, "cuda_graph": False})
        a, b = (generate(gpu_m, ids[:, :300].cuda(), mask[:, :300].cuda(), c, torch.Generator("cuda").manual_seed(1))
                for c in (sampled, eager))  # fmt: skip
        assert torch.equal(a.sequences, b.sequences)  # the graph's draws are the eager step's


@needs_cuda
@pytest.mark.parametrize("path", ["mamba_ssm", "triton"])
def test_mamba2_bf16_step_within_rounding_of_the_cpu_reference(path):
    """One fused Mamba-2 step in bf16 (from the same prefill states) against the CPU float32 step, norm-wise."""
    cpu_m, gpu_m = mamba2_pair(torch.bfloat16)
    gpu_m.backends = mamba2_backends(path)
    ids = torch.randint(0, 256, (2, 300))
    with torch.no_grad():
        ref = cpu_m(ids, return_states=True)
        ref_logits, _ = cpu_m.step(ids[:, -1], ref.states)
        out = gpu_m(ids.cuda(), return_states=True, last_logits=1)
        logits = fused_step_logits(gpu_m, out.states, ids[:, -1].cuda())
    assert rel_norm(logits, ref_logits) < 1e-2


@needs_cuda
@needs_ssd
@pytest.mark.parametrize("criterion", ["simba", "share", "deci"])
def test_mamba2_scores_on_cuda_match_the_reference(criterion):
    """The SSD scores from the CUDA layer's own operands equal ssm/ssd.py's on the CPU (bf16 operands)."""
    from simba_compress.ssm.ssd import ssd_score

    torch.manual_seed(0)
    b, l, h, p, g, n = 2, 1500, 16, 32, 2, 64
    x = torch.randn(b, l, h, p, device="cuda").bfloat16()
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, device="cuda") - 3)
    A = -torch.exp(torch.rand(h, device="cuda") * 2.5)
    B, C = (torch.randn(b, l, g, n, device="cuda").bfloat16() for _ in range(2))
    last = torch.tensor([l - 1, 900], device="cuda")
    got = ssd_score(criterion, x, dt, A, B, C, last)
    ref = ssd_score(criterion, *(t.cpu() for t in (x, dt, A, B, C, last)))
    assert rel(got, ref) < 1e-4


@needs_cuda
@needs_ssd
def test_mamba2_dense_equals_mamba_ssm():
    """Our Mamba-2 forward and greedy generation against mamba_ssm's MambaLMHeadModel on the same weights."""
    from simba_compress.bench import mamba_ssm_twin

    _, gpu_m = mamba2_pair(torch.float32)
    twin = mamba_ssm_twin(gpu_m)
    if twin is None:
        pytest.skip("mamba_ssm's MambaLMHeadModel does not import")
    ids = torch.randint(0, 256, (2, 700), device="cuda")
    with torch.no_grad():
        ours, theirs = gpu_m(ids, simba=None).logits, twin(ids).logits
    assert rel(ours, theirs) < 1e-3
    out = twin.generate(ids[:, :200], max_length=216, cg=True, return_dict_in_generate=True)
    assert torch.equal(gpu_m.generate(ids[:, :200], max_new_tokens=16), out.sequences)


# (5) mamba_ssm without its Mamba-1 CUDA scan (its next release makes selective_scan_cuda opt-in) -----------------


@pytest.fixture
def without_mamba_ssm_scan():
    """mamba_ssm as its next release installs by default: its Triton kernels without the Mamba-1 CUDA extension
    (state-spaces/mamba PR #977). Its Triton modules are imported first (2.3.2's package __init__ imports the
    extension; the next one does not), then the extension is made unimportable and every probe forgotten; both are
    undone afterwards, the probes forgotten again."""
    import sys

    probes.ssd_kernels(), probes.selective_state_update()  # imported while the extension is there
    saved = sys.modules.get("selective_scan_cuda")
    sys.modules["selective_scan_cuda"] = None  # `import selective_scan_cuda` raises ImportError
    probes.clear_probes()
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop("selective_scan_cuda", None)
        else:
            sys.modules["selective_scan_cuda"] = saved
        probes.clear_probes()


@needs_cuda
@needs_triton
def test_every_path_runs_without_mamba_ssms_scan(without_mamba_ssm_scan):
    """Mamba-1 through the project's Triton scan, Mamba-2 through mamba_ssm's SSD (where its Triton modules import),
    and generation, all equal to the CPU reference, with `import selective_scan_cuda` failing."""
    assert probes.selective_scan_fn() is None and not probes.describe()["mamba_ssm_scan"]
    cpu_m, gpu_m = gpu_model(torch.float32)
    with torch.no_grad():
        assert mamba1.scan_kernel(gpu_m.backbone.layers[0].mixer, torch.zeros(1, device="cuda"), gpu_m.backends) is \
            probes.triton_kernels().selective_scan  # fmt: skip
    ids = torch.randint(0, 128, (2, 300))
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[0, :37] = 0
    _compare(gpu_m, cpu_m, ids, None, None, torch.float32, False)
    _compare(gpu_m, cpu_m, ids, mask, PRUNE, torch.float32, True)
    gpu_m.simba = cpu_m.simba = PRUNE
    assert torch.equal(gpu_m.generate(ids.cuda(), mask.cuda(), max_new_tokens=8).cpu(),
                       cpu_m.generate(ids, mask, max_new_tokens=8))  # fmt: skip
    if probes.ssd_kernels() is None:
        pytest.skip("mamba_ssm's Triton SSD does not import here (Mamba-1 checked)")
    from simba_compress import mamba2

    cpu2, gpu2 = mamba2_pair(torch.float32)
    with torch.no_grad():
        assert mamba2.ssd_kernel(gpu2.backbone.layers[0].mixer, ids.cuda(), gpu2.backends) == "mamba_ssm"
    _compare(gpu2, cpu2, ids, mask, PRUNE, torch.float32, True)
    gpu2.simba = cpu2.simba = PRUNE
    assert torch.equal(gpu2.generate(ids.cuda(), mask.cuda(), max_new_tokens=8).cpu(),
                       cpu2.generate(ids, mask, max_new_tokens=8))  # fmt: skip


# (6) Hybrids on CUDA: SDPA prefill on the kept tokens, the graph decode over per-layer KV caches, mamba_ssm ------


def hybrid_pair(dtype, **kw):
    """(CPU float32 reference of the dtype-rounded weights, the same hybrid on CUDA): Mamba-2 layers and GQA attention
    at layers 2 and 4 (a qkv conv and partial RoPE unless kw says otherwise), the state-spaces layout's terms."""
    from conftest import random_hybrid

    m = random_hybrid(n_layer=6, attn_layers=(2, 4), d_model=64, vocab=256, **kw)
    return copy.deepcopy(m).to(dtype).float(), m.to("cuda", dtype)


HYBRID_PRUNE = [1.0, 1.0, 1.0, 0.75, 0.5, 0.25]  # the attention layers 2 and 4 prune (rank for the next), and Mamba layer 3


@needs_cuda
@pytest.mark.parametrize("path", ["mamba_ssm", "triton"])
@pytest.mark.parametrize("attention_decode", ["sdpa", "matmul"])
def test_hybrid_fast_path_matches_cpu(path, attention_decode):
    """float32: dense, pruned (simba with either attention score, snapkv, the fixed-position stride) and left-padded
    logits with equal kept sets; a pruned left-padded batch generated from the CUDA graph (greedy tokens equal the
    CPU reference's), its attention layers decoding over their own kept tokens through SDPA or the two matmuls."""
    cpu_m, gpu_m = hybrid_pair(torch.float32)
    gpu_m.backends = mamba2_backends(path).replace(attention_decode=attention_decode)
    ids = torch.randint(0, 256, (2, 600))
    mask = torch.ones(2, 600, dtype=torch.long)
    mask[0, :45] = 0
    _compare(gpu_m, cpu_m, ids, None, None, torch.float32, False)
    _compare(gpu_m, cpu_m, ids, mask, None, torch.float32, False)
    for simba in (SimbaConfig(HYBRID_PRUNE, "stride", protect_last=4),
                  SimbaConfig(HYBRID_PRUNE, protect_last=4, attention_score="carry"),
                  SimbaConfig(HYBRID_PRUNE, protect_last=4, attention_score="snapkv"),
                  SimbaConfig(HYBRID_PRUNE, "snapkv", protect_last=4)):  # fmt: skip
        _compare(gpu_m, cpu_m, ids, mask, simba, torch.float32, True)
    gpu_m.simba = cpu_m.simba = SimbaConfig(HYBRID_PRUNE, protect_last=4)
    assert torch.equal(gpu_m.generate(ids[:, :300].cuda(), mask[:, :300].cuda(), max_new_tokens=16).cpu(),
                       cpu_m.generate(ids[:, :300], mask[:, :300], max_new_tokens=16))  # fmt: skip
    assert any(d.graph is not None for d in gpu_m._graphs.decoders.values())  # the CUDA-graph decode ran


@needs_cuda
def test_hybrid_bf16_within_rounding_of_the_cpu_reference():
    """bf16 on CUDA (SDPA's flash or memory-efficient kernel on the kept tokens) against the CPU float32 forward of
    the same rounded weights, norm-wise; stride keeps the same tokens in both."""
    cpu_m, gpu_m = hybrid_pair(torch.bfloat16, rotary_dim=0, attn_conv=0)  # as the hybrid proxy: NoPE, no conv
    ids = torch.randint(0, 256, (2, 700))
    _compare(gpu_m, cpu_m, ids, None, None, torch.bfloat16, False)
    _compare(gpu_m, cpu_m, ids, None, SimbaConfig(HYBRID_PRUNE, "stride", protect_last=4), torch.bfloat16, True)


@needs_cuda
@needs_ssd
def test_hybrid_dense_prefill_equals_mamba_ssm():
    """A state-spaces hybrid's dense logits against mamba_ssm's MambaLMHeadModel (attn_layer_idx / attn_cfg) on the
    same weights. Its decode is not compared: mamba_ssm's MHA decodes through flash_attn's kv-cache kernel, absent
    on the GPU machine (benchmarks/results/cpu/check_mamba_ssm_hybrid.md). No RoPE: mamba_ssm's needs flash_attn."""
    from simba_compress.bench import mamba_ssm_twin

    _, gpu_m = hybrid_pair(torch.float32, rotary_dim=0)
    twin = mamba_ssm_twin(gpu_m)
    if twin is None:
        pytest.skip("mamba_ssm's MambaLMHeadModel does not import")
    ids = torch.randint(0, 256, (2, 700), device="cuda")
    with torch.no_grad():
        assert rel(gpu_m(ids, simba=None).logits, twin(ids).logits) < 1e-3


# (7) Jamba and Falcon-H1 on CUDA: Jamba's dt/B/C norms on Mamba-1's fast prefill and both fused steps; Falcon-H1's
# parallel layers, multipliers and Mamba-2 without its gated norm ------------------------------------------------


def family_pair(name: str, dtype):
    """(CPU float32 reference of the dtype-rounded weights, the same model on CUDA) of conftest.FAMILIES[name]."""
    from conftest import random_family

    m = random_family(name, d_model=64, vocab=256, seed=2)
    return copy.deepcopy(m).to(dtype).float(), m.to("cuda", dtype)


def family_backends(name: str, path: str) -> probes.Backends:
    """Route Jamba (Mamba-1) or Falcon-H1 and Zamba2 (Mamba-2) through mamba_ssm's kernels or the project's Triton ones
    (Zamba2's Mamba-2, with its dt floor, runs its reference on CUDA: its shared attention takes the fast paths)."""
    if name in ("falcon_h1", "zamba2"):
        return mamba2_backends(path)
    ready = probes.mamba_ssm_available() and None not in (probes.selective_state_update(), probes.causal_conv1d_update())
    return kernel_backends(path, ready, "mamba_ssm's scan and step (with causal_conv1d's update) not installed")


@needs_cuda
@pytest.mark.parametrize("path", ["mamba_ssm", "triton"])
@pytest.mark.parametrize("name", ["jamba", "falcon_h1", "zamba2"])
def test_hybrid_family_fast_path_matches_cpu(name, path):
    """float32: dense, left-padded and pruned logits (kept sets equal) and a pruned left-padded batch generated from the
    CUDA graph (greedy tokens equal the CPU's) through each path's scan and fused step; bf16 dense norm-wise."""
    cpu_m, gpu_m = family_pair(name, torch.float32)
    gpu_m.backends = family_backends(name, path)
    ids = torch.randint(0, 256, (2, 600))
    mask = torch.ones(2, 600, dtype=torch.long)
    mask[0, :45] = 0
    _compare(gpu_m, cpu_m, ids, None, None, torch.float32, False)
    _compare(gpu_m, cpu_m, ids, mask, None, torch.float32, False)
    for simba in (SimbaConfig([1.0, 0.75, 0.5], protect_last=4), SimbaConfig([1.0, 0.75, 0.5], "stride", protect_last=4),
                  SimbaConfig([1.0, 1.0, 0.5], "snapkv", protect_last=4)):  # fmt: skip
        _compare(gpu_m, cpu_m, ids, mask, simba, torch.float32, True)
    gpu_m.simba = cpu_m.simba = SimbaConfig([1.0, 0.75, 0.5], protect_last=4)
    assert torch.equal(gpu_m.generate(ids[:, :300].cuda(), mask[:, :300].cuda(), max_new_tokens=16).cpu(),
                       cpu_m.generate(ids[:, :300], mask[:, :300], max_new_tokens=16))  # fmt: skip
    assert any(d.graph is not None for d in gpu_m._graphs.decoders.values())  # the CUDA-graph decode ran
    cpu_b, gpu_b = family_pair(name, torch.bfloat16)
    gpu_b.backends = gpu_m.backends
    _compare(gpu_b, cpu_b, ids, None, None, torch.bfloat16, False)
