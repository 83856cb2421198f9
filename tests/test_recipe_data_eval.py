"""Recipes (schema, overrides, shipped examples), text input, and the evaluation metrics."""

import json
import lzma
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, random_model
from simba_compress import ExplicitSchedule, SimbaConfig, SimbaError
from simba_compress.data import read_documents, windows
from simba_compress.evaluate import evaluate, evaluate_truncated
from simba_compress.recipe import build_recipe, read_recipe_file
from simba_compress.schedules import linear


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_are_valid_and_round_trip(path):
    r = build_recipe(read_recipe_file(path), source=str(path))
    assert r.output and r.schedule.kind in ("linear", "calibrated", "explicit")
    assert build_recipe(__import__("yaml").safe_load(r.to_yaml())) == r


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: demo\nflops: 0.6\nflop: 0.5\n", r"flop: unknown key"),
        ("model: demo\nflops: lots\n", r"schedule\.flops: Input should be a valid number"),
        ("model: demo\nflops: 0.6\ncalibration: {samples: -3}\n", r"calibration\.samples: Input should be greater than or equal to 1"),
        ("model: demo\nschedule: {kind: linear, flops: 1.5}\n", r"schedule\.flops: must be in \(0, 1\], got 1\.5$"),
        ("model: demo\nschedule: {kind: linear, flops: 0.6, trials: 4}\n", r"schedule\.trials: not a setting of a linear schedule"),
        ("model: demo\nflops: 0.6\nfinetune: {steps: 2, batch_size: 4, micro_batch_size: 3}\n",
         r"finetune\.micro_batch_size: 3 does not divide batch_size 4"),
    ],
)
def test_unknown_key_wrong_type_and_bad_value_name_the_key_and_file(tmp_path, text, message):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(SimbaError, match=r"r\.yaml: " + message):
        build_recipe(read_recipe_file(f), source=str(f))


def test_bad_yaml_names_the_line(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(SimbaError, match=r"r\.yaml: not valid YAML at line"):
        read_recipe_file(f)


def test_flags_override_the_recipe():
    base = {"model": "demo", "flops": 0.6, "criterion": "utr", "calibration": {"samples": 4}}
    r = build_recipe(base, {"schedule.flops": 0.8, "calibration.seq_len": 256, "schedule.criterion": None})
    s = r.schedule
    assert (s.flops, s.criterion, r.calibration.samples, r.calibration.seq_len) == (0.8, "utr", 4, 256)
    r = build_recipe(base, {"schedule.keep": [1.0, 0.5]})  # a flag's target replaces the recipe's
    assert r.schedule == ExplicitSchedule(keep=[1.0, 0.5], criterion="utr")
    with pytest.raises(SimbaError, match="give only one of flops, keep, final_keep"):
        build_recipe({"model": "demo", "flops": 0.6, "final_keep": 0.2})
    with pytest.raises(SimbaError, match="give a target"):
        build_recipe({"model": "demo"})
    with pytest.raises(SimbaError) as e:  # a bad flag keeps its field, for the CLI to name the flag
        build_recipe(base, {"schedule.protect_last": 0}, "r.yaml")
    assert str(e.value) == "schedule.protect_last: must be >= 1, got 0" and e.value.field == "schedule.protect_last"


# A recipe and a folder's simba section exactly as simba-compress wrote them before the settings objects (issue 25)
EARLIER_RECIPE = """\
model: demo
output: out/demo-0.6
tokenizer: null
flops: 0.6
schedule: calibrated
keep: null
final_keep: null
criterion: share
protect_last: 4
form: exact
granularity: 16
max_tokens: 64@3
seq_len: 512
calibration:
  data: demo
  samples: 2
  seq_len: 256
trials: 3
timeout: null
storage: null
study_name: simba-calibration
objective: loss
finetune:
  steps: 0
  data: null
  eval_data: null
  lr: 0.0001
  warmup_steps: null
  min_lr_ratio: 0.1
  weight_decay: 0.01
  grad_clip: 1.0
  batch_size: 8
  micro_batch_size: null
  seq_len: 1024
  protect: null
  loss_positions: continuation
  distill_weight: 0.5
  temperature: 1.0
  train: all
  gradient_checkpointing: null
  memory_gb: null
  eval_every: 50
  eval_windows: 16
  save_every: 100
  seed: 0
finetune_dir: null
seed: 7
device: auto
dtype: auto
"""
EARLIER_SIMBA = {"keep": [1.0, 1.0, 0.75, 0.75, 0.5, 0.25], "criterion": "simba", "protect_last": 1, "seed": 0,
                 "granularity": 1, "extra": {"schedule": "calibrated", "form": "fast", "flops_target": 0.6,
                 "seq_len": 1024, "trial": 5}, "max_tokens": None, "align": True, "version": 1}


def test_recipes_and_folders_of_earlier_versions_still_load(tmp_path, capsys):
    """The flat recipe format (schedule settings at the top level) reads into the settings objects, with the same
    meaning, and runs; a folder written before (its simba section) loads pruned as it was."""
    import yaml

    from simba_compress import CalibratedSchedule, LinearSchedule, compress, load, save
    from simba_compress.cli import main

    f = tmp_path / "old.yaml"
    f.write_text(EARLIER_RECIPE)
    r = build_recipe(read_recipe_file(f), source=str(f))
    assert r.schedule == CalibratedSchedule(flops=0.6, criterion="share", protect_last=4, form="exact", granularity=16,
                                            max_tokens="64@3", seq_len=512, trials=3, objective="loss", seed=7)
    assert r.finetune.steps == 0 and r.calibration.samples == 2
    assert build_recipe(yaml.safe_load(r.to_yaml())) == r  # written back in today's form, read the same
    linear = build_recipe(read_recipe_file(f) | {"schedule": "linear", "trials": 40})  # other kinds' keys: unused
    assert isinstance(linear.schedule, LinearSchedule) and linear.schedule.flops == 0.6
    assert main(["--recipe", str(f), "--output", str(tmp_path / "o"), "--json"]) == 0
    report = __import__("json").loads(capsys.readouterr().out)
    assert report["schedule"]["criterion"] == "share" and report["schedule"]["max_tokens"] == [0, 0, 0, 64, 64, 64]
    assert report["search"]["trials_complete"] == 3

    folder = tmp_path / "earlier"
    model = random_model(n_layer=6, vocab=64, seed=4)
    save(model, folder)
    config = folder / "config.json"
    config.write_text(__import__("json").dumps(__import__("json").loads(config.read_text()) | {"simba": EARLIER_SIMBA}))
    loaded = load(folder)
    assert loaded.simba.keep == EARLIER_SIMBA["keep"] and loaded.simba.align and loaded.simba.extra["trial"] == 5
    again = random_model(n_layer=6, vocab=64, seed=4)
    compress(again, ExplicitSchedule(keep=EARLIER_SIMBA["keep"]))
    again.simba.align = True
    x = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, again(x).logits)


def test_reads_txt_xz_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    with lzma.open(tmp_path / "b.txt.xz", "wt") as f:
        f.write("compressed text")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_documents(str(tmp_path / "b.txt.xz")) == ["compressed text"]
    assert read_documents(str(tmp_path / "c.jsonl")) == ["one", "two"]
    assert read_documents(str(tmp_path)) == ["hello world", "compressed text", "one", "two"]
    assert len(read_documents("demo")[0]) > 100_000


def test_bad_text_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "bad.txt.xz").write_bytes(b"not xz")
    cases = {
        "empty.txt": "contains no text",
        "bad.jsonl": r"bad\.jsonl:1: expected an object with a string 'text' field",
        "x.csv": "unsupported file type",
        "bad.txt.xz": "cannot read text",
        "missing.txt": "no such file or folder",
    }
    for name, msg in cases.items():
        with pytest.raises(SimbaError, match=msg):
            read_documents(str(tmp_path / name))
    with pytest.raises(SimbaError, match="shorter than one sequence of 100"):
        windows(torch.arange(50), 100, source="short.txt")


def test_windows_are_evenly_spread_and_non_overlapping():
    w = windows(torch.arange(1000), 100, 4)
    assert w[:, 0].tolist() == [0, 300, 600, 900] and (w[:, 1:] - w[:, :-1] == 1).all()


def test_headline_and_all_position_losses_match_a_manual_computation():
    m = random_model(vocab=64, seed=2)
    win = torch.randint(0, 64, (5, 41))
    res = evaluate(m, win, protect=8, batch_size=2, simba=None, progress=False)
    with torch.no_grad():
        ce = F.cross_entropy(m(win[:, :-1]).logits.transpose(1, 2), win[:, 1:], reduction="none")
    assert res.loss == pytest.approx(ce[:, -8:].mean().item(), rel=1e-5)
    assert res.all_position_loss == pytest.approx(ce.mean().item(), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(res.loss)) and res.flop_ratio == 1.0
    trunc = evaluate_truncated(m, win, 1.0, protect=8, batch_size=2, progress=False)
    assert trunc.loss == pytest.approx(res.loss, rel=1e-5)


def test_headline_protects_the_scored_continuation():
    m = random_model(n_layer=4, vocab=64, seed=3)
    simba = SimbaConfig(linear(4, 0.2), "simba", 1)
    win = torch.randint(0, 64, (2, 65))
    res = evaluate(m, win, protect=16, simba=simba, progress=False)
    from dataclasses import replace

    with torch.no_grad():
        out = m(win[:, :-1], simba=replace(simba, protect_last=16), return_kept=True)
    assert (out.kept[-1][:, -16:] == torch.arange(48, 64)).all()
    ce = F.cross_entropy(out.logits.transpose(1, 2), win[:, 1:], reduction="none")[:, -16:].mean()
    assert res.loss == pytest.approx(ce.item(), rel=1e-5)
    assert res.all_position_loss != pytest.approx(res.loss)


def test_pruning_keeps_the_pretrained_proxy_good(l16, valid_windows):
    """On real text at 0.6 of the FLOPs, Simba stays near dense on the protected continuation and beats random
    pruning there; with only the last token protected, it keeps the recent tokens random pruning drops."""
    from simba_compress.schedules import linear_for_flops

    win = valid_windows[:4]
    dense = evaluate(l16, win, protect=64, simba=None, progress=False)
    from simba_compress import LinearSchedule

    simba = linear_for_flops(l16.config, LinearSchedule(flops=0.6, seq_len=512, protect_last=64, form="exact"))
    rnd = linear_for_flops(l16.config, LinearSchedule(flops=0.6, seq_len=512, criterion="random", protect_last=64,
                                                      form="exact"))
    from dataclasses import replace

    s = evaluate(l16, win, protect=64, simba=replace(simba, protect_last=1), progress=False)
    r = evaluate(l16, win, protect=64, simba=replace(rnd, protect_last=1), progress=False)
    assert s.loss < dense.loss + 0.1 and s.loss < r.loss
    recent = lambda res: sum(res.position_loss[-64:]) / 64  # noqa: E731  (unprotected in this pass)
    assert recent(s) < recent(r) - 0.5
