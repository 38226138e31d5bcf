"""Learning-rate schedules: exact values at known steps."""

from __future__ import annotations

import math

import pytest

from ember.pretrain.config import TrainConfig
from ember.pretrain.schedule import lr_at


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1.0, "min_lr_ratio": 0.1, "max_steps": 110, "warmup_steps": 10, **kw})


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_warmup_is_linear_to_the_peak(schedule):
    c = cfg(schedule=schedule)
    assert lr_at(1, c) == pytest.approx(0.1)
    assert lr_at(5, c) == pytest.approx(0.5)
    assert lr_at(10, c) == pytest.approx(1.0)


def test_cosine_values():
    c = cfg(schedule="cosine")
    assert lr_at(60, c) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_at(35, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(110, c) == pytest.approx(0.1)
    assert lr_at(500, c) == pytest.approx(0.1)  # past the end: the floor


def test_linear_values():
    c = cfg(schedule="linear")
    assert lr_at(60, c) == pytest.approx(0.55)
    assert lr_at(85, c) == pytest.approx(1.0 - 0.9 * 0.75)
    assert lr_at(110, c) == pytest.approx(0.1)


def test_wsd_is_stable_then_decays_linearly_to_the_floor():
    c = cfg(schedule="wsd", max_steps=100, decay_fraction=0.2)
    assert lr_at(11, c) == lr_at(80, c) == 1.0
    assert lr_at(90, c) == pytest.approx(0.55)
    assert lr_at(100, c) == pytest.approx(0.1)


def test_floor_zero_and_no_warmup():
    c = cfg(schedule="cosine", warmup_steps=0, min_lr_ratio=0.0, max_steps=4)
    assert [round(lr_at(s, c), 6) for s in range(1, 5)] == [round(0.5 * (1 + math.cos(math.pi * s / 4)), 6) for s in range(1, 5)]
    assert lr_at(4, c) == 0.0


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_never_increases_after_warmup(schedule):
    c = cfg(schedule=schedule)
    values = [lr_at(s, c) for s in range(10, 120)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert min(values) == pytest.approx(0.1)
