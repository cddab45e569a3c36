"""Migrations: `service.migrate` builds exactly the models' schema, on SQLite and PostgreSQL.

The schema comparison here is the guard against a model change without a revision: add a column
to `service.models` and `test_upgrade_builds_exactly_the_models_schema` fails until a new
revision adds it too (see migrations/README.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    Column,
    MetaData,
    String,
    Text,
    create_engine,
    inspect,
    make_url,
    pool,
    select,
)

from service.db import make_engine, make_session_factory, session_scope
from service.migrate import current_revision, downgrade, head_revision, upgrade
from service.models import Base, Owner


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The URL of an empty database; migrations must not depend on the current directory."""
    monkeypatch.chdir(tmp_path)
    if request.param == "sqlite":
        # A folder that does not exist yet: `upgrade` creates it.
        yield f"sqlite:///{tmp_path / 'data' / 'aligndiff.db'}"
        return
    # The session's database is shared with other tests: each test here gets its own.
    server_url = make_url(request.getfixturevalue("postgres_url"))
    name = f"{server_url.database}_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield server_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def schema_diff(database_url: str, metadata: MetaData) -> list[Any]:
    """Alembic autogenerate's differences between `metadata` and the database's schema."""
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def table_names(database_url: str) -> set[str]:
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def models_metadata_copy() -> MetaData:
    metadata = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(metadata)
    return metadata


def test_upgrade_builds_exactly_the_models_schema(empty_database_url: str) -> None:
    upgrade(empty_database_url)

    assert schema_diff(empty_database_url, Base.metadata) == []
    assert table_names(empty_database_url) == {*Base.metadata.tables, "alembic_version"}


def test_schema_comparison_catches_a_column_without_a_revision(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    metadata = models_metadata_copy()
    metadata.tables["samples"].append_column(Column("unmigrated_probe", Text, nullable=True))

    diff = schema_diff(empty_database_url, metadata)

    assert [(op[0], op[2], op[3].name) for op in diff] == [
        ("add_column", "samples", "unmigrated_probe")
    ]


def test_schema_comparison_catches_a_changed_column_type(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    metadata = models_metadata_copy()
    status = metadata.tables["jobs"].c.status
    assert isinstance(status.type, String) and status.type.length is not None
    length = status.type.length
    status.type = String(length * 2)

    diff = schema_diff(empty_database_url, metadata)

    assert len(diff) == 1
    ((op, _schema, table, column, _existing, old_type, new_type),) = diff[0]
    assert (op, table, column) == ("modify_type", "jobs", "status")
    assert (old_type.length, new_type.length) == (length, length * 2)


def test_current_revision_is_none_before_and_head_after_upgrade(empty_database_url: str) -> None:
    assert current_revision(empty_database_url) is None

    upgrade(empty_database_url)

    assert current_revision(empty_database_url) == head_revision()


def test_upgrade_twice_keeps_schema_and_rows(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    engine = make_engine(empty_database_url)
    with session_scope(make_session_factory(engine)) as session:
        session.add(Owner(name="ada"))

    upgrade(empty_database_url)

    with session_scope(make_session_factory(engine)) as session:
        assert session.scalars(select(Owner.name)).all() == ["ada"]
    engine.dispose()
    assert current_revision(empty_database_url) == head_revision()
    assert schema_diff(empty_database_url, Base.metadata) == []


def test_downgrade_to_base_drops_everything(empty_database_url: str) -> None:
    upgrade(empty_database_url)

    downgrade(empty_database_url, "base")

    assert table_names(empty_database_url) == {"alembic_version"}
    assert current_revision(empty_database_url) is None
