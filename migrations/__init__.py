"""The Alembic migration environment of the service's database (see README.md here)."""
