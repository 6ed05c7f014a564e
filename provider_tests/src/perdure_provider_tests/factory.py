"""What a provider author implements to run the suite: a factory of fresh, isolated providers."""

from __future__ import annotations

import abc
from typing import Final

from perdure.provider import Provider

__all__ = ["HOOKS", "ProviderFactory"]

#: The optional hooks; a test that needs one is skipped (naming it) when the factory lacks it.
HOOKS: Final = ("corrupt_history", "corrupt_queue_message", "attempt_count", "drop_connections")


class ProviderFactory(abc.ABC):
    """Creates a fresh, isolated, opened provider for each test, and reaches into its storage.

    Subclass it, implement :meth:`create`, and override the optional hooks your storage can
    support: each test that needs a hook is skipped, with a reason naming the hook, when the
    factory does not override it. The class attributes are timing knobs; override them as
    class attributes (or in ``__init__``) to suit a slower or remote store.
    """

    #: Lease (seconds) used by the lock-expiry tests, which wait for it to pass. Short keeps the
    #: suite fast; it must still be long enough for a fetch-then-act round trip.
    lock_timeout: float = 1.0
    #: Allowed lateness (seconds) of anything timed: lease expiry, visibility of delayed
    #: messages, a wait returning at its timeout. Covers clock granularity and scheduling.
    timing_slack: float = 0.25
    #: How long (seconds) a fetch may take when nothing is eligible: fetches never long-poll.
    short_poll_threshold: float = 0.1
    #: How soon (seconds) a provider declaring ``wakeups`` must return from a wait once work
    #: has arrived or its instance has changed.
    wakeup_latency: float = 0.5
    #: How many tasks race each other in the concurrency tests.
    concurrency: int = 8
    #: Largest payload (bytes) the payload tests send; ``None`` means the provider's declared
    #: ``capabilities.max_payload_bytes``. Lower it only for a store that is slow with large rows.
    max_payload_test_bytes: int | None = None

    @abc.abstractmethod
    async def create(self) -> Provider:
        """Return a new, opened provider whose storage no other test sees (a new file or schema)."""

    async def dispose(self, provider: Provider) -> None:
        """Release a provider after its test; override to also drop its file, schema or database."""
        await provider.close()

    # -- optional hooks ----------------------------------------------------------------------

    async def corrupt_history(self, provider: Provider, instance_id: str) -> None:
        """Make every stored event of the instance's current execution undecodable (e.g. not JSON)."""
        raise NotImplementedError(self._missing("corrupt_history"))

    async def corrupt_queue_message(self, provider: Provider, instance_id: str) -> None:
        """Make every queued message routed to the instance undecodable, on both queues.

        Only the payload is corrupted; the routing columns (instance id, activity identity) stay.
        """
        raise NotImplementedError(self._missing("corrupt_queue_message"))

    async def attempt_count(self, provider: Provider, instance_id: str) -> int:
        """Return the highest attempt count stored among the instance's queued messages (both queues)."""
        raise NotImplementedError(self._missing("attempt_count"))

    async def drop_connections(self, provider: Provider) -> None:
        """Break every connection the provider holds (kill backends, close sockets).

        The next calls may fail, but only with retryable errors, and the provider must recover.
        """
        raise NotImplementedError(self._missing("drop_connections"))

    def has_hook(self, name: str) -> bool:
        """Whether this factory overrides the optional hook ``name`` (one of :data:`HOOKS`)."""
        if name not in HOOKS:
            raise ValueError(f"unknown hook {name!r}; the hooks are {', '.join(HOOKS)}")
        return getattr(type(self), name) is not getattr(ProviderFactory, name)

    def payload_test_bytes(self, provider: Provider) -> int:
        """Return the payload size the payload tests use for ``provider``."""
        declared = provider.capabilities.max_payload_bytes
        cap = self.max_payload_test_bytes
        return declared if cap is None else min(cap, declared)

    def _missing(self, hook: str) -> str:
        return f"{type(self).__name__} does not implement the {hook!r} hook"
