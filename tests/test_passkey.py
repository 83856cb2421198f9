"""Passkey retrieval: the sample builder, exact-match scoring, and where the haystack text comes from."""

import lzma

import pytest
import torch

from conftest import CORPUS, random_model, shared, trained_proxy
from simba_compress import SimbaConfig
from simba_compress.passkey import NEEDLE, QUESTION, PasskeyTask, evaluate_passkey, exact_match
from simba_compress.schedules import linear


@pytest.fixture(scope="module")
def task(corpus_tokenizer):
    return PasskeyTask(corpus_tokenizer, torch.arange(1000, 4000))  # token i at position i - 1000


@pytest.mark.parametrize("length", [120, 513])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_needle_sits_at_the_requested_depth_and_length(task, corpus_tokenizer, length, depth):
    s = task.sample(length, depth, seed=5)
    decode = corpus_tokenizer.decode
    assert s.ids.numel() == length and len(s.key) == 5 and s.key.isdigit()
    lo, hi = s.needle
    assert decode(s.ids[lo:hi]).strip() == NEEDLE.format(key=s.key)
    assert decode(s.ids[-s.tail :]).strip() == f"{QUESTION} {s.key}" and decode(s.ids[-s.answer :]) == " " + s.key
    assert len(s.keys) == 2 and all(torch.equal(s.ids[a:b], s.ids[-s.answer :]) and lo <= a < b <= hi for a, b in s.keys)
    hay = torch.cat([s.ids[len(task.task) : lo], s.ids[hi : length - s.tail]])
    assert lo - len(task.task) == round(depth * hay.numel())
    assert torch.equal(hay, torch.arange(int(hay[0]), int(hay[0]) + hay.numel()))  # one contiguous slice of the text
    assert torch.equal(task.sample(length, depth, seed=5).ids, s.ids)  # deterministic
    assert task.sample(length, depth, seed=6).key != s.key or not torch.equal(task.sample(length, depth, 6).ids, s.ids)


def test_samples_grid_and_errors(task):
    grid = task.samples(200, [0.1, 0.9], per_depth=3, seed=1)
    assert len(grid) == 6 and [s.depth for s in grid] == [0.1] * 3 + [0.9] * 3
    assert len({s.key for s in grid}) > 1
    with pytest.raises(ValueError, match="cannot hold"):
        task.sample(40, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        task.sample(200, 1.5, 0)


def test_exact_match_needs_every_answer_token(task):
    s = task.sample(150, 0.5, 0)
    vocab, k = 8192, s.answer + 2
    logits = torch.zeros(2, k, vocab)
    for j, tok in enumerate(s.ids[-s.answer :]):  # position k - answer - 1 + j predicts answer token j
        logits[:, k - s.answer - 1 + j, tok] = 1.0
    logits[1, k - 2, (int(s.ids[-1]) + 1) % vocab] = 2.0  # the last answer token wrong
    assert exact_match(logits, [s, s]).tolist() == [True, False]
    with pytest.raises(ValueError, match="cannot score"):
        exact_match(logits[:, -s.answer :], [s])


def test_haystacks_come_only_from_the_text_given(corpus_tokenizer):
    """Evaluation samples built from valid.txt.xz hold validation text, none of the training text."""
    from simba_compress.data import read_documents, tokenize

    valid = tokenize(read_documents(str(shared(CORPUS / "valid.txt.xz"))), corpus_tokenizer)
    s = PasskeyTask(corpus_tokenizer, valid).sample(2048, 0.5, seed=3)
    piece = corpus_tokenizer.decode(s.ids[s.needle[1] + 50 : s.needle[1] + 250])
    valid_text = lzma.open(CORPUS / "valid.txt.xz", "rt", encoding="utf-8").read()
    train_text = lzma.open(shared(CORPUS / "train.txt.xz"), "rt", encoding="utf-8").read()
    assert len(piece) > 400 and piece in valid_text and piece not in train_text


def test_evaluate_passkey_dense_pruned_and_truncated(task):
    m = random_model(n_layer=4, d_model=16, vocab=8192)
    samples = task.samples(160, [0.1, 0.9], per_depth=2)
    dense = evaluate_passkey(m, samples, batch_tokens=320)
    assert len(dense.correct) == 4 and dense.key_kept == [True] * 4 and dense.flop_ratio == 1.0
    assert dense.protect == max(s.tail for s in samples)
    pruned = evaluate_passkey(m, samples, SimbaConfig(linear(4, 0.2)))
    assert pruned.flop_ratio < 0.8 and len(pruned.key_kept) == 4
    cut = evaluate_passkey(m, samples, recent=60)  # the depth-0.1 needles are cut off, the 0.9 ones kept
    assert cut.key_kept == [False, False, True, True] and cut.flop_ratio == 60 / 160
    with pytest.raises(ValueError, match="tail"):
        evaluate_passkey(m, samples, recent=5)


def test_the_cached_passkey_proxy_retrieves_and_truncation_loses_the_early_key(corpus_tokenizer):
    """The fine-tuned l16 passkey proxy (issue 23's CPU criterion work reads it from the cache, not a GPU rebuild):
    dense, it reads back keys early and late in a 512-token prompt; the prompt truncated to its last 30% has lost
    the early key, and with it the answer."""
    from simba_compress import load
    from simba_compress.data import read_documents, tokenize

    model = load(trained_proxy("mamba-proxy-d320-l16-passkey"))
    text = read_documents(str(shared(CORPUS / "valid.txt.xz")))[0][:40_000]  # held-out haystacks, ~10K tokens
    valid = tokenize([text], corpus_tokenizer)
    samples = PasskeyTask(corpus_tokenizer, valid).samples(512, [0.1, 0.9], per_depth=1, seed=0)
    dense = evaluate_passkey(model, samples)
    assert dense.correct == [True, True]
    cut = evaluate_passkey(model, samples, recent=150)
    assert cut.key_kept == [False, True] and cut.correct[0] is False
