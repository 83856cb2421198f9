"""Recovery fine-tuning (issue 4): it learns, gradients reach every layer, state resumes exactly, bad input fails."""

import contextlib
import copy
import json
import subprocess
import sys

import pytest
import torch

from conftest import random_model
from simba_compress import SimbaError, compress, load, save
from simba_compress.finetune import FinetuneConfig, dense_teacher, finetune, trainable_names
from simba_compress.finetune import _loss as finetune_loss

SEQ = 32
KEEP = [1.0, 0.75, 0.5, 0.25]


def pruned_model():
    m = random_model(n_layer=4, d_model=16, vocab=64)
    compress(m, keep=KEEP)
    return m


def tokens(n, seed):
    return torch.randint(0, 64, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def config(**kw):
    base = dict(steps=6, seq_len=SEQ, batch_size=4, lr=3e-3, protect=8, eval_every=3, save_every=3, distill_weight=0.5)
    return FinetuneConfig(**(base | kw))


def run(model, cfg, state=None, train=None, stop_after=None):
    return finetune(
        model, dense_teacher(model) if cfg.distill_weight else None, cfg,
        train_windows=tokens(16, 0) if train is None else train, eval_windows=tokens(4, 1),
        state_dir=state, stop_after=stop_after, progress=False,
    )


@pytest.mark.parametrize("distill", [0.0, 0.5, 1.0])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(distill):
    m = pruned_model()
    batch = tokens(4, 2)
    cfg = config(steps=8, distill_weight=distill, eval_every=4)
    teacher = dense_teacher(m)
    before = finetune_loss(cfg, m, m, teacher, batch)[0].item()
    res = finetune(m, teacher, cfg, train_windows=batch, eval_windows=batch, progress=False)
    train = [h["train_loss"] for h in res.history[1:]]  # the objective, means over steps 1-4 and 5-8
    assert train[1] < train[0] - 0.02 and train[0] < before, (before, train)
    if distill < 1:  # the kept model is the best by next-token loss on the eval windows (here: the batch)
        after = finetune_loss(cfg, m, m, teacher, batch)[0].item()
        assert after < before - 0.05 and res.best_step == 8, (before, after)
    assert m.simba.keep == KEEP and all(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("positions", ["continuation", "all"])
def test_gradients_reach_every_layer_through_the_pruned_tokens(positions):
    m = pruned_model()
    cfg = config(loss_positions=positions, distill_weight=0.5)
    loss = finetune_loss(cfg, m, m, dense_teacher(m), tokens(2, 3))[0]
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # layers 1-3 see only the kept tokens


def test_train_subsets_update_only_their_parameters():
    m = pruned_model()
    assert {n.split(".")[-2] for n in trainable_names(m, "norms")} == {"norm", "norm_f"}
    before = copy.deepcopy(m.state_dict())
    run(m, config(steps=3, train="ssm"))
    changed = {n for n, v in m.state_dict().items() if not torch.equal(v, before[n])}
    assert changed == set(trainable_names(m, "ssm"))
    assert any("A_log" in n for n in changed) and not any("in_proj" in n or "embeddings" in n for n in changed)


def test_saved_folder_holds_the_finetuned_weights(tmp_path):
    m = pruned_model()
    original = copy.deepcopy(m)
    res = run(m, config())
    assert res.finished and res.best_step > 0 and res.after["loss"] < res.before["loss"]
    x = tokens(2, 4)[:, :-1]
    folder = save(m, tmp_path / "out")
    back = load(folder)
    assert back.simba.keep == KEEP
    assert torch.equal(back(x).logits, m(x).logits)
    assert not torch.allclose(back(x).logits, original(x).logits)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    whole = pruned_model()
    uninterrupted = run(whole, config(), state=tmp_path / "a")
    first = run(pruned_model(), config(), state=tmp_path / "b", stop_after=2)
    assert not first.finished and first.steps_done == 2 and first.after is None
    assert json.loads((tmp_path / "b" / "last" / "progress.json").read_text())["step"] == 2
    resumed_model = pruned_model()  # a restarted process: the original weights, the same command
    resumed = run(resumed_model, config(), state=tmp_path / "b")
    assert resumed.finished and resumed.steps_done == 6 and resumed.best_step == uninterrupted.best_step
    assert [h["step"] for h in resumed.history] == [0, 3, 6]
    for (name, a), b in zip(whole.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(resumed_model.lm_head.weight, pruned_model().lm_head.weight)


def test_resume_with_other_settings_is_refused(tmp_path):
    run(pruned_model(), config(), state=tmp_path / "s", stop_after=1)
    with pytest.raises(SimbaError, match=r"other settings \(lr differ\)"):
        run(pruned_model(), config(lr=1e-3), state=tmp_path / "s")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    m = pruned_model()
    calls = []

    def poison(module, args, out):  # the 4th training forward turns into NaN
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 4:
                return out * float("nan")

    m.backbone.norm_f.register_forward_hook(poison)
    with pytest.raises(SimbaError, match=r"loss is nan at step 4; .*last good checkpoint \(step 3\)"):
        run(m, config(save_every=3, distill_weight=0.0), state=tmp_path / "s")
    assert json.loads((tmp_path / "s" / "last" / "progress.json").read_text())["step"] == 3
    assert m.lm_head.weight.dtype == torch.float32 and torch.isfinite(m.lm_head.weight).all()


def test_bad_input():
    m = pruned_model()
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        FinetuneConfig(steps=-1)
    with pytest.raises(SimbaError, match="no such file"):
        finetune(m, None, config(data="missing.txt", distill_weight=0.0), tokenizer=object(), progress=False)
    with pytest.raises(SimbaError, match="needs the dense teacher"):
        finetune(m, None, config(), train_windows=tokens(8, 0), eval_windows=tokens(2, 1), progress=False)
    with pytest.raises(SimbaError, match="fewer than one batch"):
        run(m, config(batch_size=4), train=tokens(3, 0))
    dense = random_model(n_layer=4, d_model=16, vocab=64)
    with pytest.raises(SimbaError, match="no pruning schedule"):
        run(dense, config(distill_weight=0.0))


def test_too_short_text_is_named(tmp_path, corpus_tokenizer):
    text = tmp_path / "short.txt"
    text.write_text("only a few words here")
    with pytest.raises(SimbaError, match=r"short.txt: \d+ tokens, too short: one batch of 4 windows"):
        finetune(pruned_model(), None, config(data=str(text), distill_weight=0.0), tokenizer=corpus_tokenizer, progress=False)


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "simba_compress.cli", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def test_cli_finetunes_the_demo_end_to_end(tmp_path):
    out = tmp_path / "out"
    args = ["--model", "demo", "--flops", "0.6", "--schedule", "linear", "--output", out, "--calib-samples", "2",
            "--calib-seq-len", "64", "--finetune-data", "demo", "--finetune-seq-len", "64", "--finetune-batch-size", "2",
            "--device", "cpu"]
    code, _, err = cli(*args, "--finetune-steps", "-2")
    assert code == 2 and err.strip().count("\n") == 0 and "finetune.steps" in err and not out.exists()
    code, stdout, err = cli(*args, "--finetune-steps", "3", "--finetune-lr", "1e-3", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    ft = report["finetune"]
    assert ft["steps_done"] == 3 and ft["settings"]["lr"] == 1e-3 and ft["settings"]["distill_weight"] == 0.5
    assert ft["before"]["loss"] > 0 and ft["after"]["loss"] > 0 and report["calibration"]["sparse_training_free"]
    assert json.loads((out / "report.json").read_text())["finetune"]["steps_done"] == 3
    assert "steps: 3" in (out / "recipe.yaml").read_text()
    assert not (tmp_path / "out.finetune").exists()  # the resumable state goes once the output is whole
    assert load(out).simba is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    from simba_compress.finetune import _checkpointing

    grads, saved = [], []
    for ckpt in (False, True):
        m = pruned_model()
        cfg = config(gradient_checkpointing=ckpt)
        count = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(t.numel()) or t, lambda t: t):
            with _checkpointing(m) if ckpt else contextlib.nullcontext():
                finetune_loss(cfg, m, m, dense_teacher(m), tokens(2, 5))[0].backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        saved.append(sum(count))  # what the backward keeps outside the checkpointed mixers
        assert "forward" not in vars(m.backbone.layers[0].mixer)  # the wrapper is gone afterwards
    assert saved[1] < saved[0] / 2, saved
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
