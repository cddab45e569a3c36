"""Alembic revisions, one file each, named `<rev>_<slug>.py`."""
