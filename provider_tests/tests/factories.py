"""Factories for the suite's own tests: InMemoryProvider, plain and behind the core's wrappers."""

from __future__ import annotations

from perdure.codec_provider import CodecProvider
from perdure.provider import Provider
from perdure.serialization import CodecChain, ZlibCodec
from perdure.testing import InMemoryProvider
from perdure_provider_tests import ProviderFactory
from perdure_provider_tests.faults import FaultyProvider


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


class WrappedMemoryFactory(MemoryFactory):
    """InMemoryProvider behind a wrapper that keeps it as ``inner``; the hooks reach through."""

    def wrap(self, inner: InMemoryProvider) -> Provider:
        raise NotImplementedError

    async def create(self) -> Provider:
        return self.wrap(InMemoryProvider())

    @staticmethod
    def _inner(provider: Provider) -> InMemoryProvider:
        inner = getattr(provider, "inner", None)
        assert isinstance(inner, InMemoryProvider)
        return inner

    async def corrupt_history(self, provider: Provider, instance_id: str) -> None:
        await super().corrupt_history(self._inner(provider), instance_id)

    async def corrupt_queue_message(self, provider: Provider, instance_id: str) -> None:
        await super().corrupt_queue_message(self._inner(provider), instance_id)

    async def attempt_count(self, provider: Provider, instance_id: str) -> int:
        return await super().attempt_count(self._inner(provider), instance_id)


class FaultyMemoryFactory(WrappedMemoryFactory):
    """InMemoryProvider behind FaultyProvider: the wrapper must be transparent, and its injected
    connection drops give the suite's drop_connections test a provider to recover."""

    def wrap(self, inner: InMemoryProvider) -> Provider:
        return FaultyProvider(inner)

    async def drop_connections(self, provider: Provider) -> None:
        assert isinstance(provider, FaultyProvider)
        provider.drop_connections(times=3)


class CodecMemoryFactory(WrappedMemoryFactory):
    """InMemoryProvider behind CodecProvider: encoding payloads at rest must keep the contract."""

    def wrap(self, inner: InMemoryProvider) -> Provider:
        return CodecProvider(inner, CodecChain(ZlibCodec()))
