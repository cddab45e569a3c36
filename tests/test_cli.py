"""The `aligndiff` command's service commands, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.auth import authenticate
from service.db import make_engine, make_session_factory
from service.migrate import current_revision, head_revision
from service.settings import Settings


def aligndiff(
    *args: str, cwd: Path, module: str = "service.cli", **settings: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNDIFF_")}
    env |= {f"ALIGNDIFF_{name.upper()}": value for name, value in settings.items()}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keys_create_prints_a_working_key_alone_on_the_last_line(tmp_path: Path) -> None:
    # when: keys are created in a fresh folder with nothing but defaults
    user = aligndiff("keys", "create", "--name", "alice", cwd=tmp_path)
    admin = aligndiff("keys", "create", "--name", "root", "--admin", cwd=tmp_path)

    # then: `| tail -1` captures each key, and the service accepts it with the right powers
    assert user.returncode == 0 and admin.returncode == 0, user.stderr + admin.stderr
    user_key, admin_key = (done.stdout.splitlines()[-1] for done in (user, admin))
    settings = Settings(data_dir=tmp_path / "aligndiff-data")
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        assert not authenticate(session, f"Bearer {user_key}").is_admin
        assert authenticate(session, f"Bearer {admin_key}").is_admin
    engine.dispose()
    assert user_key not in (tmp_path / "aligndiff-data" / "aligndiff.db").read_bytes().decode(
        "latin-1"
    )


def test_keys_create_refuses_an_empty_name(tmp_path: Path) -> None:
    done = aligndiff("keys", "create", "--name", "  ", cwd=tmp_path)

    assert done.returncode == 2 and "--name" in done.stderr and done.stdout == ""


def test_db_upgrade_brings_a_new_database_to_the_newest_revision(tmp_path: Path) -> None:
    url = Settings(data_dir=tmp_path / "aligndiff-data").resolved_database_url

    done = aligndiff("db", "upgrade", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert current_revision(url) == head_revision()


@pytest.mark.parametrize(
    "command", [[], ["serve"], ["worker"], ["keys", "create"], ["db", "upgrade"], ["synth"]]
)
def test_every_command_answers_help(tmp_path: Path, command: list[str]) -> None:
    done = aligndiff(*command, "--help", cwd=tmp_path)

    assert done.returncode == 0 and "Usage" in done.stdout


@pytest.mark.parametrize(
    ("module", "args"), [("service.cli", ["sweep", "--dry-run"]), ("worker.main", [])]
)
def test_invalid_settings_are_named_by_their_variables_not_traced(
    tmp_path: Path, module: str, args: list[str]
) -> None:
    done = aligndiff(
        *args,
        cwd=tmp_path,
        module=module,
        max_shots="many",
    )

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == "error: invalid settings:"
    assert any(line.strip().startswith("ALIGNDIFF_MAX_SHOTS: ") for line in lines)
    assert not (tmp_path / "aligndiff-data").exists()


def test_a_worker_taken_as_dead_sooner_than_3_heartbeats_is_refused(tmp_path: Path) -> None:
    done = aligndiff(
        "sweep", cwd=tmp_path, worker_heartbeat_seconds="5", worker_lost_after_seconds="10"
    )

    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "ALIGNDIFF_WORKER_LOST_AFTER_SECONDS must be at least 3 heartbeats" in done.stderr
