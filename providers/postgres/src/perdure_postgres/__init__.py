"""PostgreSQL provider for perdure: many worker processes on many machines sharing one database.

```python
from perdure_postgres import PostgresProvider

provider = PostgresProvider("postgresql://app@db/app", schema="perdure")
```

or by URL through perdure's entry points: ``perdure.connect("postgresql://app@db/app?schema=perdure")``.
Migrations run on :meth:`PostgresProvider.open` unless ``migrate=False``; run them yourself with
:func:`migrate`.
"""

from __future__ import annotations

from perdure_postgres.provider import PostgresProvider, from_url
from perdure_postgres.schema import (
    DEFAULT_SCHEMA,
    SchemaState,
    head_revision,
    migrate,
    migrations_path,
    schema_state,
    validate_schema,
)

__version__ = "0.1.0"

__all__ = [
    "PostgresProvider",
    "from_url",
    "migrate",
    "schema_state",
    "SchemaState",
    "head_revision",
    "migrations_path",
    "validate_schema",
    "DEFAULT_SCHEMA",
]
