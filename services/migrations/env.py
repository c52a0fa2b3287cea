"""Alembic's environment for the job store (services.store.migrate runs it; so does ``alembic`` pointed here).

services.store.migrate hands over a connection already inside the migration transaction (under the PostgreSQL
advisory lock, or SQLite's BEGIN IMMEDIATE) in ``config.attributes["connection"]``. Run by the ``alembic`` command
instead, this environment opens the store named by ``sqlalchemy.url`` (else AEFORGE_DB_URL, else the default
store) and takes the same lock itself. No logging is configured here: Alembic's INFO lines stay off the screen.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from services.store import VERSION_TABLE, metadata


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        # SQLite alters a table by copying it (Alembic's batch mode); PostgreSQL alters it in place.
        render_as_batch=connection.dialect.name == "sqlite",
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_standalone() -> None:
    from services.settings import ServiceSettings
    from services.store import locked_migration_connection, make_engine

    url = context.config.get_main_option("sqlalchemy.url") or ServiceSettings.load().db_url
    engine = make_engine(url)
    try:
        with locked_migration_connection(engine) as connection:
            run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("the aeforge job store is migrated online only: `aeforge admin db upgrade`")
given = context.config.attributes.get("connection")
if given is not None:
    run_on(given)
else:
    run_standalone()
