"""The calibration's Optuna study: where it is stored, what it was created for, and which process owns each trial.

Storage: any Optuna storage (an RDB URL, an SQLite file, or a journal file for workers on several machines),
opened with load_if_exists, so a rerun resumes and several processes share one study. The study remembers what
it was created for (the model's fingerprint, the budget, the calibration data, ...) and refuses another.

Ownership: every trial is created with its owner (host:pid) in the same write, so a process killed at any
point leaves no RUNNING trial without one; a rerun on the same host marks the trials of processes that are
gone as failed before it counts what is done (calibrate.py asks exactly what an uninterrupted run asks).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from datetime import datetime
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from .errors import SimbaError
from .model import MambaLM
from .settings import CalibratedSchedule

JOURNAL_SUFFIXES = (".log", ".journal")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
IDENTITY_KEY = "simba_calibration"  # study user attr: what the study was created for
WORKER_KEY = "worker"  # trial user attr: host:pid of the process that runs it


def open_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """An Optuna storage from a URL or a file name (None: in memory); a one-line SimbaError about `storage`
    when it cannot be opened."""
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
        raise SimbaError(f"storage {hide_password(url)}: cannot open ({_first_line(e)})", "storage") from None
    raise SimbaError(
        f"storage {url}: not an Optuna storage; give a URL (sqlite:///file.db, postgresql://...), "
        f"a {'/'.join(SQLITE_SUFFIXES)} file or a {'/'.join(JOURNAL_SUFFIXES)} journal file", "storage"
    )


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


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


def where(s: CalibratedSchedule) -> str:
    """How messages and reports name the study's storage (password hidden)."""
    return "memory" if s.storage is None else hide_password(s.storage)


def fingerprint(model: MambaLM) -> str:
    """A short hash of the weights (a strided sample of every tensor), to recognise the model a study was for."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().float().flatten().cpu()
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].numpy().tobytes())
    return h.hexdigest()[:16]


def identity(model: MambaLM, windows: torch.Tensor, s: CalibratedSchedule, protect: int, model_name: str) -> dict:
    """What a study is for: a rerun that differs in any of these (model_name apart) is refused. The keys are
    those of earlier versions, so their studies resume."""
    return {
        "model": fingerprint(model),
        "flops": s.flops,
        "criterion": s.criterion,
        "seq_len": s.seq_len,
        "protect_last": s.protect_last,
        "granularity": s.granularity,
        "form": s.form,
        "objective": s.objective,
        "protect": protect,
        "knots": s.knots,
        "calibration windows": hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()[:16],
        "model_name": model_name,  # for the message only
    }


def open_study(s: CalibratedSchedule, ident: dict) -> optuna.Study:
    """The study s.study_name in s.storage, created for `ident` or refused when it was created for another."""
    storage = open_storage(s.storage)
    at = where(s)
    try:
        study = optuna.create_study(storage=storage, study_name=s.study_name, direction="minimize", load_if_exists=True)
    except Exception as e:
        raise SimbaError(f"storage {at}: cannot create or load study {s.study_name!r} ({_first_line(e)})",
                         "storage") from None
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise SimbaError(f"study_name {s.study_name}: this study in {at} maximizes; it is not a calibration",
                         "study_name")
    old = study.user_attrs.get(IDENTITY_KEY)
    if old is None:
        if study.get_trials(deepcopy=False):
            raise SimbaError(f"study_name {s.study_name}: this study in {at} was not created by simba-compress",
                             "study_name")
        study.set_user_attr(IDENTITY_KEY, ident)
        return study
    for key, value in ident.items():
        if key != "model_name" and old.get(key) != value:
            what = f"{key} {old.get(key)!r}" + (f" ({old['model_name']})" if key == "model" and old.get("model_name") else "")
            raise SimbaError(
                f"study_name {s.study_name}: this study in {at} was created for {what}, not {value!r}; "
                "pass another study_name or storage", "study_name"
            )
    return study


def worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def ask(study: optuna.Study) -> optuna.Trial:
    """study.ask(), with this process recorded as the trial's owner in the same write that creates the trial.

    An owner set after the ask (trial.set_user_attr) leaves a window in which a process killed between the two
    writes leaves a RUNNING trial that no rerun can tell is dead: it is never failed, every later run counts it
    as live and runs one trial fewer. Optuna's storages create a trial from a template in one transaction (RDB)
    or one journal record, so the owner lands with it.
    """
    template = FrozenTrial(
        number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(), datetime_complete=None,
        params={}, distributions={}, user_attrs={WORKER_KEY: worker()}, system_attrs={}, intermediate_values={},
        trial_id=-1,
    )
    # study._storage / _study_id: the storage object and id that study.ask() itself creates trials through
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return optuna.Trial(study, trial_id)


def fail_dead_trials(study: optuna.Study) -> int:
    """RUNNING trials whose owner on this host is gone (killed) become FAIL: they will never finish. Returns how
    many. Owners on other hosts cannot be checked from here: their trials stay as they are."""
    host, failed = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner_host, _, pid = str(t.user_attrs.get(WORKER_KEY, "")).rpartition(":")
        if owner_host == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed += 1
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
