"""Shared fixtures: paths to ../shared, small random models in both checkpoint layouts.

../shared (the pretrained proxies and the corpus, README: Pretrained proxies) is not part of the repository: a
test that needs it asks through shared(path), and skips saying so where it is missing (a fresh clone)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
REPO = Path(__file__).resolve().parents[1]
# every process a test starts (python -c, -m, accelerate launch of a script) imports this checkout's package, not an
# installed copy of another one
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(REPO / "benchmarks"))  # benchmarks/proxies.py: where the trained proxies are found
# Triton's float32 dots in IEEE float32 (mamba_ssm's SSD and the project's): the GPU's default, TF32, keeps 10 mantissa
# bits, and the tests compare float32 paths at 1e-4. Read when a kernel compiles, so it is set before any does.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from simba_compress import MambaLM, ModelConfig  # noqa: E402

SHARED = REPO.parent / "shared"
MODELS = SHARED / "models"
CORPUS = SHARED / "corpus"
PROXIES = sorted(p.name for p in MODELS.glob("mamba-proxy-*"))
L16 = MODELS / "mamba-proxy-d320-l16"
DEMO = REPO / "simba_compress" / "data" / "demo-model"  # ships the corpus tokenizer (the demo model was trained with it)


def shared(path: Path) -> Path:
    """`path` under ../shared, or a skip that says what is missing and why it is not here."""
    if not path.exists():
        pytest.skip(f"needs {path}: the pretrained proxies and corpus of ../shared are not part of the repository "
                    "(README, Pretrained proxies)")
    return path


def trained_proxy(name: str) -> Path:
    """The folder of a proxy the project trains on the GPU machine (benchmarks/proxies.py finds it: $SIMBA_PROXIES,
    ../shared/models, ~/.cache/simba-compress/proxies), or a skip that says how to get it."""
    import proxies  # benchmarks/proxies.py

    folder = proxies.find(name)
    if folder is None:
        pytest.skip(f"needs the {name} proxy, found in none of {', '.join(map(str, proxies.search_path()))}: build it "
                    f"on a GPU with {proxies.REBUILD.get(name, 'its training script')} and unpack it there with "
                    "`python benchmarks/proxies.py PART...` (README, Pretrained proxies)")
    return folder


def random_model(
    n_layer: int = 3, d_model: int = 16, vocab: int = 64, d_state: int = 4, seed: int = 0, **kw
) -> MambaLM:
    """A random-weight Mamba-1 whose SSM has trained-like ranges (A in [-e^3, -1], dt in [1e-3, 0.5])."""
    torch.manual_seed(seed)
    m = MambaLM(ModelConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, d_state=d_state, **kw))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        for block in m.backbone.layers:
            mix = block.mixer
            mix.A_log.uniform_(0, 3)
            dt = torch.exp(torch.empty(mix.d_inner).uniform_(math.log(1e-3), math.log(0.5)))
            mix.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            block.norm.weight.uniform_(0.5, 1.5)
        m.backbone.norm_f.weight.uniform_(0.5, 1.5)
    return m.eval()


def random_hybrid(
    n_layer: int = 4, attn_layers=(1, 3), d_model: int = 32, vocab: int = 64, seed: int = 0, **kw
) -> MambaLM:
    """A random-weight hybrid: Mamba-2 layers (trained-like A and dt ranges) and GQA attention layers (a qkv conv and
    partial RoPE unless kw says otherwise), in the state-spaces layout's terms."""
    torch.manual_seed(seed)
    attn = dict(attn_heads=4, attn_kv_heads=2, attn_head_dim=8, attn_conv=4, rotary_dim=4, arch="mamba_ssm")
    cfg = ModelConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, d_state=8, headdim=16, layer="mamba2",
                      attn_layers=list(attn_layers), **(attn | kw))  # fmt: skip
    m = MambaLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        for block in m.backbone.layers:
            mix = block.mixer
            if hasattr(mix, "A_log"):
                mix.A_log.uniform_(0, 3)
                dt = torch.exp(torch.empty(mix.nheads).uniform_(math.log(1e-3), math.log(0.5)))
                mix.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                mix.norm.weight.uniform_(0.5, 1.5)
            block.norm.weight.uniform_(0.5, 1.5)
            if block.norm2 is not None:
                block.norm2.weight.uniform_(0.5, 1.5)
        m.backbone.norm_f.weight.uniform_(0.5, 1.5)
    return m.eval()


# Jamba's and Falcon-H1's shapes in ModelConfig's terms (test_hybrid.py builds them with transformers' classes)
FAMILIES = {
    # Mamba-1 with dt/B/C norms, NoPE GQA at layer 1, the MoE (no shared MLP, top-2 of the softmax) at layer 1
    "jamba": dict(d_state=8, dt_rank=4, bcdt_norm=True, attn_layers=[1], attn_heads=4, attn_kv_heads=2,
                  d_intermediate=40, block_mlp=True, n_experts=4, experts_per_token=2, expert_intermediate=40,
                  moe_layers=[1], moe_shared=False, moe_renormalize=False, residual_in_fp32=False, arch="jamba"),
    # attention (RoPE) beside Mamba-2 without its gated norm in every layer, every multiplier away from 1
    "falcon_h1": dict(d_state=8, layer="mamba2", headdim=16, d_inner_size=48, ssm_norm=False, attn_layers=[0, 1, 2],
                      attn_parallel=True, attn_heads=4, attn_kv_heads=2, attn_head_dim=16, rotary_dim=16,
                      d_intermediate=40, block_mlp=True, embedding_multiplier=3.0, lm_head_multiplier=0.3,
                      key_multiplier=0.7, attn_in_multiplier=1.3, attn_out_multiplier=0.8, ssm_in_multiplier=1.25,
                      ssm_out_multiplier=0.4, ssm_proj_multipliers=[0.5, 0.25, 0.7, 1.5, 0.6],
                      mlp_multipliers=[0.9, 0.6], residual_in_fp32=False, arch="falcon_h1"),
    # Zamba2: hybrid layers 0 and 2 use one shared block (attention over [stream; embeddings], LoRA on q, k, v and
    # the GELU MLP), RoPE, Mamba-2 with the dt floor (its reference path on CUDA too)
    "zamba2": dict(d_state=8, layer="mamba2", headdim=16, ngroups=2, dt_min=0.001, attn_layers=[0, 2], attn_heads=4,
                   attn_head_dim=16, rotary_dim=16, attn_scale=8**-0.5, d_intermediate=40, mlp_act="gelu",
                   shared_blocks=1, adapter_rank=4, attn_adapters=True, residual_in_fp32=False, arch="zamba2"),
}  # fmt: skip


def random_family(name: str, d_model: int = 32, vocab: int = 64, seed: int = 0) -> MambaLM:
    """A random-weight 3-layer model of FAMILIES[name], scaled like a trained one (unit-variance projections,
    trained-like A and dt ranges, norms away from 1)."""
    torch.manual_seed(seed)
    m = MambaLM(ModelConfig(d_model=d_model, n_layer=3, vocab_size=vocab, **FAMILIES[name]))
    with torch.no_grad():
        for pname, q in m.named_parameters():
            if q.ndim >= 2:
                q.normal_(0, 1.0 / q[0].numel() ** 0.5)
            elif pname.endswith("A_log"):
                q.uniform_(0, 2)
            elif pname.endswith(("dt_bias", "dt_proj.bias")):
                q.uniform_(-3, 0)
            elif pname.endswith("weight"):  # the norms
                q.uniform_(0.5, 1.5)
    return m.eval()


def write_original(model: MambaLM, folder: Path, vocab_size: int | None = None) -> Path:
    """Write `model` in the state-spaces layout (config.json + pytorch_model.bin, `embedding` key)."""
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    cfg = {
        "d_model": c.d_model,
        "d_intermediate": 0,
        "n_layer": c.n_layer,
        "vocab_size": vocab_size or c.vocab_size,
        "ssm_cfg": {"d_state": c.d_state},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
        "tie_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    sd = {k.replace("embeddings.", "embedding."): v.clone() for k, v in model.state_dict().items()}
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


def write_transformers(model: MambaLM, folder: Path) -> Path:
    """Write `model` through transformers' own MambaForCausalLM.save_pretrained (safetensors)."""

    ref = to_transformers(model)
    ref.save_pretrained(folder)
    return folder


def to_transformers(model: MambaLM):
    from transformers import MambaConfig, MambaForCausalLM

    c = model.config
    cfg = MambaConfig(
        hidden_size=c.d_model,
        num_hidden_layers=c.n_layer,
        vocab_size=c.vocab_size,
        state_size=c.d_state,
        conv_kernel=c.d_conv,
        expand=c.expand,
        time_step_rank=c.dt_rank,
        use_bias=c.bias,
        use_conv_bias=c.conv_bias,
        layer_norm_epsilon=c.norm_eps,
        residual_in_fp32=c.residual_in_fp32,
        tie_word_embeddings=c.tie_embeddings,
    )
    ref = MambaForCausalLM(cfg)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return ref.eval()


INTERPRETER_PRELUDE = r"""
import json
import torch, torch.nn.functional as F
import triton.runtime.interpreter as ti
_orig = ti._patch_lang_tensor
def _patched(tensor, *args):  # one argument in triton 3.5, two in 3.6
    _orig(tensor, *args)  # numpy >= 2.3 refuses int() of a shape-(1,) array, which the interpreter does
    tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])
ti._patch_lang_tensor = _patched
import numpy as np, triton.language as tl
_dot = ti.InterpreterBuilder.create_dot
def _dot_bf16(self, a, b, d, *rest):  # the interpreter keeps bf16 as its raw uint16 bits and would multiply those
    if a.dtype.scalar == tl.bfloat16:
        a, b = (ti.TensorHandle(ti._convert_float(t.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)
                for t in (a, b))
    return _dot(self, a, b, d, *rest)
ti.InterpreterBuilder.create_dot = _dot_bf16
"""


def run_in_triton_interpreter(script: str) -> dict:
    """Run `script` (after INTERPRETER_PRELUDE) with TRITON_INTERPRET=1, so Triton kernels run on CPU tensors;
    it prints one JSON object last, which is returned. Skips without triton."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-c", INTERPRETER_PRELUDE + script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def fused_step_logits(model, states: list, token: torch.Tensor) -> torch.Tensor:
    """The logits of one decode step of `model` through its Decoder (its fused step kernels, no graph) from the prefill
    states `states` (attention layers' KV caches sized for them), for token (b,)."""
    from simba_compress.generation import Decoder, GenerationConfig, cache_capacities

    dec = Decoder(model, token.shape[0], GenerationConfig(), graph=False, capacities=cache_capacities(states, 1))
    dec.prepare(states, GenerationConfig())
    dec.token.copy_(token)
    logits = []
    dec._select = lambda lg: logits.append(lg)  # keep the logits of the step
    dec.step(None)
    return logits[0]


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A random 4-layer model in the original layout, with the corpus tokenizer (the demo's copy) beside it."""
    import shutil

    folder = write_original(random_model(n_layer=4, d_model=32, vocab=8192), tmp_path_factory.mktemp("ckpt") / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def l16():
    from simba_compress import load

    return load(shared(L16))


@pytest.fixture(scope="session")
def corpus_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO))  # the corpus's tokenizer, as the package ships it


@pytest.fixture(scope="session")
def valid_windows(corpus_tokenizer):
    """8 windows of 513 tokens of the validation text."""
    from simba_compress.data import load_windows

    return load_windows(str(shared(CORPUS / "valid.txt.xz")), corpus_tokenizer, 513, 8)
