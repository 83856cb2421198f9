"""Mamba-2: the SSD scan and its score against loops, the model against transformers' Mamba2ForCausalLM, and the
fast paths (the project's Triton SSD and step; mamba_ssm's kernels from a source tree) against the reference path
through Triton's interpreter on CPU tensors.

mamba_ssm's Triton kernels run in the interpreter too, from its source: set SIMBA_TEST_MAMBA_SSM_SRC to a folder
that holds mamba_ssm/ (e.g. the unpacked sdist of mamba_ssm 2.3.2.post1); its CUDA extension is not needed. Those
tests skip without it (CI).
"""

import json
import os

import pytest
import torch

import simba_compress.ssm.ssd as ssd
from simba_compress import MambaLM, ModelConfig, SimbaConfig, load, save
from simba_compress.schedules import linear
from simba_compress.ssm.ssd import ssd_impact, ssd_scan, ssd_share, ssd_step

from conftest import run_in_triton_interpreter

MAMBA_SSM_SRC = os.environ.get("SIMBA_TEST_MAMBA_SSM_SRC")
needs_mamba_ssm_src = pytest.mark.skipif(
    not (MAMBA_SSM_SRC and os.path.isdir(os.path.join(MAMBA_SSM_SRC, "mamba_ssm"))),
    reason="SIMBA_TEST_MAMBA_SSM_SRC: no mamba_ssm source tree to run its Triton kernels from",
)


def loop_ssd(x, dt, A, B, C):
    b, l, H, P = x.shape
    rep = H // B.shape[2]
    x, dt, A = x.double(), dt.double(), A.double()
    B, C = B.double().repeat_interleave(rep, 2), C.double().repeat_interleave(rep, 2)
    h = torch.zeros(b, H, P, B.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(l):
        h = torch.exp(dt[:, t] * A)[:, :, None, None] * h + (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * B[:, t].unsqueeze(2)
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(ys, 1), h


def ssd_inputs(b=2, l=45, H=4, P=3, g=2, n=5, scale=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, l, H, P, generator=gen),
        torch.rand(b, l, H, generator=gen) * scale + 1e-3,
        -torch.exp(torch.rand(H, generator=gen) * 2),
        torch.randn(b, l, g, n, generator=gen),
        torch.randn(b, l, g, n, generator=gen),
    )


@pytest.mark.parametrize("length, chunk", [(45, 16), (64, 64), (5, 64), (1, 8)])
@pytest.mark.parametrize("scale", [0.05, 5.0])
def test_ssd_matches_loop(length, chunk, scale):
    x, dt, A, B, C = ssd_inputs(l=length, scale=scale)
    y, h = ssd_scan(x, dt, A, B, C, chunk=chunk)
    yr, hr = loop_ssd(x, dt, A, B, C)
    assert torch.allclose(y.double(), yr, rtol=1e-5, atol=1e-5 * yr.abs().max().item())
    assert torch.allclose(h.double(), hr, rtol=1e-5, atol=1e-5 * hr.abs().max().item())
    if length == 1:
        return
    _, h_prev = ssd_scan(x[:, :-1], dt[:, :-1], A, B[:, :-1], C[:, :-1], chunk=chunk)
    y_last, _ = ssd_step(h_prev, x[:, -1], dt[:, -1], A, B[:, -1], C[:, -1])
    assert torch.allclose(y_last, y[:, -1], rtol=1e-4, atol=1e-5)
    # continuing from a state (h0): the second half after the first equals the whole
    half = length // 2
    _, h_half = ssd_scan(x[:, :half], dt[:, :half], A, B[:, :half], C[:, :half], chunk=chunk)
    y2, h2 = ssd_scan(x[:, half:], dt[:, half:], A, B[:, half:], C[:, half:], h0=h_half, chunk=chunk)
    assert torch.allclose(y2.double(), yr[:, half:], rtol=1e-5, atol=1e-5 * yr.abs().max().item())
    assert torch.allclose(h2.double(), hr, rtol=1e-5, atol=1e-5 * hr.abs().max().item())


@pytest.mark.parametrize("chunk_elements", [None, 3 * 2 * 4 * 3])  # one chunk; chunks of 3 tokens
def test_ssd_impact_and_share_match_definition(chunk_elements, monkeypatch):
    if chunk_elements:
        monkeypatch.setattr(ssd, "SCORE_CHUNK_ELEMENTS", chunk_elements)
    x, dt, A, B, C = ssd_inputs(l=20)
    last = torch.tensor([19, 11])
    rep = 2
    dy = torch.zeros(2, 20, 4, 3, dtype=torch.float64)  # |dy_T(t)[h, p]|
    for r in range(2):
        T = int(last[r])
        for t in range(T + 1):
            gap = dt[r, t + 1 : T + 1].double().sum(0)  # (h,)
            cb = (C[r, T].double() * B[r, t].double()).sum(-1).repeat_interleave(rep)  # (h,)
            dy[r, t] = (dt[r, t, :, None].double() * x[r, t].double() * (cb * torch.exp(A.double() * gap))[:, None]).abs()
    flat = dy.flatten(2)
    assert torch.allclose(ssd_impact(x, dt, A, B, C, last).double(), flat.amax(-1), rtol=1e-5, atol=0)
    share = (flat / flat.sum(1, keepdim=True)).amax(-1)
    got = ssd_share(x, dt, A, B, C, last)
    assert torch.allclose(got.double(), share, rtol=1e-5, atol=1e-8) and (got[1, 12:] == 0).all()


def random_mamba2(n_layer=3, d_model=32, vocab=64, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, d_state=8, layer="mamba2", headdim=16, ngroups=2)
    m = MambaLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        for block in m.backbone.layers:
            block.mixer.A_log.uniform_(0, 2)
            block.mixer.dt_bias.uniform_(-4, 0)
            block.mixer.norm.weight.uniform_(0.5, 1.5)
            block.norm.weight.uniform_(0.5, 1.5)
    return m.eval()


def to_hf_mamba2(m):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    c = m.config
    cfg = Mamba2Config(
        hidden_size=c.d_model, num_hidden_layers=c.n_layer, vocab_size=c.vocab_size, state_size=c.d_state,
        expand=c.expand, head_dim=c.headdim, num_heads=c.d_inner // c.headdim, n_groups=c.ngroups,
        conv_kernel=c.d_conv, use_bias=c.bias, use_conv_bias=c.conv_bias, layer_norm_epsilon=c.norm_eps,
        residual_in_fp32=c.residual_in_fp32, tie_word_embeddings=c.tie_embeddings, chunk_size=16,
    )
    ref = Mamba2ForCausalLM(cfg)
    missing, unexpected = ref.load_state_dict(m.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return ref.eval()


@torch.no_grad()
def test_dense_equals_transformers_mamba2():
    m = random_mamba2()
    ids = torch.randint(0, 64, (2, 40))
    ours = m(ids, simba=SimbaConfig([1.0] * 3)).logits
    ref = to_hf_mamba2(m)(ids, use_cache=False).logits
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("criterion", ["simba", "query", "share", "deci"])
def test_mamba2_pruned_forward_padding_and_generate(criterion):
    m = random_mamba2(n_layer=4, seed=1)
    simba = SimbaConfig(linear(4, 0.3), criterion, 2)
    row = torch.randint(1, 64, (30,))
    alone = m(row[None], simba=simba, return_kept=True)
    assert alone.kept[-1].shape[1] == simba.counts(torch.tensor([30]))[-1, 0]
    ids = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.zeros(2, 30, dtype=torch.long)
    ids[0], mask[0] = row, 1
    ids[1, 10:], mask[1, 10:] = row[:20], 1
    out = m(ids, mask, simba=simba).logits
    assert torch.allclose(out[0], alone.logits[0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(out[1, 10:], m(row[None, :20], simba=simba).logits[0], rtol=1e-5, atol=1e-5)
    dense = m.generate(row[None, :12], max_new_tokens=4)  # dense decode == greedy full forwards
    seq = row[None, :12]
    for _ in range(4):
        seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(dense, seq)
    m.simba = simba
    assert m.generate(row[None], max_new_tokens=3).shape == (1, 33)


@torch.no_grad()
def test_mamba2_deci_keeps_the_largest_step_norms():
    """DeciMamba's criterion on Mamba-2: layer 1 runs on the top tokens by the L2 norm over heads of layer 0's
    step sizes softplus(dt + dt_bias) (dt needs no conv: computed here from in_proj alone), plus the tail."""
    m = random_mamba2(n_layer=2, seed=3)
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(4))
    simba = SimbaConfig([1.0, 0.4], "deci", 2)
    kept = m(ids, simba=simba, return_kept=True).kept[1]
    block = m.backbone.layers[0]
    dt_raw = block.mixer.in_proj(block.norm(m.backbone.embeddings(ids)))[..., -block.mixer.nheads :]
    norm = torch.nn.functional.softplus(dt_raw + block.mixer.dt_bias).norm(dim=-1)  # (b, l)
    norm[:, -2:] = float("inf")  # protected
    expected = norm.topk(12, dim=1).indices.sort(dim=1).values
    assert torch.equal(kept, expected)


def write_original_mamba2(m, folder, **ssm_options):
    """m in the state-spaces layout (mamba_ssm's MambaConfig fields, `embedding` key), ssm_cfg with ssm_options."""
    folder.mkdir()
    c = m.config
    ssm_cfg = {"layer": "Mamba2", "d_state": c.d_state, "headdim": c.headdim, "ngroups": c.ngroups, **ssm_options}
    (folder / "config.json").write_text(json.dumps({
        "d_model": c.d_model, "n_layer": c.n_layer, "vocab_size": c.vocab_size, "d_intermediate": 0, "ssm_cfg": ssm_cfg,
        "rms_norm": True, "residual_in_fp32": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True,
    }))  # fmt: skip
    torch.save({k.replace("embeddings.", "embedding."): v for k, v in m.state_dict().items()}, folder / "pytorch_model.bin")
    return folder


def test_mamba2_options_mamba_ssm_reads(tmp_path):
    """ssm_cfg as mamba_ssm's Mamba2 reads it: what does not change the layer's math loads (d_ssm given as d_inner,
    chunk_size, initialisation ranges, the default dt_limit); each option the mixer does not implement is one error
    naming the file and the key."""
    from simba_compress.errors import SimbaError

    m = random_mamba2(seed=5)
    ids = torch.randint(0, 64, (1, 20))
    same = {"d_ssm": m.config.d_inner, "chunk_size": 128, "A_init_range": [1, 16], "dt_limit": [0.0, float("inf")],
            "rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False, "use_mem_eff_path": True}  # fmt: skip
    with torch.no_grad():
        assert torch.equal(load(write_original_mamba2(m, tmp_path / "ok", **same))(ids).logits, m(ids).logits)
    for i, (key, value) in enumerate([("D_has_hdim", True), ("norm_before_gate", True), ("rmsnorm", False),
                                      ("dt_limit", [0.0, 0.1]), ("d_ssm", 32)]):  # fmt: skip
        folder = write_original_mamba2(m, tmp_path / str(i), **{key: value})
        with pytest.raises(SimbaError, match=rf"^{folder / 'config.json'}: ssm_cfg\.{key} = .* is not supported for Mamba-2"):
            load(folder)


def test_mamba2_checkpoints_round_trip_in_both_layouts(tmp_path):
    m = random_mamba2(seed=2)
    ids = torch.randint(0, 64, (2, 25))
    # transformers layout, written by transformers
    to_hf_mamba2(m).save_pretrained(tmp_path / "hf")
    back = load(tmp_path / "hf")
    assert back.config.layer == "mamba2" and back.config.ngroups == 2
    orig = write_original_mamba2(m, tmp_path / "orig")  # original (state-spaces) layout
    back2 = load(orig)
    m.simba = SimbaConfig(linear(3, 0.4), "simba", 1)
    save(m, tmp_path / "out")
    back3 = load(tmp_path / "out")
    with torch.no_grad():
        ref = m(ids).logits
        assert torch.allclose(back(ids, simba=m.simba).logits, ref, atol=1e-5)
        assert torch.equal(back2(ids, simba=m.simba).logits, ref)
        assert torch.equal(back3(ids).logits, ref)


def test_mamba2_projection_flops_match_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from simba_compress.flops import count, matmul_flops

    m = random_mamba2(n_layer=2)
    ids = torch.randint(0, 64, (2, 30))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(ids, simba=None)
    per = fc.get_flop_counts()
    proj = lambda name: sum(sum(o.values()) for mod, o in per.items() if mod.endswith("mixer." + name))  # noqa: E731
    a, tokens = matmul_flops(m.config), 2 * 30 * 2
    assert proj("in_proj") == a["in_proj"] * tokens and proj("out_proj") == a["out_proj"] * tokens
    conv = sum(v for mod, o in per.items() if mod.endswith(".mixer") for op, v in o.items() if "convolution" in str(op))
    assert conv == a["conv"] * tokens
    assert count(m.config, SimbaConfig(linear(2, 0.5)), 100).ratio < 1.0


# The fast paths through Triton's interpreter ---------------------------------------------------------------------

KERNELS_IN_INTERPRETER = r"""
from simba_compress import ModelConfig
from simba_compress.mamba2 import GatedRMSNorm, Mamba2Mixer
from simba_compress.layers import SSMState
from simba_compress.ssm import triton_ssd as ts
from simba_compress.ssm.ssd import ssd_scan
ts.CHUNK, ts.BLOCK_M, ts.BLOCK_K = 32, 16, 16  # several chunks (and a partial one) in a short row
torch.manual_seed(0)
out = {}
rel = lambda a, r: ((a.double() - r.double()).abs().max() / r.double().abs().max()).item()
for dtype in (torch.float32, torch.bfloat16):
    name = str(dtype).split(".")[1]
    b, l, h, p, g, n = 2, 75, 4, 16, 2, 16
    proj = torch.randn(b, l, 3 + h * p + 2 * g * n + h).to(dtype)  # views of one projection, as the mixer passes them
    x, B, C = proj[..., 3:3 + h * p].unflatten(-1, (h, p)), proj[..., 3 + h * p:3 + h * p + g * n].unflatten(-1, (g, n)), \
        proj[..., 3 + h * p + g * n:3 + h * p + 2 * g * n].unflatten(-1, (g, n))
    dt_raw = proj[..., -h:] - 2
    A, bias, D = -torch.rand(h) * 2 - 0.5, torch.randn(h) * 0.5, torch.randn(h)
    y, final = ts.ssd_scan(x, dt_raw, bias, A, B, C, D)
    yr, hr = ssd_scan(x, F.softplus(dt_raw.float() + bias), A, B, C)
    out["scan_" + name] = max(rel(y, yr + x.float() * D[:, None]), rel(final, hr))
    out["scan_dtype_" + name] = y.dtype == dtype and final.dtype == torch.float32
    norm = GatedRMSNorm(h * p, h * p // g, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    yy, zz = torch.randn(b, l, h * p).to(dtype), proj[..., :h * p]
    out["norm_" + name] = rel(ts.gated_rms_norm(yy, zz, norm.weight, h * p // g, 1e-5), norm(yy, zz))
    # the step: the reference mixer step from the same (random) states
    mixer = Mamba2Mixer(ModelConfig(d_model=32, n_layer=1, vocab_size=8, d_state=n, headdim=p, ngroups=g, layer="mamba2"))
    with torch.no_grad():
        for q in mixer.parameters():
            q.normal_(0, 0.5)
    mixer = mixer.to(dtype)
    u = torch.randn(3, 32).to(dtype)
    state = SSMState(torch.randn(3, mixer.conv_dim, 3).to(dtype), torch.randn(3, mixer.nheads, p, n))
    with torch.no_grad():
        ref_out, ref_state = mixer._step_reference(u, state)
        zxd = F.linear(u, mixer.in_proj.weight)
        z, xbc, dt = zxd.split([mixer.d_inner, mixer.conv_dim, mixer.nheads], dim=-1)
        A2, D2, bias2 = mixer.float_params()
        ynorm = ts.ssd_step(xbc, dt, z, state.conv, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, state.ssm, A2, D2,
                            bias2, mixer.norm.weight, mixer.norm.group_size, mixer.norm.eps)
        got = F.linear(ynorm, mixer.out_proj.weight)
    out["step_" + name] = rel(got, ref_out)
    out["step_ssm_" + name] = rel(state.ssm, ref_state.ssm)
    out["step_conv_" + name] = bool(torch.equal(state.conv, ref_state.conv))
print(json.dumps(out))
"""


def test_triton_ssd_kernels_in_interpreter():
    """The project's Mamba-2 kernels (ssm/triton_ssd.py) against the reference: the chunked scan on strided views with
    several chunks and a partial one, the gated norm, and the fused step (conv states shifted as the reference's)."""
    out = run_in_triton_interpreter(KERNELS_IN_INTERPRETER)
    assert out["scan_float32"] < 1e-5 and out["norm_float32"] < 1e-5 and out["step_float32"] < 1e-5, out
    assert out["step_ssm_float32"] < 1e-5 and out["step_conv_float32"] and out["step_conv_bfloat16"], out
    # the interpreter rounds float32 to bf16 by truncation (the GPU to nearest): bf16 gets bf16's tolerance
    assert out["scan_bfloat16"] < 2e-2 and out["norm_bfloat16"] < 2e-2 and out["step_bfloat16"] < 2e-2, out
    assert out["step_ssm_bfloat16"] < 2e-2 and out["scan_dtype_float32"] and out["scan_dtype_bfloat16"], out


# mamba_ssm's Triton modules from a source tree, without its CUDA extension or the package's __init__ (which imports
# that extension in 2.3.2; its next release makes it optional); the CUDA calls they make on a device, stood in for
MAMBA_SSM_FROM_SOURCE = r"""
import contextlib, os, sys, types
import triton.runtime.autotuner as autotuner
SRC = {src!r}
sys.path.insert(0, SRC)
package = types.ModuleType("mamba_ssm")
package.__path__ = [os.path.join(SRC, "mamba_ssm")]
sys.modules["mamba_ssm"] = package
if {with_models}:  # its model classes import the Mamba-1 scan's module, which imports the extension: an empty one
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
_device = torch.cuda.device
torch.cuda.device = lambda index: contextlib.nullcontext() if index is None else _device(index)
torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(multi_processor_count=2, name="cpu")
_init = autotuner.Autotuner.__init__
def _first_config(self, *args, **kwargs):  # no autotuning runs in the interpreter
    _init(self, *args, **kwargs)
    self.configs = self.configs[:1]
autotuner.Autotuner.__init__ = _first_config
"""

FAST_PATHS_IN_INTERPRETER = r"""
import time
from simba_compress import MambaLM, ModelConfig, SimbaConfig
from simba_compress import backends as probes, mamba2
from simba_compress.ssm import triton_ssd
from simba_compress.schedules import linear
probes.Backends.on = lambda self, x: self.fast_path  # the fast paths on CPU tensors
triton_ssd.CHUNK, triton_ssd.BLOCK_M, triton_ssd.BLOCK_K = 32, 16, 16  # several chunks in a short row
mamba2.SSD_CHUNK = 32
torch.manual_seed(0)
m = MambaLM(ModelConfig(d_model=32, n_layer=3, vocab_size=64, d_state=16, layer="mamba2", headdim=16, ngroups=2))
with torch.no_grad():
    for name, q in m.named_parameters():
        if q.ndim >= 2:
            q.normal_(0, 1.0 / q[0].numel() ** 0.5)
    for block in m.backbone.layers:
        block.mixer.A_log.uniform_(0, 2)
        block.mixer.dt_bias.uniform_(-3, 0)
        block.mixer.norm.weight.uniform_(0.5, 1.5)
m.eval()
reference = probes.Backends(fast_path=False)
ids = torch.randint(0, 64, (2, 45))
mask = torch.ones(2, 45, dtype=torch.long)
mask[0, :9] = 0  # left padding
rel = lambda a, r: ((a.double() - r.double()).abs().max() / r.double().abs().max()).item()
out = {{}}
for path in {paths}:
    fast = probes.Backends(scan="triton" if path == "triton" else "auto", step=path)
    with torch.no_grad():
        out[path + "_chosen"] = [mamba2.ssd_kernel(m.backbone.layers[0].mixer, ids, fast), mamba2.step_kernels(ids, fast)]
    errs, kept = [], True
    with torch.no_grad():
        for kw in ({{"simba": None, "return_states": True}},
                   {{"simba": SimbaConfig(linear(3, 0.3), "simba", 2), "return_kept": True, "return_states": True}},
                   {{"simba": SimbaConfig(linear(3, 0.3), "share", 2), "return_kept": True, "attention_mask": mask}},
                   {{"simba": SimbaConfig(linear(3, 0.3), "deci", 2), "return_kept": True, "attention_mask": mask,
                     "return_states": True}}):
            res = {{}}
            for be in (fast, reference):
                m.backends = be
                res[be] = m(ids, **kw)
            a, r = res[fast], res[reference]
            errs.append(rel(a.logits, r.logits))
            for sa, sr in zip(a.states or [], r.states or []):
                errs += [rel(sa.conv, sr.conv), rel(sa.ssm, sr.ssm)]
            kept &= all(torch.equal(u, v) for u, v in zip(a.kept or [], r.kept or []))
    out[path + "_forward"], out[path + "_kept"] = max(errs), kept
    m.simba = SimbaConfig(linear(3, 0.3), "simba", 2)
    tokens = {{}}
    for be in (fast, reference):  # a pruned, left-padded prefill, then the step: greedy tokens
        m.backends = be
        tokens[be] = m.generate(ids, mask, max_new_tokens=4)
    m.simba = None
    out[path + "_generate"] = bool(torch.equal(tokens[fast], tokens[reference]))
print(json.dumps(out))
"""


def _check_fast_paths(out: dict, paths: list[str]) -> None:
    for path in paths:
        assert out[path + "_chosen"] == [path, path], out
        assert out[path + "_forward"] < 1e-4 and out[path + "_kept"] and out[path + "_generate"], out


def test_mamba2_triton_fast_path_in_interpreter():
    """The mixer's fast path without mamba_ssm (the project's Triton SSD, gated norm and step) on CPU tensors: dense,
    pruned (simba, share, deci) and left-padded logits, kept tokens, decode states and greedy generation equal the
    reference path's."""
    _check_fast_paths(run_in_triton_interpreter(FAST_PATHS_IN_INTERPRETER.format(paths=["triton"])), ["triton"])


@needs_mamba_ssm_src
def test_mamba2_mamba_ssm_fast_path_in_interpreter():
    """The same through mamba_ssm's kernels (mamba_chunk_scan_combined, its gated norm, selective_state_update in
    heads form), loaded from SIMBA_TEST_MAMBA_SSM_SRC without its CUDA extension."""
    prelude = MAMBA_SSM_FROM_SOURCE.format(src=MAMBA_SSM_SRC, with_models=False)
    out = run_in_triton_interpreter(prelude + FAST_PATHS_IN_INTERPRETER.format(paths=["mamba_ssm"]))
    _check_fast_paths(out, ["mamba_ssm"])


MAMBA_SSM_CHECKPOINT = r"""
from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mamba_ssm.modules.mamba2 import Mamba2
import simba_compress
torch.manual_seed(0)
ssm_cfg = {{"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 32, "d_ssm": 64}}
ref = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=60, ssm_cfg=ssm_cfg, pad_vocab_size_multiple=8))
with torch.no_grad():
    for mod in ref.modules():
        if isinstance(mod, Mamba2):
            mod.use_mem_eff_path = False  # its fused path needs causal_conv1d's CUDA conv
            mod.norm.weight.uniform_(0.5, 1.5)
            mod.D.uniform_(-1, 1)
ref.save_pretrained({folder!r})  # mamba_ssm's own writer: config.json and pytorch_model.bin
ours = simba_compress.load({folder!r})
ids = torch.randint(0, 60, (2, 50))
with torch.no_grad():
    a, r = ours(ids).logits, ref(ids).logits
print(json.dumps({{"layer": ours.config.layer, "ngroups": ours.config.ngroups, "vocab": ours.config.vocab_size,
                  "rel": ((a - r).abs().max() / r.abs().max()).item()}}))
"""


@needs_mamba_ssm_src
def test_mamba_ssm_written_mamba2_checkpoint_in_interpreter(tmp_path):
    """A Mamba-2 checkpoint written by mamba_ssm's MambaLMHeadModel.save_pretrained (2 groups, d_ssm given as d_inner)
    loads, and its logits equal mamba_ssm's own forward (float32, its Triton SSD in the interpreter)."""
    prelude = MAMBA_SSM_FROM_SOURCE.format(src=MAMBA_SSM_SRC, with_models=True)
    out = run_in_triton_interpreter(prelude + MAMBA_SSM_CHECKPOINT.format(folder=str(tmp_path / "m")))
    assert out["layer"] == "mamba2" and out["ngroups"] == 2 and out["vocab"] == 64, out
    assert out["rel"] < 1e-5, out


MAMBA1_WITHOUT_SCAN = r"""
from simba_compress import MambaLM, ModelConfig, SimbaConfig
from simba_compress import backends as probes, mamba1
probes.Backends.on = lambda self, x: self.fast_path  # the fast paths on CPU tensors
torch.manual_seed(0)
m = MambaLM(ModelConfig(d_model=16, n_layer=3, vocab_size=64, d_state=4))
with torch.no_grad():
    for q in m.parameters():
        q.normal_(0, 0.3)
m.eval()
ids = torch.randint(0, 64, (2, 30))
fast, reference = probes.Backends(), probes.Backends(fast_path=False)
simba = SimbaConfig([1.0, 0.6, 0.3], protect_last=2)
with torch.no_grad():
    out = {"scan": probes.selective_scan_fn() is None, "ssd": probes.ssd_kernels() is not None,
           "kernel": mamba1.scan_kernel(m.backbone.layers[0].mixer, ids, fast) is probes.triton_kernels().selective_scan,
           "step": mamba1.step_kernels(ids, fast)}
    res = {}
    for be in (fast, reference):
        m.backends = be
        res[be] = (m(ids, simba=simba).logits, m(ids, simba=None).logits)
m.simba = simba
tokens = {}
for be in (fast, reference):
    m.backends = be
    tokens[be] = m.generate(ids, max_new_tokens=4)
out["forward"] = max(((a - r).abs().max() / r.abs().max()).item() for a, r in zip(res[fast], res[reference]))
out["generate"] = bool(torch.equal(tokens[fast], tokens[reference]))
print(json.dumps(out))
"""


@needs_mamba_ssm_src
def test_mamba1_with_mamba_ssm_but_not_its_scan_in_interpreter():
    """mamba_ssm importable without its CUDA extension (its next release's default): the probes find no Mamba-1 scan
    but its Triton SSD, so Mamba-1 runs the project's Triton scan and step (no causal_conv1d here) and equals the
    reference path, generation included. (tests/test_gpu.py checks the same on CUDA, Mamba-2 included.)"""
    prelude = MAMBA_SSM_FROM_SOURCE.format(src=MAMBA_SSM_SRC, with_models=False)
    out = run_in_triton_interpreter(prelude + MAMBA1_WITHOUT_SCAN)
    assert out["scan"] and out["ssd"] and out["kernel"] and out["step"] == "triton", out
    assert out["forward"] < 1e-4 and out["generate"], out


def test_cli_info_names_a_mamba2_checkpoint(tmp_path, capsys):
    from simba_compress.cli import main

    folder = write_original_mamba2(random_mamba2(seed=6), tmp_path / "m")
    assert main(["info", str(folder)]) == 0
    assert "Mamba-2 (headdim 16, 2 groups): d_model 32, 3 layers, d_state 8" in capsys.readouterr().out


def test_triton_ssd_kernels_compile_for_the_gpu():
    """The project's Mamba-2 kernels compiled for sm_90 (H100/H200) as the GPU machine will, here without a GPU (the
    interpreter runs them but checks neither types nor shapes as the compiler does), through triton's own ptxas."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    from simba_compress.ssm import triton_ssd as ts

    def compile_for_sm90(fn, pointers: dict[str, str], constexprs: dict, **options):
        names = fn.arg_names
        signature = {n: pointers.get(n, "i32") for n in names if n not in constexprs} | {n: "constexpr" for n in constexprs}
        src = ASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
        try:
            return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        except RuntimeError as e:
            if "ptxas" in str(e) and "not found" in str(e).lower():
                pytest.skip("no ptxas to assemble for the GPU")
            raise

    bf16 = dict.fromkeys(["x_ptr", "B_ptr", "C_ptr", "y_ptr", "dt_ptr", "z_ptr", "w_ptr", "out_ptr", "xbc_ptr",
                          "conv_ptr", "cw_ptr", "cb_ptr"], "*bf16")  # fmt: skip
    f32 = dict.fromkeys(["bias_ptr", "A_ptr", "states_ptr", "acs_ptr", "dts_ptr", "decay_ptr", "D_ptr", "final_ptr",
                         "h_ptr"], "*fp32") | {"eps": "fp32"}  # fmt: skip
    ptrs = bf16 | f32
    blocks = dict(CHUNK=ts.CHUNK, BLOCK_P=64, BLOCK_N=128, BLOCK_K=ts.BLOCK_K, PRECISION="tf32")
    compile_for_sm90(ts._chunk_state, ptrs, blocks | {"BLOCK_N": 64}, num_warps=4)
    compile_for_sm90(ts._chunk_scan, ptrs, blocks | {"HAS_D": True, "BLOCK_M": ts.BLOCK_M}, num_warps=4)
    compile_for_sm90(ts._state_passing, ptrs, {"BLOCK": 1024})
    compile_for_sm90(ts._gated_norm, ptrs, {"BLOCK": 8192, "ROWS": 1}, num_warps=16)
    compile_for_sm90(ts._step_heads, ptrs, {"K": 4, "HAS_BIAS": True, "BLOCK_P": ts.STEP_BLOCK_P, "BLOCK_N": 128})
    compile_for_sm90(ts._step_norm, ptrs, {"K": 4, "BLOCK": 8192, "BLOCK_N": 128}, num_warps=16)
