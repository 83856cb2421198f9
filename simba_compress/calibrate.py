"""Calibrate the per-layer keep schedule to a FLOP budget with an Optuna study: the search.

    simba, study = calibrate(model, windows, CalibratedSchedule(flops=0.6, trials=40))

Search space (schedules.knots): keep(u) = 1 - c * shape(u) over relative depth u (floored above 0), shape
rising from 0 to 1 through `knots` evenly spaced knots whose increments are the trial's parameters. The depth
of the drop c is not searched: each trial solves it by bisection (schedules.fit_flops) so its FLOP ratio sits
within 0.5% of the budget (within one layer's step with a granularity: schedules.flop_tolerance), and the
trials are spent on the shape alone; a handful of parameters describe 6 or 64 layers alike. The ratio is
recorded with trial.set_constraint; a shape that cannot reach the budget (flat at the bottom) is infeasible
and is not evaluated.

Objective, on the calibration windows: the headline metric (evaluate.py), i.e. the next-token loss on the last K
positions with them protected, or (objective "kl") the KL divergence from the dense model's predictions
there. Trial 0 is the paper's linear schedule at the same budget, so the answer is never worse than it on
the calibration data. Per batch, layer 0 (dense under every schedule) and the dense logits are computed once.

The study (study.py: storage, identity, owners of trials) is shared by any number of workers, which together
finish exactly `trials` trials, none asked twice. Determinism: the sampler of each trial is seeded from (seed,
its rank: the trials finished or running with a lower number), and trials left RUNNING by a killed process on
this host are marked failed first, so a killed and rerun study asks exactly what an uninterrupted one asks.
The trials as rows, the summary, the table and the plots: calibration_report.py.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from optuna.trial import TrialState
from tqdm.auto import tqdm

from .calibration_report import CalibrationResult, TrialRow, trial_row
from .errors import SimbaError
from .evaluate import default_protect, protected
from .flops import count
from .layers import ModelConfig
from .model import MambaLM, Prefix
from .pruning import SimbaConfig
from .schedules import (deepest_fast, fast_for_flops, fast_tolerance, fit_flops, flop_tolerance, knots, linear_for_flops,
                        to_fast)
from .settings import CalibratedSchedule, LinearSchedule
from .study import ask, fail_dead_trials, identity, open_study, where

DEEPEST = -1.0 + 1e-12  # knots() level at which every layer the shape touches is at the floor
LIVE = (TrialState.COMPLETE, TrialState.RUNNING)

__all__ = ["calibrate", "CalibratedSchedule", "CalibrationResult", "TrialRow"]


def calibrate(
    model: MambaLM, windows: torch.Tensor, schedule: CalibratedSchedule, *, model_name: str = "", progress: bool = True
) -> tuple[SimbaConfig, CalibrationResult]:
    """Search the keep schedule that minimises the calibration loss at schedule.flops; returns it and the study.

    windows: (n, l + 1) token windows (data.load_windows). model_name: how messages and the study's identity name
    the model. The model is not changed.
    """
    s, mc = schedule, model.config
    if not isinstance(s, CalibratedSchedule):
        raise TypeError(f"calibrate: schedule must be a CalibratedSchedule, not {type(s).__name__}")
    protect = _check_windows(windows, s)
    tol = fast_tolerance(mc, s.simba([1.0] * mc.n_layer), s.flops, s.seq_len) if s.form == "fast" else \
        flop_tolerance(mc, s.flops, s.seq_len, s.granularity)
    _check_reach(mc, s, tol)
    linear_keep, note = None, None
    try:
        linear_keep = linear_for_flops(mc, LinearSchedule(**s.shared(), flops=s.flops, form=s.form)).keep
    except SimbaError as e:
        note = f"linear baseline skipped: {e}"

    study = open_study(s, identity(model, windows, s, protect, model_name))
    fail_dead_trials(study)
    done = _count(study, TrialState.COMPLETE)
    if done and progress:
        tqdm.write(f"calibrate: resuming: {min(done, s.trials)} of {s.trials} trials done in study "
                   f"{s.study_name!r} ({where(s)})", file=sys.stderr)
    objective = _Objective(model, windows, s, protect, tol)
    t0 = time.time()
    ran = _run_trials(study, s, objective, linear_keep is not None, progress)
    search = time.time() - t0 - objective.setup

    rows = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    feasible = [r for r in rows if r.feasible and r.loss is not None]
    if not feasible:
        closest = min((r.flop_ratio for r in rows if r.flop_ratio is not None), default=None)
        raise SimbaError(
            f"flops {s.flops}: no trial of study {s.study_name!r} reached it within {tol:.3g} "
            f"(closest ratio {closest}); raise trials", "flops"
        )
    best = min(feasible, key=lambda r: (r.loss, r.number))
    baselines = [r for r in feasible if r.baseline]
    result = CalibrationResult(
        study_name=s.study_name, storage=where(s), objective=s.objective, protect=protect, flops=s.flops, trials=rows,
        best=best.number, baseline=baselines[0].number if baselines else None, baseline_note=note,
        linear_keep=linear_keep, trials_run=ran, search_seconds=search, setup_seconds=objective.setup, tolerance=tol,
        resumed_from=done,
    )
    simba = s.simba(best.keep, align=s.form == "fast")
    simba.extra = {"schedule": "calibrated", "form": s.form, "flops_target": s.flops, "seq_len": s.seq_len,
                   "trial": best.number}
    return simba, result


def _check_windows(windows: torch.Tensor, s: CalibratedSchedule) -> int:
    """The scored continuation K of the windows (n, l + 1), after checking that they hold it."""
    window_len = windows.shape[1] - 1
    protect = s.protect or default_protect(window_len)
    if windows.ndim != 2 or windows.shape[0] < 1 or not 1 <= protect <= window_len:
        raise SimbaError(f"windows: need (n, l + 1) token windows with l >= the {protect} scored positions", "windows")
    if s.granularity > window_len:
        raise SimbaError(
            f"granularity {s.granularity}: longer than the {window_len}-token calibration windows, which would "
            "then not be pruned at all; lengthen the calibration windows", "granularity"
        )
    return protect


def _profile(mc: ModelConfig, s: CalibratedSchedule, increments: list[float], level: float) -> SimbaConfig:
    return s.simba(knots(mc.n_layer, increments, level))


def _check_reach(mc: ModelConfig, s: CalibratedSchedule, tol: float) -> None:
    """Refuse, before any trial, a budget that no schedule of the search space meets."""
    deepest = _profile(mc, s, [1.0] + [0.0] * (s.knots - 1), DEEPEST)
    if s.form == "fast":
        deepest = deepest_fast(deepest)
    lowest = count(mc, deepest, s.seq_len).ratio
    if s.flops < lowest - tol and s.flops < 1.0:
        raise SimbaError(
            f"flops {s.flops}: below what the calibrated schedules reach ({lowest:.3f} at seq_len {s.seq_len}); "
            "layer 0 always runs on every token", "flops"
        )
    if s.form == "fast":  # a profile only picks among the staircases that meet the budget: with none, every trial
        fast_for_flops(mc, s.simba([1.0] * mc.n_layer), s.flops, s.seq_len)  # would miss it; say so (and the reach)


class _Objective:
    """A trial's value: its profile fitted to the budget, in the form, scored on the windows (math.inf when no
    schedule of that shape meets the budget)."""

    def __init__(self, model: MambaLM, windows: torch.Tensor, s: CalibratedSchedule, protect: int, tol: float):
        self.model, self.windows, self.s, self.protect, self.tol = model, windows, s, protect, tol
        self.scorer: _Scorer | None = None
        self.setup = 0.0  # seconds spent building the scorer
        # Profiles that run the same tokens in every layer of the calibration windows score the same: the fast form
        # maps many profiles to one staircase, and with the tail protected its lowest levels keep the same tokens
        self.seen: dict[tuple[int, ...], float] = {}
        self.row = torch.tensor([windows.shape[1] - 1])

    def __call__(self, trial: optuna.Trial) -> float:
        s, mc = self.s, self.model.config
        inc = [trial.suggest_float(f"w{j}", 0.0, 1.0) for j in range(s.knots)]
        profile = fit_flops(mc, lambda level: _profile(mc, s, inc, level), s.flops, s.seq_len, lo=DEEPEST)
        simba = to_fast(mc, profile, s.flops, s.seq_len) if s.form == "fast" else profile
        if simba is None:  # recorded as infeasible: the profile's ratio, marked beyond the tolerance
            trial.set_user_attr("keep", profile.keep)
            trial.set_user_attr("flop_ratio", count(mc, profile, s.seq_len).ratio)
            trial.set_constraint("flops", 1.0)
            return math.inf
        ratio = count(mc, simba, s.seq_len).ratio
        trial.set_user_attr("keep", simba.keep)
        trial.set_user_attr("top_keep", simba.keep[-1])
        trial.set_user_attr("flop_ratio", ratio)
        trial.set_constraint("flops", abs(ratio - s.flops) - self.tol)  # feasible: within tol of the budget
        if abs(ratio - s.flops) > self.tol:
            return math.inf  # this shape cannot go as low as the budget: nothing to evaluate
        tokens = tuple(protected(simba, self.protect).counts(self.row, mc.scan_chunks)[:, 0].tolist())
        if tokens not in self.seen:
            if self.scorer is None:  # built only when a trial needs it (a finished study needs no forward pass)
                t0 = time.time()
                self.scorer = _Scorer(self.model, self.windows, self.protect, s.objective, s.batch_size, s.criterion)
                self.setup = time.time() - t0
            self.seen[tokens] = self.scorer(simba)
        return self.seen[tokens]


def _count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _run_trials(
    study: optuna.Study, s: CalibratedSchedule, objective: _Objective, baseline: bool, progress: bool
) -> int:
    """Run trials until the study holds s.trials finished or running ones (or s.timeout passes); returns how many
    this process ran.

    Several workers share the study: one stops once the trials finished or running elsewhere make up s.trials.
    What the sampler asks follows from the trial's rank, the trials finished or running before it (the storage
    numbers trials atomically), never from a count taken before asking, which two workers can share. Rank 0 is
    the linear baseline (again after a rerun when the killed process was running it).
    """
    equal = {f"w{j}": 0.5 for j in range(s.knots)}  # equal increments: the linear schedule
    bar = tqdm(total=s.trials, initial=min(_count(study, TrialState.COMPLETE), s.trials), desc="calibrate",
               disable=not progress, leave=False)
    t_start, ran = time.time(), 0
    while _count(study, *LIVE) < s.trials and (s.timeout is None or time.time() - t_start < s.timeout):
        trial = ask(study)  # with its owner (study.ask); TPE samples at the first suggest, after the sampler is set
        rank = sum(t.number < trial.number for t in study.get_trials(deepcopy=False, states=LIVE))
        if rank >= s.trials:  # another worker took the last place between the count and the ask
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)  # never evaluated
            break
        if rank == 0 and baseline:
            trial.set_user_attr("baseline", True)
        study.sampler = _Fixed(equal) if rank == 0 and baseline else _sampler(s.seed, rank, s.trials)
        try:
            value = objective(trial)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, value)
        ran += 1
        bar.update(1)
    bar.close()
    return ran


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
