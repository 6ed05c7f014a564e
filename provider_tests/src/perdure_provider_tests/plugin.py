"""The pytest plugin behind the suite.

Load it explicitly from your root ``conftest.py``::

    pytest_plugins = ["perdure_provider_tests.plugin"]

It is deliberately not a ``pytest11`` entry point, so it never loads into unrelated test runs.
It provides:

* the ``provider`` fixture: a fresh provider from your ``provider_factory`` fixture per test,
  disposed of after it (``ProviderFactory.dispose``);
* the ``requires_capability(name)`` and ``requires_hook(name)`` markers: such a test is skipped,
  with a reason naming what is missing, when the provider does not declare the capability or the
  factory does not implement the hook;
* marking of the suite's ``async def`` tests for pytest-asyncio, so no asyncio configuration is
  needed (strict and auto mode both work);
* a short report at the end of the session: per contract area, how many tests passed, failed and
  were skipped, and why they were skipped.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from perdure.provider import Capabilities, Provider
from perdure_provider_tests.factory import HOOKS, ProviderFactory

__all__ = ["provider", "provider_factory"]

SUITE_PACKAGE = "perdure_provider_tests.suite"


@dataclass
class _Area:
    passed: int = 0
    failed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def area_of(function: object) -> str | None:
    """Return the contract area of a suite test (its module name without ``test_``), else None."""
    module = getattr(function, "__module__", "") or ""
    prefix = SUITE_PACKAGE + ".test_"
    return module[len(prefix) :] if module.startswith(prefix) else None


class ConformanceReport:
    """Collects each suite test's outcome and prints the per-area summary at the end of the session."""

    def __init__(self) -> None:
        #: nodeid -> contract area, for every collected suite test.
        self.areas: dict[str, str] = {}
        #: nodeid -> (outcome, skip reason).
        self.outcomes: dict[str, tuple[str, str]] = {}
        #: name -> capabilities of every provider the session created.
        self.providers: dict[str, Capabilities] = {}

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Remember which collected items are suite tests, and their area."""
        for item in items:
            area = area_of(getattr(item, "function", None))
            if area is not None:
                self.areas[item.nodeid] = area

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Fold each phase into the test's outcome: a failure wins, then a skip, then a pass."""
        if report.nodeid not in self.areas:
            return
        if report.failed:
            self.outcomes[report.nodeid] = ("failed", "")
        elif report.skipped and report.nodeid not in self.outcomes:
            self.outcomes[report.nodeid] = ("skipped", _skip_reason(report))
        elif report.when == "call" and report.passed:
            self.outcomes[report.nodeid] = ("passed", "")

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        """Print one line per contract area, then the skip reasons."""
        if not self.outcomes:
            return
        areas: dict[str, _Area] = {}
        for nodeid, (outcome, reason) in self.outcomes.items():
            area = areas.setdefault(self.areas[nodeid], _Area())
            if outcome == "passed":
                area.passed += 1
            elif outcome == "failed":
                area.failed += 1
            else:
                area.skipped[reason] += 1

        write = terminalreporter.write_line
        terminalreporter.section("perdure provider conformance")
        for name, capabilities in self.providers.items():
            write(f"provider: {name}  capabilities: {_describe(capabilities)}")
        write(f"{'area':<20}{'passed':>8}{'failed':>8}{'skipped':>9}")
        totals = _Area()
        for name in sorted(areas):
            area = areas[name]
            skipped = sum(area.skipped.values())
            write(f"{name:<20}{area.passed:>8}{area.failed:>8}{skipped:>9}", red=area.failed > 0)
            totals.passed += area.passed
            totals.failed += area.failed
            totals.skipped.update(area.skipped)
        skipped = sum(totals.skipped.values())
        write(f"{'total':<20}{totals.passed:>8}{totals.failed:>8}{skipped:>9}", bold=True)
        for reason, count in sorted(totals.skipped.items()):
            write(f"  skipped {count}: {reason}")


_REPORT = pytest.StashKey[ConformanceReport]()


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers and the report."""
    config.addinivalue_line(
        "markers", "requires_capability(name): skip unless the provider declares Capabilities.<name>"
    )
    config.addinivalue_line(
        "markers",
        f"requires_hook(name): skip unless the provider factory implements a hook ({', '.join(HOOKS)})",
    )
    report = ConformanceReport()
    config.stash[_REPORT] = report
    config.pluginmanager.register(report, "perdure-conformance-report")


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Mark the suite's coroutine tests for pytest-asyncio before it decides how to collect them."""
    if area_of(obj) is None or not inspect.iscoroutinefunction(obj):
        return
    marks = getattr(obj, "pytestmark", [])
    if not any(mark.name == "asyncio" for mark in marks):
        pytest.mark.asyncio(obj)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def provider_factory() -> ProviderFactory:
    """Your conftest.py must override this fixture with one returning your ProviderFactory."""
    raise pytest.UsageError(
        "perdure_provider_tests: define a `provider_factory` fixture in your conftest.py that returns "
        "an instance of your perdure_provider_tests.ProviderFactory subclass"
    )


@pytest_asyncio.fixture
async def provider(
    request: pytest.FixtureRequest, provider_factory: ProviderFactory
) -> AsyncIterator[Provider]:
    """Create a provider for one test; skip it if a required hook or capability is missing."""
    for mark in request.node.iter_markers("requires_hook"):
        hook = mark.args[0]
        if not provider_factory.has_hook(hook):
            pytest.skip(f"hook {hook!r} not implemented by {type(provider_factory).__name__}")
    created = await provider_factory.create()
    try:
        capabilities = created.capabilities
        request.config.stash[_REPORT].providers.setdefault(created.name, capabilities)
        for mark in request.node.iter_markers("requires_capability"):
            capability = mark.args[0]
            if not hasattr(capabilities, capability):
                raise pytest.UsageError(f"unknown capability {capability!r} in {request.node.nodeid}")
            if not getattr(capabilities, capability):
                pytest.skip(f"capability {capability!r} not declared by the {created.name!r} provider")
        yield created
    finally:
        await provider_factory.dispose(created)


# -- internals -----------------------------------------------------------------------------------


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
        return reason.removeprefix("Skipped: ")
    return str(longrepr)


def _describe(capabilities: Capabilities) -> str:
    """Name every capability flag the provider declares, in declaration order, then its payload limit."""
    flags = [f.name for f in dataclasses.fields(capabilities) if getattr(capabilities, f.name) is True]
    return ", ".join([*flags, f"max_payload_bytes={capabilities.max_payload_bytes}"])
