"""The queue commands of the `aeforge` CLI: serve, submit, jobs, status, logs, cancel, retry.

``register(app)`` mounts them on the main Typer app. Every command but ``serve`` talks to the service over HTTP
(AEFORGE_API_URL, AEFORGE_API_TOKEN). Errors from the service and in the settings print as one plain message (exit
code 2; see services.cli_errors); a job followed to its end exits 0 if it succeeded, 1 otherwise.
"""

from __future__ import annotations

import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli_errors import fail, handle_errors
from services.client import AeforgeClient, ApiError
from services.dispatcher import PROGRESS_MARK, parse_progress
from services.settings import ServiceSettings
from services.store import STATES, TERMINAL_STATES

console = Console()

STATE_STYLES = {"queued": "cyan", "starting": "yellow", "running": "bold yellow", "succeeded": "green",
                "failed": "bold red", "cancelled": "magenta"}


def make_client() -> AeforgeClient:
    """The API client from settings (a seam: tests put a client over an in-process app here)."""
    return AeforgeClient.from_settings(ServiceSettings.load())


def styled(state: str) -> str:
    return f"[{STATE_STYLES.get(state, 'white')}]{state}[/]"


def _short_time(iso: str | None) -> str:
    return "" if not iso else iso.replace("T", " ")[:19]


def _age(iso: str) -> str:
    """How long ago: 45s, 12m, 5h, 3d."""
    seconds = max(0.0, (datetime.now(timezone.utc) - datetime.fromisoformat(iso.replace("Z", "+00:00"))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _resources(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if v) or "-"


# --- commands -----------------------------------------------------------------------------------------------------


def serve(host: str = typer.Option("127.0.0.1", help="address to listen on"),
          port: int = typer.Option(8000, help="port to listen on"),
          dispatch: bool = typer.Option(True, "--dispatch/--no-dispatch",
                                        help="also run the dispatcher in this process (off: API only)")) -> None:
    """Run the queue service: the API, the dispatcher, and a local Ray head when RAY_ADDRESS is not set."""
    from services.api import run_service

    settings = ServiceSettings.load()
    console.print(f"aeforge service on http://{host}:{port}  (database {settings.db_url.split('://')[0]}, "
                  f"Ray {settings.ray_address or 'local head'}; API docs at /docs)", highlight=False, soft_wrap=True)
    run_service(settings, host=host, port=port, dispatch=dispatch)


def submit(spec_path: Path = typer.Argument(..., metavar="SPEC", help="job spec (YAML or JSON)"),
           priority: int = typer.Option(0, "--priority", "-p", help="higher runs first"),
           follow: bool = typer.Option(False, "--follow", "-f", help="show state changes and logs until the job ends"),
           idempotency_key: Optional[str] = typer.Option(None, "--idempotency-key",
                                                         help="a retried submission with this key returns the same job"),
           max_attempts: Optional[int] = typer.Option(None, "--max-attempts", min=1, help="attempts before it fails")) -> None:
    """Queue a job; prints its id."""
    try:
        text = spec_path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {spec_path}: {exc}")
    client = make_client()
    job = client.submit(text, priority=priority, idempotency_key=idempotency_key, max_attempts=max_attempts)
    print(job["id"], flush=True)
    if follow:
        state = follow_job(client, job["id"])
        raise typer.Exit(0 if state == "succeeded" else 1)


def jobs(state: Optional[list[str]] = typer.Option(None, "--state", "-s", help=f"one of {', '.join(STATES)} (repeatable)"),
         owner: Optional[str] = typer.Option(None, help="only this owner's jobs (admins)"),
         name: Optional[str] = typer.Option(None, help="only jobs with this name"),
         limit: int = typer.Option(50, min=1, max=500),
         offset: int = typer.Option(0, min=0)) -> None:
    """List jobs, newest first."""
    page = make_client().list_jobs(states=state, owner=owner, name=name, limit=limit, offset=offset)
    items = page["items"]
    table = Table(title=f"jobs {offset + 1 if items else 0}-{offset + len(items)} of {page['total']}",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # The id is what a user copies into the next command: it is never cut short. Columns that would say the same
    # on every row (one owner, no models yet) are left out to keep the table within a terminal.
    table.add_column("id", no_wrap=True, min_width=max([len(j["id"]) for j in items] + [2]))
    columns = ["name"] + (["owner"] if len({j["owner"] for j in items}) > 1 else [])
    columns += ["state", "prio", "tries", "resources", "age"] + (["model"] if any(j["model_version"] for j in items) else [])
    for column in columns:
        table.add_column(column, justify="right" if column in ("prio", "tries", "age") else "left",
                         no_wrap=column in ("state", "age", "prio", "tries"))
    for job in items:
        cells = {
            "name": job["name"], "owner": job["owner"],
            "state": styled(job["state"]) + (" (cancelling)" if job["cancel_requested"] and not job["finished_at"] else ""),
            "prio": str(job["priority"]), "tries": f"{job['attempts']}/{job['max_attempts']}",
            "resources": _resources(job["resources"]), "age": _age(job["created_at"]),
            "model": job["model_version"] or "",
        }
        table.add_row(job["id"], *(cells[c] for c in columns))
    console.print(table)
    if page["next_offset"] is not None:
        console.print(f"more: --offset {page['next_offset']}", highlight=False)


def status(job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """A job's state, results and every state change."""
    job = make_client().get(job_id, progress=True)
    summary = Table(show_header=False, box=None)
    summary.add_column(style="bold")
    summary.add_column()
    rows = [("id", job["id"]), ("name", job["name"]), ("owner", job["owner"]), ("kind", job["kind"]),
            ("state", styled(job["state"]) + (f" (cancel asked by {job['cancel_requested_by']})"
                                              if job["cancel_requested_by"] and not job["finished_at"] else "")),
            ("priority", str(job["priority"])), ("attempts", f"{job['attempts']} of {job['max_attempts']}"),
            ("resources", _resources(job["resources"])), ("Ray job", job["ray_submission_id"] or "-"),
            ("created", _short_time(job["created_at"])), ("started", _short_time(job["started_at"])),
            ("finished", _short_time(job["finished_at"]))]
    if job.get("progress"):
        p = job["progress"]
        rows.append(("progress", f"step {p['step']} of {p.get('total', '?')}"))
    if job["mlflow_run_id"]:
        rows.append(("MLflow run", job["mlflow_run_id"]))
    if job["model_version"]:
        rows.append(("model version", job["model_version"]))
    if job["error"]:
        rows.append(("error", f"[red]{job['error']}[/red]"))
    for key, value in rows:
        summary.add_row(key, value)
    console.print(summary)
    events = Table(title="events")
    for column in ("time", "attempt", "from", "to", "reason"):
        events.add_column(column)
    for e in job["events"]:
        events.add_row(_short_time(e["at"]), str(e["attempt"]), e["from_state"] or "", styled(e["to_state"]), e["reason"])
    console.print(events)


def logs(job_id: str = typer.Argument(..., metavar="ID"),
         follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
         attempt: Optional[int] = typer.Option(None, "--attempt", min=1, help="default: the latest")) -> None:
    """A job's log (from its Ray job)."""
    client = make_client()
    if not follow:
        console.out(client.logs(job_id, attempt=attempt), end="", highlight=False)
        return
    for chunk in client.follow_logs(job_id, attempt=attempt):
        console.out(chunk, end="", highlight=False)


def cancel(job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Cancel a job: at once if queued; a running one is stopped on Ray first."""
    job = make_client().cancel(job_id)
    if job["state"] == "cancelled":
        console.print(f"{job['id']}: {styled('cancelled')}", highlight=False)
    else:
        console.print(f"{job['id']}: {styled(job['state'])}, stopping its Ray job; it is marked cancelled once stopped",
                      highlight=False)


def retry(job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Queue a failed or cancelled job again; it resumes from its last checkpoint."""
    job = make_client().retry(job_id)
    console.print(f"{job['id']}: {styled(job['state'])} (attempt {job['attempts'] + 1} of {job['max_attempts']} next)",
                  highlight=False)


# --- following a job ----------------------------------------------------------------------------------------------


def follow_job(client: AeforgeClient, job_id: str, poll_s: float = 1.0, out: Console | None = None) -> str:
    """Print a job's state changes and log lines, with a progress bar of its training steps, until it ends;
    returns its final state."""
    out = out or console
    chunks: queue.Queue = queue.Queue()

    def read_logs():
        try:
            for chunk in client.follow_logs(job_id):
                chunks.put(chunk)
        except ApiError as exc:
            chunks.put(exc)
        finally:
            chunks.put(None)

    threading.Thread(target=read_logs, name=f"logs-{job_id}", daemon=True).start()
    shown_events, partial, logs_done, ended_at = 0, "", False, None
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=out, transient=False) as progress:
        task = progress.add_task(f"{job_id}: submitted", total=None)
        while True:
            job = client.get(job_id)
            for e in job["events"][shown_events:]:
                progress.console.print(f"[dim]{_short_time(e['at'])}[/dim] {styled(e['to_state'])}: {e['reason']}",
                                       highlight=False, soft_wrap=True)
            shown_events = len(job["events"])
            progress.update(task, description=f"{job_id}: {job['state']}")
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
                    lines = (partial + chunk).split("\n")
                    partial = lines.pop()
                    for line in lines:
                        step = parse_progress(line) if PROGRESS_MARK in line else None
                        if step is not None:
                            progress.update(task, completed=step["step"], total=step.get("total"))
                        else:
                            progress.console.out(line, highlight=False)
            if logs_done and job["state"] not in TERMINAL_STATES:
                time.sleep(poll_s)
            if job["state"] in TERMINAL_STATES:
                ended_at = ended_at or time.monotonic()
                # The log stream ends with the job; wait a little for its last lines.
                if logs_done or time.monotonic() - ended_at > 10:
                    if partial:
                        progress.console.out(partial, highlight=False)
                    break
    final = job["state"]
    out.print(f"{job_id}: {styled(final)}" + (f" — {job['error']}" if final == "failed" and job["error"] else ""),
              highlight=False, soft_wrap=True)
    return final


def register(app: typer.Typer) -> None:
    """Mount the queue commands on the `aeforge` app (each handles its errors, whatever app it is mounted on)."""
    for name, command in (("serve", serve), ("submit", submit), ("jobs", jobs), ("status", status), ("logs", logs),
                          ("cancel", cancel), ("retry", retry)):
        app.command(name)(handle_errors(command))
