"""Alembic's migration environment: the service's models, one database URL, batch mode on SQLite.

The URL comes from the Alembic config (`service.migrate.alembic_config` sets it), else from the
service settings (`ALIGNDIFF_DATABASE_URL`, or the embedded SQLite file under the data folder).
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import create_engine, pool

from service.models import Base, UTCDateTime
from service.settings import Settings

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and config.file_config.has_section("loggers"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or Settings().resolved_database_url


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    # NOTE: a revision is frozen history and must not import `service.models`, which moves on;
    # UTCDateTime is a timezone-aware DateTime in the database, so that is what revisions say.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


_OPTIONS: dict[str, Any] = {
    "target_metadata": target_metadata,
    "compare_type": True,
    "render_item": _render_item,
}


def run_migrations_offline() -> None:
    """Write the SQL to stdout instead of running it (`alembic upgrade head --sql`)."""
    url = _database_url()
    context.configure(
        url=url,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        **_OPTIONS,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # NOTE: not `service.db.make_engine`: it turns SQLite's foreign keys on, and batch mode
    # rebuilds a table by copy, drop and rename, where dropping with foreign keys on would
    # cascade-delete the rows that reference it.
    engine = create_engine(_database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
                render_as_batch=connection.dialect.name == "sqlite",
                **_OPTIONS,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
