"""The perdure provider conformance suite.

Provider authors subclass :class:`ProviderFactory`, load the plugin explicitly in their root
``conftest.py`` (``pytest_plugins = ["perdure_provider_tests.plugin"]``) and star-import
:mod:`perdure_provider_tests.suite` into one test module. :mod:`perdure_provider_tests.faults`
holds a fault-injecting wrapper provider for reliability tests.
"""

import pytest

# The suite's modules are imported from the author's test module, not collected from files, so
# pytest would not rewrite their asserts; register them before anything imports them.
pytest.register_assert_rewrite("perdure_provider_tests.suite", "perdure_provider_tests.helpers")

from perdure_provider_tests.factory import HOOKS, ProviderFactory  # noqa: E402

__all__ = ["HOOKS", "ProviderFactory"]
