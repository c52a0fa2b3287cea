"""How the `aeforge` CLI ends on an error: one rule for every command.

- An :class:`~workers.errors.AeforgeError` (a bad spec, data file, setting, storage endpoint, unknown model or job,
  a refusal of the service) is something the user can act on: it prints as one clean message, ``error: ...``
  (an error with per-field entries, such as a SpecError, lists them one per line), and exits with code 2.
- Anything else is a bug in aeforge: it prints its traceback and a line saying so, and exits with code 1.
- Click's and Typer's own exits (``typer.Exit``, ``typer.Abort``, usage errors), ``SystemExit`` and
  ``KeyboardInterrupt`` pass through unchanged.

:class:`ErrorHandlingGroup` applies the rule to every command of a Typer app made with ``cls=ErrorHandlingGroup``
(the `aeforge` app, and each sub-app, so that one mounted on its own behaves the same); :func:`handle_errors`
does it for a command registered directly on another app.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import typer
from rich.markup import escape
from typer import _click as typer_click  # the Click inside Typer: TyperGroup.invoke takes its Context
from typer.core import TyperGroup

from services.cli_output import CliConsole, make_console
from workers.errors import AeforgeError

USER_ERROR_EXIT_CODE = 2
BUG_EXIT_CODE = 1
BUG_LINE = "this is a bug in aeforge; please report it with the traceback above"

# Typer's and Click's own ends (usage errors, exits, aborts) and what they turn into them (EOF at a prompt, a closed
# pipe): they keep their exit codes and messages. A Typer with Click inside it (0.29 here) raises TyperExceptions;
# one that uses the installed Click raises Click's.
_NOT_OURS: tuple[type[BaseException], ...] = (typer.Exit, typer.Abort, typer.TyperException, EOFError, BrokenPipeError)
try:
    import click

    _NOT_OURS += (click.exceptions.Exit, click.exceptions.Abort, click.ClickException)
except ImportError:  # pragma: no cover
    pass

F = TypeVar("F", bound=Callable[..., Any])


def _stderr() -> CliConsole:
    # Made per call, so the terminal width (COLUMNS) and a test runner's stderr are the ones of this command.
    return make_console(stderr=True)


def fail(message: str, code: int = USER_ERROR_EXIT_CODE) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    _stderr().print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr; the command goes on (and its exit code is not changed)."""
    _stderr().print(f"[bold yellow]warning:[/bold yellow] {escape(message)}", highlight=False, soft_wrap=True)


def print_user_error(exc: AeforgeError) -> None:
    """``error: <message>``; an error with ``errors`` entries ({"loc", "msg"}) prints its first line, then one
    entry per line."""
    console = _stderr()
    message = str(exc) or type(exc).__name__
    entries = getattr(exc, "errors", None)
    if not (isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries)):
        console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
        return
    console.print(f"[bold red]error:[/bold red] {escape(message.splitlines()[0])}", highlight=False, soft_wrap=True)
    for entry in entries:
        console.print(
            f"  [yellow]{escape(str(entry.get('loc', '')))}[/yellow]: {escape(str(entry.get('msg', '')))}",
            highlight=False,
            soft_wrap=True,
        )


def print_bug(exc: BaseException) -> None:
    """The traceback, then the line that says it is a bug."""
    traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.flush()
    _stderr().print(f"[bold red]{BUG_LINE}[/bold red]", highlight=False, soft_wrap=True)


@contextmanager
def handling_errors() -> Iterator[None]:
    """Run a command under the rule above."""
    try:
        yield
    except _NOT_OURS:
        raise
    except AeforgeError as exc:
        print_user_error(exc)
        raise typer.Exit(USER_ERROR_EXIT_CODE) from None
    except Exception as exc:
        print_bug(exc)
        raise typer.Exit(BUG_EXIT_CODE) from None


def handle_errors(command: F) -> F:
    """``command`` under :func:`handling_errors` (for a command registered on an app that may not handle them)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with handling_errors():
            return command(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class ErrorHandlingGroup(TyperGroup):
    """A Typer group whose commands, sub-commands and callback run under :func:`handling_errors`."""

    def invoke(self, ctx: typer_click.Context) -> Any:
        with handling_errors():
            return super().invoke(ctx)
