"""How the `aeforge` commands print: tables that never cut a name, and ``--output json`` for programs.

- On a terminal, a table fits the terminal's width: a long name folds onto the next line of its cell, whole, never
  cut to "dae-dig…". Numbers stay on one line.
- Piped or redirected (no terminal, no COLUMNS), Rich would assume 80 columns; here lines are as long as their
  content, so ``aeforge models list | grep`` sees every name whole. COLUMNS, when set, is the width everywhere.
- ``--output json`` (:func:`output_option`) prints the command's data as one JSON document: full values, the same
  keys every time, no markup, no colour; NaN and infinities become null (strict JSON).
"""

from __future__ import annotations

import enum
import json
import math
import sys
from datetime import date, datetime
from pathlib import PurePath
from typing import Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table

# The width of output that goes to no terminal: wide enough that no name or line of aeforge's ever wraps.
PIPE_WIDTH = 10_000


class CliConsole(Console):
    """A rich Console as wide as the terminal on a terminal (or COLUMNS when set), and as wide as its lines when
    the output is piped. Decided at each print, so one made at import follows the stream of the command running
    (Typer's CliRunner swaps sys.stdout)."""

    @property
    def size(self) -> ConsoleDimensions:
        dimensions = super().size
        if self._width is None and not self.is_terminal and not self._environ.get("COLUMNS", "").isdigit():
            return ConsoleDimensions(PIPE_WIDTH, dimensions.height)
        return dimensions

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


def make_console(*, stderr: bool = False) -> CliConsole:
    return CliConsole(stderr=stderr)


def new_table(title: str | None = None, **kwargs: Any) -> Table:
    """A table whose columns are added with :func:`text_column` and :func:`number_column`."""
    return Table(title=title, **kwargs)


def text_column(table: Table, header: str, **kwargs: Any) -> None:
    """A column of names or text: wraps at spaces, and a word longer than the cell folds onto the next line."""
    table.add_column(header, overflow="fold", **kwargs)


def number_column(table: Table, header: str, **kwargs: Any) -> None:
    """A right-aligned column of numbers. Not ``no_wrap``: a cell that must shrink below its content would be cut
    without a mark; it folds instead (Rich narrows the widest wrapping columns, the names, first)."""
    table.add_column(header, justify="right", overflow="fold", **kwargs)


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"


def output_option() -> Any:
    """The ``--output/-o table|json`` option (a fresh OptionInfo for each command)."""
    return typer.Option(
        OutputFormat.table,
        "--output",
        "-o",
        case_sensitive=False,
        help="table (for people) or json (for programs: every value in full, stable keys)",
    )


def jsonable(value: Any) -> Any:
    """``value`` with what strict JSON cannot hold replaced: NaN/inf -> None, dates -> ISO 8601, paths -> str,
    tuples and sets -> lists (sets sorted), mapping keys -> str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if hasattr(value, "item"):  # a numpy or torch scalar
        return jsonable(value.item())
    return str(value)


def print_json(data: Any) -> None:
    """``data`` as indented, key-sorted strict JSON on stdout (plain text: no Rich markup or highlighting)."""
    sys.stdout.write(json.dumps(jsonable(data), indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def metric_text(value: Any) -> str:
    """A metric as a person reads it: 4 decimals, or scientific notation for tiny and huge values; never ``-0.0000``
    (a value that rounds to zero is 0, whatever its sign)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value != value or value in (float("inf"), float("-inf")):  # NaN, inf: as Python writes them
        return str(value)
    if value != 0 and not 1e-3 <= abs(value) < 1e6:
        return f"{value:.3e}"
    text = f"{value:.4f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text
