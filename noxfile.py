"""Every check of the project as a nox session; CI runs `python -m nox` (the default sessions).

Sessions:
    lint        ruff check and ruff format --check over the whole tree
    typecheck   mypy --strict over every distribution's package
    tests       the test matrix: Python (3.11 and newer found on this machine) x provider
                (memory, sqlite, postgres); each distribution's tests run from its own folder,
                the conformance suite installed as a package, exactly as a third party would
    demo        the hello-world example on SQLite
    bench       the standard workloads (not a default session)

An interpreter this machine lacks is skipped, on CI too. The postgres sessions need a server
(PERDURE_PG_URL, default postgresql://postgres@127.0.0.1:5432/test); with CI=true they fail
rather than skip when it is missing.
"""

from __future__ import annotations

import os

import nox

PYTHONS = ["3.11", "3.12", "3.13", "3.14"]
PROVIDERS = ["memory", "sqlite", "postgres"]
TEST_DEPS = ["pytest>=8", "pytest-asyncio>=0.23", "pytest-timeout", "pydantic>=2"]
DISTS = {
    "memory": [],
    "sqlite": ["./providers/sqlite"],
    "postgres": ["./providers/postgres"],
}
PACKAGES = [
    "core/src/perdure",
    "providers/sqlite/src/perdure_sqlite",
    "providers/postgres/src/perdure_postgres",
    "provider_tests/src/perdure_provider_tests",
]

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.error_on_missing_interpreters = False


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(
        "mypy", "./core", "./providers/sqlite", "./providers/postgres", "./provider_tests", *TEST_DEPS
    )
    session.run("mypy", "--strict", *PACKAGES)


@nox.session(python=PYTHONS)
@nox.parametrize("provider", PROVIDERS)
def tests(session: nox.Session, provider: str) -> None:
    extra = {"memory": [], "sqlite": ["hatchling"], "postgres": ["hatchling", "pytest-postgresql"]}[provider]
    session.install("./core", "./provider_tests", *DISTS[provider], *TEST_DEPS, *extra)
    env = {"PERDURE_TEST_PROVIDER": provider}
    session.run("pytest", "core/tests", *session.posargs, env=env)
    if provider == "memory":
        session.run("pytest", "provider_tests/tests", *session.posargs, env=env)
    else:
        folder = f"providers/{provider}"
        with session.chdir(folder):
            session.run("pytest", "tests", *session.posargs, env=env)
    if provider == "sqlite":
        session.run("pytest", "examples/tests", *session.posargs, env=env)


@nox.session
def demo(session: nox.Session) -> None:
    session.install("./core", "./providers/sqlite")
    session.run("python", "examples/hello.py")


@nox.session
def bench(session: nox.Session) -> None:
    session.install("./core", "./providers/sqlite", "./providers/postgres")
    session.run(
        "python",
        "bench/run.py",
        *session.posargs,
        env={"PERDURE_PG_URL": os.environ.get("PERDURE_PG_URL", "")},
    )
