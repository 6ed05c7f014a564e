"""The whole conformance suite against CodecProvider(InMemoryProvider()) with a zlib codec.

Encoding payloads at rest must not change what the contract promises: every payload reads back
exactly as written, through history, both queues and the instance row.
"""

import pytest
from factories import CodecMemoryFactory

from perdure_provider_tests import ProviderFactory
from perdure_provider_tests.suite import *  # noqa: F403


@pytest.fixture
def provider_factory() -> ProviderFactory:
    return CodecMemoryFactory()
