"""The suite's own tests, wired exactly as a provider author's conftest.py would be.

The conformance suite runs against InMemoryProvider (test_conformance_memory.py, every test must
pass), against it behind FaultyProvider (test_conformance_faulty.py) and CodecProvider
(test_conformance_codec.py), and through pytester against deliberately broken providers
(test_broken_providers.py, each must fail the tests of the rule it breaks).
"""

from __future__ import annotations

import pytest
from factories import MemoryFactory

from perdure_provider_tests import ProviderFactory

pytest_plugins = ["perdure_provider_tests.plugin", "pytester"]


@pytest.fixture
def provider_factory() -> ProviderFactory:
    return MemoryFactory()
