"""an index of the rows under a lease, for housekeeping

At every heartbeat (5 s by default) housekeeping renews this worker's leases and recovers dead
workers' (claimed rows back to pending, rows in flight to unknown). Nothing indexed status
alone, so each of those three statements read the whole deliveries table: measured on SQLite,
35 ms per heartbeat at 100,000 rows and 300 ms at 1,000,000, all of it holding the one
connection the sends' commits wait for. A partial index holds only the rows under a lease (a
few hundred at any time), so the statements cost the same whatever the queue's size.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# As in dispatcher.store.tables.LEASED_CONDITION at this revision (a migration keeps its own).
_LEASED = "status IN ('claimed', 'sending')"


def upgrade() -> None:
    op.create_index(
        "ix_deliveries_leased",
        "deliveries",
        ["owner", "lease_until"],
        unique=False,
        sqlite_where=sa.text(_LEASED),
        postgresql_where=sa.text(_LEASED),
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_leased", table_name="deliveries")
