"""What `aeforge run` shows while a job runs in this process: its progress, not Ray's output.

While the job runs, everything this process and its children write on stdout and stderr (Ray's and MLflow's
messages, the worker lines Ray forwards to its driver, C++ logs of the processes it starts) goes to the run's log
file, ``AEFORGE_HOME/runs/<job id>/run.log``. The screen gets what a person wants, read back from that file as it
grows (the marked lines of workers.protocol):

- on a terminal, one live progress bar (step/total, images/s, ETA, the latest loss parts), or for a sweep a live
  table of its trials (state, step, loss, the ranking metric once a trial has it);
- piped, or with ``-v``, plain lines, no colour codes: one per log point, ``step 50/1200  loss 123.4  recon 110.2
  kl 13.2  512 img/s  ETA 1m40s`` (a sweep's prefixed by its trial), and with ``-v`` every line of the log too,
  protocol lines left out;
- in every mode, the lines a job addresses to its user (``aeforge: ...``, such as a sweep's concurrency cut by the
  cluster, or a resumption), as ``note: ...`` lines above the display.

Nothing is shown twice: Ray may print a worker's line twice, and a resumed run may repeat steps; a log point is
shown once per (trial, step), a trial's state and a note once each.

The run itself stays on the main thread (Ray installs signal handlers there); a background thread follows the log.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from services.cli_output import CliConsole
from services.job_log import (  # noqa: F401 (format_value, format_duration: this module's, for its readers)
    RAY_PREFIX,
    format_duration,
    format_value,
    is_ray_noise,
    loss_parts,
    phase_text,
    plain_text,
)
from workers.errors import AeforgeError
from workers.protocol import PHASE_MARK, PROGRESS_MARK, TRIAL_MARK, is_protocol_line, read_mark

LOG_FILE = "run.log"
NOTICE_PREFIX = "aeforge: "
# How often the log is read for new lines while nothing new has come.
POLL_S = 0.1

# The "(RayTrainWorker pid=123, ip=10.0.0.2) " Ray puts before a line it forwards from one of its processes.
_RAY_PREFIX = RAY_PREFIX


# --- reading lines --------------------------------------------------------------------------------------------


def notice_of(line: str) -> str | None:
    """The text of a line a job addresses to its user (``aeforge: <text>``, also behind Ray's prefix), or None."""
    text = _RAY_PREFIX.sub("", plain_text(line), count=1)
    return text[len(NOTICE_PREFIX) :].strip() if text.startswith(NOTICE_PREFIX) else None


@dataclass
class Track:
    """One run's (or sweep trial's) progress, as its lines tell it."""

    name: str | None
    step: int = 0
    total: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    images_per_second: float | None = None
    state: str = "running"
    values: dict[str, Any] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    # When this reader first saw the run move, and at which step: the ETA comes from the pace since then.
    first_seen: tuple[float, int] | None = None
    last_seen: float | None = None
    # The job's own estimate (its progress line's eta_s), when it gives one; else the pace this reader saw.
    eta_s: float | None = None
    # A sweep trial's phase (training, evaluating eval/mig, ...), as its lines last told it.
    phase: str = ""

    def eta(self) -> float | None:
        if self.eta_s is not None:
            return self.eta_s
        if self.first_seen is None or self.total is None or self.last_seen is None:
            return None
        started, first_step = self.first_seen
        if self.step <= first_step or self.last_seen <= started:
            return None
        pace = (self.step - first_step) / (self.last_seen - started)
        return (self.total - self.step) / pace

    def progress_text(self) -> str:
        """``step 50/1200  loss 123.4  recon 110.2  kl 13.2  512 img/s  ETA 1m40s``."""
        parts = [f"step {self.step}/{self.total if self.total is not None else '?'}"]
        if self.metrics:
            parts.append(loss_parts(self.metrics))
        if self.images_per_second is not None:
            parts.append(f"{self.images_per_second:,.0f} img/s")
        eta = self.eta()
        if eta is not None and self.total is not None and self.step < self.total:
            parts.append(f"ETA {format_duration(eta)}")
        return "  ".join(parts)


# --- the display ----------------------------------------------------------------------------------------------


class RunDisplay:
    """Turns the run log's lines (fed one by one, from one thread) into what a person sees on ``console``.

    ``sweep_trials``: the number of trials of a sweep (None for a train job); ``metric``: a sweep's ranking metric.
    Live (a bar, or a sweep's table) when ``console`` is a terminal and not ``verbose``; plain lines otherwise.

    Lines come from one thread (the log's follower); the live display's refresh thread reads the tracks as they
    are at that moment. No lock is held while printing: rich's own locks order the two threads.
    """

    def __init__(
        self,
        console: Console,
        *,
        sweep_trials: int | None = None,
        metric: str | None = None,
        verbose: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.console = console
        self.sweep_trials = sweep_trials
        self.metric = metric
        self.verbose = verbose
        self.live = console.is_terminal and not verbose
        self._clock = clock
        self._tracks: dict[str | None, Track] = {}
        self._shown_steps: set[tuple[str | None, int]] = set()
        self._shown_states: set[tuple[str, str]] = set()
        self._shown_notes: set[str] = set()
        self._shown_phases: set[tuple[str, ...]] = set()
        self._phase_shown = False
        self._progress: _TrainProgress | None = None
        self._task: TaskID | None = None  # set with _progress
        self._live: Live | None = None

    # -- life cycle --
    def start(self) -> None:
        if not self.live:
            return
        if self.sweep_trials is None:
            self._progress = _TrainProgress(self, console=self.console)
            self._task = self._progress.add_task("starting", total=None, speed="", eta="")
            self._progress.start()
        else:
            self._live = Live(
                _SweepTable(self),
                console=self.console,
                refresh_per_second=4,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()

    def stop(self) -> None:
        if self._progress is not None and self._task is not None:
            track = self._tracks.get(None)
            if track is not None and track.total is not None and track.step >= track.total:
                self._progress.update(self._task, description="done", eta="")
            self._progress.refresh()
            self._progress.stop()
        if self._live is not None:
            self._live.refresh()
            self._live.stop()

    # -- input --
    def feed(self, line: str) -> None:
        """One line of the run's log."""
        progress = read_mark(line, PROGRESS_MARK)
        if progress is not None:
            self._on_progress(progress)
            return
        trial = read_mark(line, TRIAL_MARK)
        if trial is not None:
            self._on_trial(trial)
            return
        phase = read_mark(line, PHASE_MARK)
        if phase is not None:
            self._on_phase(phase)
            return
        if is_protocol_line(line):
            return
        note = notice_of(line)
        if note is not None:
            if note not in self._shown_notes:
                self._shown_notes.add(note)
                self._say(Text.assemble(("note: ", "bold yellow"), note) if self.live else f"note: {note}")
            return
        if self.verbose:
            self._say(plain_text(line))

    def tracks(self) -> list[Track]:
        """The runs seen so far (a train job's one, or a sweep's trials), in the order they were first seen."""
        return list(self._tracks.values())

    # -- what the lines say --
    def _track(self, name: str | None) -> Track:
        if name not in self._tracks:
            self._tracks[name] = Track(name)
        return self._tracks[name]

    def _on_progress(self, payload: dict[str, Any]) -> None:
        step, total = payload.get("step"), payload.get("total")
        if not isinstance(step, int):
            return
        name = payload.get("trial") if isinstance(payload.get("trial"), str) else None
        if (name, step) in self._shown_steps:
            return
        self._shown_steps.add((name, step))
        track = self._track(name)
        now = self._clock()
        if track.first_seen is None or step < track.step:  # the first line, or a resumed run starting over
            track.first_seen = (now, step)
        track.step, track.last_seen = step, now
        track.total = total if isinstance(total, int) else track.total
        if isinstance(payload.get("metrics"), dict):
            track.metrics = payload["metrics"]
        if isinstance(payload.get("images_per_second"), (int, float)):
            track.images_per_second = float(payload["images_per_second"])
        if isinstance(payload.get("eta_s"), (int, float)):
            track.eta_s = float(payload["eta_s"])
        track.phase = "training"
        if self._progress is not None and self._task is not None:
            done = track.total is not None and step >= track.total
            eta = track.eta()
            self._progress.update(
                self._task,
                completed=step,
                total=track.total,
                description="finishing" if done else "training",
                speed=f"{track.images_per_second:,.0f} img/s" if track.images_per_second else "",
                eta=f"ETA {format_duration(eta)}" if eta is not None and not done else "",
            )
        elif not self.live:
            self._say(f"{name}  {track.progress_text()}" if name else track.progress_text())

    def _on_phase(self, payload: dict[str, Any]) -> None:
        """A phase begins, or a part of it (the next metric of an evaluation): the bar names it, with its parts done
        of its total and its ETA; a sweep's table shows it in its trial's row; plain, one line each."""
        if not isinstance(payload.get("phase"), str):
            return
        key = tuple(str(payload.get(k)) for k in ("trial", "phase", "detail", "done", "total"))
        if key in self._shown_phases:
            return
        self._shown_phases.add(key)
        name = payload.get("trial") if isinstance(payload.get("trial"), str) else None
        label = " ".join(str(payload[k]) for k in ("phase", "detail") if payload.get(k))
        if name is not None:
            self._track(name).phase = label
        if self._progress is not None and self._task is not None and name is None:
            eta = payload.get("eta_s")
            total = payload.get("total") if isinstance(payload.get("total"), int) else None
            self._progress.update(
                self._task,
                completed=payload.get("done") if isinstance(payload.get("done"), int) else 0,
                total=total,
                description=label,
                speed="",
                eta=f"ETA {format_duration(eta)}" if isinstance(eta, (int, float)) else "",
            )
            self._phase_shown = True
        elif not self.live:
            self._say(f"{name}  phase: {phase_text(payload)}" if name else f"phase: {phase_text(payload)}")

    def _on_trial(self, payload: dict[str, Any]) -> None:
        name, state = payload.get("trial"), payload.get("state")
        if not isinstance(name, str) or not isinstance(state, str) or (name, state) in self._shown_states:
            return
        self._shown_states.add((name, state))
        track = self._track(name)
        track.state = state
        if isinstance(payload.get("values"), dict):
            track.values = payload["values"]
        if isinstance(payload.get("metrics"), dict):
            track.final = payload["metrics"]
        if payload.get("error"):
            track.error = str(payload["error"])
        if self.live:
            return
        if state == "running":
            self._say(f"trial {name} running" + (f" ({_values_text(track.values)})" if track.values else ""))
        elif state == "finished":
            shown = self._metric_of(track)
            self._say(
                f"trial {name} finished" + (f" ({self.metric} {format_value(shown)})" if shown is not None else "")
            )
        else:
            self._say(f"trial {name} failed" + (f": {track.error}" if track.error else ""))

    def _metric_of(self, track: Track) -> float | None:
        if self.metric and self.metric in track.final:
            return track.final[self.metric]
        return None

    def _say(self, what: str | Text) -> None:
        if isinstance(what, str):
            self.console.print(what, markup=False, highlight=False, soft_wrap=True, emoji=False)
        else:
            self.console.print(what, soft_wrap=True)


def _values_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {format_value(v)}" for k, v in values.items())


class _TrainProgress(Progress):
    """The bar of a train job, with the latest loss parts on the line below it."""

    def __init__(self, display: RunDisplay, console: Console):
        self._display = display  # first: Progress renders itself once while it is made
        super().__init__(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"),
            TextColumn("{task.fields[eta]}"),
            TimeElapsedColumn(),
            console=console,
            redirect_stdout=False,
            redirect_stderr=False,
            refresh_per_second=4,
        )

    def get_renderables(self) -> Iterator[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        tracks = self._display.tracks()
        if tracks and tracks[0].metrics:
            yield Text("  " + loss_parts(tracks[0].metrics), style="dim", overflow="fold")


class _SweepTable:
    """The live table of a sweep's trials (rebuilt at each refresh from the display's tracks)."""

    STATE_STYLES = {"running": "cyan", "finished": "green", "error": "bold red"}

    def __init__(self, display: RunDisplay):
        self._display = display

    def __rich__(self) -> RenderableType:
        display = self._display
        tracks = [t for t in display.tracks() if t.name is not None]
        finished = sum(t.state == "finished" for t in tracks)
        failed = sum(t.state == "error" for t in tracks)
        total = display.sweep_trials
        waiting = max(0, (total or 0) - len(tracks))
        caption = f"{len(tracks)} of {total} trials started, {finished} finished"
        caption += (f", {failed} failed" if failed else "") + (f", {waiting} waiting" if waiting else "")
        table = Table(title="sweep", caption=caption, expand=False)
        table.add_column("trial", overflow="fold")
        table.add_column("values", overflow="fold")
        table.add_column("state")
        table.add_column("step", justify="right", no_wrap=True)
        table.add_column("loss", justify="right", no_wrap=True)
        table.add_column(display.metric or "metric", justify="right", no_wrap=True, overflow="fold")
        table.add_column("img/s", justify="right", no_wrap=True)
        table.add_column("ETA", justify="right", no_wrap=True)
        for track in tracks:
            eta = track.eta() if track.state == "running" else None
            shown = display._metric_of(track)
            table.add_row(
                track.name,
                _values_text(track.values),
                Text(
                    f"{track.state}: {track.error}"
                    if track.error
                    else f"{track.state}: {track.phase}"
                    if track.state == "running" and track.phase not in ("", "training")
                    else track.state,
                    style=self.STATE_STYLES.get(track.state, ""),
                ),
                f"{track.step}/{track.total}" if track.total else "",
                format_value(track.metrics["train/loss"]) if "train/loss" in track.metrics else "",
                format_value(shown) if shown is not None else "",
                f"{track.images_per_second:,.0f}" if track.images_per_second else "",
                format_duration(eta) if eta is not None else "",
            )
        return Group(table) if tracks else Text(f"sweep: starting ({caption})", style="dim")


# --- following the log ----------------------------------------------------------------------------------------


class LogFollower:
    """Reads the lines appended to ``path`` from ``offset`` on, in a thread, and hands each to ``on_line``;
    :meth:`stop` returns once every line written before it was called has been handed over."""

    def __init__(self, path: Path, offset: int, on_line: Callable[[str], None], interval: float = POLL_S):
        self.path, self.offset, self.on_line, self.interval = path, offset, on_line, interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="aeforge-log-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _follow(self) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            pending = b""
            while True:
                stopping = self._stopping.is_set()  # before the read: what was written before stop() is read
                chunk = fh.read()
                if chunk:
                    *lines, pending = (pending + chunk).split(b"\n")
                    for raw in lines:
                        self._hand_over(raw)
                elif stopping:
                    break
                else:
                    self._stopping.wait(self.interval)
            if pending:
                self._hand_over(pending)

    def _hand_over(self, raw: bytes) -> None:
        try:
            self.on_line(raw.decode("utf-8", errors="replace"))
        except Exception:  # a display bug must not stop the run; its traceback goes to the log (stderr here)
            traceback.print_exc()


# --- where the output goes ------------------------------------------------------------------------------------


def _fd_of(stream: Any) -> int | None:
    try:
        fd: int = stream.fileno()
        return fd
    except (AttributeError, OSError, ValueError):
        return None


def _flush(stream: Any) -> None:
    try:
        stream.flush()
    except (AttributeError, OSError, ValueError):
        pass


@contextmanager
def output_to_log(log_path: Path) -> Iterator[tuple[TextIO, int]]:
    """Send file descriptors 1 and 2 (so this process's output, Ray's forwarded worker lines, and what child
    processes inherit) to ``log_path``, appended; yields a stream to what stdout was (the screen) and the log's size
    before this run wrote to it. sys.stdout and sys.stderr follow the descriptors; one that is not on them (a test
    runner's) is replaced by the log for the duration."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _flush(sys.stdout)
    _flush(sys.stderr)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    offset = os.fstat(log_fd).st_size
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    on_fd = {"stdout": _fd_of(sys.stdout) == 1, "stderr": _fd_of(sys.stderr) == 2}
    originals = {"stdout": sys.stdout, "stderr": sys.stderr}
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    screen: TextIO = (
        os.fdopen(os.dup(saved[1]), "w", encoding=encoding, errors="replace", buffering=1)
        if on_fd["stdout"]
        else sys.stdout
    )
    line_buffered = getattr(sys.stdout, "line_buffering", True)
    log_stream: TextIO | None = None
    # Ray colours its "(pid=...)" prefixes whatever the output is; the log is plain text.
    color_prefix = os.environ.get("RAY_COLOR_PREFIX")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        if on_fd["stdout"] and not line_buffered and hasattr(sys.stdout, "reconfigure"):
            # Lines (Ray's forwarded worker lines among them) reach the log as they are printed, not in blocks.
            sys.stdout.reconfigure(line_buffering=True)
        if not all(on_fd.values()):
            # It outlives this block: it is sys.stdout or sys.stderr until the process ends.
            log_stream = open(os.dup(log_fd), "a", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115
            for name, real in on_fd.items():
                if not real:
                    setattr(sys, name, log_stream)
        yield screen, offset
    finally:
        _flush(sys.stdout)
        _flush(sys.stderr)
        os.dup2(saved[1], 1)
        os.dup2(saved[2], 2)
        for fd in (*saved.values(), log_fd):
            os.close(fd)
        sys.stdout, sys.stderr = originals["stdout"], originals["stderr"]
        if on_fd["stdout"] and not line_buffered and hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=False)
        if log_stream is not None:
            log_stream.close()
        if color_prefix is None:
            os.environ.pop("RAY_COLOR_PREFIX", None)
        if screen is not originals["stdout"]:
            screen.close()


@contextmanager
def ray_left_as_found() -> Iterator[None]:
    """A Ray this block started (`aeforge run` without RAY_ADDRESS starts one) is shut down at its end, while the
    output still goes to the log: its teardown messages are Ray's, not the user's. A Ray already up (a test's, or
    the caller's) is left running."""
    was_up = _ray_is_up()
    try:
        yield
    finally:
        if not was_up and _ray_is_up():
            import ray

            ray.shutdown()


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")  # never imported: never started
    return bool(ray is not None and ray.is_initialized())


@contextmanager
def bugs_point_at(log_path: Path) -> Iterator[None]:
    """A failure that is a bug (not an AeforgeError, not a stop) carries a note, printed after its traceback, that
    names the run's log, where Ray's and MLflow's own account of it is."""
    try:
        yield
    except AeforgeError:
        raise
    except Exception as exc:
        exc.add_note(f"the run's log (Ray's and MLflow's output): {log_path}")
        raise


@contextmanager
def showing_progress(
    log_path: Path, *, sweep_trials: int | None = None, metric: str | None = None, verbose: bool = False
) -> Iterator[RunDisplay]:
    """Run the block with its output in ``log_path`` and its progress on the screen (see the module's doc)."""
    with bugs_point_at(log_path), output_to_log(log_path) as (screen, offset):
        display = RunDisplay(CliConsole(file=screen), sweep_trials=sweep_trials, metric=metric, verbose=verbose)
        follower = LogFollower(log_path, offset, display.feed)
        display.start()
        follower.start()
        try:
            with ray_left_as_found():
                yield display
        finally:
            _flush(sys.stdout)
            _flush(sys.stderr)
            follower.stop()
            display.stop()
