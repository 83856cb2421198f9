"""Loading both layouts, the errors users get for bad folders, and the output folder's round trip."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import DEMO, MODELS, random_model, shared, write_original, write_transformers
from simba_compress import SimbaConfig, SimbaError, load, save
from simba_compress.checkpoints import read_checkpoint
from simba_compress.schedules import linear


@pytest.mark.parametrize("name", ["mamba-proxy-d320-l12", "mamba-proxy-d320-l16", "mamba-proxy-d320-l6", "mamba-proxy-d320-l9"])
def test_loads_every_proxy(name):
    m = load(shared(MODELS / name))
    n_layer = int(name.rsplit("-l", 1)[1])
    assert m.config.n_layer == n_layer and m.config.vocab_size == 8192 and m.config.d_inner == 640
    assert m.lm_head.weight is m.backbone.embeddings.weight  # tied head
    assert m.source_dtype == torch.bfloat16 and m.lm_head.weight.dtype == torch.float32


def test_original_layout_with_padded_vocab(tmp_path):
    m = random_model(vocab=56)
    write_original(m, tmp_path / "orig", vocab_size=50)  # config says 50, embedding padded to 56
    back = load(tmp_path / "orig")
    assert back.config.vocab_size == 56
    ids = torch.randint(0, 50, (2, 17))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)


def test_transformers_layout_written_by_transformers(tmp_path):
    m = random_model(vocab=64)
    write_transformers(m, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    ckpt = read_checkpoint(tmp_path / "hf")
    assert ckpt.layout == "transformers"
    back = load(tmp_path / "hf")
    ids = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, m(ids).logits, atol=1e-6)


def test_saved_folder_round_trips_and_transformers_reads_it_dense(tmp_path):
    from transformers import AutoTokenizer, MambaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(DEMO))
    m = random_model(n_layer=4, vocab=8192, seed=4)
    m.simba = SimbaConfig(linear(4, 0.4), "simba", 2, granularity=8)
    out = save(m, tmp_path / "out", tokenizer=tok, files={"recipe.yaml": "model: x\n"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["simba"]["keep"] == m.simba.keep and cfg["simba"]["criterion"] == "simba" and cfg["simba"]["granularity"] == 8
    assert {"model.safetensors", "tokenizer.json", "recipe.yaml"} <= {p.name for p in out.iterdir()}
    back = load(out)
    assert back.simba == m.simba
    ids = torch.randint(0, 8192, (2, 40))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)  # sparse, identical
        hf = MambaForCausalLM.from_pretrained(out).eval()
        assert torch.allclose(hf(ids, use_cache=False).logits, m(ids, simba=None).logits, rtol=1e-4, atol=1e-4)
        assert back.generate(ids[:1, :10], max_new_tokens=3).shape == (1, 13)


def test_a_saved_folder_keeps_its_criterion_whatever_the_default(monkeypatch):
    """Folders state their criterion; one that does not (written by hand, or by a tool that left it out) was made
    when simba was the only default, and keeps it after DEFAULT_CRITERION changes (issue 23)."""
    import simba_compress.pruning as pruning

    monkeypatch.setattr(pruning, "DEFAULT_CRITERION", "query")
    assert SimbaConfig.from_dict({"keep": [1.0, 0.5], "version": 1}).criterion == "simba"
    assert SimbaConfig.from_dict({"keep": [1.0, 0.5], "criterion": "utr"}).criterion == "utr"


def test_save_refuses_to_overwrite_and_replaces_only_when_asked(tmp_path):
    m = random_model()
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(SimbaError, match=r"already exists; pass overwrite=True to replace it"):
        save(m, target)
    assert (target / "mine.txt").read_text() == "keep me"
    save(m, target, overwrite=True)
    assert not (target / "mine.txt").exists() and (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def test_a_crash_while_saving_leaves_nothing_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    m = random_model()
    save(m, tmp_path / "old")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save(m, tmp_path / "new")
    with pytest.raises(RuntimeError):
        save(m, tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (tmp_path / "old" / "model.safetensors").exists()  # the old output is intact


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(SimbaError, match=r"no config\.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SimbaError, match="not a Mamba checkpoint config"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(SimbaError, match="not valid JSON"):
        load(tmp_path)


def test_truncated_weights_name_the_file(tmp_path):
    folder = write_original(random_model(), tmp_path / "m")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(SimbaError, match=r"pytorch_model\.bin: cannot read weights, the file is corrupt or truncated"):
        load(folder)


def test_corrupt_safetensors_name_the_file(tmp_path):
    folder = write_transformers(random_model(), tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(SimbaError, match=r"model\.safetensors: cannot read weights"):
        load(folder)


def test_config_that_does_not_match_its_weights(tmp_path):
    folder = write_original(random_model(d_model=16), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["d_model"] = 32
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SimbaError, match=r"has shape .* but .*config\.json implies"):
        load(folder)
    cfg["d_model"], cfg["n_layer"] = 16, 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SimbaError, match="unexpected tensors"):
        load(folder)


def test_unsupported_variants_are_named(tmp_path):
    folder = write_original(random_model(), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    attn = {"num_heads": 2, "causal": True}
    for change, msg in [
        ({"ssm_cfg": {"layer": "Mamba2", "D_has_hdim": True}}, "ssm_cfg.D_has_hdim = True is not supported for Mamba-2"),
        ({"ssm_cfg": {"layer": "Mamba3"}}, "Mamba1 or Mamba2"),
        ({"attn_layer_idx": [1], "attn_cfg": {**attn, "mlp_dim": 64}}, r"attn_cfg\.mlp_dim = 64 is not supported"),
        ({"attn_layer_idx": [1], "attn_cfg": {"num_heads": 2}}, r"attn_cfg\.causal = False is not supported"),
        ({"attn_layer_idx": [1], "attn_cfg": {**attn, "window": 8}}, r"attn_cfg\.window is not an argument"),
        ({"attn_layer_idx": [1], "attn_cfg": {"causal": True}}, r"attn_cfg: missing 'num_heads'"),
        ({"attn_layer_idx": [7], "attn_cfg": attn}, r"config\.json: attn_layers: distinct layer indices in \[0, 3\)"),
        ({"d_intermediate": -1}, "'d_intermediate' must be an integer >= 0"),
    ]:
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(SimbaError, match=msg) as e:
            load(folder)
        assert str(folder) in str(e.value) and "\n" not in str(e.value)


def test_hub_id_offline_fails_fast_with_a_clear_message(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "simba_compress.cli", "info", "state-spaces/mamba-130m"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 2 and time.time() - t0 < 30
    assert r.stderr.strip().splitlines() == [
        "simba-compress: error: state-spaces/mamba-130m: not in the local hub cache and HF_HUB_OFFLINE is set; download it first"
    ]


def test_missing_folder_is_not_mistaken_for_a_hub_id():
    with pytest.raises(SimbaError, match="no such folder"):
        load("./no/such/model")
