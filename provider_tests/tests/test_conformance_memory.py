"""The whole conformance suite against InMemoryProvider, wired as a provider author would."""

from perdure_provider_tests.suite import *  # noqa: F403
