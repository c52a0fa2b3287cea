"""What a job and the queue service say to each other: job ids and the two lines a job prints.

A job's driver and its chief worker print ``AEFORGE_PROGRESS {"step": s, "total": t}`` at each log point and the
entry point prints ``AEFORGE_RESULT {...}`` once at the end; the dispatcher and the CLI read them back from the Ray
job's log. Both sides use this module, so the marks are written in one place. It imports nothing of aeforge: the
service, the job entry point and the training loop all depend on it.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any

PROGRESS_MARK = "AEFORGE_PROGRESS "
RESULT_MARK = "AEFORGE_RESULT "


def new_job_id(name: str) -> str:
    """``<name slug>-<UTC time>-<random>``: readable, sortable by time, unique; the same for `aeforge run` and the
    queue."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:48] or "job"
    return f"{slug}-{stamp}-{secrets.token_hex(3)}"


def progress_line(step: int, total: int, *, metrics: dict[str, float] | None = None,
                  images_per_second: float | None = None, trial: str | None = None) -> str:
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


def is_protocol_line(line: str) -> bool:
    """A line that is for the service, not for a person (progress and result marks, wherever Ray's prefix puts
    them)."""
    return PROGRESS_MARK in line or RESULT_MARK in line


def result_line(summary: dict[str, Any]) -> str:
    return f"{RESULT_MARK}{json.dumps(summary, default=str)}"


def _last_marked(logs: str, mark: str) -> dict | None:
    for line in reversed(logs.splitlines()):
        start = line.find(mark)
        if start >= 0:
            try:
                value = json.loads(line[start + len(mark):])
            except ValueError:
                continue
            if isinstance(value, dict):
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
