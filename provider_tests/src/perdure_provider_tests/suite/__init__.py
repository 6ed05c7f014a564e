"""Every conformance test, one module per contract area.

Star-import it into one test module::

    from perdure_provider_tests.suite import *  # noqa: F403

Only the test functions are exported (``__all__``), so the import brings nothing else into your
module. The plugin (``perdure_provider_tests.plugin``) must be loaded for the ``provider`` fixture
and the markers. Each test's docstring is the one sentence of the contract it enforces.

Because a star import puts every test into one namespace, two tests with the same name would
silently shadow each other; importing this package raises instead.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

from perdure_provider_tests.suite import (
    test_atomicity,
    test_batches,
    test_cancellation,
    test_concurrency,
    test_custom_status,
    test_direct_dispatch,
    test_errors,
    test_instance_creation,
    test_lock_expiry,
    test_locking,
    test_long_polling,
    test_multi_execution,
    test_payloads,
    test_poison,
    test_queue_semantics,
)

#: The contract areas, in the order a reader meets them.
AREAS: tuple[ModuleType, ...] = (
    test_instance_creation,
    test_atomicity,
    test_errors,
    test_locking,
    test_lock_expiry,
    test_queue_semantics,
    test_multi_execution,
    test_poison,
    test_cancellation,
    test_custom_status,
    test_payloads,
    test_batches,
    test_direct_dispatch,
    test_concurrency,
    test_long_polling,
)


def _tests(areas: tuple[ModuleType, ...]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for module in areas:
        for name, obj in vars(module).items():
            if (
                name.startswith("test_")
                and callable(obj)
                and getattr(obj, "__module__", None) == module.__name__
            ):
                if name in found:
                    raise RuntimeError(
                        f"two suite tests are named {name!r} ({found[name].__module__}, {module.__name__})"
                    )
                found[name] = obj
    return found


def rules_markdown() -> str:
    """Every rule the suite checks, per area, as the Markdown list in docs/provider-authoring.md."""
    lines: list[str] = []
    for module in AREAS:
        area = module.__name__.rsplit(".", 1)[1].removeprefix("test_")
        summary = (inspect.getdoc(module) or "").splitlines()[0]
        lines += [f"### {area}", "", summary, ""]
        for name, function in _tests((module,)).items():
            marks = getattr(function, "pytestmark", [])
            notes = (
                ["both queues"]
                if any(m.name == "parametrize" and m.args[0] == "queue" for m in marks)
                else []
            )
            notes += [
                f"{m.name.removeprefix('requires_')}: {m.args[0]}"
                for m in marks
                if m.name.startswith("requires_")
            ]
            suffix = f" *({'; '.join(notes)})*" if notes else ""
            lines.append(f"- `{name}`: {inspect.getdoc(function)}{suffix}")
        lines.append("")
    return "\n".join(lines)


TESTS: dict[str, Any] = _tests(AREAS)
globals().update(TESTS)
__all__ = sorted(TESTS)
