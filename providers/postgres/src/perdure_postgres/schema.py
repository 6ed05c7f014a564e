"""Schema management: run the alembic migrations and check that a database is up to date.

The alembic tree lives at the repository's top level (``migrations/postgres``) and is shipped
inside the wheel as ``perdure_postgres/migrations``. :func:`migrations_path` finds it in either
place.

Two processes starting at once must not both migrate: :func:`migrate` takes a
*transaction-scoped* advisory lock (``pg_advisory_xact_lock``, keyed by the schema name) in the
same transaction that runs every revision, on a dedicated connection that is not part of the
provider's pool. PostgreSQL DDL is transactional, so the second migrator waits, then sees the
version the first one committed and has nothing to do. A transaction-scoped lock cannot leak
(it is released by commit, rollback or a dropped connection), and works behind a transaction-mode
pooler, unlike a session-scoped one (see ``reference/reliability.md`` 4.3).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

#: The schema used when none is given.
DEFAULT_SCHEMA = "perdure"
#: The alembic version table, created inside the configured schema.
VERSION_TABLE = "alembic_version"
#: The newest shipped revision. Kept here so opening a provider on an up-to-date schema needs
#: one query and no alembic import; a test checks it against the alembic tree's head.
HEAD_REVISION = "0001"

_SCHEMA_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_RESERVED_PREFIXES = ("pg_",)
_RESERVED = {"information_schema", "public"}


def validate_schema(schema: str) -> str:
    """Return ``schema`` if it is a safe schema name, else raise :class:`ValueError`.

    Allowed: a letter or underscore, then letters, digits and underscores, at most 63 characters
    (PostgreSQL's identifier limit), not ``public``, ``information_schema`` or ``pg_*``. The name
    is still always quoted as an identifier; the check keeps names portable and predictable
    (case is preserved, so ``MyApp`` and ``myapp`` are different schemas).
    """
    if not isinstance(schema, str) or not _SCHEMA_RE.match(schema):
        raise ValueError(
            f"invalid schema name {schema!r}: use 1-63 letters, digits or underscores, "
            "not starting with a digit"
        )
    if schema.lower() in _RESERVED or schema.lower().startswith(_RESERVED_PREFIXES):
        raise ValueError(f"schema name {schema!r} is reserved; pick a dedicated schema for perdure")
    return schema


def advisory_key(namespace: str, name: str) -> tuple[int, int]:
    """A stable two-int advisory lock key: ``(hash(namespace), hash(name))`` as signed int32."""

    def _int32(text: str) -> int:
        value = zlib.crc32(text.encode())
        return value - (1 << 32) if value >= (1 << 31) else value

    return _int32(namespace), _int32(name)


def migrations_path() -> Path:
    """The directory of the alembic tree (``env.py`` and ``versions/``).

    Installed from a wheel it is ``perdure_postgres/migrations``; in an editable install or a
    source checkout it is the repository's ``migrations/postgres``.
    """
    packaged = resources.files("perdure_postgres") / "migrations"
    if isinstance(packaged, Path) and (packaged / "env.py").is_file():
        return packaged
    repo = Path(__file__).resolve().parents[4] / "migrations" / "postgres"
    if (repo / "env.py").is_file():
        return repo
    raise FileNotFoundError(
        "perdure_postgres migrations not found: expected perdure_postgres/migrations in the installed "
        f"package or {repo} in a source checkout"
    )


def _alembic_config(schema: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_path()))
    cfg.attributes["schema"] = schema
    return cfg


@lru_cache(maxsize=1)
def head_revision() -> str:
    """The newest revision of the shipped migrations."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(_alembic_config(DEFAULT_SCHEMA)).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"perdure_postgres migrations must have exactly one head, found {heads}")
    return str(heads[0])


def revisions() -> list[str]:
    """Every shipped revision, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(DEFAULT_SCHEMA))
    return [str(r.revision) for r in reversed(list(script.walk_revisions()))]


def migrate(
    dsn: str, *, schema: str = DEFAULT_SCHEMA, revision: str = "head", connect_timeout: float = 10.0
) -> None:
    """Create or upgrade the perdure tables in ``schema`` to ``revision`` (default: the newest).

    Idempotent and safe to run from several processes at once (an advisory lock serialises
    them). Creates the schema if needed. The role needs CREATE on the database (for the schema)
    or ownership of an existing schema; production deployments typically run this once per
    release with a migration role and open providers with ``migrate=False``.
    """
    validate_schema(schema)
    from alembic import command
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(dsn, connect_timeout=max(1, round(connect_timeout)))

    engine = create_engine("postgresql+psycopg://", creator=connect, poolclass=NullPool)
    try:
        with engine.connect() as conn, conn.begin():
            # Migrations may take longer than an application's statement timeout.
            conn.execute(text("SET LOCAL statement_timeout = 0"))
            key = advisory_key("perdure_postgres.migrate", schema)
            conn.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": key[0], "b": key[1]})
            quoted = conn.dialect.identifier_preparer.quote_schema(schema)
            # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists:
            # look first, so a migrator that only owns its schema can migrate it.
            exists = conn.execute(
                text("SELECT 1 FROM pg_namespace WHERE nspname = :n"), {"n": schema}
            ).first()
            if exists is None:
                conn.execute(text(f"CREATE SCHEMA {quoted}"))
            cfg = _alembic_config(schema)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


@dataclass(frozen=True, slots=True)
class SchemaState:
    """What :func:`schema_state` found: the stored revision (``None`` if not migrated) and head."""

    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        """True when the database is at the newest revision."""
        return self.current == self.head


def version_query(schema: str) -> sql.Composed:
    """SQL reading the stored alembic revision of ``schema``.

    Fails with ``UndefinedTable`` or ``InvalidSchemaName`` when the schema was never migrated;
    callers treat that as "no revision".
    """
    return sql.SQL("SELECT version_num FROM {}.{}").format(
        sql.Identifier(schema), sql.Identifier(VERSION_TABLE)
    )


def schema_state(dsn: str, *, schema: str = DEFAULT_SCHEMA) -> SchemaState:
    """Read the revision stored in ``schema`` (synchronously) and compare it with the newest."""
    validate_schema(schema)
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            row = conn.execute(version_query(schema)).fetchone()
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
            row = None
    return SchemaState(current=row[0] if row else None, head=HEAD_REVISION)


def schema_error(schema: str, state: SchemaState) -> str:
    """The message for a database that is not at the newest revision (None if it is)."""
    if state.current is None:
        what = f"schema {schema!r} has no perdure tables"
    elif state.current not in revisions():
        return (
            f"schema {schema!r} is at revision {state.current!r}, which this perdure-postgres does not know "
            f"(newest known: {state.head!r}): the database was migrated by a newer release; upgrade "
            "perdure-postgres"
        )
    else:
        what = f"schema {schema!r} is at revision {state.current!r}, not the newest {state.head!r}"
    return (
        f"{what}: run the migrations first, e.g. "
        f"python -c \"import perdure_postgres; perdure_postgres.migrate(DSN, schema='{schema}')\" "
        "or open the provider with migrate=True"
    )


__all__ = [
    "DEFAULT_SCHEMA",
    "HEAD_REVISION",
    "VERSION_TABLE",
    "SchemaState",
    "advisory_key",
    "head_revision",
    "migrate",
    "migrations_path",
    "revisions",
    "schema_error",
    "schema_state",
    "validate_schema",
]
