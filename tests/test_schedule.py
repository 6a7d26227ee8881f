"""The learning rate is a pure function of the step (`lr_at`): warmup, then cosine, constant or
warmup-stable-decay, at the values the formulas give."""

from __future__ import annotations

import math

import pytest

from lmforge.train.schedule import lr_at

BASE = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)


def test_warmup_is_linear_from_lr_over_warmup_steps():
    for kind in ("cosine", "constant", "wsd"):
        assert lr_at(0, kind=kind, **BASE) == pytest.approx(1e-4)  # (0 + 1) / 10 of lr
        assert lr_at(4, kind=kind, **BASE) == pytest.approx(5e-4)
        assert lr_at(9, kind=kind, **BASE) == pytest.approx(1e-3)


def test_cosine_decays_to_min_lr_at_max_steps_and_stays():
    assert lr_at(10, kind="cosine", **BASE) == pytest.approx(1e-3)
    # halfway through the decay: min + (lr - min) / 2
    assert lr_at(60, kind="cosine", **BASE) == pytest.approx(1e-4 + 0.5 * 9e-4)
    quarter = 1e-4 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 9e-4
    assert lr_at(35, kind="cosine", **BASE) == pytest.approx(quarter)
    assert lr_at(110, kind="cosine", **BASE) == pytest.approx(1e-4)
    assert lr_at(500, kind="cosine", **BASE) == pytest.approx(1e-4)


def test_cosine_decay_steps_fix_the_curve_whatever_max_steps_is():
    """What lets a finished run be extended with the same curve: decay_steps, not max_steps."""
    for step in (10, 30, 59, 80):
        a = lr_at(step, kind="cosine", **{**BASE, "max_steps": 60}, decay_steps=80)
        b = lr_at(step, kind="cosine", **{**BASE, "max_steps": 200}, decay_steps=80)
        assert a == b


def test_constant_holds_lr_after_warmup():
    assert {lr_at(s, kind="constant", **BASE) for s in (10, 50, 109, 1000)} == {1e-3}


def test_wsd_holds_then_decays_linearly_over_the_last_fraction():
    # decay over the last 20 % of 110 steps: from step 88 to 110
    assert lr_at(87, kind="wsd", **BASE) == 1e-3
    assert lr_at(88, kind="wsd", **BASE) == pytest.approx(1e-3)
    assert lr_at(99, kind="wsd", **BASE) == pytest.approx(1e-3 + (11 / 22) * (1e-4 - 1e-3))
    assert lr_at(110, kind="wsd", **BASE) == pytest.approx(1e-4)
    assert lr_at(99, kind="wsd", **BASE, wsd_decay_fraction=0.5) == pytest.approx(
        1e-3 + ((99 - 55) / 55) * (1e-4 - 1e-3)
    )


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(50, kind="linear", **BASE)
