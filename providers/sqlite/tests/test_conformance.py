"""The perdure provider conformance suite, run against SqliteProvider exactly as an outsider would."""

from perdure_provider_tests.suite import *  # noqa: F403
