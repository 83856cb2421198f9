"""lm-eval integration end to end: a local multiple-choice task on a pretrained proxy, dense and pruned."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import L16, shared

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A 6-question multiple-choice task from a local JSONL file, and the folder with its YAML."""
    folder = tmp_path_factory.mktemp("tasks")
    docs = [
        ("In Python, the built-in function that returns the number of items in a list is", [" len", " size", " count", " length"], 0),
        ("In SQL, rows are read from a table with the statement", [" SELECT", " FETCH", " READ", " OPEN"], 0),
        ("In the beginning God created the heaven and the", [" earth", " table", " river", " number"], 0),
        ("A Python function is defined with the keyword", [" def", " func", " fn", " lambda"], 0),
        ("To remove a table in PostgreSQL, use DROP", [" TABLE", " ROW", " INDEX", " FILE"], 0),
        ("The opposite of true is", [" false", " apple", " seven", " blue"], 0),
    ]
    with open(folder / "tiny.jsonl", "w") as f:
        for q, choices, answer in docs:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    (folder / "tiny.yaml").write_text(
        "task: simba_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'tiny.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    return folder


@pytest.fixture(scope="module")
def pruned_l16(tmp_path_factory):
    import simba_compress as sc

    m = sc.load(shared(L16))
    sc.compress(m, sc.LinearSchedule(flops=0.6, seq_len=1024))
    return sc.save(m, tmp_path_factory.mktemp("l16") / "pruned", tokenizer=sc.load_tokenizer(L16))


def run(task_folder, pretrained):
    from lm_eval.tasks import TaskManager

    import simba_compress.harness  # noqa: F401  registers "simba"

    return lm_eval.simple_evaluate(
        model="simba",
        model_args=f"pretrained={pretrained},device=cpu",
        tasks=["simba_tiny_mc"],
        task_manager=TaskManager(include_path=str(task_folder)),
        log_samples=True,
    )


def test_multiple_choice_task_end_to_end(tiny_task, pruned_l16):
    dense = run(tiny_task, L16)
    pruned = run(tiny_task, pruned_l16)
    for res in (dense, pruned):
        acc = res["results"]["simba_tiny_mc"]["acc,none"]
        assert 0.0 <= acc <= 1.0 and len(res["samples"]["simba_tiny_mc"]) == 6
    assert dense["results"]["simba_tiny_mc"]["acc,none"] >= 0.5  # a pretrained model knows most of these


def test_loglikelihood_equals_a_direct_computation(pruned_l16):
    import simba_compress as sc
    from simba_compress.harness import SimbaLM

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = SimbaLM(pretrained=str(pruned_l16), device="cpu")
    context, continuation = "def main():\n    print(", "'hello')"
    (got, _), = lm.loglikelihood([Req(context, continuation)], disable_tqdm=True)
    tok = sc.load_tokenizer(pruned_l16)
    whole = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    from dataclasses import replace

    model = sc.load(pruned_l16)
    n = len(whole) - n_ctx
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]), simba=replace(model.simba, protect_last=n)).logits[0].log_softmax(-1)
    want = sum(logits[n_ctx - 1 + i, whole[n_ctx + i]].item() for i in range(n))
    assert got == pytest.approx(want, rel=1e-5)
    rolling = lm.loglikelihood_rolling([Req("SELECT * FROM users WHERE id = 1;")], disable_tqdm=True)[0]
    assert rolling < 0 and math.isfinite(rolling)
    text = lm.generate_until([Req("import os\nimport", {"until": ["\n"], "max_gen_toks": 8})], disable_tqdm=True)[0]
    assert isinstance(text, str) and "\n" not in text


def _hook_installed() -> bool:
    """Whether the wheel's lm-eval hook (setup.py) is in site-packages; editable installs lack it."""
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return any((Path(d) / "simba_compress-lm_eval.pth").exists() for d in dirs)


@pytest.mark.parametrize("how", ["lm_eval", "module"])
def test_lm_eval_command_line(how, tiny_task, pruned_l16, tmp_path):
    """`lm_eval run --model simba ...` (the installed hook registers `simba`), and
    `python -m simba_compress.harness run ...` (lm-eval's own CLI with `simba` registered, for editable installs)."""
    import subprocess
    import sys

    if how == "lm_eval":
        if not _hook_installed():
            pytest.skip("editable install: the lm-eval hook (.pth) ships only in built wheels")
        cmd = [str(Path(sys.executable).parent / "lm_eval")]
    else:
        cmd = [sys.executable, "-m", "simba_compress.harness"]
    r = subprocess.run(
        [*cmd, "run", "--model", "simba", "--model_args", f"pretrained={pruned_l16}", "--device", "cpu",
         "--tasks", "simba_tiny_mc", "--include_path", str(tiny_task), "--output_path", str(tmp_path / "res")],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "simba_tiny_mc" in r.stdout and "acc" in r.stdout


def test_module_command_line_with_the_wheels_placeholder():
    """A built wheel's hook registers `simba` as a lazy placeholder; `python -m simba_compress.harness` must then
    neither register a second class (lm-eval refuses) nor lose the model (CI installs the wheel, this checkout
    is editable: the placeholder is made here by hand, as the hook makes it)."""
    import subprocess
    import sys

    code = (
        "import runpy, sys\n"
        "import lm_eval.models\n"
        "from lm_eval.api.registry import model_registry\n"
        "if 'simba' not in model_registry:\n"
        "    model_registry.register('simba', target='simba_compress.harness:SimbaLM')\n"
        "sys.argv = ['harness', '--help']\n"
        "try:\n"
        "    runpy.run_module('simba_compress.harness', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "from lm_eval.api.registry import get_model\n"
        "print(get_model('simba').__module__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "simba_compress.harness"
