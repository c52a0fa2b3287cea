"""The loop's device-side record of the loss parts (workers.loop.LossWindow): the means of a log window, and the
first non-finite step and part, across the folds that keep its buffer at a fixed size."""

from __future__ import annotations

import math

import pytest
import torch

from workers.loop import LossWindow

NAMES = ["loss", "recon", "kl"]


@pytest.fixture(autouse=True)
def small_buffer(monkeypatch):
    monkeypatch.setattr(LossWindow, "ROWS", 4)  # folds every 4 steps, so a window of 10 steps crosses two folds


def add(window: LossWindow, loss: float, recon: float, kl: float) -> None:
    window.add(torch.tensor(loss), {"recon": torch.tensor(recon), "kl": torch.tensor(kl)})


def test_means_over_a_window_that_crosses_folds_then_a_fresh_window():
    window = LossWindow(NAMES, torch.device("cpu"), first_step=0)
    steps = [(float(i), 2.0 * i, 0.5 * i) for i in range(10)]
    for values in steps:
        add(window, *values)
    means, diverged = window.read()
    assert diverged is None
    assert means == pytest.approx({"loss": 4.5, "recon": 9.0, "kl": 2.25})
    assert window._rows.shape == (4, 3)  # fixed, however long the window
    add(window, 1.0, 2.0, 3.0)
    assert window.read() == ({"loss": 1.0, "recon": 2.0, "kl": 3.0}, None)


@pytest.mark.parametrize(
    "bad_at, bad_values, expected_part",
    [
        (6, (math.nan, 1.0, math.nan), "kl"),  # a part is named before the total
        (3, (math.inf, math.inf, 0.0), "recon"),  # the first bad part in order
        (9, (math.nan, 1.0, 1.0), "loss"),  # only the total: the total is named
    ],
)
def test_the_first_non_finite_step_and_part_are_named(bad_at, bad_values, expected_part):
    start = 100  # a resumed run: steps are counted from where it started
    window = LossWindow(NAMES, torch.device("cpu"), first_step=start)
    for i in range(12):
        if i == bad_at:
            add(window, *bad_values)
        elif i > bad_at:
            add(window, math.inf, math.inf, math.inf)  # later bad steps do not replace the first
        else:
            add(window, 1.0, 1.0, 1.0)
    means, diverged = window.read()
    assert means == {} and diverged == (start + bad_at + 1, expected_part)


def test_a_bad_step_in_an_earlier_window_is_still_reported_after_a_read():
    window = LossWindow(NAMES, torch.device("cpu"), first_step=0)
    add(window, 1.0, 1.0, 1.0)
    assert window.read()[1] is None
    add(window, 1.0, 1.0, 1.0)
    add(window, 1.0, math.nan, 1.0)
    assert window.read() == ({}, (3, "recon"))
