"""Generation (generation.py) against a step-by-step PyTorch reference: greedy and sampled, pruned prefill,
left-padded batches, eos, thousands of tokens, the sampler's distribution; the Triton step kernels through
Triton's interpreter; and on CUDA the fused kernels and the CUDA graph (skipped without a GPU)."""

from __future__ import annotations


import pytest
import torch

from conftest import fused_step_logits, random_model, run_in_triton_interpreter
from simba_compress import SimbaConfig
from simba_compress.generation import GenerationConfig, generate, next_token
from simba_compress.schedules import linear
from simba_compress import backends as probes

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


@torch.no_grad()
def reference(model, ids, mask, cfg: GenerationConfig, generator=None) -> torch.Tensor:
    """The plain loop: the full prefill forward, then model.step (the functional PyTorch step) token by token,
    eos checked after every token."""
    out = model(ids, mask, return_states=True)
    logits, states = out.logits[:, -1], out.states
    b, vocab = ids.shape[0], model.config.vocab_size
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    tokens = [ids]
    for _ in range(cfg.max_new_tokens):
        noise = torch.empty(b, vocab, device=ids.device).uniform_(generator=generator) if cfg.do_sample else None
        nxt = next_token(logits, cfg, noise)
        if cfg.eos_token_id is not None:
            nxt = torch.where(done, cfg.eos_token_id, nxt)
            done |= nxt == cfg.eos_token_id
        tokens.append(nxt[:, None])
        if cfg.eos_token_id is not None and bool(done.all()):
            break
        logits, states = model.step(nxt, states)
    return torch.cat(tokens, 1)


@pytest.fixture(scope="module")
def model():
    m = random_model(n_layer=4, d_model=32, vocab=64, seed=2)
    m.simba = SimbaConfig(linear(4, 0.25), protect_last=2)
    return m


def left_padded(lengths: list[int], vocab: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, width - n :] = 1
    return ids * mask, mask


@pytest.mark.parametrize("pruned", [True, False])
def test_greedy_equals_the_reference_on_a_left_padded_batch(model, pruned):
    ids, mask = left_padded([37, 20, 3])  # one row shorter than the conv window
    cfg = GenerationConfig(max_new_tokens=24)
    simba = model.simba
    try:
        model.simba = simba if pruned else None
        got = generate(model, ids, mask, cfg)
        ref = reference(model, ids, mask, cfg)
    finally:
        model.simba = simba
    assert torch.equal(got.sequences, ref) and got.new_tokens == 24
    for r in range(3):  # and each row alone, unpadded
        n = int(mask[r].sum())
        alone = generate(model, ids[r : r + 1, -n:], None, cfg).sequences[0, -24:] if pruned else None
        if alone is not None:
            assert torch.equal(alone, got.sequences[r, -24:])


@pytest.mark.parametrize(
    "sampling", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(temperature=1.3, top_k=10, top_p=0.9)]
)
def test_sampling_equals_the_reference_with_the_same_generator(model, sampling):
    ids, mask = left_padded([30, 30, 12], seed=1)
    cfg = GenerationConfig(max_new_tokens=40, do_sample=True, **sampling)
    got = generate(model, ids, mask, cfg, torch.Generator().manual_seed(7)).sequences
    ref = reference(model, ids, mask, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(got, ref)
    other = generate(model, ids, mask, cfg, torch.Generator().manual_seed(8)).sequences
    assert not torch.equal(got, other)  # the generator decides the draws


def test_eos_stops_like_the_reference(model):
    ids, mask = left_padded([25, 25], seed=3)
    free = generate(model, ids, mask, GenerationConfig(max_new_tokens=60)).sequences[:, 25:]
    eos = int(free[0, 5])  # a token row 0 emits early: both rows must finish for the output to end
    cfg = GenerationConfig(max_new_tokens=60, eos_token_id=eos)
    got, ref = generate(model, ids, mask, cfg).sequences, reference(model, ids, mask, cfg)
    assert torch.equal(got, ref)
    row0 = got[0, 25:]
    first = int((row0 == eos).nonzero()[0])
    assert (row0[first:] == eos).all()


def test_thousands_of_tokens_equal_the_reference():
    m = random_model(n_layer=2, d_model=16, vocab=32, seed=5)
    m.simba = SimbaConfig([1.0, 0.5])
    ids = torch.randint(0, 32, (2, 50), generator=torch.Generator().manual_seed(0))
    cfg = GenerationConfig(max_new_tokens=2000)
    assert torch.equal(generate(m, ids, None, cfg).sequences, reference(m, ids, None, cfg))


def test_prefill_builds_logits_for_the_last_position_only(model):
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    try:
        generate(model, torch.randint(0, 64, (2, 33)), None, GenerationConfig(max_new_tokens=3))
    finally:
        hook.remove()
    assert seen[0] == (2, 1, 64)  # no (batch, length, vocab) tensor
    assert all(s == (2, 64) for s in seen[1:])


def test_the_decoder_is_cached_per_batch_size_and_dropped_when_weights_move():
    m = random_model(n_layer=2, d_model=16, vocab=32, seed=6)
    cfg = GenerationConfig(max_new_tokens=4)
    generate(m, torch.randint(0, 32, (2, 9)), None, cfg)
    first = dict(m._graphs.decoders)
    generate(m, torch.randint(0, 32, (2, 9)), None, cfg)
    assert m._graphs.decoders == first  # reused
    generate(m, torch.randint(0, 32, (3, 9)), None, cfg)
    assert len(m._graphs.decoders) == 2  # two batch sizes
    m.double()
    out = generate(m, torch.randint(0, 32, (2, 9)), None, cfg)
    assert len(m._graphs.decoders) == 1 and out.sequences.shape == (2, 13)
    m.backends = m.backends.replace(triton=False)  # a new backend setting: new graphs
    generate(m, torch.randint(0, 32, (2, 9)), None, cfg)
    assert len(m._graphs.decoders) == 1 and m._graphs.weights[1] == m.backends


def test_sampler_draws_from_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 12).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    for cfg in (GenerationConfig(do_sample=True, temperature=0.8), GenerationConfig(do_sample=True, top_k=4, top_p=0.7)):
        draws = next_token(logits, cfg, torch.rand(logits.shape, generator=g))
        freq = torch.bincount(draws, minlength=12).double() / len(draws)
        p = (logits[0] / cfg.temperature).softmax(-1).double()
        if cfg.filtered:  # top 4, then the smallest prefix of them reaching 0.7
            order = p.argsort(descending=True)
            kept = torch.zeros(12, dtype=torch.bool)
            kept[order[:4]] = True
            q = torch.where(kept, p, 0.0)
            q = q / q.sum()
            before = q[order].cumsum(0) - q[order]
            kept[order[before > 0.7]] = False
            p = torch.where(kept, q, 0.0)
            p = p / p.sum()
            assert (freq[~kept] == 0).all()
        assert (freq - p).abs().max() < 0.015


def test_bad_generation_settings_are_clear_errors(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(do_sample=True, top_p=0.0)
    ids, mask = left_padded([5, 9])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask.flip(1), GenerationConfig())


# The Triton step kernels through Triton's interpreter on CPU -----------------------------------------------

INTERPRET_STEP = r"""
from simba_compress.ssm import triton_kernels as tk
from simba_compress.ssm.scan import selective_step
torch.manual_seed(0)
out = {}
b, d, k, n, r = 3, 150, 4, 5, 40  # d not a multiple of the blocks, r not of BLOCK_R
xz = torch.randn(b, 2 * d)
x, z = xz[:, :d], xz[:, d:]  # strided views, as the step passes them
state = torch.randn(b, d, k - 1)
w, bias = torch.randn(d, k), torch.randn(d)
Wx, Wdt = torch.randn(r + 2 * n, d) / 12, torch.randn(d, r) / 6
h = torch.randn(b, d, n)
dt_bias, D = torch.randn(d), torch.randn(d)
A = -torch.exp(torch.rand(d, n) * 3)
# the reference: MambaMixer.step's math, one op at a time
window = torch.cat([state, x.unsqueeze(-1)], -1)
xc = F.silu((window * w).sum(-1) + bias)
xdbl = xc @ Wx.T
dt = F.softplus(xdbl[:, :r] @ Wdt.T + dt_bias)
yr, hr = selective_step(h, xc, dt, A, xdbl[:, r:r + n], xdbl[:, r + n:])
yr = (yr + xc * D) * F.silu(z)
xo, parts = tk.conv_xproj_step(x, state, w, bias, Wx)
out["conv"] = ((xo - xc).abs().max() / xc.abs().max()).item()
out["conv_state"] = bool(torch.equal(state, window[:, :, 1:]))
out["xproj"] = ((parts.sum(1) - xdbl).abs().max() / xdbl.abs().max()).item()
y = tk.ssm_step(h, xo, parts, Wdt, dt_bias, A, D, z)
out["ssm"] = ((y - yr).abs().max() / yr.abs().max()).item()
out["ssm_state"] = ((h - hr).abs().max() / hr.abs().max()).item()
s, add, wn = torch.randn(4, 7, 96), torch.randn(4, 7, 96), torch.rand(96) + 0.5
ref_s = s + add
ref_n = (ref_s * torch.rsqrt(ref_s.pow(2).mean(-1, keepdim=True) + 1e-5)) * wn
out["norm"] = ((tk.rms_norm(s, wn, 1e-5, add) - ref_n).abs().max() / ref_n.abs().max()).item()
out["norm_add"] = bool(torch.allclose(s, ref_s))
print(json.dumps(out))
"""


def test_triton_step_kernels_in_interpreter():
    out = run_in_triton_interpreter(INTERPRET_STEP)
    assert out["conv"] < 1e-5 and out["conv_state"] and out["xproj"] < 1e-5, out
    assert out["ssm"] < 1e-5 and out["ssm_state"] < 1e-5, out
    assert out["norm"] < 1e-5 and out["norm_add"], out


# On CUDA ----------------------------------------------------------------------------------------------------


def cuda_pair(dtype, n_layer=4, d_model=64, d_state=16, vocab=128):
    """(CPU float32 reference of the dtype-rounded weights, the same model on CUDA in dtype), scaled like a
    trained model (see test_gpu.gpu_model)."""
    import copy
    import math

    m = random_model(n_layer=n_layer, d_model=d_model, d_state=d_state, vocab=vocab, seed=4)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("in_proj.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight", "conv1d.weight")):
                p.div_(math.sqrt(p[0].numel()))
    return copy.deepcopy(m).to(dtype).float(), m.to("cuda", dtype)


def use_step_kernels(which: str, monkeypatch):
    """Route the fused step: "mamba_ssm" (causal_conv1d_update + selective_state_update, where installed) or
    "triton" (the project's step kernels, as without them)."""
    if which == "mamba_ssm":
        if probes.selective_state_update() is None or probes.causal_conv1d_update() is None:
            pytest.skip("mamba_ssm / causal_conv1d not installed")
    if which == "triton" and not probes.triton_available():
        pytest.skip("triton not available")
    return probes.Backends(step=which)


@needs_cuda
@pytest.mark.parametrize("which", ["mamba_ssm", "triton"])
def test_cuda_graph_decode_equals_the_cpu_reference(which, monkeypatch):
    """float32: the graph's tokens equal the CPU reference loop's, on a pruned, left-padded batch, greedy and
    sampled (the same generator draws on the CPU)."""
    backends = use_step_kernels(which, monkeypatch)
    cpu_m, gpu_m = cuda_pair(torch.float32)
    gpu_m.backends = backends
    cpu_m.simba = gpu_m.simba = SimbaConfig(linear(4, 0.25), protect_last=2)
    ids, mask = left_padded([60, 41, 7], vocab=128)
    for cfg in (GenerationConfig(max_new_tokens=64), GenerationConfig(max_new_tokens=64, do_sample=True, top_k=20, top_p=0.9)):
        out = generate(gpu_m, ids.cuda(), mask.cuda(), cfg, torch.Generator("cuda").manual_seed(1) if cfg.do_sample else None)
        assert gpu_m._graphs.decoders[(3, True, cfg.do_sample, cfg.filtered)].graph is not None
        if cfg.do_sample:  # the graph against the eager step on the GPU, same draws
            eager = generate(gpu_m, ids.cuda(), mask.cuda(), GenerationConfig(**{**cfg.__dict__, "cuda_graph": False}),
                             torch.Generator("cuda").manual_seed(1))  # fmt: skip
            assert torch.equal(out.sequences, eager.sequences)
        else:
            assert torch.equal(out.sequences.cpu(), reference(cpu_m, ids, mask, cfg))


@needs_cuda
@pytest.mark.parametrize("which", ["mamba_ssm", "triton"])
def test_bf16_step_logits_within_rounding_of_the_cpu_reference(which, monkeypatch):
    """bf16: one fused step's logits against the CPU float32 step from the same states, norm-wise (test_gpu)."""
    backends = use_step_kernels(which, monkeypatch)
    cpu_m, gpu_m = cuda_pair(torch.bfloat16)
    gpu_m.backends = backends
    ids = torch.randint(0, 128, (2, 50))
    with torch.no_grad():
        ref = cpu_m(ids, return_states=True)
        ref_logits, _ = cpu_m.step(ids[:, -1], ref.states)
        out = gpu_m(ids.cuda(), return_states=True, last_logits=1)
        logits = fused_step_logits(gpu_m, out.states, ids[:, -1].cuda())
    err = ((logits.float().cpu() - ref_logits).norm() / ref_logits.norm()).item()
    assert err < 1e-2


@needs_cuda
def test_graph_cache_per_batch_size_and_repeat_calls():
    _, gpu_m = cuda_pair(torch.bfloat16)
    cfg = GenerationConfig(max_new_tokens=16)
    ids = torch.randint(0, 128, (4, 100), device="cuda")
    a = generate(gpu_m, ids, None, cfg).sequences
    b = generate(gpu_m, ids, None, cfg).sequences  # replays the cached graph from fresh states
    assert torch.equal(a, b)
    generate(gpu_m, ids[:1], None, cfg)
    assert set(gpu_m._graphs.decoders) == {(4, True, False, False), (1, True, False, False)}


@needs_cuda
@pytest.mark.parametrize("pruned", [False, True])
def test_prefill_graph_replays_a_recurring_prompt_shape_as_the_eager_forward(pruned):
    """float32: a shape's first prefill runs eagerly, its second is captured; replays with new tokens give the
    eager forward's logits and states; a new schedule drops the graphs; generate's tokens are the same either way."""
    from simba_compress.generation import prefill

    _, m = cuda_pair(torch.float32, n_layer=6)
    m.simba = SimbaConfig([1.0, 0.75, 0.75, 0.5, 0.25, 0.25]) if pruned else None
    a, b = (torch.randint(0, 128, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(s)) for s in (1, 2))
    with torch.no_grad():
        eager = [m(ids, return_states=True, last_logits=1) for ids in (a, b)]
    prefill(m, a)
    assert (2, 300) not in m._graphs.prefills.graphs  # seen once: eager
    for ids, ref in ((a, eager[0]), (b, eager[1]), (a, eager[0])):
        out = prefill(m, ids)
        assert (2, 300) in m._graphs.prefills.graphs
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        for s, r in zip(out.states, ref.states):
            torch.testing.assert_close(s.ssm, r.ssm, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s.conv, r.conv)
    m.simba = SimbaConfig([1.0, 1.0, 0.5, 0.5, 0.5, 0.5]) if pruned else SimbaConfig([1.0] * 6)
    prefill(m, a)
    assert not m._graphs.prefills.graphs
    cfg = GenerationConfig(max_new_tokens=24)
    graphed = [generate(m, a, None, cfg).sequences for _ in range(3)]  # a seen shape: capture, then replays
    assert m._graphs.prefills.graphs
    eager_tokens = generate(m, a, None, GenerationConfig(max_new_tokens=24, cuda_graph=False)).sequences
    for g in graphed:
        assert torch.equal(g, eager_tokens)
