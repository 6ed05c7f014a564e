"""Every size limit perdure enforces, and the validation of instance ids and names.

Limits keep one instance from hurting the others: a 50 MB activity result slows every fetch of its
history, a history of a million events makes every replay slow. They live in this one module so
that they are documented once, enforced the same way everywhere and easy to find when one of them
is hit. Each check fails with a :class:`ValueError` subclass whose message says what was too big or
wrong, the limit, and what to do instead.

Instance ids and names may use any Unicode except control characters (C0, DEL, C1), lone
surrogates (they cannot be stored as UTF-8) and leading or trailing whitespace (invisible in logs
and UIs, and a classic source of "instance not found"). Quotes, slashes and the like are allowed:
SQL safety comes from parameterised queries, never from forbidding characters.

The checks are cheap enough to run on every call: a payload's UTF-8 size is only computed when its
length in characters does not already prove it fits.
"""

from __future__ import annotations

import re

#: Longest instance id, in characters.
MAX_INSTANCE_ID_LENGTH = 256
#: Longest orchestration, activity or event name (and activity tag), in characters.
MAX_NAME_LENGTH = 256
#: Largest single JSON payload (an input, a result, event data), in UTF-8 bytes: 2 MiB.
MAX_PAYLOAD_BYTES = 2 * 1024 * 1024
#: Largest custom status, in UTF-8 bytes of its JSON text: 64 KiB.
MAX_CUSTOM_STATUS_BYTES = 64 * 1024
#: Largest value in an instance's durable key-value store, in UTF-8 bytes of its JSON text: 64 KiB.
MAX_KV_VALUE_BYTES = 64 * 1024
#: History length (events in one execution) at which the runtime logs a warning suggesting
#: continue-as-new: replay cost and storage grow with history.
HISTORY_WARNING_EVENTS = 10_000

# C0 controls, DEL, C1 controls, and lone surrogates (not encodable as UTF-8).
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class LimitExceeded(ValueError):
    """A payload or other value is larger than perdure allows.

    ``what`` names it, ``size`` is its size and ``limit`` the largest size allowed (both in bytes).
    """

    def __init__(self, message: str, *, what: str = "", size: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.what = what
        self.size = size
        self.limit = limit


class InvalidInstanceId(ValueError):
    """An instance id is empty, too long or contains characters that are not allowed."""


class InvalidName(ValueError):
    """An orchestration, activity or event name is empty, too long or has forbidden characters."""


def _short(s: str) -> str:
    return repr(s) if len(s) <= 60 else repr(s[:57]) + "..."


def _problem(label: str, s: object, limit: int) -> str | None:
    """Describe what is wrong with ``s`` as an id or name in one sentence; ``None`` if nothing is."""
    if not isinstance(s, str):
        return f"{label} must be a str, got {type(s).__name__}"
    if not s:
        return f"{label} must not be empty"
    if len(s) > limit:
        return (
            f"{label} {_short(s)} is {len(s)} characters long, over the limit of {limit}; "
            "use a shorter one (hash long natural keys)"
        )
    bad = _FORBIDDEN.search(s)
    if bad is not None:
        char = bad.group()
        kind = "a lone surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
        return (
            f"{label} {_short(s)} contains {kind} (U+{ord(char):04X}) at position {bad.start()}; "
            "use printable characters only"
        )
    if s[0].isspace() or s[-1].isspace():
        return f"{label} {_short(s)} has leading or trailing whitespace; strip it"
    return None


def validate_instance_id(s: str) -> str:
    """Return ``s`` if it is a valid instance id, else raise :class:`InvalidInstanceId`."""
    problem = _problem("instance id", s, MAX_INSTANCE_ID_LENGTH)
    if problem is not None:
        raise InvalidInstanceId(problem)
    return s


def validate_name(s: str, what: str) -> str:
    """Return ``s`` if it is a valid name, else raise :class:`InvalidName`.

    ``what`` says which kind of name it is, e.g. ``"activity name"`` or ``"event name"``.
    """
    problem = _problem(what, s, MAX_NAME_LENGTH)
    if problem is not None:
        raise InvalidName(problem)
    return s


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _human(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)} MiB"
    if n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} bytes"


def _check_size(text: str, limit: int, what: str, advice: str) -> str:
    if len(text) * 4 <= limit:  # a code point is at most 4 bytes of UTF-8: fits without encoding
        return text
    size = _utf8_size(text)
    if size > limit:
        raise LimitExceeded(
            f"{what} is {size:,} bytes of JSON, over the limit of {_human(limit)} ({limit:,} bytes); "
            f"{advice}",
            what=what,
            size=size,
            limit=limit,
        )
    return text


def check_payload(text: str, what: str) -> str:
    """Return ``text`` if it is at most :data:`MAX_PAYLOAD_BYTES`, else raise :class:`LimitExceeded`.

    ``what`` names the payload in the message, e.g. ``"result of activity 'fetch'"``.
    """
    return _check_size(
        text,
        MAX_PAYLOAD_BYTES,
        what,
        "keep large data in a blob store or database and pass a reference (a key or URL) instead",
    )


def check_custom_status(text: str) -> str:
    """Return ``text`` if it is at most :data:`MAX_CUSTOM_STATUS_BYTES`, else raise :class:`LimitExceeded`."""
    return _check_size(
        text,
        MAX_CUSTOM_STATUS_BYTES,
        "custom status",
        "keep custom status to a short progress summary and return bulk data as the result",
    )


def check_kv_value(text: str, key: str) -> str:
    """Return ``text`` if it is at most :data:`MAX_KV_VALUE_BYTES`, else raise :class:`LimitExceeded`."""
    return _check_size(
        text,
        MAX_KV_VALUE_BYTES,
        f"value of key {_short(key)}",
        "keep large data in a blob store or database and store a reference in the key-value store",
    )


__all__ = [
    "MAX_INSTANCE_ID_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_PAYLOAD_BYTES",
    "MAX_CUSTOM_STATUS_BYTES",
    "MAX_KV_VALUE_BYTES",
    "HISTORY_WARNING_EVENTS",
    "LimitExceeded",
    "InvalidInstanceId",
    "InvalidName",
    "validate_instance_id",
    "validate_name",
    "check_payload",
    "check_custom_status",
    "check_kv_value",
]
