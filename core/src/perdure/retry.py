"""Retry policies for activity calls: how many attempts, how long to wait between them.

Waits between attempts are durable timers, so a retry schedule survives restarts like any other
step of the orchestration.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Backoff = Literal["none", "fixed", "linear", "exponential"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How an activity call is retried.

    Attributes:
        max_attempts: total attempts including the first (1 means no retry).
        backoff: ``"none"`` (retry at once), ``"fixed"`` (``delay`` every time), ``"linear"``
            (``delay * attempt``) or ``"exponential"`` (``delay * multiplier ** (attempt - 1)``).
        delay: base wait in seconds.
        multiplier: growth factor for exponential backoff.
        max_delay: cap on any single wait, in seconds.
        timeout: per-attempt timeout in seconds; an attempt that takes longer is cancelled and
            counts as a failure of type ``ActivityTimeout``.
        non_retryable: exception type names (as raised by the activity, e.g. ``"ValueError"``)
            that fail the call at once.

    """

    max_attempts: int = 3
    backoff: Backoff = "exponential"
    delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    timeout: float | None = None
    non_retryable: Iterable[str] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be at least 1, got {self.max_attempts}")
        if self.delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must not be negative")
        if self.multiplier < 1:
            raise ValueError(f"RetryPolicy.multiplier must be at least 1, got {self.multiplier}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"RetryPolicy.timeout must be positive, got {self.timeout}")
        if self.backoff not in ("none", "fixed", "linear", "exponential"):
            raise ValueError(f"unknown backoff {self.backoff!r}: use none, fixed, linear or exponential")
        object.__setattr__(self, "non_retryable", frozenset(self.non_retryable))

    def delay_after(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based), capped."""
        if self.backoff == "none":
            wait = 0.0
        elif self.backoff == "fixed":
            wait = self.delay
        elif self.backoff == "linear":
            wait = self.delay * attempt
        else:
            wait = self.delay * self.multiplier ** (attempt - 1)
        return min(wait, self.max_delay)

    def should_retry(self, error_type: str, attempt: int) -> bool:
        """Whether a failure of ``error_type`` on attempt ``attempt`` leads to another attempt."""
        return attempt < self.max_attempts and error_type not in self.non_retryable


__all__ = ["Backoff", "RetryPolicy"]
