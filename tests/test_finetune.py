"""Recovery fine-tuning (issue 4): it learns, gradients reach every layer, state resumes exactly, bad input fails."""

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_model
from simba_compress import ExplicitSchedule, SimbaError, compress, load, save
from simba_compress.finetune import FinetuneConfig, dense_teacher, finetune, trainable_names
from simba_compress.finetune import _loss as finetune_loss

SEQ = 32
KEEP = [1.0, 0.75, 0.5, 0.25]


def pruned_model():
    m = random_model(n_layer=4, d_model=16, vocab=64)
    compress(m, ExplicitSchedule(keep=KEEP))
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
    with pytest.raises(SimbaError, match=r"^steps: must be >= 0, got -1$"):
        FinetuneConfig(steps=-1)
    with pytest.raises(SimbaError, match=r"^micro_batch_size: 3 does not divide batch_size 4$"):
        FinetuneConfig(batch_size=4, micro_batch_size=3)
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
    assert code == 2 and err.strip().count("\n") == 0 and "--finetune-steps: must be >= 0, got -2" in err
    assert not out.exists()
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


# --- memory: micro-batches, the plan, the one-line error -----------------------------------------------------------


def test_micro_batches_and_checkpointing_train_as_one_batch():
    """Gradient accumulation over micro-batches (the configured batch stays the optimizer's) and checkpointing
    change the result only by float rounding."""
    runs = []
    for micro, ckpt in ((4, False), (1, False), (2, True)):
        m = pruned_model()
        res = run(m, config(micro_batch_size=micro, gradient_checkpointing=ckpt, grad_clip=1e6))  # clipping would hide a scale
        assert res.memory["micro_batch"] == micro and res.memory["gradient_checkpointing"] is ckpt
        runs.append((m.state_dict(), [h["eval_loss"] for h in res.history]))
    (whole, losses), *others = runs
    for sd, ls in others:
        assert ls == pytest.approx(losses, rel=1e-5)
        for name, v in whole.items():
            torch.testing.assert_close(sd[name], v, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(whole["lm_head.weight"], pruned_model().lm_head.weight)


def test_the_plan_splits_the_batch_before_it_checkpoints():
    from simba_compress.memory import MemoryEstimate, plan_training_memory

    def estimate(micro, ckpt):  # 10 per window without checkpointing, 3 with
        return MemoryEstimate(weights=0, optimizer=0, activations=micro * (3 if ckpt else 10), logits=0, transient=0,
                              runtime=0)

    def plan(budget, micro=None, ckpt=None):
        p = plan_training_memory(estimate, 8, budget, micro, ckpt)
        return None if p is None else (p.micro_batch, p.checkpointing)

    assert plan(80) == (8, False) and plan(79) == (4, False) and plan(10) == (1, False)  # divisors of 8 only
    assert plan(9) == (2, True) and plan(3) == (1, True) and plan(2) is None  # checkpointing once 1 does not fit
    assert plan(80, micro=2) == (2, False) and plan(80, ckpt=True) == (8, True) and plan(9, ckpt=False) is None


def test_the_estimate_follows_the_shape():
    from simba_compress.memory import estimate_training_memory

    cfg = pruned_model().config

    def est(**kw):
        kw = dict(seq_len=1024, micro_batch=4, checkpointing=False, params=10**6, trainable=10**6) | kw
        return estimate_training_memory(cfg, **kw)

    base = est()
    assert est(micro_batch=8).activations == pytest.approx(2 * base.activations, rel=0.01)
    assert est(seq_len=2048).activations == pytest.approx(2 * base.activations, rel=0.01)
    assert est(checkpointing=True).activations < base.activations / 5
    assert est(tokens=[1024, 512, 256, 128]).activations < 0.6 * base.activations  # pruned layers keep less
    assert est(loss_positions=128).logits == base.logits // 8 and est(teacher_bytes=4 * 10**6).weights > base.weights
    assert est(trainable=10**5).optimizer == base.optimizer // 10


def test_a_budget_picks_the_micro_batch():
    from simba_compress.finetune import memory_plan
    from simba_compress.memory import GiB

    m = pruned_model()
    cfg = config(batch_size=8)
    plan = memory_plan(m, m.simba, cfg, torch.device("cpu"), 8)
    assert plan.micro_batch == 8 and not plan.checkpointing  # a tiny model fits whole
    est = plan.estimate
    limit = (est.weights + est.runtime + (est.training + memory_plan(
        m, m.simba, config(batch_size=8, micro_batch_size=4), torch.device("cpu"), 8).estimate.training) / 2) / GiB
    smaller = memory_plan(m, m.simba, config(batch_size=8, memory_gb=limit), torch.device("cpu"), 8)
    assert smaller.micro_batch == 4 and not smaller.checkpointing and smaller.estimate.training <= smaller.budget


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--finetune-seq-len", "50000000"], "error: --finetune-seq-len: micro-batches of 1 window(s) of 50000000 tokens with"),
        (["--finetune-seq-len", "50000000", "--no-gradient-checkpointing"], "error: --gradient-checkpointing: micro-batches"),
        (["--finetune-micro-batch-size", "3"], "error: --finetune-micro-batch-size: 3 does not divide batch_size 4"),
        (["--finetune-memory", "0.05"], "error: --finetune-memory: 0.05 GB is less than"),
    ],
)
def test_cli_when_nothing_fits_is_one_line_naming_the_flag(tmp_path, extra, flag):
    out = tmp_path / "out"
    code, _, err = cli("--model", "demo", "--flops", "0.6", "--schedule", "linear", "--output", out, "--calib-samples", "2",
                       "--calib-seq-len", "64", "--finetune-data", "demo", "--finetune-steps", "2", "--finetune-batch-size", "4",
                       "--device", "cpu", *extra)
    assert code == 2 and err.strip().count("\n") == 0 and flag in err, err
    assert not out.exists()


# --- several processes ------------------------------------------------------------------------------------------


def test_two_processes_train_as_one_resume_and_write_once(tmp_path, small_checkpoint):
    """accelerate launch with 2 processes (DDP over gloo on the CPU), the same global batch of 4: the same weights
    as one process within float rounding, after a stop at step 2 and a resume; the command line under the same
    launch writes one folder and prints one report."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    worker = str(Path(__file__).with_name("ddp_worker.py"))
    r = subprocess.run([*launch, worker, str(tmp_path), str(small_checkpoint)], capture_output=True, text=True,
                       timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    one = pruned_model()
    reference = run(one, config(grad_clip=1e6))  # uninterrupted, one process
    got = torch.load(tmp_path / "ddp.pt")
    assert got["first"]["steps_done"] == 2 and not got["first"]["finished"]
    assert got["result"]["processes"] == 2 and got["result"]["memory"]["micro_batch"] == 2 and got["result"]["finished"]
    assert [h["eval_loss"] for h in got["result"]["history"]] == pytest.approx([h["eval_loss"] for h in reference.history], rel=1e-5)
    for name, v in one.state_dict().items():
        torch.testing.assert_close(got["state_dict"][name], v, rtol=1e-4, atol=1e-6, msg=name)
    reports = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["finetune"]["processes"] == 2 and reports[0]["finetune"]["steps_done"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli", "ddp.pt", "state"]  # nothing written twice or left over
    assert load(tmp_path / "cli").simba is not None
