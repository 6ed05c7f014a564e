"""The whole conformance suite against FaultyProvider(InMemoryProvider()) with no faults queued.

The wrapper must be transparent, and its drop_connections hook (the next calls fail retryably)
exercises the suite's recovery test, which the plain in-memory factory skips.
"""

import pytest
from factories import FaultyMemoryFactory

from perdure_provider_tests import ProviderFactory
from perdure_provider_tests.suite import *  # noqa: F403


@pytest.fixture
def provider_factory() -> ProviderFactory:
    return FaultyMemoryFactory()
