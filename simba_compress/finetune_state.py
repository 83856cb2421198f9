"""The fine-tune's resumable state folder (beside the output, since the output folder is written atomically and
only when whole; shared by the processes, the main one writes it):

    last/   accelerate state + progress.json (step, history, settings), swapped in atomically
    best/   the trainable weights with the lowest held-out loss so far (step 0 = the training-free model)

Every write goes to a temporary sibling that is swapped in whole. A rerun with the same settings resumes from
last/; other settings are refused (delete the folder).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .errors import SimbaError
from .model import MambaLM
from .settings import FinetuneConfig

STATE_FORMAT = 1


def mkdtemp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="simba-finetune-")


def nan_error(step: int, what: str, value: float, state: Path) -> SimbaError:
    last = state / "last" / "progress.json"
    kept = (f"the last good checkpoint (step {json.loads(last.read_text())['step']}) is kept in {state / 'last'}"
            if last.exists() else "no checkpoint was saved before it")
    return SimbaError(f"finetune: {what} is {value} at step {step}; stopped (lower the learning rate?); {kept}")


def identity(cfg: FinetuneConfig, model: MambaLM, train_w: torch.Tensor, eval_w: torch.Tensor) -> dict:
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


def prepare_state(state: Path, ident: dict, acc) -> tuple[dict | None, int]:
    """Clean up after a crash, check that a saved state belongs to this run; (its progress, its step)."""
    last = state / "last"
    if acc.is_main_process:
        state.mkdir(parents=True, exist_ok=True)
        for d in ("last", "best"):  # a crash between the two renames of swap leaves only the old copy
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
    if saved != ident:
        diff = sorted(k for k in set(saved) | set(ident) if saved.get(k) != ident.get(k))
        raise SimbaError(
            f"{state}: holds a fine-tune with other settings ({', '.join(diff)} differ); "
            "delete it to start over, or give another state folder"
        )
    acc.load_state(str(last))
    return prog, int(prog["step"])


def swap(acc, tmp: Path, final: Path) -> None:
    """Put the finished folder tmp at final (main process): the old copy is removed only after."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        old = final.with_name(final.name + ".old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def save_last(acc, state: Path, prog: dict) -> None:
    tmp = state / "last.tmp"
    acc.save_state(str(tmp), safe_serialization=False)  # pickle: keeps the tied lm_head / embedding as one tensor
    if acc.is_main_process:
        (tmp / "progress.json").write_text(json.dumps(prog, indent=1) + "\n")
    swap(acc, tmp, state / "last")


def save_best(acc, student: MambaLM, names: set[str], best: dict, best_dir: Path) -> None:
    from safetensors.torch import save_file

    tmp = best_dir.with_name("best.tmp")
    if acc.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
        sd = {n: p.detach().to("cpu").contiguous() for n, p in student.named_parameters() if n in names}
        save_file(sd, str(tmp / "model.safetensors"))
        (tmp / "best.json").write_text(json.dumps(best) + "\n")
    swap(acc, tmp, best_dir)


def load_best(student: MambaLM, best_dir: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(best_dir / "model.safetensors"))
    params = dict(student.named_parameters())
    with torch.no_grad():
        for n, v in sd.items():
            params[n].copy_(v)
