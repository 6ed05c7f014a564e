"""Alembic environment for the perdure SQLite schema.

perdure_sqlite passes its own open connection in ``config.attributes["connection"]`` (so that
``:memory:`` databases and the provider's connection settings work); the alembic CLI uses
``sqlalchemy.url`` from alembic.ini or ``-x url=...``. The whole upgrade runs in one
``BEGIN IMMEDIATE`` transaction: SQLite DDL is transactional, so a failed migration leaves the
previous schema intact, and concurrent migrators queue on the write lock and then find the
schema already current.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine


def _migrate(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")
    try:
        context.configure(connection=connection, transactional_ddl=True, render_as_batch=True)
        context.run_migrations()
    except BaseException:
        connection.rollback()
        raise
    connection.commit()


def _run() -> None:
    config = context.config
    given = config.attributes.get("connection")
    if given is not None:
        _migrate(given)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if context.is_offline_mode():
        context.configure(url=url, literal_binds=True, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    # isolation_level=None: the driver must not open transactions on its own (we BEGIN IMMEDIATE).
    engine = create_engine(url, connect_args={"isolation_level": None})
    try:
        with engine.connect() as connection:
            _migrate(connection)
    finally:
        engine.dispose()


_run()
