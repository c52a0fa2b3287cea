"""The queue commands of the `aeforge` CLI: serve, submit, jobs, status, logs, cancel, retry.

``register(app)`` mounts them on the main Typer app. Every command but ``serve`` talks to the service over HTTP:
AEFORGE_API_URL, else the address a running ``aeforge serve`` recorded in AEFORGE_HOME/service.json (see
services.settings), with AEFORGE_API_TOKEN. Errors from the service and in the settings print as one plain message
(exit code 2; see services.cli_errors); a job followed to its end exits 0 if it succeeded, 1 otherwise.

What is printed is for people: the lines a job prints for the service (workers.protocol: AEFORGE_PROGRESS,
AEFORGE_RESULT) drive the progress bar and the final summary instead of being shown, and colour codes from the
job's log are removed. ``--output json`` on ``jobs`` and ``status`` prints the API's own JSON instead of tables.
Tables never cut a value: on a terminal long cells fold onto more lines, and piped output is as wide as the table.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli_errors import fail, handle_errors
from services.cli_output import OutputFormat, metric_text, output_option, print_json
from services.client import AeforgeClient, ApiError
from services.job_log import ReadableLog, format_duration, phase_text
from services.job_states import STATES, TERMINAL_STATES
from services.settings import ServiceSettings
from workers.protocol import PROGRESS_MARK

console = Console()

STATE_STYLES = {
    "queued": "cyan",
    "starting": "yellow",
    "running": "bold yellow",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}


def make_client() -> AeforgeClient:
    """The API client from settings (a seam: tests put a client over an in-process app here)."""
    return AeforgeClient.from_settings(ServiceSettings.load())


def styled(state: str) -> str:
    return f"[{STATE_STYLES.get(state, 'white')}]{state}[/]"


def _short_time(iso: str | None) -> str:
    return "" if not iso else iso.replace("T", " ")[:19]


def _age(iso: str) -> str:
    """How long ago: 45s, 12m, 5h, 3d."""
    seconds = max(0.0, (datetime.now(UTC) - datetime.fromisoformat(iso.replace("Z", "+00:00"))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _resources(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if v) or "-"


def _number(value: Any) -> str:
    """A metric as a person reads it (services.cli_output.metric_text)."""
    return metric_text(value)


def print_table(renderable: RenderableType, out: Console | None = None) -> None:
    """On a terminal, as wide as the terminal (cells fold); piped, as wide as the table needs, so that nothing is
    cut at rich's default of 80 columns."""
    out = out or console
    if out.is_terminal:
        out.print(renderable)
        return
    natural = Measurement.get(out, out.options.update(max_width=1 << 16), renderable).maximum
    if natural <= out.width:
        out.print(renderable)
        return
    # Console.print's width can only narrow: a console as wide as the table writes it to the same file.
    wide = Console(file=out.file, width=natural, no_color=out.no_color, color_system=None, highlight=False)
    wide.print(renderable)


# --- the log ---------------------------------------------------------------------------------------------------


def whole_lines(chunks: Iterable[str]) -> Iterator[str]:
    """Text in chunks -> its lines, each once its end has arrived (the last one at the end)."""
    partial = ""
    for chunk in chunks:
        *lines, partial = (partial + chunk).split("\n")
        yield from lines
    if partial:
        yield partial


# --- a job's outcome and progress, shared by status and submit --follow ---------------------------------------


def progress_text(progress: dict[str, Any]) -> str:
    """``step 50 of 100 (50%) · 1,234 images/s`` from a progress line."""
    step, total = progress.get("step"), progress.get("total")
    text = f"step {step}"
    if isinstance(total, int) and total > 0 and isinstance(step, int | float):
        text += f" of {total} ({100 * step / total:.0f}%)"
    if isinstance(progress.get("images_per_second"), (int, float)):
        text += f" · {progress['images_per_second']:,.0f} images/s"
    if isinstance(progress.get("eta_s"), (int, float)) and step != total:
        text += f" · ETA {format_duration(progress['eta_s'])}"
    if progress.get("trial"):
        text += f" · trial {progress['trial']}"
    return text


def metrics_brief(metrics: dict[str, Any] | None, most: int = 4) -> str:
    """The first few metrics on one line, for the progress bar: ``loss 0.1234  recon 0.1000``."""
    items = sorted((k, v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)))
    return "  ".join(f"{k} {_number(v)}" for k, v in items[:most])


def metrics_table(metrics: dict[str, Any], title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, min_width=len(title) + 2)  # a title on one line
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    for key in sorted(metrics):
        table.add_row(key, _number(metrics[key]))
    return table


def model_rows(job: dict[str, Any]) -> list[tuple[str, str]]:
    """Where a finished job's results are: its MLflow run, the registered model (name, version, alias, the
    models:/ URIs a notebook loads) and the pictures."""
    result = job.get("result") or {}
    rows = []
    if job.get("mlflow_run_id"):
        rows.append(("MLflow run", job["mlflow_run_id"]))
    model = result.get("model") if isinstance(result.get("model"), dict) else None
    if model and model.get("name"):
        alias = f" @{model['alias']}" if model.get("alias") else ""
        rows.append(("model", f"{model['name']} version {model.get('version', '?')}{alias}"))
        uris = [model["model_uri"]] if model.get("model_uri") else []
        if model.get("alias"):
            uris.append(f"models:/{model['name']}@{model['alias']}")
        if uris:
            rows.append(("model URI", "  ".join(uris)))
        if model.get("decision"):  # why the alias moved to this version or stayed (jobs/gate.py)
            rows.append(("alias", str(model["decision"])))
    elif job.get("model_version"):
        rows.append(("model version", job["model_version"]))
    if result.get("best_trial"):
        rows.append(("best trial", str(result["best_trial"])))
    if result.get("no_best"):
        rows.append(("best trial", str(result["no_best"])))
    if result.get("pictures"):
        rows.append(("pictures", str(result["pictures"])))
    return rows


def key_value_table(rows: list[tuple[str, str]]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def print_outcome(job: dict[str, Any], out: Console | None = None) -> None:
    """The final metrics table and where the model and pictures are."""
    out = out or console
    result = job.get("result") or {}
    metrics = result.get("metrics") if isinstance(result.get("metrics"), dict) else {}
    if metrics:
        title = f"best trial {result['best_trial']}: final metrics" if result.get("best_trial") else "final metrics"
        print_table(metrics_table(metrics, title), out)
    rows = model_rows(job)
    if rows:
        print_table(key_value_table(rows), out)


def queue_text(place: dict[str, Any]) -> str:
    """Why a queued job waits, with numbers: ``needs CPU 4, GPU 0; free CPU 2, GPU 0; 3 jobs ahead``."""
    ahead = place["jobs_ahead"]
    ahead_text = f"{ahead} job{'s' if ahead != 1 else ''} ahead"
    if place.get("reason"):
        return f"{place['reason']}; {ahead_text}"
    if place.get("blocked_by"):
        return f"{ahead_text}; the dispatcher waits on {place['blocked_by']}: {place['blocked_by_reason']}"
    if ahead:
        return ahead_text
    return "next in line; the dispatcher has not looked at it yet (is it running? `aeforge serve` runs one)"


# --- commands -----------------------------------------------------------------------------------------------------


def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, min=0, max=65535, help="port to listen on (0: any free port)"),
    dispatch: bool = typer.Option(
        True, "--dispatch/--no-dispatch", help="also run the dispatcher in this process (off: API only)"
    ),
    workers: int | None = typer.Option(
        None,
        min=1,
        help="API processes on the port, the first also dispatching (default AEFORGE_API_WORKERS, 1): one process "
        "serves some 250-300 submissions/s",
    ),
) -> None:
    """Run the queue service: the API, the dispatcher, and a local Ray head when RAY_ADDRESS is not set. The CLI
    on this machine finds it without AEFORGE_API_URL (its address is recorded in AEFORGE_HOME/service.json)."""
    from services.api import run_service
    from services.settings import service_record_path

    settings = ServiceSettings.load()

    def ready(url: str) -> None:
        console.print(
            f"aeforge service on {url}  (database {settings.db_url.split('://')[0]}, "
            f"Ray {settings.ray_address or 'local head'}; API docs at {url}/docs; address recorded in "
            f"{service_record_path(settings.home)})",
            highlight=False,
            soft_wrap=True,
        )

    run_service(settings, host=host, port=port, dispatch=dispatch, on_ready=ready, workers=workers)


def submit(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="job spec (YAML or JSON)"),
    priority_class: str | None = typer.Option(
        None, "--class", "-c", help="priority class from the queue policy (default: its default class)"
    ),
    priority: int | None = typer.Option(None, "--priority", "-p", help="a raw priority, higher first (admins only)"),
    follow: bool = typer.Option(False, "--follow", "-f", help="show state changes and logs until the job ends"),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="a retried submission with this key returns the same job"
    ),
    max_attempts: int | None = typer.Option(None, "--max-attempts", min=1, help="attempts before it fails"),
) -> None:
    """Queue a job; prints its id."""
    try:
        text = spec_path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {spec_path}: {exc}")
    client = make_client()
    job = client.submit(
        text,
        priority_class=priority_class,
        priority=priority,
        idempotency_key=idempotency_key,
        max_attempts=max_attempts,
    )
    print(job["id"], flush=True)
    for note in job.get("notes") or []:  # what the service's data check could not check
        Console(stderr=True).print(f"note: {note}", highlight=False, soft_wrap=True, markup=False)
    if follow:
        state = follow_job(client, job["id"])
        raise typer.Exit(0 if state == "succeeded" else 1)


def jobs(
    state: list[str] | None = typer.Option(None, "--state", "-s", help=f"one of {', '.join(STATES)} (repeatable)"),
    owner: str | None = typer.Option(None, help="only this owner's jobs (admins)"),
    name: str | None = typer.Option(None, help="only jobs with this name"),
    limit: int = typer.Option(50, min=1, max=500),
    offset: int = typer.Option(0, min=0),
    cursor: str | None = typer.Option(None, help="the page after this one (the `more: --cursor` of a listing)"),
    output: OutputFormat = output_option(),
) -> None:
    """List jobs, newest first."""
    page = make_client().list_jobs(states=state, owner=owner, name=name, limit=limit, offset=offset, cursor=cursor)
    if output == OutputFormat.json:
        print_json(page)
        return
    items = page["items"]
    total = f"{page['total']:,}" + ("" if page.get("total_exact", True) else "+")
    shown = f"{len(items)} after --cursor {cursor}" if cursor else f"{offset + 1 if items else 0}-{offset + len(items)}"
    table = Table(
        title=f"jobs {shown} of {total}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    # Long cells (ids, names, models) fold onto more lines rather than being cut; on a terminal wide enough for
    # them (and always when piped) each is on one line, ready to copy. Columns that would say the same on every row
    # (one owner, no models yet) are left out to keep the table within a terminal.
    table.add_column("id", overflow="fold")
    columns = ["name"] + (["owner"] if len({j["owner"] for j in items}) > 1 else [])
    columns += ["state", "prio", "tries", "resources", "age"] + (
        ["model"] if any(j["model_version"] for j in items) else []
    )
    for column in columns:
        table.add_column(
            column,
            justify="right" if column in ("prio", "tries", "age") else "left",
            no_wrap=column in ("state", "age", "prio", "tries"),
            overflow="fold",
        )
    for job in items:
        model = (job.get("result") or {}).get("model")
        model_name = model.get("name") if isinstance(model, dict) else None
        cells = {
            "name": job["name"],
            "owner": job["owner"],
            "state": styled(job["state"])
            + (" (cancelling)" if job["cancel_requested"] and not job["finished_at"] else ""),
            "prio": str(job["priority"]),
            "tries": f"{job['attempts']}/{job['max_attempts']}",
            "resources": _resources(job["resources"]),
            "age": _age(job["created_at"]),
            "model": (f"{model_name} v{job['model_version']}" if model_name else job["model_version"] or ""),
        }
        table.add_row(job["id"], *(cells[c] for c in columns))
    print_table(table)
    if page.get("next_cursor") is not None:
        console.print(f"more: --cursor {page['next_cursor']}", highlight=False)


def queue_command(output: OutputFormat = output_option()) -> None:
    """The queue per team and owner: what runs and waits, what each holds against its quota and share, and each
    waiting job's place and reason (users see every team's totals and their own jobs)."""
    report = make_client().queue()
    if output == OutputFormat.json:
        print_json(report)
        return
    policy = report["policy"]
    console.print(f"policy: {policy['source']}", highlight=False, soft_wrap=True)
    if policy.get("problem"):
        console.print(f"[red]policy file refused:[/red] {policy['problem']}", highlight=False, soft_wrap=True)
    teams = Table(title="teams", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("team", "owners", "running", "waiting", "holds", "quota", "share", "usage"):
        teams.add_column(column, overflow="fold", justify="right" if column in ("running", "waiting") else "left")
    for team in report["teams"]:
        quota = team["quota"]
        limits = ", ".join(f"{k} {v:g}" for k, v in quota.items() if v is not None) or "none"
        holds = team["holds"]
        share = "" if team["share"] is None else f"{team['share']:.0%}"
        usage = "" if team["weighted_usage"] is None else f"{team['weighted_usage']:.3f} (weight {team['weight']:g})"
        owners = ", ".join(f"{o['owner']} {o['running']}/{o['waiting']}" for o in team["owners"])
        teams.add_row(
            team["team"],
            owners,
            str(team["running"]),
            str(team["waiting"]),
            f"cpu {holds['cpu']:g}, gpu {holds['gpu']:g}, jobs {holds['jobs']}",
            limits,
            share,
            usage,
        )
    print_table(teams)
    if report["waiting"]:
        waiting = Table(title="waiting", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for column in ("place", "id", "owner", "team", "class", "reason"):
            waiting.add_column(column, overflow="fold", justify="right" if column == "place" else "left")
        for job in report["waiting"]:
            waiting.add_row(
                f"{job['place']} ({job['place_in_team']} in team)",
                job["id"],
                job["owner"],
                job["team"],
                job["priority_class"] or f"priority {job['priority']}",
                job["reason"] or "",
            )
        print_table(waiting)
    if not report["live"]:
        console.print("(the service cannot see the cluster now: reasons are those of the last pass)", highlight=False)


def status(job_id: str = typer.Argument(..., metavar="ID"), output: OutputFormat = output_option()) -> None:
    """A job's state, progress or why it waits, its results (metrics, model, pictures) and every state change."""
    job = make_client().get(job_id, progress=True)
    if output == OutputFormat.json:
        print_json(job)
        return
    state = styled(job["state"]) + (
        f" (cancel asked by {job['cancel_requested_by']})"
        if job["cancel_requested_by"] and not job["finished_at"]
        else ""
    )
    rows = [("id", job["id"]), ("name", job["name"]), ("owner", job["owner"]), ("kind", job["kind"]), ("state", state)]
    if job.get("queue"):
        rows.append(("waiting", queue_text(job["queue"])))
    progress, phase = job.get("progress"), job.get("phase")
    if phase and job["state"] == "running":
        training = phase.get("phase") == "training"
        rows.append(("phase", "training" if training else phase_text(phase)))
    if progress:
        rows.append(("progress", progress_text(progress)))
    rows += [
        ("priority", str(job["priority"])),
        ("attempts", f"{job['attempts']} of {job['max_attempts']}"),
        ("resources", _resources(job["resources"])),
        ("Ray job", job["ray_submission_id"] or "-"),
        ("created", _short_time(job["created_at"])),
        ("started", _short_time(job["started_at"])),
        ("finished", _short_time(job["finished_at"])),
    ]
    rows += model_rows(job)
    if job["error"]:
        rows.append(("error", f"[red]{job['error']}[/red]"))
    print_table(key_value_table(rows))
    if progress and isinstance(progress.get("metrics"), dict) and progress["metrics"]:
        print_table(metrics_table(progress["metrics"], f"latest metrics (step {progress.get('step')})"))
    final = (job.get("result") or {}).get("metrics")
    if isinstance(final, dict) and final:
        best = (job.get("result") or {}).get("best_trial")
        print_table(metrics_table(final, f"best trial {best}: final metrics" if best else "final metrics"))
    events = Table(title="events", box=box.SIMPLE_HEAD)
    for column in ("time", "attempt", "from", "to"):
        events.add_column(column, no_wrap=True)
    events.add_column("reason", overflow="fold")
    for e in job["events"]:
        events.add_row(
            _short_time(e["at"]), str(e["attempt"]), e["from_state"] or "", styled(e["to_state"]), e["reason"]
        )
    print_table(events)


def logs(
    job_id: str = typer.Argument(..., metavar="ID"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
    tail: int | None = typer.Option(None, "--tail", "-n", min=0, help="only the last N lines (then follow)"),
    attempt: int | None = typer.Option(None, "--attempt", min=1, help="default: the latest"),
    full: bool = typer.Option(
        False, "--full", help="Ray's log as it is: colour codes, the lines for the service, Ray's own noise"
    ),
) -> None:
    """A job's log (from its Ray job), as a person reads it: its steps (loss parts, images/s), phases, and the job's
    and Ray's lines, without colour codes, the lines meant for the service or Ray's known noise (see --full)."""
    client = make_client()
    skip = 0
    if not follow or tail is not None:
        lines = client.logs(job_id, attempt=attempt, full=full).splitlines()
        skip = len(lines)  # the stream starts from the beginning of the log: what was shown is passed over
        if tail is not None:
            lines = lines[len(lines) - tail :] if tail else []
        _write_lines(lines)
        if not follow:
            return
    for number, line in enumerate(whole_lines(client.follow_logs(job_id, attempt=attempt, full=full))):
        if number >= skip:
            _write_lines([line])


def _write_lines(lines: list[str]) -> None:
    if lines:
        console.out("\n".join(lines), highlight=False)


def cancel(job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Cancel a job: at once if queued; a running one is stopped on Ray first."""
    job = make_client().cancel(job_id)
    if job["state"] == "cancelled":
        console.print(f"{job['id']}: {styled('cancelled')}", highlight=False)
    else:
        console.print(
            f"{job['id']}: {styled(job['state'])}, stopping its Ray job; it is marked cancelled once stopped",
            highlight=False,
        )


def retry(job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Queue a failed or cancelled job again; it resumes from its last checkpoint."""
    job = make_client().retry(job_id)
    console.print(
        f"{job['id']}: {styled(job['state'])} (attempt {job['attempts'] + 1} of {job['max_attempts']} next)",
        highlight=False,
    )


# --- following a job ----------------------------------------------------------------------------------------------


def follow_job(client: AeforgeClient, job_id: str, poll_s: float = 1.0, out: Console | None = None) -> str:
    """Print a job's state changes and log lines, with a progress bar of its training steps (its speed and latest
    loss parts beside it), until it ends; then its final metrics and where its model and pictures are. Returns its
    final state."""
    out = out or console
    chunks: queue.Queue = queue.Queue()

    def read_logs():
        try:
            for chunk in client.follow_logs(job_id, full=True):  # the marked lines drive the bar
                chunks.put(chunk)
        except ApiError as exc:
            chunks.put(exc)
        finally:
            chunks.put(None)

    threading.Thread(target=read_logs, name=f"logs-{job_id}", daemon=True).start()
    shown_events, logs_done, ended_at = 0, False, None
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    with Progress(*columns, console=out, transient=False) as progress:
        task = progress.add_task(f"{job_id}: submitted", total=None, detail="")

        def on_progress(mark: str, payload: dict[str, Any]) -> None:
            """A step or phase line: the bar shows the phase, its parts done of its total, and its ETA."""
            if mark == PROGRESS_MARK:
                detail = "  ".join(
                    part
                    for part in (
                        f"{payload['images_per_second']:,.0f} images/s"
                        if isinstance(payload.get("images_per_second"), (int, float))
                        else "",
                        f"ETA {format_duration(payload['eta_s'])}"
                        if isinstance(payload.get("eta_s"), (int, float)) and payload["step"] != payload.get("total")
                        else "",
                        metrics_brief(payload.get("metrics")),
                    )
                    if part
                )
                phase["text"] = "training" + (f" {payload['trial']}" if payload.get("trial") else "")
                progress.update(task, completed=payload["step"], total=payload.get("total"), detail=detail)
            else:
                phase["text"] = " ".join(str(payload[k]) for k in ("trial", "phase", "detail") if payload.get(k))
                eta = payload.get("eta_s")
                progress.update(
                    task,
                    completed=payload.get("done") or 0,
                    total=payload.get("total") if isinstance(payload.get("total"), int) else None,
                    detail=f"ETA {format_duration(eta)}" if isinstance(eta, (int, float)) else "",
                )
            progress.update(task, description=f"{job_id}: {phase['text']}")

        phase = {"text": ""}
        reader = ReadableLog(on_progress=on_progress)
        while True:
            job = client.get(job_id)
            for e in job["events"][shown_events:]:
                progress.console.print(
                    f"[dim]{_short_time(e['at'])}[/dim] {styled(e['to_state'])}: {e['reason']}",
                    highlight=False,
                    soft_wrap=True,
                )
            shown_events = len(job["events"])
            shown_state = phase["text"] if job["state"] == "running" and phase["text"] else job["state"]
            progress.update(task, description=f"{job_id}: {shown_state}")
            deadline = time.monotonic() + poll_s
            while not logs_done and (left := deadline - time.monotonic()) > 0:
                try:
                    chunk = chunks.get(timeout=left)
                except queue.Empty:
                    break
                if chunk is None:
                    logs_done = True
                elif isinstance(chunk, ApiError):
                    progress.console.print(f"[yellow]logs unavailable: {chunk}[/yellow]", highlight=False)
                else:
                    for line in reader.feed(chunk):
                        progress.console.out(line, highlight=False)
            if logs_done and job["state"] not in TERMINAL_STATES:
                time.sleep(poll_s)
            if job["state"] in TERMINAL_STATES:
                ended_at = ended_at or time.monotonic()
                # The log stream ends with the job; wait a little for its last lines.
                if logs_done or time.monotonic() - ended_at > 10:
                    for line in reader.flush():
                        progress.console.out(line, highlight=False)
                    break
    final = job["state"]
    out.print(
        f"{job_id}: {styled(final)}" + (f" — {job['error']}" if final == "failed" and job["error"] else ""),
        highlight=False,
        soft_wrap=True,
    )
    if final == "succeeded":
        print_outcome(job, out)
    return final


def register(app: typer.Typer) -> None:
    """Mount the queue commands on the `aeforge` app (each handles its errors, whatever app it is mounted on)."""
    for name, command in (
        ("serve", serve),
        ("submit", submit),
        ("jobs", jobs),
        ("queue", queue_command),
        ("status", status),
        ("logs", logs),
        ("cancel", cancel),
        ("retry", retry),
    ):
        app.command(name)(handle_errors(command))
