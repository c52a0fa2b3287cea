"""What a job and its readers (the queue service, `aeforge run`'s display) say to each other: job ids and the
marked lines a job prints.

A job's chief worker prints ``AEFORGE_PROGRESS {"step": s, "total": t, ...}`` at each log point, a sweep's trials
print ``AEFORGE_TRIAL {"trial": name, "state": ...}`` when they start and end, the job and its chief print
``AEFORGE_PHASE {"phase": ..., ...}`` as it goes from one phase to the next (PHASES: starting Ray, loading data,
training, evaluating, pictures, registering) and within a phase that has parts of its own (each metric of an
evaluation), and the entry point prints ``AEFORGE_RESULT {...}`` once at the end; the dispatcher and the CLI read them back from the job's log. Both sides
use this module, so the marks are written in one place. It imports nothing of aeforge: the service, the job entry
point and the training loop all depend on it.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import time
from typing import Any

PROGRESS_MARK = "AEFORGE_PROGRESS "
RESULT_MARK = "AEFORGE_RESULT "
TRIAL_MARK = "AEFORGE_TRIAL "
PHASE_MARK = "AEFORGE_PHASE "
MARKS = (PROGRESS_MARK, RESULT_MARK, TRIAL_MARK, PHASE_MARK)
# A job's phases, in the order it goes through them. "training" is told by the progress lines' steps; the others
# by phase lines, with their own parts (``done`` of ``total``) where they have some.
PHASES = ("starting Ray", "loading data", "training", "evaluating", "pictures", "registering")
# A sweep trial's states, in the order a trial goes through them.
TRIAL_STATES = ("running", "finished", "error")
_DECODER = json.JSONDecoder()


def new_job_id(name: str) -> str:
    """``<name slug>-<UTC time>-<random>``: readable, sortable by time, unique; the same for `aeforge run` and the
    queue."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:48] or "job"
    return f"{slug}-{stamp}-{secrets.token_hex(3)}"


def progress_line(
    step: int,
    total: int,
    *,
    metrics: dict[str, float] | None = None,
    images_per_second: float | None = None,
    trial: str | None = None,
    eta_s: float | None = None,
) -> str:
    """``AEFORGE_PROGRESS {"step": s, "total": t, ...}``: where a run is, and (optional) its latest loss parts, its
    speed, the seconds its remaining steps will take at the pace so far, and for a sweep the trial's run name.
    Readers need only ``step`` and ``total``; the rest may be absent."""
    payload: dict[str, Any] = {"step": step, "total": total}
    if metrics:
        payload["metrics"] = {k: float(v) for k, v in metrics.items()}
    if images_per_second is not None:
        payload["images_per_second"] = round(float(images_per_second), 1)
    if eta_s is not None:
        payload["eta_s"] = round(max(0.0, float(eta_s)), 1)
    if trial is not None:
        payload["trial"] = trial
    return f"{PROGRESS_MARK}{json.dumps(payload)}"


def trial_line(
    trial: str,
    state: str,
    *,
    values: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    error: str | None = None,
) -> str:
    """``AEFORGE_TRIAL {"trial": name, "state": s, ...}``: a sweep trial started (``running``, with its searched
    ``values``), ``finished`` (with its final ``metrics``) or ended in an ``error`` (its last line)."""
    if state not in TRIAL_STATES:
        raise ValueError(f"a trial's state is one of {', '.join(TRIAL_STATES)}, not {state!r}")
    payload: dict[str, Any] = {"trial": trial, "state": state}
    if values:
        payload["values"] = values
    if metrics:
        payload["metrics"] = {k: float(v) for k, v in metrics.items()}
    if error:
        payload["error"] = error
    return f"{TRIAL_MARK}{json.dumps(payload, default=str)}"


def phase_line(
    phase: str,
    *,
    detail: str | None = None,
    done: int | None = None,
    total: int | None = None,
    eta_s: float | None = None,
    trial: str | None = None,
) -> str:
    """``AEFORGE_PHASE {"phase": p, ...}``: the job (or a sweep's ``trial``) is now in ``phase`` (one of PHASES), at
    ``detail`` (the metric being evaluated), part ``done`` of ``total``, with ``eta_s`` seconds left of the phase
    at its pace so far."""
    if phase not in PHASES:
        raise ValueError(f"a phase is one of {', '.join(PHASES)}, not {phase!r}")
    payload: dict[str, Any] = {"phase": phase}
    for key, value in (("detail", detail), ("done", done), ("total", total), ("trial", trial)):
        if value is not None:
            payload[key] = value
    if eta_s is not None:
        payload["eta_s"] = round(max(0.0, float(eta_s)), 1)
    return f"{PHASE_MARK}{json.dumps(payload, default=str)}"


def emit(line: str) -> None:
    """Write a marked line to stdout at once. Not print(): Ray Train's workers replace print with one that writes a
    line twice (to stdout and through a logger) when stdout is wrapped, as Ray's workers' is."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def is_protocol_line(line: str) -> bool:
    """A line that is for the service, not for a person (progress, trial and result marks, wherever Ray's prefix
    puts them)."""
    return any(mark in line for mark in MARKS)


def read_mark(line: str, mark: str) -> dict | None:
    """The JSON object after ``mark`` in one line (Ray's ``(pid=...)`` prefix or colour codes before it are
    ignored), or None when the line has no such mark or what follows it is not an object."""
    start = line.find(mark)
    if start < 0:
        return None
    try:
        # raw_decode: text after the object (Ray's " [repeated 2x across cluster]") is not part of it.
        value, _ = _DECODER.raw_decode(line[start + len(mark) :].lstrip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def result_line(summary: dict[str, Any]) -> str:
    return f"{RESULT_MARK}{json.dumps(summary, default=str)}"


def _last_marked(logs: str, mark: str) -> dict | None:
    for line in reversed(logs.splitlines()):
        value = read_mark(line, mark)
        if value is not None:
            return value
    return None


def parse_result(logs: str) -> dict | None:
    """The job's ``AEFORGE_RESULT {...}`` line (the last one), or None."""
    return _last_marked(logs, RESULT_MARK)


def parse_phase(logs: str) -> dict | None:
    """Where a job is: its last phase line, or (when a progress line came after it, or there is none) the
    "training" phase with that progress line's step, total, speed and ETA; None when the log has neither."""
    for line in reversed(logs.splitlines()):
        phase = read_mark(line, PHASE_MARK)
        if phase is not None and isinstance(phase.get("phase"), str):
            return phase
        progress = read_mark(line, PROGRESS_MARK)
        if progress is not None and isinstance(progress.get("step"), int):
            return {"phase": "training", **progress}
    return None


def parse_progress(logs: str) -> dict | None:
    """The last ``AEFORGE_PROGRESS {"step": s, "total": t}`` line, or None."""
    progress = _last_marked(logs, PROGRESS_MARK)
    if progress is None or not isinstance(progress.get("step"), int):
        return None
    return progress
