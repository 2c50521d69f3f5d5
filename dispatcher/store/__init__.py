"""Storage: SQLModel tables, database set-up, the claim/lease SQL, Alembic migrations."""
