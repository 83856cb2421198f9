"""Fact recall (the second long-context probe): the sample builder, the answer likelihoods, and the evaluation."""

import pytest
import torch

from conftest import random_model
from simba_compress import SimbaConfig
from simba_compress.facts import TEMPLATES, FactTask, answer_logprobs, evaluate_facts
from simba_compress.schedules import linear


@pytest.fixture(scope="module")
def text(corpus_tokenizer):
    words = "The cat sat on the mat. It was warm.\nA dog ran past the gate, and then it slept. "
    return torch.tensor(corpus_tokenizer(words * 200, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def task(corpus_tokenizer, text):
    return FactTask(corpus_tokenizer, text, choices=4)


@pytest.mark.parametrize("length", [120, 400])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_fact_sits_whole_at_a_sentence_boundary(task, corpus_tokenizer, length, depth):
    s = task.sample(length, depth, seed=3)
    decode = corpus_tokenizer.decode
    fact, question, pool = TEMPLATES[s.template]
    assert s.ids.numel() == length and len(s.answers) == len(s.texts) == 4 and len(set(s.texts)) == 4
    assert set(s.texts) <= set(pool)
    lo, hi = s.fact
    assert decode(s.ids[lo:hi]).strip() == fact.format(a=s.texts[0])  # the true answer is the one stated
    assert decode(s.ids[-s.tail :]).strip() == question
    assert [decode(a) for a in s.answers] == [" " + t for t in s.texts]
    if lo > 0:  # after a sentence or line end, before white space
        before = decode(s.ids[lo - 1 : lo])
        assert before.endswith("\n") or before.rstrip()[-1] in ".!?"
        assert decode(s.ids[hi : hi + 1])[:1].isspace()
    assert abs(s.depth - depth) < 0.2
    assert torch.equal(task.sample(length, depth, seed=3).ids, s.ids)  # deterministic
    others = [task.sample(length, depth, seed=k) for k in range(4, 10)]
    assert len({o.template for o in others} | {s.template}) > 1  # varied templates


def test_samples_grid_and_errors(corpus_tokenizer, text, task):
    grid = task.samples(200, [0.1, 0.9], per_depth=3, seed=1)
    assert len(grid) == 6 and all(g.length == 200 for g in grid)
    with pytest.raises(ValueError, match="cannot hold"):
        task.sample(20, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        task.sample(200, -0.1, 0)
    with pytest.raises(ValueError, match="choices"):
        FactTask(corpus_tokenizer, text, choices=1)


def test_answer_logprobs_match_the_full_forward(task):
    """Decoding the answer from the prefill's states gives the teacher-forced likelihood of one full forward."""
    m = random_model(n_layer=3, d_model=16, vocab=8192)
    s = task.sample(150, 0.5, seed=0)
    scores = answer_logprobs(m, s.ids[None], s.answers, None)
    for a, got in zip(s.answers, scores):
        logits = m(torch.cat([s.ids, a])[None], simba=None).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        want = sum(lp[s.length - 1 + i, a[i]].item() for i in range(len(a)))
        assert got == pytest.approx(want, abs=1e-4)


def test_evaluate_facts_dense_pruned_and_truncated(task):
    m = random_model(n_layer=4, d_model=16, vocab=8192)
    samples = task.samples(160, [0.2, 0.8], per_depth=2)
    dense = evaluate_facts(m, samples)
    assert len(dense.correct) == 4 and dense.flop_ratio == 1.0 and dense.protect == max(s.tail for s in samples)
    assert all(c == (mg > 0) for c, mg in zip(dense.correct, dense.margin))
    pruned = evaluate_facts(m, samples, SimbaConfig(linear(4, 0.2)))
    assert pruned.flop_ratio < 0.8 and pruned.logprob != dense.logprob
    cut = evaluate_facts(m, samples, recent=60)
    assert cut.flop_ratio == 60 / 160
    with pytest.raises(ValueError, match="question"):
        evaluate_facts(m, samples, recent=3)
    with pytest.raises(ValueError, match="one length"):
        evaluate_facts(m, samples + task.samples(170, [0.5], 1))
