"""Alembic environment for the perdure PostgreSQL schema.

Run through :func:`perdure_postgres.migrate` (which passes an open SQLAlchemy connection, already
inside a transaction that holds the migration advisory lock, in ``config.attributes``), or with the
``alembic`` command line: ``alembic -x schema=perdure -x dsn=postgresql://... upgrade head`` from a
directory whose ``alembic.ini`` points ``script_location`` here.

Every object, the version table included, lives in one schema, so several applications (or test
runs) share a database without touching each other. Revisions read the schema name from
``op.get_context().version_table_schema``.
"""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes.get("connection")
schema = config.attributes.get("schema") or context.get_x_argument(as_dictionary=True).get(
    "schema", "perdure"
)

if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or "postgresql://",
        literal_binds=True,
        version_table_schema=schema,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()
elif connection is not None:
    context.configure(connection=connection, version_table_schema=schema, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    # Command-line use: delegate to the library so the advisory lock and schema creation apply.
    from perdure_postgres import migrate

    dsn = context.get_x_argument(as_dictionary=True).get("dsn") or config.get_main_option("sqlalchemy.url")
    if not dsn:
        raise SystemExit("pass the database with -x dsn=postgresql://... (or sqlalchemy.url in alembic.ini)")
    migrate(dsn, schema=schema)
