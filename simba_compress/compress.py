"""The verb: compress(model, ...) sets a pruning schedule on a model; run(recipe) is the whole job.

    model = simba_compress.load("state-spaces/mamba-1.4b")
    simba_compress.compress(model, flops=0.6)      # model.simba is now the linear schedule at 0.6 of the FLOPs
    simba, study = calibrate(model, windows, CalibrationConfig(flops=0.6))  # or a searched one (calibrate.py)
    simba_compress.save(model, "out/", tokenizer=tok)
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoints import check_output, load, load_tokenizer, read_checkpoint, resolve, save
from .data import load_windows
from .errors import SimbaError
from .evaluate import default_protect, evaluate
from .flops import count
from .model import MambaLM
from .pruning import DEFAULT_CRITERION, SimbaConfig
from .recipe import Recipe
from .schedules import Form, linear, linear_for_flops, max_tokens_list

if TYPE_CHECKING:
    from .calibrate import CalibrationConfig, CalibrationResult
    from .finetune import FinetuneConfig, FinetuneResult


def compress(
    model: MambaLM,
    *,
    flops: float | None = None,
    keep: list[float] | None = None,
    final_keep: float | None = None,
    criterion: str = DEFAULT_CRITERION,
    protect_last: int = 1,
    seq_len: int = 1024,
    seed: int = 0,
    granularity: int = 1,
    form: Form = "fast",
    max_tokens: str | list[int] | None = None,
) -> SimbaConfig:
    """Give `model` a fixed pruning schedule (in place) and return it; calibrate() searches one instead.

    Exactly one target: flops (the linear schedule whose backbone FLOP ratio at seq_len is within 0.5% of it,
    in the fast form by default: the nearest staircase of 1, 3/4, 1/2 ... 1/16, schedules.py; form="exact" keeps the
    paper's line), final_keep (the paper's linear schedule down to this ratio) or keep (explicit ratios).
    max_tokens: per-layer token caps or "T@L" (schedules.max_tokens_list), applied on top of the schedule, which
    is fitted without them (they bind only on prompts longer than T).
    """
    n_layer = model.config.n_layer
    try:
        if keep is not None:
            if len(keep) != n_layer:
                raise SimbaError(f"keep: {len(keep)} ratios for a model of {n_layer} layers")
            simba = SimbaConfig(list(keep), criterion, protect_last, seed, granularity)
        elif final_keep is not None:
            simba = SimbaConfig(linear(n_layer, final_keep), criterion, protect_last, seed, granularity)
        elif flops is not None:
            if form == "fast" and granularity > 1:
                raise SimbaError("--granularity: a staircase of its own; use it with --form exact")
            simba = linear_for_flops(model.config, flops, seq_len, criterion, protect_last, seed, granularity, form)
        else:
            raise SimbaError("compress: give flops, final_keep or keep")
        simba = with_max_tokens(simba, max_tokens)
    except ValueError as e:  # SimbaConfig's own validation
        raise SimbaError(str(e)) from None
    simba.extra = {"schedule": "explicit" if keep is not None else "linear", "flops_target": flops, "seq_len": seq_len}
    if flops is not None and keep is None and final_keep is None:
        simba.extra["form"] = form
    model.simba = simba
    return simba


def with_max_tokens(simba: SimbaConfig, max_tokens: str | list[int] | None) -> SimbaConfig:
    """`simba` with the token caps `max_tokens` (None: unchanged)."""
    if max_tokens is None:
        return simba
    try:
        return replace(simba, max_tokens=max_tokens_list(max_tokens, simba.n_layer))
    except ValueError as e:
        raise SimbaError(str(e)) from None


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


def run(recipe: Recipe, overwrite: bool = False, progress: bool = True) -> tuple[Path | None, dict]:
    """Load, compress, measure on the calibration text, and save the folder. Returns (folder, report).

    Launched as several processes (accelerate launch, for a data-parallel fine-tune) every process runs the
    job, the main one alone searches the schedule and writes; the others return (None, report).
    """
    if recipe.output is None:
        raise SimbaError("--output: required (the folder to write the compressed model to)")
    out = Path(recipe.output).expanduser()
    check_output(out, overwrite)  # before any long work
    t0 = time.time()
    device, dtype = resolve_device(recipe.device, recipe.dtype)
    state = _distributed(device)
    main = state is None or state.is_main_process
    torch.manual_seed(recipe.seed)
    config = read_checkpoint(resolve(recipe.model)).config  # a folder that is not a checkpoint is named as such
    tokenizer = load_tokenizer(recipe.model, recipe.tokenizer)
    cal = recipe.calibration
    windows = load_windows(cal.data, tokenizer, cal.seq_len + 1, cal.samples)  # bad data fails before the model loads
    ft = recipe.finetune
    if ft.steps:
        from .finetune import load_finetune_windows

        _check_finetune_fits(config, ft, device, dtype, 1 if state is None else state.num_processes)
        ft_windows = load_finetune_windows(ft, tokenizer)  # before the model loads and the schedule search runs
        ft_state = Path(recipe.finetune_dir).expanduser() if recipe.finetune_dir else out.resolve().parent / f"{out.name}.finetune"
    model = load(recipe.model, dtype=dtype, device=device)
    study_file = out.resolve().parent / f"{out.name}.optuna.db"  # beside: the output folder appears only when whole
    study = None
    if recipe.schedule == "calibrated":
        from .calibrate import calibrate  # optuna loads only for a search

        if recipe.storage is None:
            out.parent.mkdir(parents=True, exist_ok=True)
        search = lambda: calibrate(model, windows, _search_config(recipe, study_file, progress))  # noqa: E731
        simba, study = search() if state is None else _on_main(state, search)
        simba = model.simba = with_max_tokens(simba, recipe.max_tokens)
    else:
        simba = compress(
            model,
            flops=recipe.flops,
            keep=recipe.keep,
            final_keep=recipe.final_keep,
            criterion=recipe.criterion,
            protect_last=recipe.protect_last,
            seq_len=recipe.seq_len,
            seed=recipe.seed,
            granularity=recipe.granularity,
            form=recipe.form,
            max_tokens=recipe.max_tokens,
        )
    protect = default_protect(cal.seq_len)
    dense = evaluate(model, windows, protect, simba=None, progress=progress)
    tuned = None
    if ft.steps:
        training_free = evaluate(model, windows, protect, progress=progress)
        tuned = _finetune(model, ft, ft_windows, ft_state, progress)
    sparse = evaluate(model, windows, protect, progress=progress)
    flops = count(model.config, simba, recipe.seq_len)
    report = {
        "simba_compress": _version(),
        "source_model": recipe.model,
        "schedule": simba.to_dict(),
        "flops": flops.to_dict(),
        "calibration": {
            "data": cal.data,
            "windows": int(windows.shape[0]),
            "seq_len": cal.seq_len,
            "protect": protect,
            "dense": dense.to_dict() | {"position_loss": None},
            "sparse": sparse.to_dict() | {"position_loss": None},  # the saved model: fine-tuned when finetune.steps
            "sparse_training_free": None if tuned is None else training_free.to_dict() | {"position_loss": None},
        },
        "finetune": None if tuned is None else {"settings": asdict(ft), **tuned.to_dict()},
        "search": None if study is None else study.summary(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "seconds": round(time.time() - t0, 1),
    }
    files = {
        "recipe.yaml": recipe.to_yaml(),
        "report.json": json.dumps(report, indent=2) + "\n",
        "schedule.json": json.dumps(simba.to_dict() | {"flop_ratio": flops.ratio}, indent=2) + "\n",
    }
    if not main:
        return None, report
    if study is not None:
        files |= _study_files(study, study_file if recipe.storage is None else None)
    folder = save(
        model,
        out,
        tokenizer=tokenizer,
        overwrite=overwrite,
        files=files,
    )
    if study is not None and recipe.storage is None:
        study_file.unlink(missing_ok=True)  # its copy is the folder's study.db
    if tuned is not None:
        _remove_finetune_state(ft_state)  # the output holds the result; the state was only there to resume
    return folder, report


def _distributed(device: torch.device):
    """accelerate's PartialState when this process is one of several (accelerate launch, torchrun), else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")  # on the CPU: gloo (finetune's Accelerator shares this state)


def _on_main(state, search):
    """search() -> (schedule, study) on the main process; the others wait for its schedule, however long the
    search takes (a gloo group of its own: the default group's 30-minute timeout would end the wait), and get
    (schedule, None)."""
    from datetime import timedelta

    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    result = search() if state.is_main_process else (None, None)
    box = [result[0]]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0], result[1]


def _check_finetune_fits(config, ft: FinetuneConfig, device: torch.device, dtype: torch.dtype, processes: int) -> None:
    """Fail now, before the data is read and the schedule searched, when no micro-batch of the fine-tune fits
    in memory even unpruned (an upper bound; finetune() plans the micro-batch later, with the schedule)."""
    from dataclasses import replace

    from .finetune import memory_plan

    with torch.device("meta"):
        shape = MambaLM(config)
    if ft.batch_size % processes:
        raise SimbaError(f"finetune.batch_size (--finetune-batch-size): {ft.batch_size} does not split over {processes} processes")
    teacher = sum(p.numel() for p in shape.parameters()) * dtype.itemsize if ft.distill_weight > 0 else 0
    memory_plan(shape, None, replace(ft, micro_batch_size=None), device, ft.batch_size // processes, teacher)


def _finetune(model: MambaLM, ft: FinetuneConfig, ft_windows, state: Path, progress: bool) -> FinetuneResult:
    """Recovery fine-tune with the schedule fixed, distilled from a dense copy taken before any update."""
    from .finetune import dense_teacher, finetune

    teacher = dense_teacher(model) if ft.distill_weight > 0 else None
    result = finetune(model, teacher, ft, train_windows=ft_windows[0], eval_windows=ft_windows[1], state_dir=state,
                      progress=progress)
    del teacher
    return result


def _remove_finetune_state(state: Path) -> None:
    """Remove what finetune() wrote into its state folder, and the folder when nothing else is left in it."""
    import shutil

    for name in ("last", "best"):
        shutil.rmtree(state / name, ignore_errors=True)
    try:
        state.rmdir()
    except OSError:  # the user's own files stay
        pass


def _search_config(recipe: Recipe, study_file: Path, progress: bool) -> CalibrationConfig:
    from .calibrate import CalibrationConfig

    return CalibrationConfig(
        flops=recipe.flops,
        seq_len=recipe.seq_len,
        criterion=recipe.criterion,
        protect_last=recipe.protect_last,
        granularity=recipe.granularity,
        form=recipe.form,
        trials=recipe.trials,
        timeout=recipe.timeout,
        objective=recipe.objective,
        seed=recipe.seed,
        storage=recipe.storage or f"sqlite:///{study_file}",
        study_name=recipe.study_name,
        model_name=recipe.model,
        progress=progress,
    )


def _study_files(study: CalibrationResult, sqlite_file: Path | None) -> dict[str, str | bytes]:
    """The trials table, the plots, and (default storage) the study itself, for the output folder."""
    files: dict[str, str | bytes] = {"trials.csv": study.trials_csv(), **study.plots()}
    if sqlite_file is not None:
        files["study.db"] = sqlite_file.read_bytes()
    return files


def _version() -> str:
    from . import __version__

    return __version__
