"""Memory planning for fine-tuning: the training peak estimated from the model's shape, before it is reached.

    est = estimate_training_memory(config, seq_len=1024, micro_batch=8, checkpointing=False, tokens=..., ...)
    plan = plan_training_memory(estimate_for, batch=8, budget=training_budget(device))

The estimate counts what autograd keeps for the backward per layer and token (the reference scan keeps one
(b, d_inner, d_state) state per chunk, ssm/scan.py), the logits and their loss terms, the parameters, their
gradients and AdamW's moments, and the largest short-lived working set; its constants were measured
(benchmarks/finetune_memory.py: the estimate against the peak resident memory of real runs on the CPU). The
plan takes the largest micro-batch that fits without gradient checkpointing (it costs a second forward of
every mixer), and checkpointing only when not even one window fits without it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .layers import ModelConfig

GiB = 1 << 30
Scan = Literal["reference", "mamba_ssm"]

# Floats autograd keeps per layer and token (measured with saved_tensors_hooks on the l16 proxy: 20 d_inner
# in all, with its float64 channels): the mixer's (b, l, d_inner) activations (in_proj's x and z, conv,
# x_proj, dt, the scan's inputs, y, gate), the residual stream and norms (d_model), B and C (d_state), and the
# reference scan's chunk states, d_inner * d_state / chunk, twice for the channels it runs in float64.
REFERENCE_PER_TOKEN = (16, 4, 4)  # (x d_inner, x d_model, x d_state)
MAMBA_SSM_PER_TOKEN = (12, 4, 4)  # mamba_ssm's kernel keeps its inputs, not states: not measured here (no GPU)
CHECKPOINTED_PER_TOKEN = 4  # x d_model: with gradient checkpointing a layer keeps its input stream only
# interpreter, torch, transformers, accelerate, the tokenizer (CPU: measured 0.9 GB with the proxy loaded);
# CUDA context and workspaces
RUNTIME = {"cpu": 900 << 20, "cuda": 1 * GiB}
# Share of the free memory the plan may fill: RAM is shared with other processes that may grow after the
# plan is made, and the estimate is good to about 20%; a GPU is the run's own, less the allocator's slack.
HEADROOM = {"cpu": 0.5, "cuda": 0.85}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes at the peak of one training step (one micro-batch's forward and backward)."""

    weights: int  # the student in float32 and the dense teacher, as loaded
    optimizer: int  # gradients and AdamW's two moments of the trainable parameters (float32)
    activations: int  # what the backward needs from the forward of one micro-batch
    logits: int  # the LM head's outputs at the trained positions and the loss terms built on them
    transient: int  # the largest short-lived working set: one layer's backward (and its recomputation)
    runtime: int  # interpreter and libraries, or the CUDA context

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.logits + self.transient + self.runtime

    @property
    def training(self) -> int:
        """What training adds to a process that has loaded the model and the teacher."""
        return self.total - self.weights - self.runtime


def estimate_training_memory(
    config: ModelConfig,
    *,
    seq_len: int,
    micro_batch: int,
    checkpointing: bool,
    tokens: list[int] | None = None,
    loss_positions: int | None = None,
    params: int,
    trainable: int,
    teacher_bytes: int = 0,
    device: str = "cpu",
    scan: Scan = "reference",
) -> MemoryEstimate:
    """The peak of a training step of `micro_batch` windows of seq_len tokens.

    tokens: how many tokens each layer runs on (SimbaConfig.counts; None: every layer on every token).
    loss_positions: positions per window whose logits enter the loss (None: all). params / trainable:
    parameter counts; teacher_bytes: the dense teacher's size (0 without distillation). scan: "mamba_ssm"
    where its kernel runs the backward (CUDA), else "reference" (ssm/scan.py).
    """
    c = config
    tokens = [seq_len] * c.n_layer if tokens is None else tokens
    b, f = micro_batch, 4  # activations are counted in float32 (also under bf16 autocast: an upper bound)
    d_in, d_st = c.d_inner, c.d_state
    reference = c.layer == "mamba2" or scan == "reference"
    if reference:
        from .ssm.scan import MAX_CHUNK, MAX_CHUNK_GPU, PAIRWISE_ELEMENTS

        chunk = MAX_CHUNK if device == "cpu" else MAX_CHUNK_GPU
        k_in, k_model, k_state = REFERENCE_PER_TOKEN
        per_token = k_in * d_in + k_model * c.d_model + k_state * d_st + 2 * d_in * d_st / chunk
        # one chunk recomputed in the backward (float64, a few tensors) and the pairwise path's decays (two)
        scan_work = 8 * b * chunk * d_in * d_st * 8 + 2 * PAIRWISE_ELEMENTS * f
    else:
        k_in, k_model, k_state = MAMBA_SSM_PER_TOKEN
        per_token = k_in * d_in + k_model * c.d_model + k_state * d_st
        scan_work = 0
    widest = max(tokens)
    stream = 2 * b * (seq_len + 1) * c.d_model * f  # embeddings and the frozen stream of pruned tokens
    if checkpointing:
        activations = stream + sum(b * k * CHECKPOINTED_PER_TOKEN * c.d_model * f for k in tokens)
        recompute = b * widest * per_token * f  # one mixer's activations, rebuilt in its backward
    else:
        activations = stream + sum(b * k * per_token * f for k in tokens)
        recompute = 0
    layer_backward = b * widest * (10 * d_in + 4 * c.d_model) * f  # gradients of one layer's activations
    k = seq_len if loss_positions is None else loss_positions
    logits = b * k * c.vocab_size * f * (5 if teacher_bytes else 3)  # logits, log-softmax, KL terms
    extra_weights = params * 2 if device == "cuda" else 0  # autocast's bf16 copies of the weights
    return MemoryEstimate(
        weights=params * 4 + teacher_bytes + extra_weights,
        optimizer=trainable * 12,
        activations=int(activations),
        logits=logits,
        transient=int(recompute + layer_backward + scan_work),
        runtime=RUNTIME["cuda" if device == "cuda" else "cpu"],
    )


def available_memory(device: torch.device) -> int:
    """Bytes free for this process now: the GPU's free memory, or the RAM available (within a cgroup's limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # a dependency of accelerate

    free = psutil.virtual_memory().available
    try:  # a container's limit, when it is tighter than the machine's
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def training_budget(device: torch.device, processes_here: int = 1, limit_gb: float | None = None,
                    loaded: int = 0) -> int:
    """Bytes training may add: HEADROOM of the free memory, shared by the processes on this host (CPU); or,
    with limit_gb (a cap on the whole process), that cap less what is `loaded` already."""
    if limit_gb is not None:
        return int(limit_gb * GiB) - loaded
    kind = "cuda" if device.type == "cuda" else "cpu"
    share = 1 if kind == "cuda" else max(1, processes_here)
    return int(HEADROOM[kind] * available_memory(device) / share)


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch: int
    checkpointing: bool
    estimate: MemoryEstimate
    budget: int  # bytes training may add (MemoryEstimate.training is compared with it)

    def to_dict(self) -> dict:
        e = self.estimate
        return {
            "micro_batch": self.micro_batch,
            "gradient_checkpointing": self.checkpointing,
            "estimated_peak_gb": round(e.total / GiB, 3),
            "estimated_training_gb": round(e.training / GiB, 3),
            "budget_gb": round(self.budget / GiB, 3),
        }


def plan_training_memory(
    estimate: Callable[[int, bool], MemoryEstimate],
    batch: int,
    budget: int,
    micro_batch: int | None = None,
    checkpointing: bool | None = None,
) -> MemoryPlan | None:
    """The micro-batch (a divisor of `batch`, the windows one process takes per step) and checkpointing whose
    estimate(micro_batch, checkpointing).training fits in `budget`; None when no allowed setting fits.

    micro_batch / checkpointing: fixed by the caller, or None to choose: the largest micro-batch without
    checkpointing, and checkpointing only when not even one window fits without it.
    """
    sizes = [micro_batch] if micro_batch else [m for m in range(batch, 0, -1) if batch % m == 0]
    modes = [checkpointing] if checkpointing is not None else [False, True]
    for ckpt in modes:
        for m in sizes:
            est = estimate(m, ckpt)
            if est.training <= budget:
                return MemoryPlan(m, ckpt, est, budget)
    return None


def parameter_bytes(module: torch.nn.Module) -> int:
    """The bytes a module's parameters take."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def gb(n: int) -> str:
    return f"{n / GiB:.1f} GB" if abs(n) >= GiB / 10 else f"{math.ceil(n / (1 << 20))} MB"


def local_processes() -> int:
    """Processes of this run on this host (torchrun / accelerate launch set LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
