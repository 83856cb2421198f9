"""Recipes: one YAML file that states a compression run completely, validated, and saved beside its output.

CLI flags override recipe values; both go through the same schema, so a bad flag and a bad recipe key
fail the same way: one line naming the file (or flag), the key and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SimbaError
from .finetune import FinetuneConfig
from .pruning import CRITERIA, DEFAULT_CRITERION

Criterion = Literal["simba", "query", "share", "deci", "utr", "l2norm", "random", "stride"]
assert set(Criterion.__args__) == set(CRITERIA)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class CalibrationData(_Strict):
    data: str = "demo"  # .txt / .txt.xz / .jsonl file, folder, "demo" (the embedded sample) or a datasets name
    samples: int = Field(16, ge=1)  # windows of seq_len tokens
    seq_len: int = Field(1024, ge=2)


class Recipe(_Strict):
    """Every setting of a compression run."""

    model: str  # folder, hub id, or "demo"
    output: str | None = None
    tokenizer: str | None = None  # folder or hub id when the checkpoint has none
    flops: float | None = Field(None, gt=0, le=1)  # target backbone FLOP ratio
    # None: "calibrated" with flops, "linear" with final_keep, "explicit" with keep
    schedule: Literal["calibrated", "linear", "explicit"] | None = None
    keep: list[float] | None = None  # explicit per-layer keep ratios (schedule: explicit)
    final_keep: float | None = Field(None, gt=0, le=1)  # linear schedule's top-layer keep, instead of flops
    criterion: Criterion = DEFAULT_CRITERION
    protect_last: int = Field(1, ge=1)  # last tokens never pruned (generation needs >= 1)
    # with flops: "fast", keep ratios on a staircase of 1, 3/4, 1/2 ... 1/16 (fast on a GPU at any prompt length), or "exact"
    form: Literal["fast", "exact"] = "fast"
    granularity: int = Field(1, ge=1)  # form exact: token counts rounded to multiples of this
    max_tokens: list[int] | str | None = None  # per-layer token caps (0: none) or "T@L": context extension
    seq_len: int = Field(1024, ge=2)  # input length the FLOP ratio is computed at
    calibration: CalibrationData = CalibrationData()
    # the Optuna study of schedule "calibrated" (calibrate.py)
    trials: int = Field(40, ge=1)  # finished trials the study should hold, over all its workers
    timeout: float | None = Field(None, gt=0)  # seconds after which this run starts no new trial
    storage: str | None = None  # Optuna URL or .db/.journal file; None: <output>.optuna.db, then <output>/study.db
    study_name: str = "simba-calibration"
    objective: Literal["loss", "kl"] = "kl"  # KL to the dense model, or next-token loss, on the scored tail
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)  # recovery fine-tune (finetune.py); steps 0: none
    finetune_dir: str | None = None  # its resumable state; None: <output>.finetune beside the output
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @field_validator("keep")
    @classmethod
    def _keep(cls, v):
        if v is not None and not v:
            raise ValueError("must list one ratio per layer")
        return v

    @model_validator(mode="after")
    def _one_target(self):
        if self.keep is not None:
            self.schedule = "explicit"
        given = [k for k in ("flops", "keep", "final_keep") if getattr(self, k) is not None]
        if self.schedule == "explicit" and self.keep is None:
            raise ValueError("schedule 'explicit' needs 'keep' (one ratio per layer)")
        if len(given) > 1:
            raise ValueError(f"give only one of flops, keep, final_keep (got {', '.join(given)})")
        if not given:
            raise ValueError("give a target: flops (e.g. 0.6), final_keep, or keep")
        if self.schedule is None:
            self.schedule = "calibrated" if self.flops is not None else "linear"
        if self.schedule == "calibrated" and self.flops is None:
            raise ValueError("schedule 'calibrated' needs flops (the FLOP budget to calibrate to)")
        if self.flops is not None and self.form == "fast" and self.granularity > 1:
            raise ValueError("granularity: a staircase of its own; use it with form 'exact'")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _explain(e: ValidationError, where: str) -> SimbaError:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # a model's / a dataclass's extra key
        msg = "unknown key"
    return SimbaError(f"{where}: {key}: {msg}" if key else f"{where}: {msg}")


def read_recipe_file(path: str | Path) -> dict:
    """The raw mapping of a recipe file (validated later, together with any flags)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SimbaError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise SimbaError(f"{path}: not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise SimbaError(f"{path}: a recipe is a mapping of keys to values")
    return data


def build_recipe(base: dict | None = None, overrides: dict | None = None, source: str = "recipe") -> Recipe:
    """Validate `base` (a recipe file's mapping) with `overrides` (flags that were given) on top."""
    data = dict(base or {})
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, dot, sub = key.partition(".")
        if dot:  # calibration.samples, finetune.steps, ...: one key of a section
            data.setdefault(section, {})
            if isinstance(data[section], dict):
                data[section] = {**data[section], sub: value}
        else:
            data[key] = value
        if key in ("flops", "keep", "final_keep"):  # a flag's target replaces the recipe's
            for other in {"flops", "keep", "final_keep"} - {key}:
                if other not in overrides or overrides[other] is None:
                    data.pop(other, None)
            # and a schedule tied to the old target (explicit keep, calibrated flops) falls back to the default
            if key != "keep" and overrides.get("schedule") is None and data.get("schedule") != "linear":
                data.pop("schedule", None)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise _explain(e, source) from None
