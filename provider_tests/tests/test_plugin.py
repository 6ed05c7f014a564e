"""Tests of the plugin and of the suite's own shape (run through pytester where pytest is involved)."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
from pathlib import Path

import pytest

from perdure.history import Message, event_types, message_types
from perdure_provider_tests import HOOKS, ProviderFactory
from perdure_provider_tests.suite import AREAS, TESTS
from perdure_provider_tests.suite import test_payloads as payloads

HERE = Path(__file__).parent

CONFTEST = """
import sys
sys.path.insert(0, {here!r})

import pytest
from factories import MemoryFactory
import broken

pytest_plugins = ["perdure_provider_tests.plugin"]

DISPOSED = []


class Factory(MemoryFactory):
    provider_class = broken.{provider}

    async def dispose(self, provider):
        DISPOSED.append(provider)
        await super().dispose(provider)


@pytest.fixture
def provider_factory():
    return Factory()


def pytest_sessionfinish(session):
    print(f"\\ndisposed {{len(DISPOSED)}} providers")
"""


def setup_project(pytester: pytest.Pytester, provider: str = "InMemoryProvider") -> None:
    pytester.makeconftest(CONFTEST.format(here=str(HERE), provider=provider))
    pytester.makepyfile(test_conformance="from perdure_provider_tests.suite import *  # noqa: F403\n")


def test_runs_in_strict_mode_without_asyncio_configuration(pytester: pytest.Pytester) -> None:
    setup_project(pytester)
    # Only a warnings filter: pytest-asyncio warns that its loop-scope default is unset.
    quiet = ["-W", "ignore::pytest.PytestDeprecationWarning"]
    result = pytester.runpytest_inprocess(
        "-p",
        "no:cacheprovider",
        *quiet,
        "test_conformance.py::test_first_ack_creates_the_instance_from_its_data",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["asyncio: mode=Mode.STRICT*"])
    assert "asyncio_mode" not in (pytester.path / "conftest.py").read_text()


def test_missing_hooks_and_capabilities_skip_with_a_reason(pytester: pytest.Pytester) -> None:
    setup_project(pytester, provider="NoWakeupsDeclared")
    result = pytester.runpytest_inprocess(
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
        "-rs",
        "test_conformance.py::test_recovers_after_connections_drop",
        "test_conformance.py::test_abandon_wakes_waiters",
        "test_conformance.py::test_empty_fetch_returns_promptly",
        "test_conformance.py::test_direct_lease_acks_renews_and_abandons",
    )
    result.assert_outcomes(passed=2, skipped=4)
    result.stdout.fnmatch_lines(
        [
            "*hook 'drop_connections' not implemented by Factory*",
            "*capability 'wakeups' not declared by the 'memory' provider*",
            "*capability 'direct_dispatch' not declared by the 'memory' provider*",
        ]
    )


def test_prints_a_report_per_area(pytester: pytest.Pytester) -> None:
    setup_project(pytester)
    result = pytester.runpytest_inprocess(
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
        "test_conformance.py::test_recovers_after_connections_drop",
        "test_conformance.py::test_lock_tokens_are_unique",
        "test_conformance.py::test_empty_fetch_returns_promptly",
    )
    result.assert_outcomes(passed=3, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*perdure provider conformance*",
            "provider: memory  capabilities: wakeups, direct_dispatch, max_payload_bytes=16777216",
            "area*passed*failed*skipped",
            "errors*0*0*1",
            "locking*1*0*0",
            "long_polling*2*0*0",
            "total*3*0*1",
            "  skipped 1: hook 'drop_connections' not implemented by Factory",
        ]
    )


def test_every_provider_is_disposed(pytester: pytest.Pytester) -> None:
    setup_project(pytester)
    result = pytester.runpytest_inprocess(
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
        "-s",
        "-k",
        "custom_status or attempt_count_starts_at_one",
    )
    outcomes = result.parseoutcomes()
    created = outcomes["passed"]
    assert created >= 5
    result.stdout.fnmatch_lines([f"disposed {created} providers"])


def test_missing_factory_fixture_is_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["perdure_provider_tests.plugin"]\n')
    pytester.makepyfile(test_conformance="from perdure_provider_tests.suite import *  # noqa: F403\n")
    result = pytester.runpytest_inprocess(
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
        "test_conformance.py::test_lock_tokens_are_unique",
    )
    result.stdout.fnmatch_lines(["*define a `provider_factory` fixture in your conftest.py*"])
    assert result.ret != 0


def test_no_pytest11_entry_point() -> None:
    """The plugin must never auto-load into unrelated pytest runs."""
    distribution = importlib.metadata.distribution("perdure-provider-tests")
    assert [ep for ep in distribution.entry_points if ep.group == "pytest11"] == []


def test_suite_shape() -> None:
    """At least 100 distinct tests, one area module each, every one with a one-sentence docstring."""
    assert len(TESTS) >= 100, len(TESTS)
    for name, function in TESTS.items():
        assert inspect.iscoroutinefunction(function), name
        doc = inspect.getdoc(function)
        assert doc, f"{name} has no docstring"
        assert "\n" not in doc, f"{name}: the docstring is one sentence on one line"
        assert doc.endswith("."), name
    assert {function.__module__ for function in TESTS.values()} == {module.__name__ for module in AREAS}


def test_suite_exports_only_tests() -> None:
    import perdure_provider_tests.suite as suite

    assert set(suite.__all__) == set(TESTS)
    assert all(name.startswith("test_") for name in suite.__all__)


def test_duplicate_test_names_are_refused() -> None:
    from types import ModuleType

    from perdure_provider_tests.suite import _tests

    def module_with_test_same(name: str) -> ModuleType:
        module = ModuleType(name)

        async def test_same() -> None: ...

        test_same.__module__ = name
        module.test_same = test_same  # type: ignore[attr-defined]
        return module

    first, second = module_with_test_same("m1"), module_with_test_same("m2")
    with pytest.raises(RuntimeError, match="two suite tests are named 'test_same'"):
        _tests((first, second))


def test_payload_samples_cover_every_type() -> None:
    assert {type(e) for e in payloads.SAMPLE_EVENTS} == set(event_types())
    assert {type(m) for m in payloads.SAMPLE_MESSAGES} == {
        t for t in message_types() if issubclass(t, Message)
    }


def test_hooks_are_detected_by_override() -> None:
    class Bare(ProviderFactory):
        async def create(self):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    class WithOne(Bare):
        async def attempt_count(self, provider, instance_id):  # type: ignore[no-untyped-def]
            return 0

    assert not any(Bare().has_hook(hook) for hook in HOOKS)
    assert [hook for hook in HOOKS if WithOne().has_hook(hook)] == ["attempt_count"]
    with pytest.raises(ValueError, match="unknown hook"):
        Bare().has_hook("nope")


def test_every_requires_marker_names_a_real_hook_or_capability() -> None:
    from perdure.provider import Capabilities

    capabilities = {name for name in Capabilities.__dataclass_fields__}
    for name, function in TESTS.items():
        for mark in getattr(function, "pytestmark", []):
            if mark.name == "requires_hook":
                assert mark.args[0] in HOOKS, name
            if mark.name == "requires_capability":
                assert mark.args[0] in capabilities, name


def test_suite_modules_do_not_sleep_blindly() -> None:
    """Sleeps in the suite wait for a lease, a delay or a timer under test (named), never a bare number."""
    root = Path(inspect.getfile(AREAS[0])).parent
    for path in sorted(root.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "sleep" and node.args:
                argument = node.args[0]
                if isinstance(argument, ast.Constant):
                    assert argument.value == 0, f"{path.name}:{node.lineno} sleeps a bare {argument.value!r}s"


GUIDE = HERE.parent.parent / "docs" / "provider-authoring.md"


@pytest.mark.skipif(not GUIDE.exists(), reason="docs/provider-authoring.md is not beside this checkout")
def test_guide_lists_every_rule() -> None:
    """The guide's appendix is rules_markdown(): regenerate it when a test or docstring changes."""
    from perdure_provider_tests.suite import rules_markdown

    assert rules_markdown() in GUIDE.read_text(), "docs/provider-authoring.md appendix is stale"


@pytest.mark.skipif(not GUIDE.exists(), reason="docs/provider-authoring.md is not beside this checkout")
def test_guide_names_only_real_tests() -> None:
    import re

    named = set(re.findall(r"`(test_[a-z0-9_]+)`", GUIDE.read_text()))
    assert named - set(TESTS) == set()
