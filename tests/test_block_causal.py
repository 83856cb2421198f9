"""benchmarks/block_causal.py: its layer loop is the model's pruned forward, and its blocks are causal."""

import importlib.util

import pytest
import torch

from conftest import REPO, random_model
from simba_compress import SimbaConfig
from simba_compress.evaluate import protected

spec = importlib.util.spec_from_file_location("block_causal", REPO / "benchmarks" / "block_causal.py")
bc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bc)

SIMBA = SimbaConfig([1.0, 0.75, 0.75, 0.5, 0.25])
LENGTH, PROTECT = 96, 16


@torch.no_grad()
def test_one_span_is_the_models_pruned_forward():
    m = random_model(n_layer=5, d_model=32, vocab=64, seed=3)
    ids = torch.randint(0, 64, (3, LENGTH))
    got, tokens = bc.forward_spans(m, ids, SIMBA, bc.segments(LENGTH, PROTECT, None))
    want = m(ids, simba=protected(SIMBA, PROTECT))
    torch.testing.assert_close(got, want.logits, rtol=1e-5, atol=1e-5)  # every position: the frozen streams too
    assert tokens == protected(SIMBA, PROTECT).counts(torch.tensor([LENGTH]), m.config.scan_chunks)[:, 0].tolist()


@torch.no_grad()
@pytest.mark.parametrize("block", [16, 20, 80])
def test_blocks_keep_as_many_tokens_and_decide_from_what_precedes_them(block):
    m = random_model(n_layer=5, d_model=32, vocab=64, seed=4)
    ids = torch.randint(0, 64, (2, LENGTH))
    spans = bc.segments(LENGTH, PROTECT, block)
    assert spans[-1] == (LENGTH - PROTECT, LENGTH, PROTECT) and spans[0][0] == 0
    logits, tokens = bc.forward_spans(m, ids, SIMBA, spans)
    total = protected(SIMBA, PROTECT).counts(torch.tensor([LENGTH]), m.config.scan_chunks)[:, 0].tolist()
    blocks = len(spans) - 1
    assert all(g <= t <= g + blocks for g, t in zip(total, tokens))  # rounding up per block, at most one each
    # a later block's tokens never change what an earlier position computed
    cut = spans[0][1]
    other = ids.clone()
    other[:, cut:] = torch.randint(0, 64, other[:, cut:].shape)
    again, _ = bc.forward_spans(m, other, SIMBA, spans)
    torch.testing.assert_close(again[:, :cut], logits[:, :cut], rtol=1e-5, atol=1e-5)
    # the global forward is not causal in this sense: the same change moves the first block's logits
    first, _ = bc.forward_spans(m, ids, SIMBA, bc.segments(LENGTH, PROTECT, None))
    moved, _ = bc.forward_spans(m, other, SIMBA, bc.segments(LENGTH, PROTECT, None))
    assert (first[:, :cut] - moved[:, :cut]).abs().max() > 1e-4
