"""The layer interface (layers.py) every mixer implements, the kernel setting (backends.py), and the package's
import graph (no circles: each module imports only modules below it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from conftest import REPO
from simba_compress import MambaLM, ModelConfig, SimbaConfig
from simba_compress.backends import Backends
from simba_compress.layers import KVState, MixerContext, ParallelState, SSMState
from simba_compress.model import MIXERS

PACKAGE = REPO / "simba_compress"


def _module_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports at its top level (function-level imports are deliberate: lazy)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                for alias in node.names:  # `from . import x` imports the module x
                    full = f"{target}.{alias.name}"
                    deps.add(full if (REPO / (full.replace(".", "/") + ".py")).exists() else target)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("simba_compress")}
        graph[name] = {d for d in deps if d != name}
    return graph


def test_no_import_circles():
    graph = _module_imports()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep):] + [dep] if dep in trail else [node, dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    # the interface sits below the mixers, the mixers below the model, the model below generation
    assert "simba_compress.model" not in graph["simba_compress.layers"]
    assert not {"simba_compress.model", "simba_compress.generation"} & graph["simba_compress.mamba2"]
    assert "simba_compress.generation" not in graph["simba_compress.model"]


def test_backends_default_from_the_environment(monkeypatch):
    for var in ("SIMBA_COMPRESS_KERNELS", "SIMBA_COMPRESS_TRITON", "SIMBA_COMPRESS_SCAN", "SIMBA_COMPRESS_STEP"):
        monkeypatch.delenv(var, raising=False)
    assert Backends.from_env() == Backends()
    monkeypatch.setenv("SIMBA_COMPRESS_KERNELS", "0")
    monkeypatch.setenv("SIMBA_COMPRESS_STEP", "triton")
    assert Backends.from_env() == Backends(fast_path=False, step="triton")
    m = MambaLM(ModelConfig(d_model=16, n_layer=2, vocab_size=32))
    assert m.backends == Backends(fast_path=False, step="triton")  # a model takes the environment's defaults
    assert MambaLM(m.config, backends=Backends()).backends == Backends()  # unless given one
    monkeypatch.setenv("SIMBA_COMPRESS_SCAN", "fast")
    with pytest.raises(ValueError, match="scan"):
        Backends.from_env()
    assert not Backends().on(torch.zeros(1)) and not Backends().use_triton(torch.zeros(1))  # the CPU: reference


def one_layer_config(kind: str) -> ModelConfig:
    """A one-layer model whose layer is a mixer of `kind` (attention: GQA, a qkv conv, partial RoPE)."""
    extra = {
        "attention": dict(attn_layers=[0], attn_heads=4, attn_kv_heads=2, attn_conv=3, rotary_dim=4, attn_qkv_bias=True),
        "mlp": dict(mlp_layers=[0], d_intermediate=24, mlp_gated=False, mlp_act="relu2"),
        # Falcon-H1's: attention (RoPE) beside Mamba-2, its multipliers
        "parallel": dict(attn_layers=[0], attn_parallel=True, attn_heads=4, attn_kv_heads=2, rotary_dim=4,
                         ssm_in_multiplier=1.3, ssm_out_multiplier=0.6, attn_in_multiplier=0.8, attn_out_multiplier=1.2,
                         key_multiplier=0.5, ssm_proj_multipliers=[0.5, 2.0, 0.7, 1.5, 0.9]),
    }.get(kind, {})
    return ModelConfig(d_model=32, n_layer=1, vocab_size=16, d_state=8, headdim=16,
                       layer=kind if kind in ("mamba1", "mamba2") else "mamba2", **extra)  # fmt: skip


SCORES = {"mamba1": ("simba", "share", "deci"), "mamba2": ("simba", "share", "deci"), "attention": ("snapkv",), "mlp": (),
          "parallel": ("simba", "share", "deci", "snapkv")}


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_every_mixer_implements_the_interface(kind):
    """forward on the tokens given (with the in-layer scores asked for and the decode state), zero_state, and a
    step that advances the state in place: the step after a prefix equals the forward over prefix + token."""
    torch.manual_seed(0)
    cfg = one_layer_config(kind)
    assert cfg.kind(0) == kind
    mixer = MIXERS[kind](cfg).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.2)
    reference = Backends(fast_path=False)
    u = torch.randn(2, 9, 32, dtype=torch.float64)
    full = mixer(u, MixerContext(None, torch.tensor([8, 8]), want_state=True, backends=reference))
    prefix = mixer(u[:, :8], MixerContext(None, torch.tensor([7, 7]), want_state=True, backends=reference))
    assert prefix.score is None
    state = mixer.zero_state(2, "cpu", torch.float64, capacity=12)
    if kind == "mlp":
        assert state is None and prefix.state is None
    else:
        assert type(state) is type(prefix.state) is type(full.state)
        state.copy_(prefix.state)
    mixer.prepare_step()
    out = mixer.step(u[:, 8], state, reference)
    torch.testing.assert_close(out, full.out[:, 8], rtol=1e-5, atol=1e-6)  # the scans compute in float32
    parts = [(state.ssm, full.state.ssm), (state.kv, full.state.kv)] if isinstance(state, ParallelState) else [(state, full.state)]
    for state, full_state in parts:
        if isinstance(state, SSMState):
            torch.testing.assert_close(state.ssm, full_state.ssm.to(state.ssm.dtype), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state.conv, full_state.conv, rtol=1e-5, atol=1e-6)
        elif isinstance(state, KVState):  # the cache holds the 9 tokens, at the positions the full forward gave them
            assert state.capacity == 12 and state.length.tolist() == [9, 9] and state.position.tolist() == [9, 9]
            torch.testing.assert_close(state.k[:, :, :9], full_state.k)
            torch.testing.assert_close(state.v[:, :, :9], full_state.v)
            torch.testing.assert_close(state.conv, full_state.conv)
    for criterion in SCORES[kind]:
        scored = mixer(u, MixerContext(None, torch.tensor([8, 5]), score=criterion, backends=reference))
        assert scored.score.shape == (2, 9) and scored.score.dtype == torch.float32
        assert torch.equal(scored.out, full.out)
    with pytest.raises(ValueError):
        mixer(u, MixerContext(None, torch.tensor([8, 8]), score="utr", backends=reference))


def test_model_step_is_functional():
    """MambaLM.step (the reference) returns new states and leaves the caller's as they were."""
    m = MambaLM(ModelConfig(d_model=16, n_layer=2, vocab_size=32), SimbaConfig([1.0, 0.5]))
    ids = torch.randint(0, 32, (2, 10))
    with torch.no_grad():
        states = m(ids, return_states=True).states
        before = [s.clone() for s in states]
        _, new = m.step(ids[:, -1], states)
    assert all(torch.equal(a.ssm, b.ssm) and torch.equal(a.conv, b.conv) for a, b in zip(states, before))
    assert not all(torch.equal(a.ssm, b.ssm) for a, b in zip(new, before))


def test_backends_choose_scan_and_step(monkeypatch):
    """scan_path / step_path, the one rule every mixer's choice goes through: mamba_ssm's kernels where installed
    unless the setting names the project's Triton ones; the Triton scan never under autograd; the reference path
    off CUDA or with the fast path off."""
    from simba_compress import backends as probes

    x = torch.zeros(1)
    assert Backends().scan_path(x, True, False) is None and Backends().step_path(x, True) is None  # the CPU
    monkeypatch.setattr(Backends, "on", lambda self, t: self.fast_path)  # as on CUDA
    monkeypatch.setattr(probes, "triton_kernels", lambda: object())
    auto, triton, mamba = Backends(), Backends(scan="triton", step="triton"), Backends(step="mamba_ssm")
    assert [auto.scan_path(x, True, False), auto.scan_path(x, False, False), auto.scan_path(x, False, True)] == [
        "mamba_ssm", "triton", None]
    assert [triton.scan_path(x, True, False), triton.scan_path(x, True, True)] == ["triton", "mamba_ssm"]
    assert Backends(fast_path=False).scan_path(x, True, False) is None
    assert [auto.step_path(x, True), auto.step_path(x, False), auto.step_path(x, True, preferred=False)] == [
        "mamba_ssm", "triton", "triton"]
    assert [triton.step_path(x, True), mamba.step_path(x, True, preferred=False), mamba.step_path(x, False)] == [
        "triton", "mamba_ssm", "triton"]
    no_triton = Backends(triton=False)
    assert [no_triton.scan_path(x, False, False), no_triton.step_path(x, True, preferred=False)] == [None, "mamba_ssm"]
