"""Ship the alembic tree (the repository's ``migrations/sqlite``) inside the wheel.

Wheel: every migration file goes in as ``perdure_sqlite/migrations/...``. Sdist: the same files go
in as ``migrations/sqlite/...``, so that a wheel built from the sdist (``python -m build``) finds
them there. Files are listed one by one rather than force-including the directory, so the wheel
depends on the revision only, never on stray files (``__pycache__``, scratch databases) on the
builder's disk. Editable installs ship nothing: the package reads the checkout directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PATTERNS = ("env.py", "script.py.mako", "alembic.ini", "versions/*.py")


class MigrationsHook(BuildHookInterface):  # type: ignore[type-arg]
    """Add the migration files to the wheel or sdist being built."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Map each migration file to its place in the artifact."""
        if self.target_name == "wheel" and version == "editable":
            return
        root = Path(self.root).resolve()
        candidates = (root.parent.parent / "migrations" / "sqlite", root / "migrations" / "sqlite")
        source = next((c for c in candidates if (c / "env.py").is_file()), None)
        if source is None:
            raise FileNotFoundError(
                f"perdure-sqlite migrations not found in {', '.join(map(str, candidates))}"
            )
        target = "perdure_sqlite/migrations" if self.target_name == "wheel" else "migrations/sqlite"
        files = sorted({path for pattern in PATTERNS for path in source.glob(pattern) if path.is_file()})
        for path in files:
            build_data["force_include"][str(path)] = f"{target}/{path.relative_to(source).as_posix()}"
