"""Calibrate the per-layer keep schedule to a FLOP budget with an Optuna study.

Search space (schedules.knots): keep(u) = 1 - c * shape(u) over relative depth u (floored above 0), shape
rising from 0 to 1 through `knots` evenly spaced knots whose increments are the trial's parameters. The depth
of the drop c is not searched: each trial solves it by bisection (schedules.fit_flops) so its FLOP ratio sits
within 0.5% of the budget (within one layer's step with a granularity: schedules.flop_tolerance), and the
trials are spent on the shape alone; a handful of parameters describe 6 or 64 layers alike. The ratio is
recorded with trial.set_constraint; a shape that cannot reach the budget (flat at the bottom) is infeasible
and is not evaluated.

Objective, on the calibration windows: the DESIGN.md headline, i.e. the next-token loss on the last K
positions with them protected, or (objective "kl") the KL divergence from the dense model's predictions
there. Trial 0 is the paper's linear schedule at the same budget, so the answer is never worse than it on
the calibration data. Per batch, layer 0 (dense under every schedule) and the dense logits are computed once.

Storage: any Optuna storage (RDB URL, or a journal file for workers on several machines), opened with
load_if_exists, so a rerun resumes and several processes share one study; the study remembers what it was
created for (model, budget, data, ...) and refuses another. Workers together finish exactly `trials` trials,
none asked twice. Determinism: the sampler of each trial is seeded from (seed, its rank: the trials finished
or running with a lower number), and trials left RUNNING by a killed process on this host are marked failed
first, so a killed and rerun study asks exactly what an uninterrupted one asks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from .errors import SimbaError
from .evaluate import default_protect, protected
from .flops import count
from .model import MambaLM, Prefix
from .pruning import DEFAULT_CRITERION, SimbaConfig
from .schedules import Form, check_flops, deepest_fast, fast_for_flops, fast_tolerance, fit_flops, flop_tolerance, knots, linear_for_flops, to_fast

JOURNAL_SUFFIXES = (".log", ".journal")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
IDENTITY_KEY = "simba_calibration"  # study user attr: what the study was created for
DEEPEST = -1.0 + 1e-12  # knots() level at which every layer the shape touches is at the floor


@dataclass
class CalibrationConfig:
    """Settings of a schedule search. storage None keeps the study in memory (the Python API's default)."""

    flops: float  # target backbone FLOP ratio
    seq_len: int = 1024  # input length the FLOP ratio is computed at
    criterion: str = DEFAULT_CRITERION
    protect_last: int = 1
    granularity: int = 1  # token counts rounded to multiples of this (SimbaConfig.granularity)
    form: Form = "fast"  # "fast": each trial's profile becomes its nearest fast-form staircase (schedules.to_fast)
    trials: int = 40  # finished trials the study should hold (shared by all workers)
    timeout: float | None = None  # seconds after which this process starts no new trial
    # KL to the dense model on the scored tail: lower variance than the next-token loss on the same windows, and
    # better on held-out text at 3 of the 4 budgets that both were measured at (README, Calibration)
    objective: Literal["loss", "kl"] = "kl"
    protect: int | None = None  # K, the scored continuation; None: min(128, window length // 4)
    knots: int = 4
    seed: int = 0
    storage: str | None = None  # Optuna RDB URL, .db/.sqlite file, or .log/.journal journal file
    study_name: str = "simba-calibration"
    model_name: str = ""  # how messages and the study's identity name the model
    batch_size: int = 8
    progress: bool = True


@dataclass
class TrialRow:
    number: int
    state: str
    baseline: bool
    params: dict[str, float]
    top_keep: float | None
    flop_ratio: float | None
    feasible: bool
    loss: float | None  # None: not evaluated (infeasible, failed or running)
    seconds: float | None
    keep: list[float] | None = None


@dataclass
class CalibrationResult:
    study_name: str
    storage: str  # password hidden
    objective: str
    protect: int
    flops: float
    trials: list[TrialRow]
    best: int  # trial number of the chosen schedule
    baseline: int | None  # trial number of the linear schedule, None when F is below its reach
    baseline_note: str | None
    linear_keep: list[float] | None
    trials_run: int  # by this process
    search_seconds: float  # this process's trial loop
    setup_seconds: float  # caching layer 0 and the dense logits
    tolerance: float = 0.0  # how far from flops a feasible ratio may land (schedules.flop_tolerance)

    def row(self, number: int) -> TrialRow:
        return next(r for r in self.trials if r.number == number)

    @property
    def trials_per_minute(self) -> float | None:
        return round(60 * self.trials_run / self.search_seconds, 2) if self.search_seconds > 0 else None

    def summary(self) -> dict:
        """What report.json records."""
        best = self.row(self.best)
        base = None if self.baseline is None else self.row(self.baseline)
        return {
            "study_name": self.study_name,
            "storage": self.storage,
            "objective": self.objective,
            "protect": self.protect,
            "flops_target": self.flops,
            "trials_complete": sum(r.state == "COMPLETE" for r in self.trials),
            "trials_feasible": sum(r.feasible for r in self.trials),
            "trials_run_here": self.trials_run,
            "search_seconds": round(self.search_seconds, 1),
            "setup_seconds": round(self.setup_seconds, 1),
            "trials_per_minute": self.trials_per_minute,
            "best": {"trial": best.number, "loss": best.loss, "flop_ratio": best.flop_ratio, "keep": best.keep},
            "linear": None if base is None else {"trial": base.number, "loss": base.loss, "flop_ratio": base.flop_ratio},
            "linear_note": self.baseline_note,
            "gain_vs_linear": None if base is None else round(base.loss - best.loss, 6),
        }

    def trials_csv(self) -> str:
        names = sorted({k for r in self.trials for k in r.params}, key=lambda k: int(k[1:]))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["number", "state", "baseline", *names, "top_keep", "flop_ratio", "feasible", "loss", "seconds"])
        for r in self.trials:
            w.writerow(
                [r.number, r.state, int(r.baseline), *(r.params.get(k, "") for k in names)]
                + ["" if v is None else v for v in (r.top_keep, r.flop_ratio)]
                + [int(r.feasible), "" if r.loss is None else r.loss, "" if r.seconds is None else round(r.seconds, 3)]
            )
        return buf.getvalue()

    def plots(self) -> dict[str, bytes]:
        """PNG files: calibration loss vs FLOP ratio, and the chosen keep profile beside the linear one."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        done = [r for r in self.trials if r.loss is not None]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.scatter([r.flop_ratio for r in done], [r.loss for r in done], s=14, c="tab:gray", label="trials")
        front = _pareto(done)
        ax.step([r.flop_ratio for r in front], [r.loss for r in front], where="post", c="tab:blue", label="Pareto front")
        if self.baseline is not None:
            b = self.row(self.baseline)
            ax.scatter([b.flop_ratio], [b.loss], marker="s", s=60, c="tab:orange", label="linear (paper)", zorder=3)
        best = self.row(self.best)
        ax.scatter([best.flop_ratio], [best.loss], marker="*", s=140, c="tab:red", label="chosen", zorder=4)
        ax.axvline(self.flops, ls=":", c="k", lw=1)
        ax.axvspan(self.flops - self.tolerance, self.flops + self.tolerance, color="k", alpha=0.06)
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_xlabel(f"backbone FLOP ratio (target {self.flops} ± {self.tolerance:.3g} shaded)")
        ax.set_ylabel(f"calibration {self.objective} (last {self.protect} positions)")
        skipped = len(self.trials) - len(done)
        ax.set_title(f"{len(done)} evaluated trials" + (f" ({skipped} infeasible or unfinished)" if skipped else ""))
        ax.legend(fontsize=8)
        out = {"calibration_loss_vs_flops.png": _png(fig)}

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        layers = range(len(best.keep))
        ax.plot(layers, best.keep, "o-", c="tab:red", label=f"calibrated (trial {best.number})")
        if self.linear_keep is not None:
            ax.plot(layers, self.linear_keep, "s--", c="tab:orange", label="linear (paper)")
        ax.set_xlabel("layer")
        ax.set_ylabel("keep ratio")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"keep profile at FLOP ratio {self.flops}")
        ax.legend(fontsize=8)
        out["keep_profile.png"] = _png(fig)
        return out


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pareto(rows: list[TrialRow]) -> list[TrialRow]:
    """Trials no other trial beats on both FLOP ratio and loss, by increasing ratio."""
    front, best = [], math.inf
    for r in sorted(rows, key=lambda r: (r.flop_ratio, r.loss)):
        if r.loss < best:
            front.append(r)
            best = r.loss
    return front


class _Scorer:
    """The calibration objective of a schedule on fixed windows; what no schedule changes is computed once."""

    def __init__(
        self, model: MambaLM, windows: torch.Tensor, protect: int, objective: str, batch_size: int, criterion: str
    ):
        self.model, self.protect, self.objective = model, protect, objective
        self.batches: list[tuple[torch.Tensor, Prefix, torch.Tensor]] = []
        with torch.no_grad():
            for s in range(0, windows.shape[0], batch_size):
                w = windows[s : s + batch_size].to(model.device)
                x, targets = w[:, :-1], w[:, -protect:]
                prefix = model.prefix(x, criterion=criterion)  # layer 0 is dense under every schedule
                if objective == "kl":
                    targets = self._logits(x, prefix, None).log_softmax(-1)  # the dense teacher
                self.batches.append((x, prefix, targets))

    def _logits(self, x: torch.Tensor, prefix: Prefix, simba: SimbaConfig | None) -> torch.Tensor:
        return self.model(x, simba=simba, prefix=prefix, last_logits=self.protect).logits.float()

    @torch.no_grad()
    def __call__(self, simba: SimbaConfig) -> float:
        head = protected(simba, self.protect)
        total, n = 0.0, 0
        for x, prefix, targets in self.batches:
            logits = self._logits(x, prefix, head)
            if self.objective == "kl":
                losses = F.kl_div(logits.log_softmax(-1), targets, log_target=True, reduction="none").sum(-1)
            else:
                losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total += losses.double().sum().item()
            n += losses.numel()
        return total / n


def open_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """An Optuna storage from a URL or a file name; a one-line SimbaError when it cannot be opened."""
    if url is None:
        return None
    try:
        if "://" in url:
            return _rdb_storage(url)
        path = Path(url).expanduser().resolve()
        if path.name.endswith(SQLITE_SUFFIXES):
            return optuna.storages.RDBStorage(f"sqlite:///{path}")
        if path.name.endswith(JOURNAL_SUFFIXES):
            from optuna.storages.journal import JournalFileBackend

            if not path.parent.is_dir():
                raise FileNotFoundError(f"no folder {path.parent}")
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SimbaError(f"--storage {hide_password(url)}: cannot open ({first})") from None
    raise SimbaError(
        f"--storage {url}: not an Optuna storage; give a URL (sqlite:///file.db, postgresql://...), "
        f"a {'/'.join(SQLITE_SUFFIXES)} file or a {'/'.join(JOURNAL_SUFFIXES)} journal file"
    )


def _rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """RDBStorage(url); workers that meet an empty database at once all create Optuna's tables, and all but one
    fail on the server's catalog: they try again, and find the tables made."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url)
        except (IntegrityError, ProgrammingError):
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))


def hide_password(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@/]+@", r"://\1:***@", url)


def fingerprint(model: MambaLM) -> str:
    """A short hash of the weights (a strided sample of every tensor), to recognise the model a study was for."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().float().flatten().cpu()
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].numpy().tobytes())
    return h.hexdigest()[:16]


def _identity(model: MambaLM, windows: torch.Tensor, cfg: CalibrationConfig, protect: int) -> dict:
    return {
        "model": fingerprint(model),
        "flops": cfg.flops,
        "criterion": cfg.criterion,
        "seq_len": cfg.seq_len,
        "protect_last": cfg.protect_last,
        "granularity": cfg.granularity,
        "form": cfg.form,
        "objective": cfg.objective,
        "protect": protect,
        "knots": cfg.knots,
        "calibration windows": hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()[:16],
        "model_name": cfg.model_name,  # for the message only
    }


def _open_study(cfg: CalibrationConfig, identity: dict) -> optuna.Study:
    storage = open_storage(cfg.storage)
    where = "memory" if cfg.storage is None else hide_password(cfg.storage)
    try:
        study = optuna.create_study(storage=storage, study_name=cfg.study_name, direction="minimize", load_if_exists=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SimbaError(f"--storage {where}: cannot create or load study {cfg.study_name!r} ({first})") from None
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise SimbaError(f"--study-name {cfg.study_name}: this study in {where} maximizes; it is not a calibration")
    old = study.user_attrs.get(IDENTITY_KEY)
    if old is None:
        if study.get_trials(deepcopy=False):
            raise SimbaError(f"--study-name {cfg.study_name}: this study in {where} was not created by simba-compress")
        study.set_user_attr(IDENTITY_KEY, identity)
        return study
    for key, value in identity.items():
        if key != "model_name" and old.get(key) != value:
            what = f"{key} {old.get(key)!r}" + (f" ({old['model_name']})" if key == "model" and old.get("model_name") else "")
            raise SimbaError(
                f"--study-name {cfg.study_name}: this study in {where} was created for {what}, not {value!r}; "
                "pass another --study-name or --storage"
            )
    return study



def _fail_dead_trials(study: optuna.Study) -> None:
    """RUNNING trials whose process on this host is gone (killed) become FAIL: they will never finish."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if worker_host == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sampler(seed: int, rank: int, trials: int) -> optuna.samplers.TPESampler:
    """The sampler of the trial of `rank`, seeded by it so a resumed study asks the same."""
    trial_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=trial_seed, n_startup_trials=max(2, min(10, trials // 4)), multivariate=True)


class _Fixed(optuna.samplers.BaseSampler):
    """Asks given parameter values (the linear baseline), recorded as any trial's parameters."""

    def __init__(self, params: dict[str, float]):
        self.params = params

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.params[param_name]


def _row(t: FrozenTrial) -> TrialRow:
    ratio = t.user_attrs.get("flop_ratio")
    feasible = t.state == TrialState.COMPLETE and all(v <= 0 for v in t.constraints.values()) and t.constraints != {}
    loss = t.value if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value) else None
    return TrialRow(
        number=t.number,
        state=t.state.name,
        baseline=bool(t.user_attrs.get("baseline")),
        params=dict(t.params),
        top_keep=t.user_attrs.get("top_keep"),
        flop_ratio=ratio,
        feasible=feasible,
        loss=loss,
        seconds=t.duration.total_seconds() if t.duration is not None else None,
        keep=t.user_attrs.get("keep"),
    )


def calibrate(model: MambaLM, windows: torch.Tensor, config: CalibrationConfig) -> tuple[SimbaConfig, CalibrationResult]:
    """Search the keep schedule that minimises the calibration loss at config.flops; returns it and the study.

    windows: (n, l + 1) token windows (data.load_windows). The model is not changed.
    """
    cfg, mc = config, model.config
    check_flops(cfg.flops)
    if cfg.trials < 1 or cfg.knots < 1 or cfg.objective not in ("loss", "kl"):
        raise SimbaError("calibrate: trials and knots must be >= 1, objective 'loss' or 'kl'")
    window_len = windows.shape[1] - 1
    protect = cfg.protect or default_protect(window_len)
    if windows.ndim != 2 or windows.shape[0] < 1 or not 1 <= protect <= window_len:
        raise SimbaError(f"calibrate: need windows (n, l + 1) with l >= the {protect} scored positions")
    if cfg.granularity > window_len:
        raise SimbaError(
            f"--granularity {cfg.granularity}: longer than the {window_len}-token calibration windows, which would "
            "then not be pruned at all; raise --calib-seq-len"
        )
    if cfg.form == "fast" and cfg.granularity > 1:
        raise SimbaError("--granularity: a staircase of its own; use it with --form exact")
    template = SimbaConfig([1.0] * mc.n_layer, cfg.criterion, cfg.protect_last, cfg.seed, cfg.granularity)
    if cfg.form == "fast":
        tol = fast_tolerance(mc, template, cfg.flops, cfg.seq_len)
    else:
        tol = flop_tolerance(mc, cfg.flops, cfg.seq_len, cfg.granularity)

    def schedule(increments: list[float], level: float) -> SimbaConfig:
        return SimbaConfig(knots(mc.n_layer, increments, level), cfg.criterion, cfg.protect_last, cfg.seed, cfg.granularity)

    def in_form(simba: SimbaConfig) -> SimbaConfig | None:
        """A trial's continuous profile at the budget as the form runs it; None: no staircase meets the budget."""
        if cfg.form != "fast":
            return simba
        return to_fast(mc, simba, cfg.flops, cfg.seq_len)

    deepest = schedule([1.0] + [0.0] * (cfg.knots - 1), DEEPEST)
    if cfg.form == "fast":
        deepest = deepest_fast(deepest)
    lowest = count(mc, deepest, cfg.seq_len).ratio
    if cfg.flops < lowest - tol and cfg.flops < 1.0:
        raise SimbaError(
            f"--flops {cfg.flops}: below what the calibrated schedules reach ({lowest:.3f} at --seq-len {cfg.seq_len}); "
            "layer 0 always runs on every token"
        )
    if cfg.form == "fast":  # a profile only picks among the staircases that meet the budget: with none, every trial
        fast_for_flops(mc, template, cfg.flops, cfg.seq_len)  # would miss it; say so (and how far the form reaches) now
    linear_keep, note = None, None
    try:
        linear_keep = linear_for_flops(
            mc, cfg.flops, cfg.seq_len, cfg.criterion, cfg.protect_last, cfg.seed, cfg.granularity, cfg.form
        ).keep
    except SimbaError as e:
        note = f"linear baseline skipped: {e}"

    study = _open_study(cfg, _identity(model, windows, cfg, protect))
    _fail_dead_trials(study)
    equal = {f"w{j}": 0.5 for j in range(cfg.knots)}  # equal increments: the linear schedule

    scorer: _Scorer | None = None
    setup = 0.0
    # Profiles that run the same tokens in every layer of the calibration windows score the same: the fast form
    # maps many profiles to one staircase, and with the tail protected its lowest levels keep the same tokens
    seen: dict[tuple[int, ...], float] = {}
    row = torch.tensor([window_len])

    def objective(trial: optuna.Trial) -> float:
        nonlocal scorer, setup
        inc = [trial.suggest_float(f"w{j}", 0.0, 1.0) for j in range(cfg.knots)]
        profile = fit_flops(mc, lambda level: schedule(inc, level), cfg.flops, cfg.seq_len, lo=DEEPEST)
        simba = in_form(profile)
        if simba is None:  # recorded as infeasible: the profile's ratio, marked beyond the tolerance
            trial.set_user_attr("keep", profile.keep)
            trial.set_user_attr("flop_ratio", count(mc, profile, cfg.seq_len).ratio)
            trial.set_constraint("flops", 1.0)
            return math.inf
        ratio = count(mc, simba, cfg.seq_len).ratio
        trial.set_user_attr("keep", simba.keep)
        trial.set_user_attr("top_keep", simba.keep[-1])
        trial.set_user_attr("flop_ratio", ratio)
        trial.set_constraint("flops", abs(ratio - cfg.flops) - tol)  # feasible: within tol of the budget
        if abs(ratio - cfg.flops) > tol:
            return math.inf  # this shape cannot go as low as the budget: nothing to evaluate
        tokens = tuple(protected(simba, protect).counts(row, mc.scan_chunks)[:, 0].tolist())
        if tokens in seen:
            return seen[tokens]
        if scorer is None:  # built only when a trial needs it (a finished study needs no forward pass)
            t0 = time.time()
            scorer = _Scorer(model, windows, protect, cfg.objective, cfg.batch_size, cfg.criterion)
            setup = time.time() - t0
        seen[tokens] = scorer(simba)
        return seen[tokens]

    live = (TrialState.COMPLETE, TrialState.RUNNING)
    trials_in = lambda *states: len(study.get_trials(deepcopy=False, states=states))  # noqa: E731
    bar = tqdm(total=cfg.trials, initial=min(trials_in(TrialState.COMPLETE), cfg.trials), desc="calibrate",
               disable=not cfg.progress, leave=False)
    t_start, ran = time.time(), 0
    # Several workers share the study: one stops once the trials finished or running elsewhere make up
    # cfg.trials. What the sampler asks follows from the trial's rank, the trials finished or running before it
    # (the storage numbers trials atomically), never from a count taken before asking, which two workers can
    # share. Rank 0 is the linear baseline (again after a rerun when the killed process was running it).
    while trials_in(*live) < cfg.trials and (cfg.timeout is None or time.time() - t_start < cfg.timeout):
        trial = study.ask()  # TPE samples at the first suggest, after the sampler below is set
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # see _fail_dead_trials
        rank = sum(t.number < trial.number for t in study.get_trials(deepcopy=False, states=live))
        if rank >= cfg.trials:  # another worker took the last place between the count and the ask
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)  # never evaluated
            break
        baseline = rank == 0 and linear_keep is not None
        if baseline:
            trial.set_user_attr("baseline", True)
        study.sampler = _Fixed(equal) if baseline else _sampler(cfg.seed, rank, cfg.trials)
        try:
            value = objective(trial)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, value)
        ran += 1
        bar.update(1)
    bar.close()
    search = time.time() - t_start - setup

    rows = [_row(t) for t in study.get_trials(deepcopy=False)]
    feasible = [r for r in rows if r.feasible and r.loss is not None]
    if not feasible:
        closest = min((r.flop_ratio for r in rows if r.flop_ratio is not None), default=None)
        raise SimbaError(
            f"--flops {cfg.flops}: no trial of study {cfg.study_name!r} reached it within {tol:.3g} "
            f"(closest ratio {closest}); raise --trials"
        )
    best = min(feasible, key=lambda r: (r.loss, r.number))
    baselines = [r for r in feasible if r.baseline]
    result = CalibrationResult(
        study_name=cfg.study_name,
        storage="memory" if cfg.storage is None else hide_password(cfg.storage),
        objective=cfg.objective,
        protect=protect,
        flops=cfg.flops,
        trials=rows,
        best=best.number,
        baseline=baselines[0].number if baselines else None,
        baseline_note=note,
        linear_keep=linear_keep,
        trials_run=ran,
        search_seconds=search,
        setup_seconds=setup,
        tolerance=tol,
    )
    simba = SimbaConfig(best.keep, cfg.criterion, cfg.protect_last, cfg.seed, cfg.granularity, align=cfg.form == "fast")
    simba.extra = {
        "schedule": "calibrated", "form": cfg.form, "flops_target": cfg.flops, "seq_len": cfg.seq_len, "trial": best.number
    }
    return simba, result

