"""`aeforge tokens ...`: the queue service's API tokens.

``aeforge tokens add OWNER [--role admin]`` makes a random token, appends its hash (``sha256:<hex>``) to the token
file the service reads (AEFORGE_TOKENS_FILE, else AEFORGE_HOME/tokens.yaml; made with mode 0600 if missing) and
prints the token, once, on stdout: it is kept nowhere else. A running service reads the file again when it changes,
so the token works at once. Run it where the token file is (the service's machine, or its mounted secret's source).
"""

from __future__ import annotations

import typer
from rich.console import Console

from services.cli_errors import ErrorHandlingGroup

tokens_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True, help="The queue service's API tokens.")


@tokens_app.command("add")
def add(
    owner: str = typer.Argument(..., help="who the token is for (jobs submitted with it are theirs)"),
    role: str = typer.Option("user", "--role", help="user (their own jobs) or admin (every job)"),
) -> None:
    """Add a token for OWNER: prints the new token once; the token file keeps only its hash."""
    from services.settings import add_token, tokens_file_for

    path = tokens_file_for()
    principal = add_token(path, owner, role)  # type: ignore[arg-type]  # add_token checks the role
    Console(stderr=True).print(
        f"added a token for {principal.owner} (role {principal.role}) to {path}, its hash only; "
        f"the token is shown this once:",
        highlight=False,
        soft_wrap=True,
    )
    typer.echo(principal.token)


def register(app: typer.Typer) -> None:
    """Mount the `tokens` commands on the main CLI."""
    app.add_typer(tokens_app, name="tokens")
