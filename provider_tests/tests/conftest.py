"""The suite's own tests: the conformance suite run against InMemoryProvider (which must pass every
test) and, through pytester, against deliberately broken providers (which must fail the tests of
the rule they break). This conftest is wired exactly as a provider author's would be.
"""

from __future__ import annotations

import pytest

from perdure.provider import Provider
from perdure.testing import InMemoryProvider
from perdure_provider_tests import ProviderFactory

pytest_plugins = ["perdure_provider_tests.plugin", "pytester"]


class MemoryFactory(ProviderFactory):
    """InMemoryProvider with every hook but drop_connections (it has no connections to drop)."""

    lock_timeout = 0.2
    timing_slack = 0.1
    provider_class: type[InMemoryProvider] = InMemoryProvider

    async def create(self) -> Provider:
        return self.provider_class()

    async def corrupt_history(self, provider: Provider, instance_id: str) -> None:
        assert isinstance(provider, InMemoryProvider)
        provider.corrupt_history(instance_id)

    async def corrupt_queue_message(self, provider: Provider, instance_id: str) -> None:
        assert isinstance(provider, InMemoryProvider)
        provider.corrupt_queued_messages(instance_id)

    async def attempt_count(self, provider: Provider, instance_id: str) -> int:
        assert isinstance(provider, InMemoryProvider)
        return provider.stored_attempt_count(instance_id)


@pytest.fixture
def provider_factory() -> ProviderFactory:
    return MemoryFactory()
