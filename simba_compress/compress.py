"""The verb: compress(model, ...) sets a pruning schedule on a model; run(recipe) is the whole job.

    model = simba_compress.load("state-spaces/mamba-1.4b")
    simba_compress.compress(model, flops=0.6)      # model.simba is now a schedule at 0.6 of the FLOPs
    simba_compress.save(model, "out/", tokenizer=tok)
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from .checkpoints import check_output, load, load_tokenizer, save
from .data import load_windows
from .errors import SimbaError
from .evaluate import evaluate
from .flops import count
from .model import MambaLM
from .pruning import SimbaConfig
from .recipe import Recipe
from .schedules import linear, linear_for_flops


def compress(
    model: MambaLM,
    *,
    flops: float | None = None,
    keep: list[float] | None = None,
    final_keep: float | None = None,
    criterion: str = "simba",
    protect_last: int = 1,
    seq_len: int = 1024,
    seed: int = 0,
) -> SimbaConfig:
    """Give `model` a pruning schedule (in place) and return it.

    Exactly one target: flops (the linear schedule whose backbone FLOP ratio at seq_len is within 0.5% of it),
    final_keep (the paper's linear schedule down to this ratio) or keep (explicit per-layer ratios).
    """
    n_layer = model.config.n_layer
    try:
        if keep is not None:
            if len(keep) != n_layer:
                raise SimbaError(f"keep: {len(keep)} ratios for a model of {n_layer} layers")
            simba = SimbaConfig(list(keep), criterion, protect_last, seed)
        elif final_keep is not None:
            simba = SimbaConfig(linear(n_layer, final_keep), criterion, protect_last, seed)
        elif flops is not None:
            simba = linear_for_flops(model.config, flops, seq_len, criterion, protect_last, seed)
        else:
            raise SimbaError("compress: give flops, final_keep or keep")
    except ValueError as e:  # SimbaConfig's own validation
        raise SimbaError(str(e)) from None
    simba.extra = {"schedule": "explicit" if keep is not None else "linear", "flops_target": flops, "seq_len": seq_len}
    model.simba = simba
    return simba


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SimbaError(f"--device: unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SimbaError(f"--device {device}: CUDA is not available on this machine")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, dtype)


def run(recipe: Recipe, overwrite: bool = False, progress: bool = True) -> tuple[Path, dict]:
    """Load, compress, measure on the calibration text, and save the folder. Returns (folder, report)."""
    if recipe.output is None:
        raise SimbaError("--output: required (the folder to write the compressed model to)")
    out = Path(recipe.output).expanduser()
    check_output(out, overwrite)  # before any long work
    t0 = time.time()
    device, dtype = resolve_device(recipe.device, recipe.dtype)
    torch.manual_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe.model, recipe.tokenizer)
    cal = recipe.calibration
    windows = load_windows(cal.data, tokenizer, cal.seq_len + 1, cal.samples)  # bad data fails before the model loads
    model = load(recipe.model, dtype=dtype, device=device)
    simba = compress(
        model,
        flops=recipe.flops,
        keep=recipe.keep,
        final_keep=recipe.final_keep,
        criterion=recipe.criterion,
        protect_last=recipe.protect_last,
        seq_len=recipe.seq_len,
        seed=recipe.seed,
    )
    protect = max(1, min(128, cal.seq_len // 4))
    dense = evaluate(model, windows, protect, simba=None, progress=progress)
    sparse = evaluate(model, windows, protect, progress=progress)
    report = {
        "simba_compress": _version(),
        "source_model": recipe.model,
        "schedule": simba.to_dict(),
        "flops": count(model.config, simba, recipe.seq_len).to_dict(),
        "calibration": {
            "data": cal.data,
            "windows": int(windows.shape[0]),
            "seq_len": cal.seq_len,
            "protect": protect,
            "dense": dense.to_dict() | {"position_loss": None},
            "sparse": sparse.to_dict() | {"position_loss": None},
        },
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "seconds": round(time.time() - t0, 1),
    }
    folder = save(
        model,
        out,
        tokenizer=tokenizer,
        overwrite=overwrite,
        files={"recipe.yaml": recipe.to_yaml(), "report.json": json.dumps(report, indent=2) + "\n"},
    )
    return folder, report


def _version() -> str:
    from . import __version__

    return __version__
