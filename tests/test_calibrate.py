"""Schedule calibration (issue 3): the search, its storage (resume after SIGKILL, two workers), the outputs, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from conftest import random_model
from simba_compress.calibrate import calibrate
from simba_compress.cli import main
from simba_compress.errors import SimbaError
from simba_compress.evaluate import evaluate
from simba_compress.flops import count
from simba_compress.recipe import build_recipe
from simba_compress.pruning import SimbaConfig
from simba_compress.schedules import FAST_LEVELS, FLOP_TOLERANCE, fast_tolerance, linear_for_flops
from simba_compress.settings import CalibratedSchedule, LinearSchedule

optuna.logging.set_verbosity(optuna.logging.WARNING)
SEQ = 1024  # the FLOP ratio's input length; the windows themselves are short
# One thread per process: the worker tests run two at once, and a busy 2-core machine punishes oversubscription.
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return random_model(n_layer=6, d_model=16, vocab=64)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 64, (4, 129), generator=torch.Generator().manual_seed(0))


def search(model, windows, **kw):
    kw = {"flops": 0.6, "seq_len": SEQ, "trials": 8} | kw
    return calibrate(model, windows, CalibratedSchedule(**kw), progress=False)


def test_prefix_and_last_logits_match_the_full_forward(model, windows):
    x = windows[:, :-1]
    sched = linear_for_flops(model.config, LinearSchedule(flops=0.6, protect_last=8, form="exact"))
    prefix = model.prefix(x)
    with torch.no_grad():
        for simba in (None, sched):
            full = model(x, simba=simba).logits[:, -8:]
            torch.testing.assert_close(model(x, simba=simba, prefix=prefix, last_logits=8).logits, full)


@pytest.mark.parametrize("objective, form", [("loss", "exact"), ("kl", "exact"), ("kl", "fast")])
def test_meets_the_budget_and_is_never_worse_than_linear(model, windows, objective, form):
    simba, res = search(model, windows, objective=objective, form=form)
    tol = FLOP_TOLERANCE * 0.6 if form == "exact" else fast_tolerance(model.config, simba, 0.6, SEQ)
    assert abs(count(model.config, simba, SEQ).ratio - 0.6) <= tol and res.tolerance == pytest.approx(tol)
    assert simba.keep[0] == 1.0 and all(a >= b for a, b in zip(simba.keep, simba.keep[1:]))
    if form == "fast":  # a staircase of the form's levels, and so is every evaluated trial
        assert set(simba.keep) <= set(FAST_LEVELS)
        assert all(k in FAST_LEVELS for r in res.trials if r.loss is not None for k in r.keep)
    base, best = res.row(0), res.row(res.best)
    assert res.baseline == 0 and base.baseline
    linear = linear_for_flops(model.config, LinearSchedule(flops=0.6, seq_len=SEQ, form=form))
    assert base.keep == pytest.approx(linear.keep, abs=1e-12) and res.linear_keep == linear.keep
    assert best.loss <= base.loss and len(res.trials) == 8
    if objective == "loss":  # the objective is the evaluation headline on the calibration windows
        head = evaluate(model, windows, res.protect, simba=simba, all_positions=False, progress=False)
        assert head.loss == pytest.approx(best.loss, abs=1e-5)
    else:
        assert best.loss >= 0


def test_schedules_that_run_the_same_tokens_are_scored_once(model, windows, monkeypatch):
    """Trials whose schedules keep the same tokens in every layer of the calibration windows (in the fast form:
    the same staircase, or levels the protected tail makes equal) share one forward pass and one value."""
    import simba_compress.calibrate as cal

    scored, score = [], cal._Scorer.__call__

    def counted(self, simba):
        tokens = tuple(cal.protected(simba, self.protect).counts(torch.tensor([windows.shape[1] - 1]))[:, 0].tolist())
        scored.append(tokens)
        return score(self, simba)

    monkeypatch.setattr(cal._Scorer, "__call__", counted)
    # at 128 tokens with the last 32 protected, 1/4, 1/8 and 1/16 all keep 32: staircases that differ only there
    _, res = search(model, windows, form="fast", trials=16, seq_len=128, protect_last=32)
    assert len(scored) == len(set(scored))  # never the same tokens twice
    evaluated = [r for r in res.trials if r.loss is not None and math.isfinite(r.loss)]
    assert len(evaluated) > len(scored)  # some trials took an earlier trial's value
    by_tokens: dict[tuple, float] = {}
    for r in evaluated:
        simba = cal.protected(SimbaConfig(r.keep, protect_last=32), res.protect)
        tokens = tuple(simba.counts(torch.tensor([windows.shape[1] - 1]))[:, 0].tolist())
        assert by_tokens.setdefault(tokens, r.loss) == r.loss


def test_below_the_linear_reach_the_baseline_is_skipped(model, windows):
    simba, res = search(model, windows, flops=0.3, form="exact")
    assert abs(count(model.config, simba, SEQ).ratio - 0.3) <= FLOP_TOLERANCE * 0.3
    assert res.baseline is None and "linear baseline skipped" in res.baseline_note
    assert res.summary()["linear"] is None


def test_deterministic_with_a_seed(model, windows):
    a, _ = search(model, windows, seed=3, trials=5)
    b, _ = search(model, windows, seed=3, trials=5)
    assert a.keep == b.keep


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"flops": 0.0}, "flops: must be in (0, 1], got 0.0"),
        ({"flops": 1.5}, "flops: must be in (0, 1], got 1.5"),
        ({"trials": 0}, "trials: must be >= 1, got 0"),
        ({"objective": "mse"}, "objective: 'mse' is not one of loss, kl"),
        ({"granularity": 64}, "granularity: a staircase of its own; use it with form 'exact'"),
        ({"flops": 0.05}, "flops 0.05: below what the calibrated schedules reach"),
        ({"flops": 0.99}, "flops 0.99: no fast-form schedule of 6 layers"),  # before any trial runs
        ({"storage": "sqlite:////no/such/folder/s.db"}, "storage sqlite:////no/such/folder/s.db: cannot open"),
        ({"storage": "nosuchdialect://host/db"}, "storage nosuchdialect://host/db: cannot open"),
        ({"storage": "/no/such/folder/s.log"}, "storage /no/such/folder/s.log: cannot open"),
        ({"storage": "study.txt"}, "storage study.txt: not an Optuna storage"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(model, windows, kw, message):
    with pytest.raises(SimbaError) as e:
        search(model, windows, **kw)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert e.value.field == message.split(":")[0].split()[0]


def test_a_study_for_another_budget_or_model_is_refused(model, windows, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    search(model, windows, storage=storage, trials=2)
    with pytest.raises(SimbaError, match=r"was created for flops 0.6, not 0.5; pass another study_name"):
        search(model, windows, storage=storage, trials=2, flops=0.5)
    with pytest.raises(SimbaError, match=r"was created for model '\w+'"):
        search(random_model(n_layer=6, d_model=16, vocab=64, seed=1), windows, storage=storage, trials=2)
    study = optuna.load_study(study_name="simba-calibration", storage=storage)
    assert len(study.trials) == 2  # nothing lost; a rerun of the original resumes
    _, res = calibrate(model, windows, CalibratedSchedule(flops=0.6, seq_len=SEQ, trials=3, storage=storage))
    assert res.trials_run == 1 and len(res.trials) == 3 and res.resumed_from == 2
    assert f"calibrate: resuming: 2 of 3 trials done in study 'simba-calibration' ({storage})" in capsys.readouterr().err


def test_recipe_defaults_to_calibrated_with_flops():
    kind = lambda base, flags=None: build_recipe({"model": "demo"} | base, flags).schedule.kind  # noqa: E731
    assert kind({"flops": 0.6}) == "calibrated"
    assert kind({"flops": 0.6, "schedule": "linear"}) == "linear"
    assert kind({"final_keep": 0.3}) == "linear"
    r = build_recipe({"model": "demo", "keep": [1, 0.5], "schedule": "explicit"}, {"schedule.flops": 0.7}, "flags")
    assert r.schedule.kind == "calibrated" and r.schedule.flops == 0.7 and not hasattr(r.schedule, "keep")
    assert kind({"flops": 0.6, "schedule": "linear"}, {"schedule.flops": 0.7}) == "linear"
    assert kind({"flops": 0.6}, {"schedule.final_keep": 0.3}) == "linear"
    with pytest.raises(SimbaError, match=r"recipe: schedule.flops: Field required"):
        build_recipe({"model": "demo", "final_keep": 0.3, "schedule": "calibrated"})


# --- the command line, for real: outputs, SIGKILL and resume, two workers ---------------------------------------


def command(checkpoint, output, trials, *extra):
    return [sys.executable, "-m", "simba_compress.cli", "--model", str(checkpoint), "--flops", "0.6", "--output",
            str(output), "--trials", str(trials), "--calib-samples", "8", "--calib-seq-len", "256", "--json", *extra]


def completed(trials_csv) -> list[tuple]:
    rows = list(csv.DictReader(open(trials_csv)))
    return [tuple(v for k, v in r.items() if k not in ("number", "seconds")) for r in rows if r["state"] == "COMPLETE"]


def test_outputs_of_a_calibrated_run(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(command(small_checkpoint, out, 3)[3:]) == 0
    report = json.loads(capsys.readouterr().out)
    s = report["search"]
    assert report["schedule"]["extra"]["schedule"] == "calibrated" and s["trials_complete"] == 3
    assert s["trials_per_minute"] > 0 and s["best"]["loss"] <= s["linear"]["loss"]
    assert s["storage"] == "study.db" and s["trials_before_this_run"] == 0  # where the study ended up
    assert 1 <= s["distinct_schedules"] <= 3
    for name in ("trials.csv", "schedule.json", "study.db", "calibration_loss_vs_flops.png", "keep_profile.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "schedule.json").read_text())["keep"] == report["schedule"]["keep"]
    assert len(list(csv.DictReader(open(out / "trials.csv")))) == 3
    assert not (tmp_path / "out.optuna.db").exists()  # the study moved into the folder
    study = optuna.load_study(study_name="simba-calibration", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 3


def test_sigkill_mid_study_then_rerun_equals_an_uninterrupted_run(small_checkpoint, tmp_path):
    trials, killed = 10, tmp_path / "killed"
    storage = f"sqlite:///{tmp_path / 'killed.optuna.db'}"
    straight = subprocess.Popen(command(small_checkpoint, tmp_path / "straight", trials), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)  # the reference, alongside
    proc = subprocess.Popen(command(small_checkpoint, killed, trials), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    done = 0
    while proc.poll() is None and done < 3:
        time.sleep(0.05)
        try:
            done = len(optuna.load_study(study_name="simba-calibration", storage=storage).get_trials(
                states=(optuna.trial.TrialState.COMPLETE,)))
        except Exception:  # the study is not created yet
            pass
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = optuna.load_study(study_name="simba-calibration", storage=storage).trials
    finished = [(t.number, t.params, t.value) for t in before if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) >= 3 and not killed.exists()

    r = subprocess.run(command(small_checkpoint, killed, trials), capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    resumed = json.loads(r.stdout)
    assert resumed["search"]["trials_run_here"] == trials - len(finished)
    after = optuna.load_study(study_name="simba-calibration", storage=f"sqlite:///{killed / 'study.db'}").trials
    assert [(t.number, t.params, t.value) for t in after[: len(finished)]] == finished  # kept as they were

    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    assert completed(killed / "trials.csv") == completed(tmp_path / "straight" / "trials.csv")
    assert resumed["schedule"]["keep"] == json.loads(out)["schedule"]["keep"]


KILLED_AT_ASK = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import optuna, torch
from conftest import random_model
from simba_compress.calibrate import calibrate
from simba_compress.settings import CalibratedSchedule
torch.set_num_threads(1)
init = optuna.trial.Trial.__init__

def dying(self, study, trial_id):  # trial {at} exists in the storage and nothing else has happened to it: die here
    if study._storage.get_trial(trial_id).number == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
    init(self, study, trial_id)

optuna.trial.Trial.__init__ = dying
model = random_model(n_layer=6, d_model=16, vocab=64)
windows = torch.randint(0, 64, (4, 129), generator=torch.Generator().manual_seed(0))
calibrate(model, windows, CalibratedSchedule(flops=0.6, seq_len=1024, trials={trials}, storage={url!r}), progress=False)
"""


def test_a_worker_killed_as_it_creates_a_trial_is_failed_and_the_rerun_equals_an_uninterrupted_one(
    model, windows, tmp_path
):
    """The resume race (issue 25): a process killed right after its trial is created, before anything else is
    written for it. The trial carries its owner from the start, so the rerun fails it and runs all the trials
    still missing (not one fewer), asking what an uninterrupted study asks."""
    import socket

    url, trials, at = f"sqlite:///{tmp_path / 's.db'}", 6, 3
    script = KILLED_AT_ASK.format(tests=str(Path(__file__).parent), at=at, trials=trials, url=url)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=ENV)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    before = optuna.load_study(study_name="simba-calibration", storage=url).trials
    assert [t.state.name for t in before] == ["COMPLETE"] * at + ["RUNNING"] and before[-1].params == {}
    assert before[-1].user_attrs == {"worker": f"{socket.gethostname()}:{proc.pid}"}

    _, resumed = search(model, windows, storage=url, trials=trials)
    assert resumed.trials_run == trials - at and resumed.resumed_from == at
    assert [r.state for r in resumed.trials] == ["COMPLETE"] * at + ["FAIL"] + ["COMPLETE"] * (trials - at)
    _, straight = search(model, windows, trials=trials)
    done = lambda res: [(r.params, r.keep, r.loss) for r in res.trials if r.state == "COMPLETE"]  # noqa: E731
    assert done(resumed) == done(straight)
    assert resumed.row(resumed.best).keep == straight.row(straight.best).keep


def test_two_workers_share_one_journal(small_checkpoint, tmp_path):
    journal, trials = tmp_path / "study.journal", 10
    workers = [
        subprocess.Popen(command(small_checkpoint, tmp_path / f"w{i}", trials, "--storage", str(journal), "--study-name", "team"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for i in range(2)
    ]
    reports = []
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
        reports.append(json.loads(out))
    study = optuna.load_study(study_name="team", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    ran = [r["search"]["trials_run_here"] for r in reports]
    # none twice, none lost (a worker that starts after the other has finished runs none: the PostgreSQL test
    # below starts its two together)
    assert sum(ran) == len(complete) == trials
    best = min((t for t in complete if t.value != float("inf")), key=lambda t: (t.value, t.number))
    assert best.number in [r["search"]["best"]["trial"] for r in reports]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--calib-data", "{tmp}/short.txt", "--calib-seq-len", "512"], "{tmp}/short.txt: 3 tokens, shorter than one sequence of 513"),
        (["--storage", "sqlite:////no/such/folder/s.db"], "--storage sqlite:////no/such/folder/s.db: cannot open"),
        (["--flops", "0.1"], "--flops 0.1: below what the calibrated schedules reach"),
        (["--trials", "0"], "--trials: must be >= 1, got 0"),
        (["--objective", "mse"], "--objective: Input should be 'loss' or 'kl'"),
        (["--schedule", "linear"], "--trials: not a setting of a linear schedule"),
    ],
)
def test_cli_bad_input_is_one_line_and_leaves_nothing(small_checkpoint, tmp_path, capsys, extra, message):
    (tmp_path / "short.txt").write_text("hello world")
    args = command(small_checkpoint, tmp_path / "o", 2, *[a.replace("{tmp}", str(tmp_path)) for a in extra])[3:]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("{tmp}", str(tmp_path)) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


# --- workers on a PostgreSQL server (.ci/run starts one and sets SIMBA_TEST_POSTGRES_URL) -------------------------

WORKER = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from conftest import random_model
from simba_compress.calibrate import calibrate
from simba_compress.settings import CalibratedSchedule
torch.set_num_threads(1)
model, folder = random_model(n_layer=6, d_model=16, vocab=64), Path({folder!r})
windows = torch.randint(0, 64, (4, 129), generator=torch.Generator().manual_seed(0))
(folder / "ready.{i}").touch()
while not (folder / "go").exists():  # both workers start their first trial together
    time.sleep(0.01)
_, res = calibrate(model, windows, CalibratedSchedule(flops=0.6, seq_len=1024, trials={trials}, storage={url!r},
                                                     study_name={name!r}), progress=False)
print(json.dumps({{"ran": res.trials_run, "best": res.best}}))
"""


@pytest.fixture
def postgres_url():
    """SIMBA_TEST_POSTGRES_URL in a schema of its own, empty (Optuna's tables not made yet), dropped afterwards."""
    import uuid

    url = os.environ.get("SIMBA_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("SIMBA_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)")
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        schema = f"simba_test_{uuid.uuid4().hex[:12]}"
        with engine.begin() as db:
            db.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    except Exception as e:  # no driver, no server, no database, no right to create a schema
        from simba_compress.study import hide_password

        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        pytest.skip(f"no PostgreSQL server at {hide_password(url)} ({first})")
    in_schema = sqlalchemy.engine.make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    yield in_schema.render_as_string(hide_password=False)
    with engine.begin() as db:
        db.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


def test_two_workers_finish_one_study_on_postgres(tmp_path, postgres_url):
    """Two processes start one study on a PostgreSQL server at the same moment, on an empty database: it ends
    with exactly `trials` complete trials, each asked once (distinct numbers and parameters), none lost (every
    trial a worker ran is recorded) and none left running."""
    url, name, trials = postgres_url, "simba-calibration", 12
    tests = str(Path(__file__).parent)
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER.format(tests=tests, folder=str(tmp_path), i=i, trials=trials,
                                                              url=url, name=name)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for i in range(2)
    ]
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"ready.{i}").exists() for i in range(2)):
            assert time.time() < deadline and all(w.poll() is None for w in workers), [w.communicate() for w in workers]
            time.sleep(0.05)
        (tmp_path / "go").touch()
        reports = []
        for w in workers:
            out, err = w.communicate(timeout=300)
            assert w.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
        study = optuna.load_study(study_name=name, storage=url)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(complete) == trials, [(t.number, t.state.name) for t in study.trials]
        assert len({t.number for t in study.trials}) == len(study.trials)
        assert len({tuple(sorted(t.params.items())) for t in complete}) == trials  # no parameters asked twice
        assert sum(r["ran"] for r in reports) == trials and all(r["ran"] >= 1 for r in reports)
        assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
        assert sum(bool(t.user_attrs.get("baseline")) for t in complete) == 1
    finally:
        for w in workers:
            w.kill()
