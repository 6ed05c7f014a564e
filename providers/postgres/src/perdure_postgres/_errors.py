"""Map psycopg and pool failures to :class:`perdure.provider.ProviderError`.

Retryable: anything that may succeed if the same call is made again later: a dropped or refused
connection, a server shutting down or in recovery, a statement or lock timeout, a pool with no
free connection, resource exhaustion, a deadlock or serialization failure (those two are first
retried inside the provider, see :data:`CONFLICT_ERRORS`), and a cached plan invalidated by a
concurrent migration (0A000, ``reference/reliability.md`` 4.9).

Permanent: integrity violations (a duplicate history event id is the important one), missing
tables (the schema was not migrated), bad input and anything else the server rejects on its merits.
"""

from __future__ import annotations

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import PoolClosed, PoolTimeout

from perdure.provider import ProviderError

#: Errors retried inside the provider (the transaction was rolled back, so retrying is safe).
CONFLICT_ERRORS: tuple[type[BaseException], ...] = (
    pg_errors.DeadlockDetected,  # 40P01
    pg_errors.SerializationFailure,  # 40001
)

#: SQLSTATE classes that describe a transient condition.
_RETRYABLE_CLASSES = ("08", "40", "53", "55", "57", "58", "HV")


def is_connection_error(exc: BaseException) -> bool:
    """True if ``exc`` means the connection (not the statement) failed."""
    if isinstance(exc, PoolTimeout | psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = getattr(exc, "sqlstate", None)
        # No SQLSTATE: a client-side connection failure. 08: connection exception. 57P0x: shutdown.
        return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")
    return isinstance(exc, OSError)


def to_provider_error(operation: str, exc: BaseException, *, schema: str | None = None) -> ProviderError:
    """The :class:`ProviderError` for ``exc`` raised while running ``operation``."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, PoolTimeout):
        return ProviderError(operation, f"no database connection available: {exc}", retryable=True)
    if isinstance(exc, PoolClosed):
        return ProviderError(operation, "the provider is closed", retryable=False)
    if isinstance(exc, pg_errors.UniqueViolation):
        detail = exc.diag.message_detail or str(exc)
        if exc.diag.table_name == "history":
            return ProviderError(
                operation, f"duplicate history event (history is append-only): {detail}", retryable=False
            )
        return ProviderError(operation, f"unique violation: {detail}", retryable=False)
    if isinstance(exc, pg_errors.UndefinedTable | pg_errors.InvalidSchemaName | pg_errors.UndefinedFunction):
        hint = f" (is schema {schema!r} migrated? run perdure_postgres.migrate)" if schema else ""
        return ProviderError(operation, f"{exc}{hint}".strip(), retryable=False)
    if isinstance(exc, pg_errors.FeatureNotSupported) and "cached plan" in str(exc):
        return ProviderError(operation, f"cached plan invalidated: {exc}", retryable=True)
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return ProviderError(operation, f"database unavailable: {str(exc).strip()}", retryable=True)
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        retryable = state.startswith(_RETRYABLE_CLASSES)
        return ProviderError(operation, f"{type(exc).__name__}: {str(exc).strip()}", retryable=retryable)
    if isinstance(exc, TimeoutError | OSError):
        return ProviderError(operation, f"database unavailable: {exc!r}", retryable=True)
    return ProviderError(operation, f"{type(exc).__name__}: {exc}", retryable=False)


__all__ = ["CONFLICT_ERRORS", "is_connection_error", "to_provider_error"]
