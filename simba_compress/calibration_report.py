"""What a calibration study holds, for people: its trials as rows, the summary report.json records, the trials
table (trials.csv) and two plots (calibration loss against FLOP ratio, the chosen keep profile)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState


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
    resumed_from: int = 0  # trials the study had finished when this process started (0: a fresh study)

    def row(self, number: int) -> TrialRow:
        return next(r for r in self.trials if r.number == number)

    def distinct_schedules(self) -> int:
        """Evaluated trials with distinct keep ratios: in the fast form many profiles project onto one staircase."""
        return len({tuple(r.keep) for r in self.trials if r.loss is not None and r.keep is not None})

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
            "trials_before_this_run": self.resumed_from,
            "distinct_schedules": self.distinct_schedules(),
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
        distinct = self.distinct_schedules()  # points of equal schedules lie on one another
        ax.set_title(f"{len(done)} evaluated trials, {distinct} distinct schedule{'s' * (distinct != 1)}"
                     + (f" ({skipped} infeasible or unfinished)" if skipped else ""), fontsize=10)
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


def trial_row(t: FrozenTrial) -> TrialRow:
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
