"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

from alembic import op

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def _schema() -> str:
    schema = op.get_context().version_table_schema
    assert schema, "perdure migrations need a schema (version_table_schema)"
    return op.get_bind().dialect.identifier_preparer.quote_schema(schema)


def upgrade() -> None:
    """Apply this revision."""
    s = _schema()
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    """Revert this revision."""
    s = _schema()
    ${downgrades if downgrades else "pass"}
