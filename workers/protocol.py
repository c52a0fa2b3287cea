"""What a job and its readers (the queue service, `aeforge run`'s display) say to each other: job ids and the
marked lines a job prints.

A job's chief worker prints ``AEFORGE_PROGRESS {"step": s, "total": t, ...}`` at each log point, a sweep's trials
print ``AEFORGE_TRIAL {"trial": name, "state": ...}`` when they start and end, and the entry point prints
``AEFORGE_RESULT {...}`` once at the end; the dispatcher and the CLI read them back from the job's log. Both sides
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
) -> str:
    """``AEFORGE_PROGRESS {"step": s, "total": t, ...}``: where a run is, and (optional) its latest loss parts, its
    speed, and for a sweep the trial's run name. Readers need only ``step`` and ``total``; the rest may be absent."""
    payload: dict[str, Any] = {"step": step, "total": total}
    if metrics:
        payload["metrics"] = {k: float(v) for k, v in metrics.items()}
    if images_per_second is not None:
        payload["images_per_second"] = round(float(images_per_second), 1)
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


def emit(line: str) -> None:
    """Write a marked line to stdout at once. Not print(): Ray Train's workers replace print with one that writes a
    line twice (to stdout and through a logger) when stdout is wrapped, as Ray's workers' is."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def is_protocol_line(line: str) -> bool:
    """A line that is for the service, not for a person (progress, trial and result marks, wherever Ray's prefix
    puts them)."""
    return PROGRESS_MARK in line or RESULT_MARK in line or TRIAL_MARK in line


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


def parse_progress(logs: str) -> dict | None:
    """The last ``AEFORGE_PROGRESS {"step": s, "total": t}`` line, or None."""
    progress = _last_marked(logs, PROGRESS_MARK)
    if progress is None or not isinstance(progress.get("step"), int):
        return None
    return progress
