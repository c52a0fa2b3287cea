"""A job's log as a person reads it, from the log as Ray writes it.

Ray's log of a job holds the job's own lines, the lines Ray forwards from its processes (behind a
``(RayTrainWorker pid=123, ip=10.0.0.2)`` prefix, coloured), and the marked lines of workers.protocol that are for
the service. The readable log is:

- every line without its colour and cursor codes;
- a progress line as ``step 50/1200  loss 123.4  recon 110.2  kl 13.2  512 img/s  ETA 1m40s`` (a sweep's behind its
  trial's name), once per (trial, step) although Ray may forward a worker's line twice;
- a phase line as ``phase: evaluating eval/mig (2 of 6)  ETA 40s``, a sweep trial's line as ``trial t03 finished:
  eval/mig 0.41``; the result line is left out (``aeforge status`` shows the result);
- without Ray's known noise, which stays in the full log: the lines of Ray Train's detached helper actors
  (NOISY_RAY_ACTORS: the placement group cleaner's shutdown traceback, "Found multiple active Ray instances", the
  preemption watcher's polling).

The service gives this view by default (``GET /jobs/{id}/logs``; ``full=true`` for Ray's log as it is), so the CLI,
notebooks (``AeforgeClient.logs``) and anything else reading the API see the same lines. `aeforge run` shows the
same step lines (services.run_display formats them with the functions here).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from workers.protocol import PHASE_MARK, PROGRESS_MARK, TRIAL_MARK, is_protocol_line, read_mark

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# The "(RayTrainWorker pid=123, ip=10.0.0.2) " Ray puts before a line it forwards from one of its processes.
RAY_PREFIX = re.compile(r"^\(([^()]*)\)\s")
# Ray Train's detached helpers: what they print is about Ray's own housekeeping (the cleaner's traceback when the
# cluster shuts down under it, the watcher's polls), never about the job.
NOISY_RAY_ACTORS = ("PlacementGroupCleaner", "PreemptionWatcher")
# Starts the line the service puts in a followed log between two attempts of a job: the next attempt's steps are
# shown again (a resumed run repeats the steps after its last checkpoint).
ATTEMPT_NOTE = "[aeforge] job "
_NOISE_TEXT = re.compile(r"\bPreemptionWatcher\b")


def plain_text(line: str) -> str:
    """A log line without colour codes or its line end; a carriage return overwrites, as on a terminal."""
    text = _ANSI.sub("", line).rstrip("\r\n")
    return text.rsplit("\r", 1)[-1] if "\r" in text else text


def ray_process_of(line: str) -> str | None:
    """The Ray process a forwarded line came from (``RayTrainWorker``), or None for a line of the job's own."""
    match = RAY_PREFIX.match(line)
    return match.group(1).split(" ", 1)[0] if match else None


def is_ray_noise(line: str) -> bool:
    """A line of Ray's known noise (plain text expected): left out of the readable log, kept in the full one."""
    return ray_process_of(line) in NOISY_RAY_ACTORS or bool(_NOISE_TEXT.search(line))


def format_duration(seconds: float) -> str:
    """``45s``, ``1m40s``, ``2h03m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_value(value: Any) -> str:
    """Four significant digits; a value near 0 (a TC or MI estimate early on) in two, ``-5.7e-05``; never ``-0``."""
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.1e}"
    return str(value)


def loss_parts(metrics: dict[str, float]) -> str:
    """``loss 123.4  recon 110.2  kl 13.2``: the loss parts of a progress line, in the order the loop logs them."""
    return "  ".join(f"{key.rsplit('/', 1)[-1]} {format_value(value)}" for key, value in metrics.items())


def step_text(progress: dict[str, Any], eta_s: float | None = None) -> str:
    """``step 50/1200  loss 123.4  recon 110.2  kl 13.2  512 img/s  ETA 1m40s`` from a progress line's payload;
    ``eta_s`` (else the line's own) is left out once the last step is done."""
    step, total = progress.get("step"), progress.get("total")
    parts = [f"step {step}/{total if isinstance(total, int) else '?'}"]
    if isinstance(progress.get("metrics"), dict) and progress["metrics"]:
        parts.append(loss_parts(progress["metrics"]))
    if isinstance(progress.get("images_per_second"), (int, float)):
        parts.append(f"{progress['images_per_second']:,.0f} img/s")
    eta = eta_s if eta_s is not None else progress.get("eta_s")
    if isinstance(eta, (int, float)) and not (isinstance(total, int) and isinstance(step, int) and step >= total):
        parts.append(f"ETA {format_duration(eta)}")
    return "  ".join(parts)


def phase_text(phase: dict[str, Any]) -> str:
    """``evaluating eval/mig (2 of 6)  ETA 40s``: a phase line's payload, or a training phase's step line."""
    if phase.get("phase") == "training" and isinstance(phase.get("step"), int):
        return "training  " + step_text(phase)
    text = str(phase.get("phase", "?"))
    if phase.get("detail"):
        text += f" {phase['detail']}"
    if isinstance(phase.get("done"), int) and isinstance(phase.get("total"), int):
        text += f" ({phase['done']} of {phase['total']})"
    if isinstance(phase.get("eta_s"), (int, float)):
        text += f"  ETA {format_duration(phase['eta_s'])}"
    return text


def trial_text(trial: dict[str, Any]) -> str:
    """``trial t03 finished (beta 4): eval/mig 0.41`` from a sweep's trial line."""
    text = f"trial {trial.get('trial')} {trial.get('state')}"
    values = trial.get("values")
    if isinstance(values, dict) and values:
        text += " (" + ", ".join(f"{k} {format_value(v)}" for k, v in values.items()) + ")"
    metrics = trial.get("metrics")
    if isinstance(metrics, dict) and metrics:
        text += ": " + "  ".join(f"{k} {format_value(v)}" for k, v in sorted(metrics.items())[:4])
    if trial.get("error"):
        text += f": {trial['error']}"
    return text


class ReadableLog:
    """Ray's log text in chunks -> the readable lines (see the module's doc). A line cut between chunks is held
    until its end arrives (or :meth:`flush`).

    ``on_progress(mark, payload)``: when given, progress and phase lines go to it instead of becoming text (a live
    display shows them as a bar)."""

    def __init__(self, on_progress: Callable[[str, dict[str, Any]], None] | None = None):
        self.partial = ""
        self.on_progress = on_progress
        self._shown_steps: set[tuple[str | None, int]] = set()
        self._shown_phases: set[tuple[str, ...]] = set()
        self._shown_trials: set[tuple[str, str]] = set()

    def feed(self, chunk: str) -> list[str]:
        lines = (self.partial + chunk).split("\n")
        self.partial = lines.pop()
        return [kept for line in lines if (kept := self.line(line)) is not None]

    def flush(self) -> list[str]:
        rest, self.partial = self.partial, ""
        kept = self.line(rest) if rest else None
        return [] if kept is None else [kept]

    def restart(self) -> None:
        """A new attempt's log follows: its steps are shown again."""
        self._shown_steps.clear()
        self._shown_phases.clear()
        self._shown_trials.clear()

    def line(self, raw: str) -> str | None:
        """One line of Ray's log as a person reads it, or None when it is for the service only or Ray's noise."""
        text = plain_text(raw)
        if is_protocol_line(text):
            return self._marked(text)
        if is_ray_noise(text):
            return None
        if text.startswith(ATTEMPT_NOTE) and ": attempt " in text:
            self.restart()
        return text

    def _marked(self, text: str) -> str | None:
        progress = read_mark(text, PROGRESS_MARK)
        if progress is not None:
            step, trial = progress.get("step"), progress.get("trial")
            trial = trial if isinstance(trial, str) else None
            if not isinstance(step, int) or (trial, step) in self._shown_steps:
                return None
            self._shown_steps.add((trial, step))
            if self.on_progress is not None:
                self.on_progress(PROGRESS_MARK, progress)
                return None
            return f"{trial}  {step_text(progress)}" if trial else step_text(progress)
        phase = read_mark(text, PHASE_MARK)
        if phase is not None:
            if self.on_progress is not None:
                self.on_progress(PHASE_MARK, phase)
                return None
            # A phase's parts (each metric) are shown as they begin; a line Ray forwards twice, once.
            key = tuple(str(phase.get(k)) for k in ("trial", "phase", "detail", "done", "total"))
            if key in self._shown_phases:
                return None
            self._shown_phases.add(key)
            trial = phase.get("trial")
            return f"{trial}  phase: {phase_text(phase)}" if isinstance(trial, str) else f"phase: {phase_text(phase)}"
        trial = read_mark(text, TRIAL_MARK)
        if trial is not None:
            key = (str(trial.get("trial")), str(trial.get("state")))
            if key in self._shown_trials:
                return None
            self._shown_trials.add(key)
            return trial_text(trial)
        return None  # the result line (and a marked line that cannot be read): for the service only


def readable_lines(text: str) -> list[str]:
    """The readable lines of a whole log."""
    reader = ReadableLog()
    return reader.feed(text) + reader.flush()


def readable_text(text: str) -> str:
    lines = readable_lines(text)
    return "\n".join(lines) + "\n" if lines else ""
