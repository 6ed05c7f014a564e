"""Small helpers shared by the examples: a throw-away database and quick runtime options.

Every example keeps its state in a SQLite file inside a fresh temporary directory that is removed
when the example ends, so examples can run from any working directory, any number of times.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from perdure import RuntimeOptions


@contextmanager
def temp_database(name: str = "perdure.db") -> Iterator[Path]:
    """Yield the path of a SQLite file in a new temporary directory; delete it all afterwards."""
    with tempfile.TemporaryDirectory(prefix="perdure-example-") as folder:
        yield Path(folder) / name


#: Options for short demos: check for work more often than the default once a second, and don't
#: wait long for in-flight activities at shutdown. The defaults suit a real service.
DEMO_OPTIONS = RuntimeOptions(poll_interval=0.2, shutdown_timeout=5.0)
