"""indexes that keep claims and housekeeping independent of the queue's size

Claims: one condition `not_before IS NULL OR not_before <= now` in id order (0002's index)
read past every row of the channel not due yet. A million rows held for a send window's
opening cost 200 ms per claim, every second until it opened. Claims now take the due rows
earliest due first (by not_before, then id), one range of an index on
(channel, status, not_before, id), which replaces both earlier queue indexes.

Housekeeping: at every heartbeat it renews this worker's leases and recovers dead workers',
with conditions no index served: three full scans, 35 ms at 100,000 rows and 300 ms at
1,000,000 on SQLite, holding the connection the sends' commits wait for. A partial index holds
only the rows under a lease (claimed or in flight: a few hundred at any time).

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

# As dispatcher.store.tables.LEASED_CONDITION at this revision (a migration keeps its own).
_LEASED = "status IN ('claimed', 'sending')"


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deliveries_due", ["channel", "status", "not_before", "id"], unique=False
        )
        batch_op.drop_index("ix_deliveries_claim")
        batch_op.drop_index("ix_deliveries_queue")
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
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_deliveries_queue", ["channel", "status", "not_before"])
        batch_op.create_index("ix_deliveries_claim", ["channel", "status", "id"])
        batch_op.drop_index("ix_deliveries_due")
