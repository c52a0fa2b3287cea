"""The timeline that splits a fit's wall time into parts (workers/timeline.py)."""

from __future__ import annotations

import os

import pytest

from workers.timeline import Timeline, fit_parts, parts_line


def test_parts_are_the_times_between_marks_in_order(monkeypatch):
    clock = iter([10.0, 12.5, 13.0, 16.0])
    monkeypatch.setattr("workers.timeline.time.time", lambda: next(clock))
    timeline = Timeline()
    for part in ("data", "model", "steps"):
        timeline.mark(part)
    assert timeline.parts() == [("data", 2.5), ("model", 0.5), ("steps", 3.0)]
    assert timeline.to_dict() == {
        "started": 10.0,
        "ended": 16.0,
        "parts": [["data", 2.5], ["model", 0.5], ["steps", 3.0]],
    }


def test_a_part_marked_twice_adds_up_in_its_first_place():
    timeline = Timeline(started=0.0)
    timeline.marks = [("steps", 2.0), ("checkpoint", 3.0), ("steps", 7.0)]
    assert timeline.parts() == [("steps", 6.0), ("checkpoint", 1.0)]


def test_a_fit_is_ray_start_up_then_the_chiefs_parts_then_the_tail():
    worker = {"started": 108.0, "ended": 115.0, "parts": [["data", 1.0], ["steps", 6.0]]}
    parts = fit_parts(100.0, 116.0, worker)
    assert parts == {"ray start-up": 8.0, "data": 1.0, "steps": 6.0, "ray tail": 1.0}
    assert sum(parts.values()) == pytest.approx(16.0)
    assert parts_line(parts) == "16.0 s: ray start-up 8.0, data 1.0, steps 6.0, ray tail 1.0"


def test_a_fit_without_a_timeline_is_one_part():
    assert fit_parts(100.0, 103.5, None) == {"fit": 3.5}


def test_connecting_to_ray_shortens_train_s_poll_unless_the_user_set_it(monkeypatch):
    import ray

    from jobs import ray_train

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    ray_train.connect_ray()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == ray_train.HEALTH_CHECK_INTERVAL_S
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    ray_train.connect_ray()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
