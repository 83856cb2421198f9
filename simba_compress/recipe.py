"""Recipes: one YAML file that states a compression run completely, validated, and saved beside its output.

    model: demo
    output: out/demo-recipe
    schedule: {kind: calibrated, flops: 0.6, trials: 40}   # a settings object of settings.py, by its kind
    calibration: {data: demo, samples: 16, seq_len: 1024}
    finetune: {steps: 0}

CLI flags override recipe values; both go through the same schema, so a bad flag and a bad recipe key fail
the same way: one line naming the file (or, through the CLI, the flag), the key and the problem. Recipes of
earlier versions held the schedule's settings at the top level (`flops: 0.6`, `schedule: linear`, `trials: 40`,
...); they load as they did.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from .errors import SimbaError
from .settings import KINDS, FinetuneConfig, PruningSettings, Schedule

TARGETS = ("flops", "keep", "final_keep")
# every key a schedule of any kind takes: in an earlier version's recipe, these sat at the top level
SCHEDULE_KEYS = {f.name for kind in KINDS.values() for f in fields(kind)}


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
    schedule: Schedule  # LinearSchedule, CalibratedSchedule or ExplicitSchedule (settings.py); `kind` in YAML
    calibration: CalibrationData = CalibrationData()  # the text a search scores and the report measures on
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)  # recovery fine-tune (finetune.py); steps 0: none
    finetune_dir: str | None = None  # its resumable state; None: <output>.finetune beside the output
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @field_validator("schedule", mode="wrap")
    @classmethod
    def _schedule(cls, value, handler):
        if isinstance(value, PruningSettings):
            return value
        if not isinstance(value, dict):
            raise ValueError("a mapping of settings with their kind (linear, calibrated or explicit)")
        section = dict(value)
        kind = section.pop("kind", None) or _infer_kind(section)
        if kind not in KINDS:
            raise SimbaError(f"schedule.kind: {kind!r} is not one of {', '.join(KINDS)}", "schedule.kind")
        try:
            return TypeAdapter(KINDS[kind]).validate_python(section)
        except SimbaError as e:
            raise e.within("schedule") from None

    @field_validator("finetune", mode="wrap")
    @classmethod
    def _finetune(cls, value, handler):
        try:
            return handler(value)
        except SimbaError as e:
            raise e.within("finetune") from None

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        settings = asdict(self.schedule)  # the kind and its target first, as one reads a recipe
        first = {"kind": self.schedule.kind} | {t: settings.pop(t) for t in TARGETS if t in settings}
        data["schedule"] = first | settings
        return yaml.safe_dump(data, sort_keys=False)


def _infer_kind(section: dict) -> str:
    """The kind a schedule section without one has: explicit with keep, calibrated with flops, linear with
    final_keep (as the CLI reads --keep, --flops and --final-keep)."""
    given = [k for k in TARGETS if section.get(k) is not None]
    if len(given) > 1:
        raise SimbaError(f"schedule: give only one of flops, keep, final_keep (got {', '.join(given)})", "schedule")
    if not given:
        raise SimbaError("schedule: give a target: flops (e.g. 0.6), final_keep, or keep", "schedule")
    return {"keep": "explicit", "flops": "calibrated", "final_keep": "linear"}[given[0]]


def _nested(data: dict) -> tuple[dict, bool]:
    """`data` with its schedule settings in the `schedule` section, and whether it was an earlier version's flat
    recipe (whose keys were allowed whatever the schedule's kind: those of other kinds are dropped)."""
    data = dict(data)
    if isinstance(data.get("schedule"), dict):
        return data | {"schedule": dict(data["schedule"])}, False
    section = {k: data.pop(k) for k in SCHEDULE_KEYS & data.keys()}
    kind = data.pop("schedule", None)
    if kind is not None:
        section["kind"] = kind
    if section.get("keep") is not None:  # earlier versions: a keep list made the schedule explicit
        section["kind"] = "explicit"
    data["schedule"] = section
    return data, True


def _explain(e: ValidationError) -> SimbaError:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # a model's / a dataclass's extra key
        msg = "unknown key"
    return SimbaError(f"{key}: {msg}", key or None)


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
    """Validate `base` (a recipe file's mapping, of this version or an earlier one) with `overrides` on top.

    overrides: values by key ("model", "schedule.flops", "calibration.samples", "finetune.steps"; an earlier
    version's top-level schedule keys, "flops", are read as "schedule.flops"), None for not given. A flag's
    target (flops, keep, final_keep) replaces the recipe's, and the recipe's kind of schedule when it was tied
    to the old target. Errors about a key from `overrides` keep it as their field for the caller to name (the
    CLI names its flag); errors about the base name `source`.
    """
    data, flat = _nested(base or {})
    try:  # the kind the recipe itself meant, if any
        base_kind = data["schedule"].get("kind") or _infer_kind(data["schedule"])
    except SimbaError:
        base_kind = None
    given: dict = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in SCHEDULE_KEYS or key == "schedule":
            key = "schedule." + ("kind" if key == "schedule" else key)
        given[key] = value
        head, dot, sub = key.partition(".")
        if dot:  # schedule.flops, calibration.samples, finetune.steps, ...: one key of a section
            if not isinstance(data.get(head, {}), dict):
                data[head] = {}
            data[head] = {**data.get(head, {}), sub: value}
        else:
            data[key] = value
    section = data["schedule"]
    new_targets = [t for t in TARGETS if f"schedule.{t}" in given]
    if new_targets:  # a flag's target replaces the recipe's
        for other in set(TARGETS) - set(new_targets):
            section.pop(other, None)
        # and a kind tied to the old target (explicit keep, calibrated flops) gives way to the one inferred
        if "schedule.kind" not in given and not (section.get("kind") == "linear" and "keep" not in new_targets):
            section.pop("kind", None)
    try:
        kind = section.get("kind") or _infer_kind(section)
        section["kind"] = kind
        if kind in KINDS:
            allowed = {f.name for f in fields(KINDS[kind])} | {"kind"}
            for key in [k for k in section if k in SCHEDULE_KEYS - allowed]:  # another kind's setting
                if f"schedule.{key}" not in given and (flat or kind != base_kind):  # written when allowed: unused
                    del section[key]
                else:
                    raise SimbaError(f"schedule.{key}: not a setting of a {kind} schedule", f"schedule.{key}")
        return Recipe.model_validate(data)
    except ValidationError as e:
        err = _explain(e)
    except SimbaError as e:
        err = e
    if err.field is not None and err.field in given:
        raise err from None
    raise SimbaError(f"{source}: {err}") from None
