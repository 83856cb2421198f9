"""The saved folder in transformers (remote code), pipelines and the Hub: it prunes as simba_compress.load does."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import simba_compress as sc
from conftest import REPO, random_model
from simba_compress import SimbaConfig
from simba_compress.hf import REMOTE_CLASSES
from test_hybrid import CASES as HYBRIDS
from test_hybrid import load_case_model
from test_mamba2 import random_mamba2

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Mamba2ForCausalLM, MambaForCausalLM  # noqa: E402

PROMPTS = ["In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
           "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. " * 3,
           "SELECT name, count(*) FROM users WHERE id > 10 GROUP BY name ORDER BY"]


def auto(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """The embedded demo model at 0.6 of its FLOPs (a real tokenizer, so generate and pipelines run on text)."""
    m = sc.load("demo")
    sc.compress(m, sc.LinearSchedule(flops=0.6))
    return sc.save(m, tmp_path_factory.mktemp("hf") / "demo-0.6", tokenizer=sc.load_tokenizer("demo"))


@pytest.fixture(scope="module", params=["demo", *sorted(HYBRIDS)])
def text_folder(request, demo_folder, tmp_path_factory):
    """A pruned folder with the demo's tokenizer: the demo model, or a random-weight hybrid of each layout."""
    if request.param == "demo":
        return demo_folder
    m, _ = pruned_model(request.param, vocab_size=8192)
    return sc.save(m, tmp_path_factory.mktemp("hf") / request.param, tokenizer=sc.load_tokenizer("demo"))


def padded(ids: torch.Tensor, side: str, pad: int = 5):
    """Row 0 as is, row 1 its first half padded by `pad` slots on `side`: (ids, mask)."""
    n = ids.shape[1]
    out, mask = ids.repeat(2, 1), torch.ones(2, n, dtype=torch.long)
    short = ids[0, : n - pad]
    if side == "left":
        out[1, pad:], mask[1, :pad] = short, 0
    else:
        out[1, : n - pad], mask[1, n - pad :] = short, 0
    return out, mask


KINDS = ["mamba1", "mamba2", *sorted(HYBRIDS)]  # every layout a pruned folder is written in with remote code


def pruned_model(kind: str, **overrides):
    """(a random-weight model of `kind` with a schedule that prunes after every kind of layer it has, the transformers
    class that reads its folder dense). Hybrids: test_hybrid's small configs, through the folder transformers writes."""
    if kind == "mamba1":
        m, dense = random_model(n_layer=4, d_model=32, vocab=overrides.get("vocab_size", 64), seed=1), MambaForCausalLM
    elif kind == "mamba2":
        m, dense = random_mamba2(n_layer=4, seed=1, vocab=overrides.get("vocab_size", 64)), Mamba2ForCausalLM
    else:
        m, dense = load_case_model(kind, **overrides), getattr(transformers, f"{HYBRIDS[kind][0]}ForCausalLM")
    keep = [1.0, 0.7, 0.5, 0.5, 0.3, 0.3, 0.2][: m.config.n_layer]
    m.simba = SimbaConfig(keep, protect_last=2)
    return m, dense


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_remote_code_prunes_as_simba_load_and_the_explicit_class_runs_dense(kind, tmp_path):
    m, dense_class = pruned_model(kind)
    folder = sc.save(m, tmp_path / "out")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_simba." + REMOTE_CLASSES[cfg["model_type"]]
    card = (folder / "README.md").read_text()  # the model card says how to load it either way
    assert "trust_remote_code=True" in card and f"`{dense_class.__name__}.from_pretrained(" in card
    ours = sc.load(folder)
    hf, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                    output_loading_info=True)  # fmt: skip
    assert type(hf).__name__ == REMOTE_CLASSES[cfg["model_type"]] and type(hf).__module__.endswith("modeling_simba")
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])  # layouts.to_model's names
    ids = torch.randint(0, m.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    for side in ("left", "right"):
        batch, mask = padded(ids, side)
        want = ours(batch, mask).logits
        got = hf.eval()(batch, attention_mask=mask).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dense = ours(ids, simba=None).logits
    pruned = hf(ids).logits
    assert (pruned - dense).abs().max() > 1e-2  # the remote forward prunes
    explicit = dense_class.from_pretrained(folder, dtype=torch.float32).eval()
    torch.testing.assert_close(explicit(ids, use_cache=False).logits, dense, rtol=1e-4, atol=1e-4)
    # save_pretrained writes the layout's names back (layouts.from_model): the explicit class reads it dense again
    hf.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(auto(tmp_path / "again")(ids).logits, pruned, rtol=1e-6, atol=1e-6)
    again = dense_class.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    torch.testing.assert_close(again(ids, use_cache=False).logits, dense, rtol=1e-4, atol=1e-4)
    hf.simba = None  # the remote model without its schedule is the dense model
    torch.testing.assert_close(hf(ids).logits, dense, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_generate_greedy_batched_left_padded_equals_simba_generate(text_folder):
    hf, ours = auto(text_folder), sc.load(text_folder)
    tok = AutoTokenizer.from_pretrained(text_folder, padding_side="left")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert enc.attention_mask[1].sum() < enc.attention_mask.shape[1]  # the second row is padded
    got = hf.generate(**enc, max_new_tokens=10, do_sample=False)
    for row, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt").input_ids
        want = ours.generate(ids, max_new_tokens=10, eos_token_id=tok.eos_token_id)[0, ids.shape[1] :]
        assert got[row, enc.input_ids.shape[1] :].tolist() == want.tolist()
    # the prompt is pruned: its first new token's logits are the pruned prefill's, not the dense model's
    first = hf.generate(**enc, max_new_tokens=1, return_dict_in_generate=True, output_logits=True).logits[0]
    pruned = ours(enc.input_ids, enc.attention_mask).logits[:, -1]
    dense = ours(enc.input_ids, enc.attention_mask, simba=None).logits[:, -1]
    torch.testing.assert_close(first, pruned, rtol=1e-4, atol=1e-4)
    assert (first - dense).abs().max() > 1e-2


@torch.no_grad()
def test_sampling_decodes_every_new_token_from_the_pruned_prefill_states(text_folder):
    """A hybrid's attention layers decode from KV caches of the tokens each kept, as simba_compress's step does."""
    hf, ours = auto(text_folder), sc.load(text_folder)
    tok = AutoTokenizer.from_pretrained(text_folder, padding_side="left")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = hf.generate(**enc, max_new_tokens=6, do_sample=True, top_k=50, temperature=0.9,
                      return_dict_in_generate=True, output_logits=True)  # fmt: skip
    new = out.sequences[:, enc.input_ids.shape[1] :]
    # the reference: simba_compress's pruned prefill, then its step, fed the tokens transformers sampled
    pre = ours(enc.input_ids, enc.attention_mask, return_states=True, last_logits=1)
    logits, states = pre.logits[:, -1], pre.states
    for t in range(new.shape[1]):
        torch.testing.assert_close(out.logits[t], logits, rtol=1e-4, atol=1e-4)
        logits, states = ours.step(new[:, t], states)
    torch.manual_seed(0)
    again = hf.generate(**enc, max_new_tokens=6, do_sample=True, top_k=50, temperature=0.9)
    assert torch.equal(again, out.sequences)


def test_pipeline_text_generation(text_folder):
    from transformers import pipeline

    tok = AutoTokenizer.from_pretrained(text_folder, padding_side="left")
    pipe = pipeline("text-generation", model=str(text_folder), tokenizer=tok, trust_remote_code=True, dtype=torch.float32)
    got = pipe(PROMPTS, max_new_tokens=8, do_sample=False, return_full_text=False, batch_size=2)
    ours = sc.load(text_folder)
    for prompt, res in zip(PROMPTS, got):
        ids = tok(prompt, return_tensors="pt").input_ids
        want = ours.generate(ids, max_new_tokens=8, eos_token_id=tok.eos_token_id)[0, ids.shape[1] :]
        assert res[0]["generated_text"] == tok.decode(want, skip_special_tokens=True)


def test_refusals_name_the_problem(demo_folder):
    hf = auto(demo_folder)
    tok = AutoTokenizer.from_pretrained(demo_folder)  # right padding
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="left-padded"):
        hf.generate(**enc, max_new_tokens=2)
    with pytest.raises(ValueError, match="greedy or sampling only"):
        hf.generate(enc.input_ids[:1], max_new_tokens=2, num_beams=2)


def test_missing_package_is_named_with_how_to_install_it(demo_folder, tmp_path):
    script = (
        "import sys; sys.modules['simba_compress'] = None\n"  # as if it were not installed
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(demo_folder)!r}, trust_remote_code=True)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode != 0
    assert "simba-compress package, which could not be imported" in res.stderr and "pip install simba-compress" in res.stderr


def test_folder_is_a_hub_repository_with_a_parsing_model_card(demo_folder, tmp_path):
    """What huggingface_hub's upload_folder would publish, downloaded elsewhere, loads and prunes the same."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects  # upload_folder's filter

    files = [p.relative_to(demo_folder).as_posix() for p in demo_folder.rglob("*") if p.is_file()]
    published = list(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    assert {"README.md", "config.json", "model.safetensors", "modeling_simba.py", "keep_profile.png"} <= set(published)
    assert not [f for f in published if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]  # no pickle
    for f in published:
        assert (demo_folder / f).stat().st_mode & 0o044 == 0o044, f"{f} is not readable by others"
    repo = tmp_path / "owner--demo"  # as a download of the repository would lay it out
    repo.mkdir()
    for f in published:
        shutil.copy(demo_folder / f, repo / f)
    ids = torch.randint(0, 8192, (1, 200))
    torch.testing.assert_close(auto(repo)(ids).logits, sc.load(demo_folder)(ids).logits, rtol=1e-5, atol=1e-5)

    card = ModelCard.load(repo / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0" and "simba-compress" in card.data.tags
    assert "trust_remote_code=True" in card.text and "MambaForCausalLM.from_pretrained" in card.text
    assert "![keep profile](keep_profile.png)" in card.text


def test_model_card_reports_the_run(tmp_path):
    """A CLI run's card: FLOP ratio and calibration losses from report.json, the recipe command, the source's license."""
    from simba_compress.cli import main

    src = tmp_path / "src"
    shutil.copytree(REPO / "simba_compress" / "data" / "demo-model", src)
    (src / "README.md").write_text("---\nlicense: mit\ntags:\n- mamba\n---\n# a source model\n")
    out = tmp_path / "out"
    assert main(["--model", str(src), "--flops", "0.6", "--schedule", "linear", "--calib-samples", "2",
                 "--calib-seq-len", "256", "--output", str(out), "--json"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    text = (out / "README.md").read_text()
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.base_model is None  # a local source is no Hub id
    assert f"**{report['flops']['ratio']:.3f} of the dense backbone FLOPs**" in text
    assert f"| dense | {report['calibration']['dense']['loss']:.4f} |" in text
    assert f"| pruned | {report['calibration']['sparse']['loss']:.4f} |" in text
    assert "simba-compress --recipe recipe.yaml --output out" in text
    assert (out / "keep_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


LM_EVAL_DOCS = [
    ("In the beginning God created the heaven and the", [" earth", " table", " river", " number"]),
    ("In Python, the number of items in a list is given by the built-in", [" len", " size", " count", " number"]),
    ("To read rows from a table in SQL, use the statement", [" SELECT", " TABLE", " ROW", " INDEX"]),
    ("A Python function is defined with the keyword", [" def", " func", " seven", " blue"]),
    ("The opposite of true is", [" false", " seven", " water", " light"]),
]


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    """Local tasks: multiple choice with one-token answers, the same with multi-token answers, a rolling
    loglikelihood (perplexity) task and a generation task, each from a JSONL file."""
    folder = tmp_path_factory.mktemp("tasks")
    rows = [{"question": q, "choices": c, "answer": 0, "long": [a + " and the" + b for a, b in zip(c, c[1:] + c[:1])],
             "text": q + c[0] + ". " + q.lower() + c[1] + "."} for q, c in LM_EVAL_DOCS]  # fmt: skip
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
              "test_split: test\ntarget_delimiter: ''\n")  # fmt: skip
    mc = ("output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
          "metric_list:\n  - metric: acc\n")
    (folder / "one.yaml").write_text("task: simba_hf_one\n" + common + mc + "doc_to_choice: '{{choices}}'\n")
    (folder / "long.yaml").write_text("task: simba_hf_long\n" + common + mc + "doc_to_choice: '{{long}}'\n")
    (folder / "rolling.yaml").write_text(
        "task: simba_hf_rolling\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")  # fmt: skip
    (folder / "gen.yaml").write_text(
        "task: simba_hf_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{choices[0]}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")  # fmt: skip
    return folder


def lm_eval_responses(model: str, model_args: str, tasks: list[str], folder) -> dict[str, list]:
    """Each task's per-request responses (loglikelihoods, or generated text), in document order."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import simba_compress.harness  # noqa: F401  registers "simba"

    res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                  task_manager=TaskManager(include_path=str(folder), include_defaults=False))  # fmt: skip
    out = {}
    for task in tasks:
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        out[task] = [r[0] if isinstance(r, list) else r for s in samples for r in s["resps"]]
    return out


@pytest.mark.parametrize("text_folder", ["demo", "granite_moe_rope_multipliers"], indirect=True)
def test_lm_eval_hf_model_scores_as_the_simba_model(text_folder, lm_eval_tasks):
    """lm_eval --model hf with trust_remote_code against --model simba: the same loglikelihoods where lm-eval's hf
    model can express the simba model's request (one-token continuations, rolling windows) and the same generations.
    A longer continuation is scored as the forward prunes it (lm-eval's hf model never says where it starts). On the
    demo model and on a hybrid (MoE MLPs, RoPE attention, Granite's multipliers)."""
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
    tok = sc.load_tokenizer(text_folder)
    assert all(len(tok(c, add_special_tokens=False).input_ids) == 1 for _, cs in LM_EVAL_DOCS for c in cs)
    tasks = ["simba_hf_one", "simba_hf_rolling", "simba_hf_gen", "simba_hf_long"]
    hf = lm_eval_responses("hf", f"pretrained={text_folder},trust_remote_code=True,device=cpu,dtype=float32",
                           tasks, lm_eval_tasks)  # fmt: skip
    ours = lm_eval_responses("simba", f"pretrained={text_folder},device=cpu", tasks, lm_eval_tasks)
    dense = lm_eval_responses("simba", f"pretrained={text_folder},device=cpu,dense=true", tasks[:1], lm_eval_tasks)
    for task in ("simba_hf_one", "simba_hf_rolling"):
        got = [r[0] if isinstance(r, (list, tuple)) else r for r in hf[task]]
        want = [r[0] if isinstance(r, (list, tuple)) else r for r in ours[task]]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-4), task
    assert hf["simba_hf_gen"] == ours["simba_hf_gen"]
    assert [r[0] for r in ours["simba_hf_one"]] != pytest.approx([r[0] for r in dense["simba_hf_one"]], abs=1e-3)
    # multi-token continuations: the hf model's request is the plain pruned forward over context + continuation
    model, long = sc.load(text_folder), []
    for q, choices in LM_EVAL_DOCS:
        for a, b in zip(choices, choices[1:] + choices[:1]):
            whole, n_ctx = tok(q + a + " and the" + b).input_ids, len(tok(q).input_ids)
            with torch.no_grad():
                logp = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            long.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
    assert [r[0] for r in hf["simba_hf_long"]] == pytest.approx(long, rel=1e-5, abs=1e-4)
    assert [r[0] for r in ours["simba_hf_long"]] != pytest.approx(long, abs=1e-3)  # --model simba protects them
