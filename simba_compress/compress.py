"""The verb: compress(model, settings) gives a model the pruning schedule its settings object describes (the
object's type picks how: settings.py); run(recipe) is the whole job (load, compress, measure, fine-tune, save).

    model = simba_compress.load("state-spaces/mamba-1.4b")
    simba_compress.compress(model, LinearSchedule(flops=0.6))      # model.simba: the linear schedule at 0.6
    simba_compress.compress(model, CalibratedSchedule(flops=0.6), windows=windows)  # or a searched one
    simba_compress.save(model, "out/", tokenizer=tok)
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from contextlib import contextmanager
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
from .pruning import SimbaConfig
from .recipe import Recipe
from .schedules import linear, linear_for_flops, max_tokens_list
from .settings import CalibratedSchedule, ExplicitSchedule, FinetuneConfig, LinearSchedule, PruningSettings

if TYPE_CHECKING:
    from .calibrate import CalibrationResult
    from .finetune import FinetuneResult

# compress()'s keywords of earlier versions, read as a LinearSchedule or an ExplicitSchedule
_KEYWORDS = ("flops", "keep", "final_keep", "criterion", "protect_last", "seq_len", "seed", "granularity", "form",
             "max_tokens")


def compress(
    model: MambaLM, schedule: PruningSettings | None = None, *, windows: torch.Tensor | None = None,
    progress: bool = False, **keywords,
) -> SimbaConfig:
    """Give `model` the pruning schedule that `schedule` describes (in place: model.simba) and return it.

    schedule: LinearSchedule (the paper's, fitted to a FLOP budget or down to a final ratio), CalibratedSchedule
    (searched on `windows`, (n, l + 1) token windows from data.load_windows; calibrate() also returns the study)
    or ExplicitSchedule (given ratios); their max_tokens caps apply on top of the schedule, fitted without them.
    The keywords of earlier versions (compress(model, flops=0.6, criterion=...)) still work, deprecated: they
    mean LinearSchedule(...), or ExplicitSchedule(...) with keep.
    """
    if schedule is None:
        schedule = _from_keywords(keywords)
    elif keywords:
        raise TypeError(f"compress: give a settings object or keywords, not both ({', '.join(keywords)})")
    simba, _ = fit(model, schedule, windows, progress=progress)
    model.simba = simba
    return simba


def _from_keywords(keywords: dict) -> PruningSettings:
    unknown = sorted(set(keywords) - set(_KEYWORDS))
    if unknown:
        raise TypeError(f"compress() got an unexpected keyword argument {unknown[0]!r}")
    if all(keywords.get(k) is None for k in ("flops", "keep", "final_keep")):
        raise SimbaError("compress: give a schedule: LinearSchedule, CalibratedSchedule or ExplicitSchedule (settings.py)")
    warnings.warn("compress(model, flops=...) is deprecated: pass a settings object, compress(model, "
                  "LinearSchedule(flops=...)) (simba_compress.settings)", DeprecationWarning, stacklevel=3)
    given = {k: v for k, v in keywords.items() if v is not None}
    if "keep" in given:
        given.pop("form", None)
        return ExplicitSchedule(**given)
    return LinearSchedule(**given)


def fit(
    model: MambaLM, schedule: PruningSettings, windows: torch.Tensor | None = None, *, model_name: str = "",
    progress: bool = False,
) -> tuple[SimbaConfig, CalibrationResult | None]:
    """The schedule `schedule` describes for `model`, token caps included, and the study that found it (a
    CalibratedSchedule) or None. The model is not changed."""
    for kind, handler in _HANDLERS.items():
        if isinstance(schedule, kind):
            simba, study = handler(model, schedule, windows, model_name, progress)
            return with_max_tokens(simba, schedule.max_tokens), study
    raise TypeError(f"compress: schedule must be a LinearSchedule, CalibratedSchedule or ExplicitSchedule, not "
                    f"{type(schedule).__name__}")


def _linear(model: MambaLM, s: LinearSchedule, windows, model_name, progress) -> tuple[SimbaConfig, None]:
    if s.flops is not None:
        simba = linear_for_flops(model.config, s)
        simba.extra = {"schedule": "linear", "flops_target": s.flops, "seq_len": s.seq_len, "form": s.form}
    else:
        simba = s.simba(linear(model.config.n_layer, s.final_keep))
        simba.extra = {"schedule": "linear", "flops_target": None, "seq_len": s.seq_len}
    return simba, None


def _explicit(model: MambaLM, s: ExplicitSchedule, windows, model_name, progress) -> tuple[SimbaConfig, None]:
    if len(s.keep) != model.config.n_layer:
        raise SimbaError(f"keep: {len(s.keep)} ratios for a model of {model.config.n_layer} layers", "keep")
    simba = s.simba(s.keep)
    simba.extra = {"schedule": "explicit", "flops_target": None, "seq_len": s.seq_len}
    return simba, None


def _calibrated(model: MambaLM, s: CalibratedSchedule, windows, model_name, progress):
    from .calibrate import calibrate  # optuna loads only for a search

    if windows is None:
        raise SimbaError("windows: a CalibratedSchedule is searched on calibration windows (data.load_windows)")
    return calibrate(model, windows, s, model_name=model_name, progress=progress)


_HANDLERS = {LinearSchedule: _linear, CalibratedSchedule: _calibrated, ExplicitSchedule: _explicit}


def with_max_tokens(simba: SimbaConfig, max_tokens: str | list[int] | None) -> SimbaConfig:
    """`simba` with the token caps `max_tokens` (None: unchanged)."""
    if max_tokens is None:
        return simba
    try:
        return replace(simba, max_tokens=max_tokens_list(max_tokens, simba.n_layer))
    except ValueError as e:
        raise SimbaError(str(e), "max_tokens") from None


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SimbaError(f"device: unknown device {device!r}", "device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SimbaError(f"device {device}: CUDA is not available on this machine", "device")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, dtype)


def run(recipe: Recipe, overwrite: bool = False, progress: bool = True) -> tuple[Path | None, dict]:
    """Load, compress, measure on the calibration text, and save the folder. Returns (folder, report).

    Launched as several processes (accelerate launch, for a data-parallel fine-tune) every process runs the
    job, the main one alone searches the schedule and writes; the others return (None, report).
    """
    if recipe.output is None:
        raise SimbaError("output: required (the folder to write the compressed model to)", "output")
    out = Path(recipe.output).expanduser()
    check_output(out, overwrite)  # before any long work
    t0 = time.time()
    device, dtype = resolve_device(recipe.device, recipe.dtype)
    state = _distributed(device)
    main = state is None or state.is_main_process
    torch.manual_seed(recipe.schedule.seed)
    config = read_checkpoint(resolve(recipe.model)).config  # a folder that is not a checkpoint is named as such
    tokenizer = load_tokenizer(recipe.model, recipe.tokenizer)
    cal = recipe.calibration
    windows = load_windows(cal.data, tokenizer, cal.seq_len + 1, cal.samples)  # bad data fails before the model loads
    ft = recipe.finetune
    if ft.steps:
        from .finetune_plan import load_finetune_windows

        with _about("finetune"):  # before the model loads and the schedule search runs
            _check_finetune_fits(config, ft, device, dtype, 1 if state is None else state.num_processes)
            ft_windows = load_finetune_windows(ft, tokenizer)
        ft_state = Path(recipe.finetune_dir).expanduser() if recipe.finetune_dir else out.resolve().parent / f"{out.name}.finetune"
    model = load(recipe.model, dtype=dtype, device=device)
    study_file = out.resolve().parent / f"{out.name}.optuna.db"  # beside: the output folder appears only when whole
    settings = recipe.schedule
    searched = isinstance(settings, CalibratedSchedule)
    if searched and settings.storage is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        settings = replace(settings, storage=f"sqlite:///{study_file}")
    search = lambda: fit(model, settings, windows, model_name=recipe.model, progress=progress)  # noqa: E731
    with _about("schedule"):
        simba, study = _on_main(state, search) if searched and state is not None else search()
    model.simba = simba
    protect = default_protect(cal.seq_len)
    dense = evaluate(model, windows, protect, simba=None, progress=progress)
    tuned = None
    if ft.steps:
        training_free = evaluate(model, windows, protect, progress=progress)
        with _about("finetune"):
            tuned = _finetune(model, ft, ft_windows, ft_state, progress)
    sparse = evaluate(model, windows, protect, progress=progress)
    flops = count(model.config, simba, settings.seq_len)
    # where the study ends up: by default the folder's study.db (it lay beside the folder while the search ran)
    moved = {"storage": "study.db"} if searched and recipe.schedule.storage is None else {}
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
        "search": None if study is None else study.summary() | moved,
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
        files |= _study_files(study, study_file if recipe.schedule.storage is None else None)
    folder = save(
        model,
        out,
        tokenizer=tokenizer,
        overwrite=overwrite,
        files=files,
    )
    if study is not None and recipe.schedule.storage is None:
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


@contextmanager
def _about(section: str):
    """Errors about a field of the settings object in `section` of the recipe name it there (schedule.flops)."""
    try:
        yield
    except SimbaError as e:
        raise e.within(section) from None


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

    from .finetune_plan import memory_plan

    with torch.device("meta"):
        shape = MambaLM(config)
    if ft.batch_size % processes:
        raise SimbaError(f"batch_size: {ft.batch_size} does not split over {processes} processes", "batch_size")
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


def _study_files(study: CalibrationResult, sqlite_file: Path | None) -> dict[str, str | bytes]:
    """The trials table, the plots, and (default storage) the study itself, for the output folder."""
    files: dict[str, str | bytes] = {"trials.csv": study.trials_csv(), **study.plots()}
    if sqlite_file is not None:
        files["study.db"] = sqlite_file.read_bytes()
    return files


def _version() -> str:
    from . import __version__

    return __version__
