"""Alembic environment: migrations run on the connection handed over by `upgrade_sync`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from dispatcher.store.tables import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # `alembic` CLI (for developers writing a migration)
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=NullPool)
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    context.run_migrations()
