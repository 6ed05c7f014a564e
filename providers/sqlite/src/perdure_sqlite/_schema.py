"""Connections and schema migrations (alembic) for the SQLite provider.

The alembic tree lives at the repository's ``migrations/sqlite`` and ships inside the wheel as
``perdure_sqlite/migrations``. Opening a database whose schema is already at
:data:`SCHEMA_REVISION` never imports alembic (a quick ``alembic_version`` check), so opening is
cheap; anything else runs ``alembic upgrade head`` on the provider's own connection.
"""

from __future__ import annotations

import importlib.resources
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Literal

from perdure.provider import ProviderError
from perdure_sqlite._errors import is_busy

#: The alembic head this version of perdure-sqlite reads and writes. Bump it together with every
#: new revision under migrations/sqlite/versions (a test checks they agree).
SCHEMA_REVISION = "0001"

#: RETURNING (3.35) is used by the fetch and lease statements.
MIN_SQLITE_VERSION = (3, 35, 0)

Durability = Literal["full", "fast"]

MEMORY = ":memory:"

#: The writer checkpoints by itself only past this many WAL pages (16 MiB). The background
#: ``_thread.Checkpointer`` copies most frames before that, so the writer's own checkpoint is
#: short; it is still needed under sustained load, because a checkpoint running beside a busy
#: writer never catches up with the last frames, and only a complete one lets the WAL restart.
WAL_AUTOCHECKPOINT_PAGES = 4096

#: alembic keeps the running migration in module globals (``alembic.context``): one at a time
#: per process. Other processes are serialised by the write lock the migration holds.
_ALEMBIC_LOCK = threading.Lock()


def migrations_path() -> Path:
    """Return the directory holding the alembic ``env.py`` and ``versions/``.

    Inside an installed wheel it is the package resource ``perdure_sqlite/migrations``; from a
    source checkout (editable install) it is the repository's ``migrations/sqlite``.
    """
    try:
        packaged = importlib.resources.files("perdure_sqlite") / "migrations"
        if isinstance(packaged, Path) and (packaged / "env.py").is_file():
            return packaged
    except (ModuleNotFoundError, NotADirectoryError):  # pragma: no cover - zipped installs
        pass
    checkout = Path(__file__).resolve().parents[4] / "migrations" / "sqlite"
    if (checkout / "env.py").is_file():
        return checkout
    raise ProviderError(
        "migrate",
        f"cannot find the perdure-sqlite migrations (looked in the package and in {checkout})",
        retryable=False,
    )


def connect(
    path: str,
    *,
    durability: Durability = "full",
    busy_timeout: float = 5.0,
) -> sqlite3.Connection:
    """Open a connection with perdure's settings: WAL, the durability pragma, manual transactions.

    ``isolation_level=None`` hands transaction control to us (``BEGIN IMMEDIATE``); ``timeout``
    is SQLite's own busy handler, which waits for a lock before reporting SQLITE_BUSY.
    """
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise ProviderError(
            "open",
            f"SQLite {sqlite3.sqlite_version} is too old: perdure-sqlite needs 3.35 or newer",
            retryable=False,
        )
    try:
        connection = sqlite3.connect(
            path,
            timeout=busy_timeout,
            isolation_level=None,
            check_same_thread=True,
            cached_statements=256,
        )
    except sqlite3.OperationalError as exc:
        raise _cannot_open(path, exc) from exc
    try:
        execute = connection.execute
        if path != MEMORY:
            try:
                mode = execute("PRAGMA journal_mode=WAL").fetchone()[0]  # the file opens here
            except sqlite3.OperationalError as exc:
                if "unable to open" not in str(exc):
                    raise
                raise _cannot_open(path, exc) from exc
            if str(mode).lower() != "wal":
                raise ProviderError(
                    "open", f"cannot switch {path!r} to WAL mode (got {mode!r})", retryable=False
                )
        # FULL: the WAL is fsynced at every commit, so an acknowledged write survives power loss.
        # NORMAL: fsync only at checkpoints; survives process crashes, may lose the last commits
        # on power loss or an OS crash.
        execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        if path != MEMORY:
            execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            execute("PRAGMA journal_size_limit=33554432")  # truncate a restarted WAL above 32 MiB
        execute("PRAGMA temp_store=MEMORY")
        execute("PRAGMA cache_size=-32768")  # 32 MiB of page cache
        execute("PRAGMA foreign_keys=OFF")
    except BaseException:
        connection.close()
        raise
    return connection


def _cannot_open(path: str, exc: sqlite3.OperationalError) -> ProviderError:
    folder = os.path.dirname(os.path.abspath(path))
    hint = (
        f"its folder {folder!r} does not exist: create it first"
        if not os.path.isdir(folder)
        else "check that the file and its folder are writable by this process"
    )
    return ProviderError("open", f"cannot open SQLite database {path!r} ({exc}): {hint}", retryable=False)


def current_revision(connection: sqlite3.Connection) -> str | None:
    """Return the alembic revision stored in the database, or None if it has no perdure schema."""
    table = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
    ).fetchone()
    if table is None:
        return None
    rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    if len(rows) != 1:
        return None if not rows else ",".join(sorted(str(row[0]) for row in rows))
    return str(rows[0][0])


def check_schema(connection: sqlite3.Connection, path: str) -> None:
    """Raise a clear, permanent error unless the schema is exactly :data:`SCHEMA_REVISION`."""
    revision = current_revision(connection)
    if revision == SCHEMA_REVISION:
        return
    how = (
        f"run perdure_sqlite.migrate({path!r}) (or `perdure migrate sqlite:///{path}`), "
        "or open the provider with migrate=True"
    )
    if revision is None:
        message = f"the database {path!r} has no perdure schema: {how}"
    else:
        message = (
            f"the database {path!r} is at schema revision {revision!r} but this perdure-sqlite needs "
            f"{SCHEMA_REVISION!r}: {how} (a newer revision means the database was migrated by a "
            "newer perdure-sqlite)"
        )
    raise ProviderError("open", message, retryable=False)


class _Borrowed:
    """Lends our sqlite3 connection to SQLAlchemy without letting SQLAlchemy close it."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def close(self) -> None:
        """SQLAlchemy returns the connection here; it stays ours."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def upgrade(connection: sqlite3.Connection) -> str:
    """Bring the schema to the head revision on ``connection``; return that revision.

    Runs alembic on the given connection (so ``:memory:`` works) inside one ``BEGIN IMMEDIATE``
    transaction (see ``migrations/sqlite/env.py``).
    """
    if current_revision(connection) == SCHEMA_REVISION:
        return SCHEMA_REVISION
    from alembic import command
    from alembic.config import Config
    from alembic.util.exc import CommandError
    from sqlalchemy import create_engine
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.pool import StaticPool

    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    engine = create_engine("sqlite://", creator=lambda: _Borrowed(connection), poolclass=StaticPool)
    try:
        with _ALEMBIC_LOCK, engine.connect() as sa_connection:
            config.attributes["connection"] = sa_connection
            command.upgrade(config, "head")
    except DBAPIError as exc:
        # Surface the driver's error so that callers can tell a busy database from a real failure.
        if isinstance(exc.orig, sqlite3.Error):
            raise exc.orig from exc
        raise
    except CommandError as exc:
        raise ProviderError(
            "migrate",
            f"cannot migrate (the database may have been migrated by a newer perdure-sqlite): {exc}",
            retryable=False,
        ) from exc
    finally:
        engine.dispose()
    revision = current_revision(connection)
    if revision != SCHEMA_REVISION:
        raise ProviderError(
            "migrate",
            f"migrations ended at revision {revision!r}, expected {SCHEMA_REVISION!r}",
            retryable=False,
        )
    return revision


def migrate(
    path: str | os.PathLike[str],
    *,
    busy_timeout: float = 5.0,
    busy_retry_limit: float = 60.0,
) -> str:
    """Create or upgrade the perdure schema of the SQLite database at ``path``; return its revision.

    Blocking (call it at deploy time, or from a thread). Safe to run from several processes at
    once: the upgrade holds the write lock, so the others wait and then find the schema current.
    """
    target = os.fspath(path)
    deadline = time.monotonic() + busy_retry_limit
    pause = 0.01
    while True:
        try:
            connection = connect(target, busy_timeout=busy_timeout)
            try:
                return upgrade(connection)
            finally:
                connection.close()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() + pause > deadline:
                raise ProviderError("migrate", str(exc), retryable=is_busy(exc)) from exc
        time.sleep(pause)
        pause = min(pause * 2, 0.5)
