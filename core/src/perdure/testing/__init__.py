"""Test support for perdure users and provider authors.

:class:`InMemoryProvider` is a complete, non-persistent provider: the reference implementation of
the Provider contract and the provider to use in unit tests. The conformance suite that checks a
provider against the contract is the separate distribution ``perdure-provider-tests``.
"""

from perdure.testing.memory import InMemoryProvider

__all__ = ["InMemoryProvider"]
