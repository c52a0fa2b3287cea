"""`aeforge admin db ...`: the job store's schema, for the team that runs the service.

``upgrade`` brings the database named by AEFORGE_DB_URL (else the default SQLite store under AEFORGE_HOME) to the
newest revision aeforge has, as ``aeforge serve`` does at start and under the same lock; ``current`` says which
revision it is at; ``history`` lists the revisions. A database newer than this aeforge is refused, not touched.
"""

from __future__ import annotations

import typer

from services.cli_errors import ErrorHandlingGroup
from services.cli_output import make_console, new_table, text_column

admin_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True, help="Running the service: its database.")
db_app = typer.Typer(cls=ErrorHandlingGroup, no_args_is_help=True, help="The job store's schema (Alembic).")
admin_app.add_typer(db_app, name="db")
console = make_console()


def _db_url() -> str:
    from services.settings import ServiceSettings

    return ServiceSettings.load().db_url


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def upgrade() -> None:
    """Migrate the job store to the newest revision (what `aeforge serve` does at start)."""
    from services.store import current_revision, make_engine, migrate

    url = _db_url()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            before = current_revision(conn)
        after = migrate(engine)
    finally:
        engine.dispose()
    if before == after:
        console.print(f"{_shown(url)}: already at revision {after} (the newest)", highlight=False, soft_wrap=True)
    else:
        console.print(
            f"{_shown(url)}: migrated from revision {before or '(empty)'} to {after}", highlight=False, soft_wrap=True
        )


@db_app.command("current")
def current() -> None:
    """The revision the job store is at, and whether it is the newest."""
    from services.store import current_revision, make_engine, migration_history

    url = _db_url()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            revision = current_revision(conn)
    finally:
        engine.dispose()
    head = migration_history()[-1].id
    if revision is None:
        note = "no aeforge tables yet (`aeforge admin db upgrade` or the first `aeforge serve` creates them)"
    elif revision == head:
        note = f"revision {revision} (the newest)"
    else:
        note = f"revision {revision}; the newest is {head}: run `aeforge admin db upgrade`"
    console.print(f"{_shown(url)}: {note}", highlight=False, soft_wrap=True)


@db_app.command("history")
def history() -> None:
    """The job store's revisions, oldest first."""
    from services.store import migration_history

    table = new_table()
    text_column(table, "revision")
    text_column(table, "change")
    text_column(table, "")
    for revision in migration_history():
        table.add_row(revision.id, revision.description, "newest" if revision.is_head else "")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Mount the `admin` commands on the main CLI."""
    app.add_typer(admin_app, name="admin")
