"""perdure-sqlite: the embedded SQLite provider for perdure.

``SqliteProvider("app.db")`` (or ``":memory:"``) implements :class:`perdure.provider.Provider`
on one SQLite database in WAL mode with ``synchronous=FULL``; ``from_url`` is the
``perdure.providers`` entry point (``sqlite:///app.db``); ``migrate(path)`` creates or upgrades
the schema ahead of time for deployments that open providers with ``migrate=False``.
"""

from __future__ import annotations

from perdure_sqlite._schema import SCHEMA_REVISION, migrate, migrations_path
from perdure_sqlite.provider import MAX_PAYLOAD_BYTES, SqliteProvider, from_url

__all__ = [
    "SqliteProvider",
    "from_url",
    "migrate",
    "migrations_path",
    "MAX_PAYLOAD_BYTES",
    "SCHEMA_REVISION",
]
