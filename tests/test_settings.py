"""Settings objects (issue 25): one class per kind of schedule, validated once, naming fields; compress() applies
one by its type; the keyword form of earlier versions; what `import simba_compress` loads."""

import subprocess
import sys

import pytest
import torch

from conftest import random_model
from simba_compress import (CalibratedSchedule, ExplicitSchedule, FinetuneConfig, LinearSchedule, SimbaError, compress,
                            load_windows)
from simba_compress.calibrate import calibrate
from simba_compress.flops import count
from simba_compress.schedules import linear, linear_for_flops


@pytest.fixture(scope="module")
def model():
    return random_model(n_layer=6, d_model=16, vocab=64)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LinearSchedule(flops=0.6, final_keep=0.2), "flops: give exactly one of flops and final_keep"),
        (lambda: LinearSchedule(), "flops: give exactly one of flops and final_keep"),
        (lambda: LinearSchedule(final_keep=0.0), "final_keep: must be in (0, 1], got 0.0"),
        (lambda: LinearSchedule(flops=0.6, form="quick"), "form: 'quick' is not one of fast, exact"),
        (lambda: LinearSchedule(flops=0.6, granularity=128), "granularity: a staircase of its own; use it with form 'exact'"),
        (lambda: CalibratedSchedule(flops=0.6, granularity=128), "granularity: a staircase of its own"),
        (lambda: CalibratedSchedule(flops=0.6, timeout=0), "timeout: must be > 0, got 0"),
        (lambda: CalibratedSchedule(flops=0.6, knots=2.5), "knots: expected an integer, got 2.5"),
        (lambda: ExplicitSchedule(keep=[0.9, 0.5]), "keep: the first layer must keep 1.0, got 0.9"),
        (lambda: ExplicitSchedule(keep=[1.0, 0.5, 0.7]), "keep: layer 2 has 0.7; ratios must be in (0, 1] and never increase"),
        (lambda: ExplicitSchedule(keep=[1.0], criterion="best"), "criterion: 'best' is not one of simba, query, recent-query, share"),
        (lambda: ExplicitSchedule(keep=[1.0], protect_last=0), "protect_last: must be >= 1, got 0"),
        (lambda: FinetuneConfig(distill_weight=2), "distill_weight: must be in [0, 1], got 2"),
        (lambda: FinetuneConfig(lr=0), "lr: must be > 0, got 0"),
    ],
)
def test_settings_are_checked_once_when_made_and_name_the_field(make, message):
    with pytest.raises(SimbaError) as e:
        make()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert e.value.field == message.split(":")[0]
    assert str(e.value.within("schedule")).startswith("schedule." + message)
    assert str(e.value.within("schedule").renamed("--flag")).startswith("--flag" + message[len(e.value.field):])


def test_granularity_goes_with_the_exact_form_and_with_schedules_without_a_budget():
    assert LinearSchedule(flops=0.6, form="exact", granularity=128).granularity == 128
    assert LinearSchedule(final_keep=0.3, granularity=128).granularity == 128  # the form applies to a budget only
    assert ExplicitSchedule(keep=[1.0, 0.5], granularity=64).keep == [1.0, 0.5]


def test_the_type_of_the_settings_picks_what_compress_does(model):
    """Linear: the fitted paper schedule; explicit: the ratios given; calibrated: calibrate()'s search; each with
    the shared settings (criterion, protected tail, caps) and its provenance."""
    cfg = model.config
    s = compress(model, LinearSchedule(flops=0.6, criterion="utr", protect_last=4))
    assert model.simba is s and s.criterion == "utr" and s.protect_last == 4 and s.align
    assert s.keep == linear_for_flops(cfg, LinearSchedule(flops=0.6, criterion="utr", protect_last=4)).keep
    assert s.extra == {"schedule": "linear", "flops_target": 0.6, "seq_len": 1024, "form": "fast"}
    s = compress(model, LinearSchedule(final_keep=0.3, max_tokens="100@3"))
    assert s.keep == pytest.approx(linear(6, 0.3)) and s.max_tokens == [0, 0, 0, 100, 100, 100]
    s = compress(model, ExplicitSchedule(keep=[1, 1, 0.5, 0.5, 0.25, 0.25], seed=3, criterion="random"))
    assert (s.keep, s.seed, s.extra["schedule"]) == ([1, 1, 0.5, 0.5, 0.25, 0.25], 3, "explicit")
    windows = torch.randint(0, 64, (4, 129), generator=torch.Generator().manual_seed(0))
    searched = CalibratedSchedule(flops=0.6, trials=4)
    s = compress(model, searched, windows=windows)
    expected, study = calibrate(model, windows, searched, progress=False)
    assert s.keep == expected.keep and s.extra["trial"] == study.best and abs(count(cfg, s, 1024).ratio - 0.6) < 0.006
    with pytest.raises(SimbaError, match=r"^windows: a CalibratedSchedule is searched on calibration windows"):
        compress(model, searched)
    with pytest.raises(SimbaError, match=r"^keep: 2 ratios for a model of 6 layers"):
        compress(model, ExplicitSchedule(keep=[1.0, 0.5]))
    with pytest.raises(SimbaError, match=r"^max_tokens 100@9: the first capped layer must be in \[1, 5\]"):
        compress(model, LinearSchedule(final_keep=0.3, max_tokens="100@9"))
    with pytest.raises(TypeError, match="LinearSchedule, CalibratedSchedule or ExplicitSchedule, not dict"):
        compress(model, {"flops": 0.6})


def test_the_keyword_form_of_earlier_versions_still_works_deprecated(model):
    with pytest.warns(DeprecationWarning, match=r"LinearSchedule\(flops=...\)"):
        old = compress(model, flops=0.6, criterion="share", seq_len=2048, form="exact")
    assert old == compress(model, LinearSchedule(flops=0.6, criterion="share", seq_len=2048, form="exact"))
    with pytest.warns(DeprecationWarning):
        assert compress(model, keep=[1.0] * 6, form="fast").keep == [1.0] * 6
    with pytest.raises(TypeError, match="unexpected keyword argument 'flop'"):
        compress(model, flop=0.6)
    with pytest.raises(TypeError, match="not both"):
        compress(model, LinearSchedule(flops=0.6), criterion="utr")


def test_windows_for_the_calibrated_kind():
    """load_windows is exported for the calibrated kind's windows: (n, length) tokens of the text."""
    from simba_compress import load_tokenizer

    w = load_windows("demo", load_tokenizer("demo"), 65, 3)
    assert w.shape == (3, 65) and w.dtype == torch.long


def test_import_loads_neither_the_training_loop_nor_the_search():
    code = ("import sys, simba_compress\n"
            "print(sorted(m for m in ('accelerate', 'optuna', 'simba_compress.finetune', 'simba_compress.calibrate') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
