"""Schema migrations: run Alembic from code, wherever the package is installed.

The migration environment lives in the `migrations` package; the Alembic config is built here,
so nothing depends on the current directory or on an `alembic.ini`.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, make_url, pool

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
# Revisions are numbered 0001, 0002, …: the file name says the order, `<rev>_<slug>.py`.
_FILE_TEMPLATE = "%(rev)s_%(slug)s"


def alembic_config(database_url: str) -> Config:
    """An Alembic config for the `migrations` package and `database_url`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.set_main_option("file_template", _FILE_TEMPLATE.replace("%", "%%"))
    # The config is a ConfigParser: a literal `%` (URL-encoded passwords) must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database at `database_url` up to `revision`; a no-op when already there.

    For a SQLite file, its folder is created first.
    """
    _create_sqlite_folder(database_url)
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Migrate the database at `database_url` down to `revision` (`"base"`: drop everything)."""
    command.downgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    """The revision the database is at; None when it was never migrated (or does not exist)."""
    path = _sqlite_path(database_url)
    if path is not None and not path.exists():
        return None
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest revision in the `migrations` package."""
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    if head is None:
        raise RuntimeError(f"no revisions in {MIGRATIONS_DIR / 'versions'}")
    return head


def autogenerate(message: str, database_url: str | None = None) -> Path:
    """Write the next revision: the difference between the models and the migrated schema.

    By default it compares against a throwaway SQLite database migrated to head. Returns the
    new file's path; read and tidy it before committing (autogenerate misses renames and
    server-side details).
    """
    scripts = ScriptDirectory(str(MIGRATIONS_DIR))
    rev_id = f"{len(list(scripts.walk_revisions())) + 1:04d}"
    with tempfile.TemporaryDirectory() as scratch:
        url = database_url or f"sqlite:///{Path(scratch) / 'head.db'}"
        upgrade(url)
        config = alembic_config(url)
        _add_ruff_hooks(config)
        script = command.revision(config, message=message, autogenerate=True, rev_id=rev_id)
    if script is None or isinstance(script, list):
        raise RuntimeError("alembic wrote no single revision")
    return Path(script.path)


def _add_ruff_hooks(config: Config) -> None:
    # Ruff is a development dependency: format the new file when it is there, else leave it.
    if importlib.util.find_spec("ruff") is None:
        return
    hooks = {"ruff_format": "format", "ruff_fix": "check --fix"}
    config.set_section_option("post_write_hooks", "hooks", ", ".join(hooks))
    for name, options in hooks.items():
        config.set_section_option("post_write_hooks", f"{name}.type", "module")
        config.set_section_option("post_write_hooks", f"{name}.module", "ruff")
        config.set_section_option(
            "post_write_hooks", f"{name}.options", f"{options} REVISION_SCRIPT_FILENAME"
        )


def _sqlite_path(database_url: str) -> Path | None:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def _create_sqlite_folder(database_url: str) -> None:
    path = _sqlite_path(database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
