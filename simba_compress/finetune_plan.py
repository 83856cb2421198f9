"""The plan of a recovery fine-tune, fixed before its first step: what trains, the windows it reads (and which
of them each step takes), the learning-rate schedule, and the micro-batch that fits in memory.

Light (no accelerate): compress.run checks that a fine-tune fits, and reads its text, before the model loads.
"""

from __future__ import annotations

import math
import re

import torch

from .backends import mamba_ssm_available
from .data import read_tokens
from .errors import SimbaError
from .evaluate import protected
from .memory import (MemoryEstimate, MemoryPlan, available_memory, estimate_training_memory, gb, local_processes,
                     plan_training_memory, training_budget)
from .model import MambaLM
from .pruning import SimbaConfig
from .settings import FinetuneConfig


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
        raise SimbaError(f"micro_batch_size: {cfg.micro_batch_size} does not divide the {per_process} windows each "
                         "process takes per step", "micro_batch_size")
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
        raise SimbaError(f"memory_gb: {cfg.memory_gb} GB is less than the {gb(loaded.weights + loaded.runtime)} the "
                         f"loaded model{', teacher' if teacher_bytes else ''} and runtime take", "memory_gb")
    if cfg.memory_gb is not None:
        room = f"the {gb(budget)} left under the cap of {cfg.memory_gb} GB once the model is loaded"
    else:
        room = f"the {gb(budget)} it may take of the {gb(available_memory(device))} free on {kind}"
    # named by the setting to change
    field, change = ("micro_batch_size", "lower it or leave it unset") if micro > 1 else \
        ("gradient_checkpointing", "allow it") if not ckpt else ("seq_len", "lower it")
    raise SimbaError(
        f"{field}: micro-batches of {micro} window(s) of {cfg.seq_len} tokens {'with' if ckpt else 'without'} gradient "
        f"checkpointing need about {gb(need)} for training, more than {room}; {change}", field
    )


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
            raise SimbaError("data: required (the training text: a file, folder, datasets name or demo)", "data")
        if tokenizer is None:
            raise SimbaError("finetune: reading data needs the tokenizer")
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
            raise SimbaError("finetune: reading eval_data needs the tokenizer")
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


def lr_lambda(cfg: FinetuneConfig):
    warm, total, floor = cfg.resolved_warmup(), cfg.steps, cfg.min_lr_ratio

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warm:
            return (step + 1) / (warm + 1)  # never 0: the first step already moves
        t = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def step_windows(train_w: torch.Tensor, step: int, batch: int, seed: int) -> torch.Tensor:
    """The windows of optimizer step `step`: epochs of seeded permutations, read in order."""
    n = train_w.shape[0]
    rows = []
    for i in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(int(perm[pos]))
    return train_w[rows]
