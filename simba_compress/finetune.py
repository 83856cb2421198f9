"""Recovery fine-tuning of a pruned model, optionally distilled from the dense one (issue 4).

    teacher = dense_teacher(model)                       # frozen dense copy (simba=None), before training
    result = finetune(model, teacher, FinetuneConfig(steps=300, data="train.txt.xz"), tokenizer=tok)

The student is the MambaLM with its schedule (model.simba) fixed; pruning stays active in its forward, and
the token selection is not differentiable: gradients reach every layer through the kept tokens (gather) and
the frozen streams (scatter), never through the scores.

Which positions train. The loss is taken where DESIGN.md's headline measures quality: the last `protect`
positions of each window, protected from pruning, i.e. a continuation read through every layer after a
pruned prompt, as generated tokens are. A pruned position's logits come from the layer where it was
dropped; asking early layers to predict from there (or to match the dense teacher there, which they cannot
by construction) would spend the updates on an unreachable target and bend the kept tokens' representation.
loss_positions="all" trains on every position instead (the all-position stress figure).
KL: KL(teacher || student) on the same positions, with temperature T (scaled by T^2, as usual).

Memory: memory_plan (memory.py's estimate against the free memory) picks the micro-batch, a divisor of the
windows each process takes per step whose gradients accumulate into the step (the optimizer's batch stays
batch_size), and gradient checkpointing only when one window does not fit without it; or fails in one line.

Machinery: accelerate places the model, wraps it in DDP under `accelerate launch` (each process takes its
slice of every step's windows, so N processes train as one on the same global batch), runs bf16 autocast on
CUDA (float32 on CPU, master weights always float32) and saves / loads the resumable state (model,
optimizer, scheduler, RNG). The batch of step s is a pure function of (seed, s), so a resumed run reads the
same batches as an uninterrupted one. State folder (beside the output, since the output folder is written
atomically and only when whole; shared by the processes, the main one writes it):
    last/   accelerate state + progress.json (step, history, settings), swapped in atomically
    best/   the trainable weights with the lowest held-out loss so far (step 0 = the training-free model)
A rerun with the same settings resumes from last/; other settings are refused (delete the folder).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, field
from dataclasses import dataclass as plain_dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass
from tqdm.auto import tqdm

from .data import read_tokens
from .errors import SimbaError
from .evaluate import EvalResult, default_protect, evaluate, protected
from .memory import (MemoryEstimate, MemoryPlan, available_memory, estimate_training_memory, gb, local_processes,
                     parameter_bytes, plan_training_memory, training_budget)
from .model import MambaLM
from .pruning import SimbaConfig
from .backends import mamba_ssm_available

STATE_FORMAT = 1


@dataclass(config=ConfigDict(extra="forbid"))
class FinetuneConfig:
    """Settings of a recovery fine-tune; also the recipe's `finetune:` section (validated the same way)."""

    steps: int = Field(0, ge=0)  # optimizer steps; 0 = no fine-tuning
    data: str | None = None  # training text: file, folder, "demo" or a datasets name (streamed)
    eval_data: str | None = None  # held-out text; None: the eval_windows after the training part of `data`
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int | None = Field(None, ge=0)  # linear warm-up (None: 5% of steps), then cosine to lr * min_lr_ratio
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)  # on matrices and embeddings; not on norms, biases, A_log, D
    grad_clip: float = Field(1.0, gt=0)  # max global gradient norm
    batch_size: int = Field(8, ge=1)  # windows per optimizer step (over all processes)
    micro_batch_size: int | None = Field(None, ge=1)  # windows per forward/backward; None: planned (memory.py)
    seq_len: int = Field(1024, ge=2)  # tokens a window is read as (it holds seq_len + 1)
    protect: int | None = Field(None, ge=1)  # scored continuation; None: min(128, seq_len // 4)
    loss_positions: Literal["continuation", "all"] = "continuation"
    distill_weight: float = Field(0.5, ge=0, le=1)  # 0: next-token loss only, 1: KL to the dense model only
    temperature: float = Field(1.0, gt=0)
    train: Literal["all", "ssm", "norms"] = "all"  # what trains; "ssm": A_log, D, dt, x_proj, conv1d and norms
    gradient_checkpointing: bool | None = None  # recompute each mixer in the backward; None: only if needed to fit
    memory_gb: float | None = Field(None, gt=0)  # cap on the process's peak; None: a share of the free memory
    eval_every: int = Field(50, ge=1)
    eval_windows: int = Field(16, ge=1)
    save_every: int = Field(100, ge=1)  # resumable state every this many steps (and at the end)
    seed: int = 0

    @model_validator(mode="after")
    def _micro_batch_divides(self):
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} does not divide batch_size {self.batch_size} "
                             "(--finetune-micro-batch-size, --finetune-batch-size)")
        return self

    def resolved_warmup(self) -> int:
        return round(0.05 * self.steps) if self.warmup_steps is None else self.warmup_steps

    def resolved_protect(self) -> int:
        return self.protect or default_protect(self.seq_len)


@plain_dataclass
class FinetuneResult:
    steps_done: int  # steps trained in all, over every resumed run
    finished: bool  # False when stop_after ended this run early
    best_step: int  # the step whose weights the model now holds (0: training never beat the start)
    before: dict  # held-out EvalResult (without position_loss) of the model as it came in
    after: dict | None  # the same for the best weights, when finished
    history: list[dict] = field(default_factory=list)  # per eval point: step, train loss (mean since last), eval loss
    epochs: float = 0.0  # passes over the training windows
    train_windows: int = 0
    eval_windows: int = 0
    seconds: float = 0.0
    state_dir: str | None = None
    processes: int = 1  # data-parallel processes (accelerate launch)
    memory: dict | None = None  # the memory plan each process ran with (MemoryPlan.to_dict)

    def to_dict(self) -> dict:
        return asdict(self)


def dense_teacher(model: MambaLM) -> MambaLM:
    """A frozen dense copy of `model` (same weights, no pruning) whose logits the student is distilled towards."""
    teacher = copy.deepcopy(model)
    teacher.simba = None
    teacher.requires_grad_(False)
    return teacher.eval()


def trainable_names(model: MambaLM, train: str) -> list[str]:
    """Parameter names that `train` ("all", "ssm", "norms") updates."""
    norm = re.compile(r"(^|\.)norm(_f)?\.(weight|bias)$")
    ssm = re.compile(r"\.(A_log|D|dt_bias)$|\.(dt_proj|x_proj|conv1d)\.")
    names = []
    for name, _ in model.named_parameters():  # a tied lm_head is the embedding: named once
        if train == "all" or norm.search(name) or (train == "ssm" and ssm.search(name)):
            names.append(name)
    return names


def memory_plan(
    model: MambaLM, simba: SimbaConfig | None, cfg: FinetuneConfig, device: torch.device, per_process: int,
    teacher_bytes: int = 0,
) -> MemoryPlan:
    """The micro-batch and gradient checkpointing that fine-tuning `model` under `simba` (None: dense, an upper
    bound) fits in memory with (cfg's own where it fixes them), or a one-line SimbaError naming the setting to
    change. per_process: the windows each process takes per step. `model` may live on the meta device."""
    if cfg.micro_batch_size is not None and per_process % cfg.micro_batch_size:
        raise SimbaError(f"finetune.micro_batch_size (--finetune-micro-batch-size): {cfg.micro_batch_size} does not "
                         f"divide the {per_process} windows each process takes per step")
    k = cfg.resolved_protect() if cfg.loss_positions == "continuation" else None
    if simba is not None and k is not None:
        simba = protected(simba, k)
    tokens = None if simba is None else simba.counts(torch.tensor([cfg.seq_len]), model.config.scan_chunks)[:, 0].tolist()
    names = set(trainable_names(model, cfg.train))
    count = {n: p.numel() for n, p in model.named_parameters()}
    kind = "cuda" if device.type == "cuda" else "cpu"

    def estimate(micro: int, checkpointing: bool) -> MemoryEstimate:
        return estimate_training_memory(
            model.config, seq_len=cfg.seq_len, micro_batch=micro, checkpointing=checkpointing, tokens=tokens,
            loss_positions=k, params=sum(count.values()), trainable=sum(count[n] for n in names),
            teacher_bytes=teacher_bytes, device=kind, scan="mamba_ssm" if kind == "cuda" and mamba_ssm_available() else "reference",
        )

    loaded = estimate(1, False)
    budget = training_budget(device, local_processes(), cfg.memory_gb, loaded.weights + loaded.runtime)
    plan = plan_training_memory(estimate, per_process, budget, cfg.micro_batch_size, cfg.gradient_checkpointing)
    if plan is not None:
        return plan
    micro = cfg.micro_batch_size or 1
    ckpt = cfg.gradient_checkpointing is not False
    need = estimate(micro, ckpt).training
    if cfg.memory_gb is not None and budget <= 0:
        raise SimbaError(f"finetune.memory_gb (--finetune-memory): {cfg.memory_gb} GB is less than the "
                         f"{gb(loaded.weights + loaded.runtime)} the loaded model{', teacher' if teacher_bytes else ''} and runtime take")
    if cfg.memory_gb is not None:
        room = f"the {gb(budget)} left under finetune.memory_gb (--finetune-memory) {cfg.memory_gb} once the model is loaded"
    else:
        room = f"the {gb(budget)} it may take of the {gb(available_memory(device))} free on {kind}"
    if micro > 1:
        change = "lower finetune.micro_batch_size (--finetune-micro-batch-size) or leave it unset"
    elif not ckpt:
        change = "allow gradient checkpointing (--gradient-checkpointing)"
    else:
        change = "lower finetune.seq_len (--finetune-seq-len)"
    raise SimbaError(
        f"finetune: micro-batches of {micro} window(s) of {cfg.seq_len} tokens {'with' if ckpt else 'without'} gradient "
        f"checkpointing need about {gb(need)} for training, more than {room}; {change}"
    )


def finetune(
    model: MambaLM,
    teacher: MambaLM | None,
    config: FinetuneConfig,
    tokenizer=None,
    *,
    train_windows: torch.Tensor | None = None,
    eval_windows: torch.Tensor | None = None,
    state_dir: str | os.PathLike | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune the pruned `model` in place and leave it holding the best weights (by held-out loss).

    teacher: the dense model (dense_teacher) when config.distill_weight > 0. Text comes from config.data
    through `tokenizer`, or as token windows (n, seq_len + 1) in train_windows / eval_windows. state_dir:
    where the resumable state lives (None: a temporary folder, removed at the end). stop_after: train at most
    this many steps in this call, save, and return with finished=False (a later call resumes).
    """
    cfg = config
    t0 = time.time()
    if model.simba is None:
        raise SimbaError("finetune: the model has no pruning schedule (compress or calibrate it first)")
    if cfg.distill_weight > 0 and teacher is None:
        raise SimbaError(f"finetune: distill_weight {cfg.distill_weight} needs the dense teacher model")
    if stop_after is not None and stop_after < 1:
        raise SimbaError(f"finetune: stop_after must be >= 1, got {stop_after}")
    protect = cfg.resolved_protect()
    if protect > cfg.seq_len:
        raise SimbaError(f"finetune.protect: {protect} is longer than finetune.seq_len {cfg.seq_len}")
    train_w, eval_w = load_finetune_windows(cfg, tokenizer, train_windows, eval_windows)

    from accelerate import Accelerator  # imported here: the rest of the package runs without it

    cpu = model.device.type == "cpu"
    # step_scheduler_with_optimizer=False: accelerate would step the schedule once per process (it assumes each
    # process reads batches of its own); here every step is one global batch split over the processes
    acc = Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16", step_scheduler_with_optimizer=False)
    if cfg.batch_size % acc.num_processes:
        raise SimbaError(f"finetune.batch_size: {cfg.batch_size} does not split over {acc.num_processes} processes")
    plan = memory_plan(model, model.simba, cfg, acc.device, cfg.batch_size // acc.num_processes,
                       teacher_bytes=0 if teacher is None else parameter_bytes(teacher))
    if state_dir is None and acc.num_processes > 1:  # each would make a temporary folder of its own
        raise SimbaError("finetune: several processes need a state_dir that they share")
    tmp_state = state_dir is None
    state = Path(state_dir) if state_dir is not None else Path(_mkdtemp())
    identity = _identity(cfg, model, train_w, eval_w)

    in_dtype = model.lm_head.weight.dtype
    names = set(trainable_names(model, cfg.train))
    was_trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    model.float()  # master weights in float32; bf16 only inside autocast
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    params, decay, rest = [], [], []
    for n, p in model.named_parameters():
        if n in names:  # weight decay on matrices and embeddings; A_log is a matrix of rates, not weights
            params.append(p)
            (decay if p.ndim >= 2 and not n.endswith("A_log") else rest).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=False,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    if teacher is not None:
        teacher.to(acc.device).requires_grad_(False).eval()
    wrapped, opt, sched = acc.prepare(model, opt, sched)
    student = acc.unwrap_model(wrapped)
    ckpt = _checkpointing(student) if plan.checkpointing else nullcontext()
    try:
        progress_file, start = _prepare_state(state, identity, acc)  # after prepare: load_state fills what it registered
        with ckpt:
            res = _train(cfg, acc, wrapped, student, teacher, opt, sched, params, names, train_w, eval_w, state,
                         progress_file, start, identity, stop_after, progress, plan.micro_batch)
    finally:
        model = acc.unwrap_model(wrapped, keep_fp32_wrapper=False)  # drops accelerate's autocast wrapper
        model.to(in_dtype)
        for n, p in model.named_parameters():
            p.requires_grad_(was_trainable[n])
        acc.free_memory()
    res.seconds = round(time.time() - t0, 1)
    res.processes = acc.num_processes
    res.memory = plan.to_dict()
    res.state_dir = None if tmp_state else str(state)
    if tmp_state and acc.is_main_process:
        shutil.rmtree(state, ignore_errors=True)
    return res


def _mkdtemp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="simba-finetune-")


def load_finetune_windows(
    cfg: FinetuneConfig, tokenizer, train_w: torch.Tensor | None = None, eval_w: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out windows (n, seq_len + 1), read from cfg.data / cfg.eval_data where not given.

    Only as much text is read as the steps use (fewer windows are cycled over, in epochs); held out by
    default: the eval_windows right after the training part of cfg.data.
    """
    length = cfg.seq_len + 1
    if train_w is None:
        if cfg.data is None:
            raise SimbaError("finetune.data: required (--finetune-data: a file, folder, datasets name or demo)")
        if tokenizer is None:
            raise SimbaError("finetune: reading finetune.data needs the tokenizer")
        held = 0 if cfg.eval_data is not None or eval_w is not None else cfg.eval_windows
        want = cfg.steps * cfg.batch_size + held  # more is never read; fewer is cycled over (epochs)
        stream = read_tokens(cfg.data, tokenizer, max(want, 1) * length)
        n = stream.numel() // length
        if n < cfg.batch_size + held:
            raise SimbaError(
                f"{cfg.data}: {stream.numel()} tokens, too short: one batch of {cfg.batch_size} windows of {length} tokens"
                + (f" plus {held} held-out windows" if held else "") + f" needs {(cfg.batch_size + held) * length}"
            )
        all_w = stream[: n * length].view(n, length)
        train_w, held_w = all_w[: n - held], all_w[n - held :]
        if eval_w is None and held:
            eval_w = held_w
    if eval_w is None:
        if tokenizer is None:
            raise SimbaError("finetune: reading finetune.eval_data needs the tokenizer")
        stream = read_tokens(cfg.eval_data, tokenizer, cfg.eval_windows * length)
        if stream.numel() < length:
            raise SimbaError(f"{cfg.eval_data}: {stream.numel()} tokens, shorter than one window of {length}")
        n = stream.numel() // length
        eval_w = stream[: n * length].view(n, length)
    for name, w in (("training", train_w), ("held-out", eval_w)):
        if w.ndim != 2 or w.shape[1] != length:
            raise SimbaError(f"finetune: {name} windows must be (n, seq_len + 1 = {length}), got {tuple(w.shape)}")
    if train_w.shape[0] < cfg.batch_size:
        raise SimbaError(f"finetune: {train_w.shape[0]} training windows, fewer than one batch of {cfg.batch_size}")
    return train_w, eval_w


def _lr_lambda(cfg: FinetuneConfig):
    warm, total, floor = cfg.resolved_warmup(), cfg.steps, cfg.min_lr_ratio

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warm:
            return (step + 1) / (warm + 1)  # never 0: the first step already moves
        t = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _batch(train_w: torch.Tensor, step: int, batch: int, seed: int) -> torch.Tensor:
    """The windows of optimizer step `step`: epochs of seeded permutations, read in order."""
    n = train_w.shape[0]
    rows = []
    for i in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(int(perm[pos]))
    return train_w[rows]


def _loss(cfg: FinetuneConfig, model, student: MambaLM, teacher: MambaLM | None, batch: torch.Tensor):
    """(loss, next-token loss, KL) on the trained positions of `batch` (b, seq_len + 1)."""
    x, y = batch[:, :-1], batch[:, 1:]
    k = cfg.resolved_protect()
    if cfg.loss_positions == "continuation":
        simba, last, y = protected(student.simba, k), k, y[:, -k:]
    else:
        simba, last = student.simba, None
    logits = model(x, simba=simba, last_logits=last).logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    if cfg.distill_weight == 0:
        return ce, ce.detach(), None
    with torch.no_grad():
        t_logits = teacher(x, simba=None, last_logits=last).logits.float()
    temp = cfg.temperature
    log_p = F.log_softmax(t_logits / temp, -1)
    log_q = F.log_softmax(logits / temp, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temp**2
    loss = (1 - cfg.distill_weight) * ce + cfg.distill_weight * kl
    return loss, ce.detach(), kl.detach()


def _eval(acc, student: MambaLM, eval_w: torch.Tensor, cfg: FinetuneConfig, all_positions: bool) -> EvalResult:
    with acc.autocast():
        return evaluate(student, eval_w, cfg.resolved_protect(), batch_size=max(1, 8192 // cfg.seq_len),
                        all_positions=all_positions, progress=False)


def _summary(r: EvalResult) -> dict:
    d = r.to_dict()
    d.pop("position_loss")
    return d


def _train(cfg, acc, model, student, teacher, opt, sched, params, names, train_w, eval_w, state: Path,
           progress_file: dict | None, start: int, identity: dict, stop_after, progress, micro: int) -> FinetuneResult:
    best_dir = state / "best"
    if progress_file is None:  # a fresh run: the starting point is the first "best"
        before = _eval(acc, student, eval_w, cfg, all_positions=True)
        prog = {"step": 0, "before": _summary(before), "history": [{"step": 0, "eval_loss": before.loss}]}
        best = {"step": 0, "eval_loss": before.loss}
        _save_best(acc, student, names, best, best_dir)
    else:
        prog = progress_file
        best = json.loads((best_dir / "best.json").read_text())
    step = start
    if start and progress and acc.is_local_main_process:
        tqdm.write(f"finetune: resuming from step {start} of {cfg.steps} in {state / 'last'}")
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    per_proc = cfg.batch_size // acc.num_processes
    running: list[float] = []
    bar = tqdm(total=cfg.steps, initial=step, desc="finetune", disable=not progress or not acc.is_local_main_process)
    model.train()
    while step < end:
        batch = _batch(train_w, step, cfg.batch_size, cfg.seed)
        batch = batch[acc.process_index * per_proc : (acc.process_index + 1) * per_proc]
        sums = torch.zeros(3, device=acc.device)  # loss, next-token loss, KL over this process's micro-batches
        parts = per_proc // micro
        for j in range(parts):  # gradient accumulation: the sum of the parts' mean losses / parts is the mean
            # DDP averages the gradients over processes in the last part's backward only
            with acc.no_sync(model) if j < parts - 1 else nullcontext():
                with acc.autocast():
                    loss, ce, kl = _loss(cfg, model, student, teacher, batch[j * micro : (j + 1) * micro].to(acc.device))
                acc.backward(loss / parts)
            sums += torch.stack([loss.detach(), ce, ce if kl is None else kl]).float()
        ce, kl = sums[1] / parts, None if kl is None else sums[2] / parts
        mean_loss = acc.reduce(sums[0] / parts, "mean").item()  # every process, before any of them steps
        if not math.isfinite(mean_loss):
            raise _nan_error(step + 1, "loss", mean_loss, state)
        norm = acc.clip_grad_norm_(params, cfg.grad_clip)
        if not math.isfinite(float(norm)):
            raise _nan_error(step + 1, "gradient norm", float(norm), state)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        running.append(mean_loss)
        post = {"loss": f"{mean_loss:.4f}", "ce": f"{ce.item():.4f}", "lr": f"{sched.get_last_lr()[0]:.2e}"}
        if kl is not None:
            post["kl"] = f"{kl.item():.4f}"
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            ev = _eval(acc, student, eval_w, cfg, all_positions=False).loss
            model.train()
            prog["history"].append({"step": step, "train_loss": sum(running) / len(running), "eval_loss": ev})
            running = []
            if ev < best["eval_loss"]:
                best = {"step": step, "eval_loss": ev}
                _save_best(acc, student, names, best, best_dir)
            post["eval"] = f"{ev:.4f}"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
        if step % cfg.save_every == 0 or step == end:
            prog["step"] = step
            _save_last(acc, state, prog | {"identity": identity})
    bar.close()
    model.eval()
    finished = step >= cfg.steps
    after = None
    if finished:
        if best["step"] != step:  # the model holds the last weights: bring back the best
            _load_best(student, best_dir)
        after = _summary(_eval(acc, student, eval_w, cfg, all_positions=True))
    return FinetuneResult(
        steps_done=step,
        finished=finished,
        best_step=best["step"],
        before=prog["before"],
        after=after,
        history=prog["history"],
        epochs=round(step * cfg.batch_size / train_w.shape[0], 3),
        train_windows=int(train_w.shape[0]),
        eval_windows=int(eval_w.shape[0]),
    )


def _nan_error(step: int, what: str, value: float, state: Path) -> SimbaError:
    last = state / "last" / "progress.json"
    kept = (f"the last good checkpoint (step {json.loads(last.read_text())['step']}) is kept in {state / 'last'}"
            if last.exists() else "no checkpoint was saved before it")
    return SimbaError(f"finetune: {what} is {value} at step {step}; stopped (lower finetune.lr?); {kept}")


# ---- the state folder: every write goes to a temporary sibling that is swapped in whole -------------------


def _identity(cfg: FinetuneConfig, model: MambaLM, train_w: torch.Tensor, eval_w: torch.Tensor) -> dict:
    """What a resumed run must share with the one that saved the state (not how often it saves, nor how it fits
    in memory: micro-batches and checkpointing change the result only by float rounding)."""
    d = asdict(cfg)
    for how in ("save_every", "micro_batch_size", "gradient_checkpointing", "memory_gb"):  # not what is trained
        d.pop(how)
    d["schedule"] = model.simba.to_dict()
    d["train_windows"] = [int(train_w.shape[0]), int(train_w[:, :8].sum())]  # count and a cheap fingerprint
    d["eval_windows"] = [int(eval_w.shape[0]), int(eval_w[:, :8].sum())]
    d["format"] = STATE_FORMAT
    return d


def _prepare_state(state: Path, identity: dict, acc) -> tuple[dict | None, int]:
    """Clean up after a crash, check that a saved state belongs to this run; (its progress, its step)."""
    last = state / "last"
    if acc.is_main_process:
        state.mkdir(parents=True, exist_ok=True)
        for d in ("last", "best"):  # a crash between the two renames of _swap leaves only the old copy
            if not (state / d).exists() and (state / f"{d}.old").exists():
                (state / f"{d}.old").rename(state / d)
        for stale in ("last.tmp", "best.tmp"):  # only names this module writes: the folder may be the user's
            shutil.rmtree(state / stale, ignore_errors=True)
    acc.wait_for_everyone()
    if not (last / "progress.json").exists():
        if (state / "best").exists():  # best/ of a run that never saved a step: start over
            if acc.is_main_process:
                shutil.rmtree(state / "best")
        return None, 0
    prog = json.loads((last / "progress.json").read_text())
    saved = prog.pop("identity", {})
    if saved != identity:
        diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        raise SimbaError(
            f"{state}: holds a fine-tune with other settings ({', '.join(diff)} differ); "
            "delete it to start over, or pass another --finetune-dir"
        )
    acc.load_state(str(last))
    return prog, int(prog["step"])


def _swap(acc, tmp: Path, final: Path) -> None:
    """Put the finished folder tmp at final (main process): the old copy is removed only after."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        old = final.with_name(final.name + ".old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _save_last(acc, state: Path, prog: dict) -> None:
    tmp = state / "last.tmp"
    acc.save_state(str(tmp), safe_serialization=False)  # pickle: keeps the tied lm_head / embedding as one tensor
    if acc.is_main_process:
        (tmp / "progress.json").write_text(json.dumps(prog, indent=1) + "\n")
    _swap(acc, tmp, state / "last")


def _save_best(acc, student: MambaLM, names: set[str], best: dict, best_dir: Path) -> None:
    from safetensors.torch import save_file

    tmp = best_dir.with_name("best.tmp")
    if acc.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
        sd = {n: p.detach().to("cpu").contiguous() for n, p in student.named_parameters() if n in names}
        save_file(sd, str(tmp / "model.safetensors"))
        (tmp / "best.json").write_text(json.dumps(best) + "\n")
    _swap(acc, tmp, best_dir)


def _load_best(student: MambaLM, best_dir: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(best_dir / "model.safetensors"))
    params = dict(student.named_parameters())
    with torch.no_grad():
        for n, v in sd.items():
            params[n].copy_(v)


@contextmanager
def _checkpointing(model: MambaLM):
    """Recompute each mixer in the backward instead of keeping its activations (torch.utils.checkpoint).

    Done by wrapping the mixers' forward here rather than in model.py: the mixer is deterministic, so the
    recomputation reproduces the forward (its Simba score too, which is then simply dropped).
    """
    from torch.utils.checkpoint import checkpoint

    mixers = [block.mixer for block in model.backbone.layers]
    for m in mixers:
        inner = m.forward

        def wrapped(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        m.forward = wrapped
    try:
        yield
    finally:
        for m in mixers:
            del m.forward  # back to the class's forward
