"""Prove the suite catches broken providers: run it, through pytester, against each provider of
broken.py and check that the tests of the rule it breaks fail (and that an unrelated control test
still passes, so the failures are not a crash of the whole run).

The inner runs are wired exactly as a provider author's project: a conftest.py that loads the
plugin and defines ``provider_factory``, and a test module that star-imports the suite. They run
in pytest-asyncio's default (strict) mode.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from broken import CATCHES

from perdure_provider_tests.suite import TESTS

HERE = Path(__file__).parent
CONTROL = "test_unknown_instance_has_no_state"

CONFTEST = """
import sys
sys.path.insert(0, {here!r})

import pytest
from factories import MemoryFactory
import broken

pytest_plugins = ["perdure_provider_tests.plugin"]


class BrokenFactory(MemoryFactory):
    provider_class = broken.{name}


@pytest.fixture
def provider_factory():
    return BrokenFactory()
"""

TEST_MODULE = "from perdure_provider_tests.suite import *  # noqa: F403\n"


def run_suite(pytester: pytest.Pytester, broken_name: str, tests: list[str]) -> dict[str, set[str]]:
    """Run the named suite tests against ``broken.<broken_name>``; return outcome -> test names."""
    pytester.makeconftest(CONFTEST.format(here=str(HERE), name=broken_name))
    module = f"test_conformance_{broken_name.lower()}"
    pytester.makepyfile(**{module: TEST_MODULE})
    # The ini option only silences pytest-asyncio's deprecation warning about an unset default;
    # test_plugin.py proves the suite runs without any asyncio configuration.
    options = ["-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function"]
    recorder = pytester.inline_run(*options, *(f"{module}.py::{name}" for name in tests))
    outcomes: dict[str, set[str]] = {"passed": set(), "failed": set(), "skipped": set()}
    for report in recorder.getreports("pytest_runtest_logreport"):
        name = report.nodeid.split("::")[-1].split("[")[0]
        if report.failed:
            outcomes["failed"].add(name)
        elif report.skipped:
            outcomes["skipped"].add(name)
        elif report.when == "call" and report.passed:
            outcomes["passed"].add(name)
    return outcomes


def test_every_listed_test_exists() -> None:
    for names in CATCHES.values():
        for name in names:
            assert name in TESTS, f"broken.py lists {name!r}, which is not a suite test"


@pytest.mark.parametrize("broken_class", list(CATCHES), ids=lambda cls: cls.__name__)
def test_suite_catches_the_broken_provider(pytester: pytest.Pytester, broken_class: type) -> None:
    expected = CATCHES[broken_class]
    outcomes = run_suite(pytester, broken_class.__name__, [*expected, CONTROL])
    missed = [name for name in expected if name not in outcomes["failed"]]
    assert not missed, f"{broken_class.__name__} ({broken_class.__doc__}) was not caught by {missed}"
    assert CONTROL in outcomes["passed"] - outcomes["failed"], f"the control test did not pass: {outcomes}"


def test_correct_provider_passes_the_same_tests(pytester: pytest.Pytester) -> None:
    """The tests that catch the broken providers pass against the correct InMemoryProvider."""
    every = sorted({name for names in CATCHES.values() for name in names})
    outcomes = run_suite(pytester, "InMemoryProvider", every)
    assert outcomes["failed"] == set()
    assert outcomes["passed"] == set(every)
