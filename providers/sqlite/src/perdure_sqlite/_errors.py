"""Classify failures into :class:`~perdure.provider.ProviderError` (retryable or permanent)."""

from __future__ import annotations

import sqlite3

from perdure.history import DecodeError
from perdure.provider import ProviderError

#: Primary result codes after which the same call may succeed later.
_RETRYABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class BusyTimeout(Exception):
    """The database stayed locked by another connection for longer than the retry limit."""


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def is_busy(exc: BaseException) -> bool:
    """Tell whether ``exc`` means another connection holds a lock we need (retry after a pause)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = _primary_code(exc)
    if code is not None:
        return code in _BUSY_CODES
    text = str(exc)
    return "database is locked" in text or "database is busy" in text


def is_transaction_fatal(exc: BaseException) -> bool:
    """Tell whether SQLite may have rolled back the whole transaction on ``exc``, not one statement."""
    if not isinstance(exc, sqlite3.Error) or isinstance(exc, sqlite3.IntegrityError):
        return False
    return _primary_code(exc) in _RETRYABLE_CODES | _CORRUPT_CODES


def as_provider_error(operation: str, exc: BaseException) -> ProviderError:
    """Translate anything raised while serving ``operation`` into a :class:`ProviderError`."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, BusyTimeout):
        return ProviderError(operation, str(exc), retryable=True)
    if isinstance(exc, sqlite3.IntegrityError):
        text = str(exc)
        if "history." in text:
            text = f"duplicate event id, history is append-only ({text})"
        return ProviderError(operation, text, retryable=False)
    if isinstance(exc, sqlite3.Error):
        code = _primary_code(exc)
        if code in _CORRUPT_CODES:
            return ProviderError(operation, f"the database file is corrupt: {exc}", retryable=False)
        if code in _RETRYABLE_CODES:
            return ProviderError(operation, str(exc), retryable=True)
        text = str(exc)
        if "no such table" in text or "no such column" in text:
            return ProviderError(
                operation,
                f"{text}: the database schema is missing or outdated; run perdure_sqlite.migrate(path)",
                retryable=False,
            )
        if isinstance(exc, sqlite3.OperationalError) and code is None:
            return ProviderError(operation, text, retryable=True)
        return ProviderError(operation, text, retryable=False)
    if isinstance(exc, DecodeError):
        return ProviderError(operation, f"corrupt stored data: {exc}", retryable=False)
    if isinstance(exc, (UnicodeError, OverflowError, ValueError, TypeError)):
        return ProviderError(operation, f"invalid input: {type(exc).__name__}: {exc}", retryable=False)
    return ProviderError(operation, f"{type(exc).__name__}: {exc}", retryable=False)


def closed_error(operation: str) -> ProviderError:
    """Build the error for a call made after the provider was closed."""
    return ProviderError(operation, "the SQLite provider is closed", retryable=False)
