"""`dispatcher db`: schema migrations."""

from __future__ import annotations

import click

from dispatcher.cli.common import config_argument, console, load, run
from dispatcher.store.database import Database


@click.group()
def db() -> None:
    """Database maintenance."""


@db.command()
@config_argument
def upgrade(config: str) -> None:
    """Apply pending schema migrations (the daemon also does this at start)."""
    cfg = load(config)

    async def _upgrade() -> None:
        database = Database.open(cfg.database_url)
        try:
            await database.upgrade()
        finally:
            await database.close()

    run(_upgrade())
    console().print("database schema is up to date")
