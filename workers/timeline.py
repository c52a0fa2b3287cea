"""Where a run's wall time goes: a process marks the end of each part of its run, and the driver adds the parts it
alone sees (Ray's start-up before the train function runs, the tail after it returns).

Marks are wall-clock times (``time.time()``), so the driver can set a worker's marks against its own; on one host
the clocks are the same, across hosts they agree to within NTP's skew, which is small beside these parts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any


class Timeline:
    """The ends of one process's parts, in order: ``mark("data")`` ends the part called "data", which began at the
    previous mark (or when the timeline was made)."""

    def __init__(self, started: float | None = None):
        self.started = time.time() if started is None else started
        self.marks: list[tuple[str, float]] = []

    def mark(self, part: str) -> None:
        self.marks.append((part, time.time()))

    def parts(self) -> list[tuple[str, float]]:
        """(part, seconds) in order; a part marked twice (a resumed loop) adds up under its first place."""
        durations: dict[str, float] = {}
        previous = self.started
        for part, at in self.marks:
            durations[part] = durations.get(part, 0.0) + (at - previous)
            previous = at
        return list(durations.items())

    def to_dict(self) -> dict[str, Any]:
        """What a worker returns to the driver (plain types: it crosses Ray)."""
        ended = self.marks[-1][1] if self.marks else self.started
        return {"started": self.started, "ended": ended, "parts": [[p, s] for p, s in self.parts()]}


def fit_parts(fit_started: float, fit_ended: float, worker: Mapping[str, Any] | None) -> dict[str, float]:
    """A fit's wall time in parts: Ray's start-up until the chief's train function ran, the chief's own parts, and
    the tail until fit() returned. Without the chief's timeline (a fit that returned none), the fit as one part."""
    if not worker:
        return {"fit": fit_ended - fit_started}
    parts = {"ray start-up": worker["started"] - fit_started}
    for part, seconds in worker["parts"]:
        parts[part] = parts.get(part, 0.0) + seconds
    parts["ray tail"] = fit_ended - worker["ended"]
    return parts


def parts_line(parts: Mapping[str, float]) -> str:
    """ "20.4 s: ray start-up 9.1, set-up 2.3, steps 1.8, ..." for a log."""
    total = sum(parts.values())
    return f"{total:.1f} s: " + ", ".join(f"{part} {seconds:.1f}" for part, seconds in parts.items())
