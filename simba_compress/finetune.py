"""Recovery fine-tuning of a pruned model, optionally distilled from the dense one.

    teacher = dense_teacher(model)                       # frozen dense copy (simba=None), before training
    result = finetune(model, teacher, FinetuneConfig(steps=300, data="train.txt.xz"), tokenizer=tok)

The student is the MambaLM with its schedule (model.simba) fixed; pruning stays active in its forward, and
the token selection is not differentiable: gradients reach every layer through the kept tokens (gather) and
the frozen streams (scatter), never through the scores.

Which positions train. The loss is taken where the headline metric (evaluate.py) measures quality: the last `protect`
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
same batches as an uninterrupted one.

This module is the loop; the plan fixed before it (what trains, the windows, the learning rate, the memory):
finetune_plan.py; the resumable state folder: finetune_state.py; the settings: settings.FinetuneConfig.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import SimbaError
from .evaluate import EvalResult, evaluate, protected
from .finetune_plan import load_finetune_windows, lr_lambda, memory_plan, step_windows, trainable_names
from .finetune_state import identity, load_best, mkdtemp, nan_error, prepare_state, save_best, save_last
from .memory import parameter_bytes
from .model import MambaLM
from .settings import FinetuneConfig

__all__ = ["finetune", "dense_teacher", "FinetuneConfig", "FinetuneResult", "memory_plan", "trainable_names"]


@dataclass
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
        raise SimbaError(f"distill_weight {cfg.distill_weight}: needs the dense teacher model (dense_teacher)",
                         "distill_weight")
    if stop_after is not None and stop_after < 1:
        raise SimbaError(f"finetune: stop_after must be >= 1, got {stop_after}")
    protect = cfg.resolved_protect()
    if protect > cfg.seq_len:
        raise SimbaError(f"protect: {protect} is longer than seq_len {cfg.seq_len}", "protect")
    train_w, eval_w = load_finetune_windows(cfg, tokenizer, train_windows, eval_windows)

    from accelerate import Accelerator  # imported here: the rest of the package runs without it

    cpu = model.device.type == "cpu"
    # step_scheduler_with_optimizer=False: accelerate would step the schedule once per process (it assumes each
    # process reads batches of its own); here every step is one global batch split over the processes
    acc = Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16", step_scheduler_with_optimizer=False)
    if cfg.batch_size % acc.num_processes:
        raise SimbaError(f"batch_size: {cfg.batch_size} does not split over {acc.num_processes} processes", "batch_size")
    plan = memory_plan(model, model.simba, cfg, acc.device, cfg.batch_size // acc.num_processes,
                       teacher_bytes=0 if teacher is None else parameter_bytes(teacher))
    if state_dir is None and acc.num_processes > 1:  # each would make a temporary folder of its own
        raise SimbaError("finetune: several processes need a state_dir that they share")
    tmp_state = state_dir is None
    state = Path(state_dir) if state_dir is not None else Path(mkdtemp())
    ident = identity(cfg, model, train_w, eval_w)

    in_dtype = model.lm_head.weight.dtype
    names = set(trainable_names(model, cfg.train))
    was_trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    model.float()  # master weights in float32; bf16 only inside autocast
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    params, opt, sched = _optimizer(model, names, cfg)
    if teacher is not None:
        teacher.to(acc.device).requires_grad_(False).eval()
    wrapped, opt, sched = acc.prepare(model, opt, sched)
    student = acc.unwrap_model(wrapped)
    ckpt = _checkpointing(student) if plan.checkpointing else nullcontext()
    try:
        saved, start = prepare_state(state, ident, acc)  # after prepare: load_state fills what it registered
        loop = _Loop(cfg, acc, wrapped, student, teacher, opt, sched, params, names, train_w, eval_w, state,
                     plan.micro_batch)
        with ckpt:
            res = loop.run(saved, start, ident, stop_after, progress)
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


def _optimizer(model: MambaLM, names: set[str], cfg: FinetuneConfig):
    """The trained parameters, AdamW over them and its learning-rate schedule."""
    params, decay, rest = [], [], []
    for n, p in model.named_parameters():
        if n in names:  # weight decay on matrices and embeddings; A_log is a matrix of rates, not weights
            params.append(p)
            (decay if p.ndim >= 2 and not n.endswith("A_log") else rest).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=False,
    )
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


@dataclass
class _Loop:
    """The training loop over what finetune() set up: the accelerate-prepared model and its optimizer and
    schedule, the trained parameters, the windows and the state folder."""

    cfg: FinetuneConfig
    acc: Any  # accelerate.Accelerator
    model: torch.nn.Module  # as prepared (DDP under several processes)
    student: MambaLM  # the model itself
    teacher: MambaLM | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    names: set[str]
    train_w: torch.Tensor
    eval_w: torch.Tensor
    state: Path
    micro: int  # windows per forward/backward

    def run(self, saved: dict | None, start: int, ident: dict, stop_after: int | None, progress: bool) -> FinetuneResult:
        """Train from step `start` (the saved progress, or a fresh run) to cfg.steps, or stop_after steps."""
        cfg, acc = self.cfg, self.acc
        best_dir = self.state / "best"
        if saved is None:  # a fresh run: the starting point is the first "best"
            before = self.evaluate(all_positions=True)
            prog = {"step": 0, "before": _summary(before), "history": [{"step": 0, "eval_loss": before.loss}]}
            best = {"step": 0, "eval_loss": before.loss}
            save_best(acc, self.student, self.names, best, best_dir)
        else:
            prog = saved
            best = json.loads((best_dir / "best.json").read_text())
        step = start
        if start and progress and acc.is_local_main_process:
            tqdm.write(f"finetune: resuming from step {start} of {cfg.steps} in {self.state / 'last'}")
        end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
        running: list[float] = []
        bar = tqdm(total=cfg.steps, initial=step, desc="finetune", disable=not progress or not acc.is_local_main_process)
        self.model.train()
        while step < end:
            mean_loss, ce, kl = self.step(step)
            step += 1
            running.append(mean_loss)
            post = {"loss": f"{mean_loss:.4f}", "ce": f"{ce:.4f}", "lr": f"{self.sched.get_last_lr()[0]:.2e}"}
            if kl is not None:
                post["kl"] = f"{kl:.4f}"
            if step % cfg.eval_every == 0 or step == cfg.steps:
                self.model.eval()
                ev = self.evaluate(all_positions=False).loss
                self.model.train()
                prog["history"].append({"step": step, "train_loss": sum(running) / len(running), "eval_loss": ev})
                running = []
                if ev < best["eval_loss"]:
                    best = {"step": step, "eval_loss": ev}
                    save_best(acc, self.student, self.names, best, best_dir)
                post["eval"] = f"{ev:.4f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            if step % cfg.save_every == 0 or step == end:
                prog["step"] = step
                save_last(acc, self.state, prog | {"identity": ident})
        bar.close()
        self.model.eval()
        finished = step >= cfg.steps
        after = None
        if finished:
            if best["step"] != step:  # the model holds the last weights: bring back the best
                load_best(self.student, best_dir)
            after = _summary(self.evaluate(all_positions=True))
        return FinetuneResult(
            steps_done=step,
            finished=finished,
            best_step=best["step"],
            before=prog["before"],
            after=after,
            history=prog["history"],
            epochs=round(step * cfg.batch_size / self.train_w.shape[0], 3),
            train_windows=int(self.train_w.shape[0]),
            eval_windows=int(self.eval_w.shape[0]),
        )

    def step(self, step: int) -> tuple[float, float, float | None]:
        """Optimizer step `step` (0-based) on its windows; (loss averaged over processes, next-token loss, KL)."""
        cfg, acc = self.cfg, self.acc
        per_proc = cfg.batch_size // acc.num_processes
        batch = step_windows(self.train_w, step, cfg.batch_size, cfg.seed)
        batch = batch[acc.process_index * per_proc : (acc.process_index + 1) * per_proc]
        sums = torch.zeros(3, device=acc.device)  # loss, next-token loss, KL over this process's micro-batches
        parts, micro = per_proc // self.micro, self.micro
        for j in range(parts):  # gradient accumulation: the sum of the parts' mean losses / parts is the mean
            # DDP averages the gradients over processes in the last part's backward only
            with acc.no_sync(self.model) if j < parts - 1 else nullcontext():
                with acc.autocast():
                    loss, ce, kl = _loss(cfg, self.model, self.student, self.teacher,
                                         batch[j * micro : (j + 1) * micro].to(acc.device))
                acc.backward(loss / parts)
            sums += torch.stack([loss.detach(), ce, ce if kl is None else kl]).float()
        mean_loss = acc.reduce(sums[0] / parts, "mean").item()  # every process, before any of them steps
        if not math.isfinite(mean_loss):
            raise nan_error(step + 1, "loss", mean_loss, self.state)
        norm = acc.clip_grad_norm_(self.params, cfg.grad_clip)
        if not math.isfinite(float(norm)):
            raise nan_error(step + 1, "gradient norm", float(norm), self.state)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return mean_loss, (sums[1] / parts).item(), None if kl is None else (sums[2] / parts).item()

    def evaluate(self, all_positions: bool) -> EvalResult:
        with self.acc.autocast():
            return evaluate(self.student, self.eval_w, self.cfg.resolved_protect(),
                            batch_size=max(1, 8192 // self.cfg.seq_len), all_positions=all_positions, progress=False)


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


def _summary(r: EvalResult) -> dict:
    d = r.to_dict()
    d.pop("position_loss")
    return d


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
