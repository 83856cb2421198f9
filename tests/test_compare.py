"""`compare` and the evaluation extras of issue 5: position buckets, the table and plots, bad input."""

import json

import pytest

from conftest import random_model, write_original
from simba_compress.cli import main
from simba_compress.evaluate import position_buckets


def test_position_buckets_double():
    b = position_buckets([1.0] * 64 + [2.0] * 64 + [3.0] * 100)
    assert [(x["start"], x["end"], x["loss"]) for x in b] == [(0, 64, 1.0), (64, 128, 2.0), (128, 228, 3.0)]


def test_compare_table_and_plots(tmp_path, capsys):
    args = ["compare", "--model", "demo", "--flops", "0.8", "0.6", "--seq-len", "256", "--max-windows", "4"]
    assert main(args + ["--protect", "32", "--output", str(tmp_path / "cmp"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["model"] for r in rows] == ["dense", "flops=0.8", "flops=0.6"]
    assert rows[0]["flop_ratio"] == 1.0 and rows[2]["flop_ratio"] < rows[1]["flop_ratio"] < 1.0
    assert rows[0]["position_buckets"][-1]["end"] == 256 and rows[0]["latency_ms"] is None  # no GPU here
    names = {p.name for p in (tmp_path / "cmp").iterdir()}
    assert {"compare.json", "compare.md", "loss_vs_flops.png", "loss_by_position.png"} <= names
    assert "| flops=0.6 |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_eval_reports_loss_by_position(capsys):
    assert main(["eval", "--model", "demo", "--data", "demo", "--seq-len", "512", "--max-windows", "2", "--protect", "16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [b["end"] for b in res["position_buckets"]] == [64, 128, 256, 512]


def test_eval_bad_input(tmp_path, capsys):
    no_tok = write_original(random_model(vocab=8192), tmp_path / "m")
    (tmp_path / "empty.txt").write_text("")
    cases = [
        (["--model", "demo", "--data", str(tmp_path / "empty.txt")], "contains no text"),
        (["--model", "demo", "--data", "demo", "--seq-len", "10000000"], "shorter than one sequence"),
        (["--model", str(no_tok), "--data", "demo"], "no tokenizer files"),
    ]
    for args, msg in cases:
        assert main(["eval", *args]) == 2
        assert msg in capsys.readouterr().err


def test_compare_unknown_lm_eval_task(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    args = ["compare", "--model", "demo", "--flops", "0.8", "--seq-len", "128", "--max-windows", "1", "--protect", "8"]
    assert main(args + ["--tasks", "no_such_task_xyz", "--output", str(tmp_path / "c")]) == 2
    assert "--tasks: unknown lm-eval task 'no_such_task_xyz'" in capsys.readouterr().err
