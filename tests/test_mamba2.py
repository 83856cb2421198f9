"""Mamba-2: the SSD scan and its score against loops, and the model against transformers' Mamba2ForCausalLM."""

import json

import pytest
import torch

from simba_compress import MambaLM, ModelConfig, SimbaConfig, load, save
from simba_compress.schedules import linear
from simba_compress.ssm.ssd import ssd_impact, ssd_scan, ssd_share, ssd_step


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


def test_ssd_impact_and_share_match_definition():
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


def test_mamba2_checkpoints_round_trip_in_both_layouts(tmp_path):
    m = random_mamba2(seed=2)
    ids = torch.randint(0, 64, (2, 25))
    # transformers layout, written by transformers
    to_hf_mamba2(m).save_pretrained(tmp_path / "hf")
    back = load(tmp_path / "hf")
    assert back.config.layer == "mamba2" and back.config.ngroups == 2
    # original (state-spaces) layout
    orig = tmp_path / "orig"
    orig.mkdir()
    c = m.config
    (orig / "config.json").write_text(json.dumps({
        "d_model": c.d_model, "n_layer": c.n_layer, "vocab_size": c.vocab_size, "d_intermediate": 0,
        "ssm_cfg": {"layer": "Mamba2", "d_state": c.d_state, "headdim": c.headdim, "ngroups": c.ngroups},
        "rms_norm": True, "residual_in_fp32": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True,
    }))
    torch.save({k.replace("embeddings.", "embedding."): v for k, v in m.state_dict().items()}, orig / "pytorch_model.bin")
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
