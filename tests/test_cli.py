"""The `aligndiff` command's service commands, run as a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from service.auth import authenticate
from service.cli import app as cli_app
from service.db import make_engine, make_session_factory
from service.migrate import current_revision, head_revision
from service.problems import Problem
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
    "command",
    [
        [],
        ["serve"],
        ["worker"],
        ["keys", "create"],
        ["keys", "list"],
        ["keys", "revoke"],
        ["db", "upgrade"],
        ["synth"],
    ],
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


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        (
            "service.cli",
            ["worker", "--queues=aligndiff,training"],
            "error: unknown queue 'training': choose among aligndiff, aligndiff.predict, "
            "aligndiff.synthesis.default (the last is the synthesis of model 'default', the "
            "one --model names)",
        ),
        (
            "worker.main",
            ["--queues=aligndiff.synthesis.sdxl"],
            "error: unknown queue 'aligndiff.synthesis.sdxl': choose among aligndiff, "
            "aligndiff.predict, aligndiff.synthesis.default (the last is the synthesis of model "
            "'default', the one --model names)",
        ),
        (
            "service.cli",
            ["worker", "--pool=threads"],
            "error: pool must be one of solo, prefork, got 'threads'",
        ),
    ],
)
def test_a_worker_refuses_unknown_queues_and_pools_in_one_line_before_it_starts(
    tmp_path: Path, module: str, args: list[str], message: str
) -> None:
    done = aligndiff(*args, cwd=tmp_path, module=module)

    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [message]
    assert not (tmp_path / "aligndiff-data").exists()


def command_paths(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command's words after `aligndiff`, groups included (`()` is `aligndiff` itself)."""
    paths = [path]
    if isinstance(command, TyperGroup):
        for name, sub in sorted(command.commands.items()):
            paths += command_paths(sub, (*path, name))
    return paths


CLI = typer.main.get_command(cli_app)


@pytest.mark.parametrize("path", command_paths(CLI), ids=lambda path: " ".join(path) or "-")
def test_every_help_reads_cleanly_at_80_columns(path: tuple[str, ...]) -> None:
    # when: a user on an 80-column terminal asks a command for its help
    done = CliRunner().invoke(cli_app, [*path, "--help"], env={"COLUMNS": "80"})

    # then: no line runs past the terminal, no type noise, and every option's name is whole
    assert done.exit_code == 0, done.output
    long_lines = [line for line in done.output.splitlines() if len(line) > 80]
    assert long_lines == []
    assert "<bool>" not in done.output and "…" not in done.output
    command = CLI
    for word in path:
        assert isinstance(command, TyperGroup)
        command = command.commands[word]
    for param in command.params:
        for name in (*param.opts, *param.secondary_opts):
            if name.startswith("-"):
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", done.output), name


def test_keys_list_shows_every_key_and_revoke_refuses_it(tmp_path: Path) -> None:
    # given: two keys made with the command
    alice = aligndiff("keys", "create", "--name", "alice", cwd=tmp_path).stdout.splitlines()[-1]
    aligndiff("keys", "create", "--name", "root", "--admin", cwd=tmp_path)

    # when: they are listed
    listing = aligndiff("keys", "list", cwd=tmp_path)

    # then: a table of both, newest first, never with the keys themselves
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split()[:4] == ["ID", "NAME", "ADMIN", "OWNER"]
    assert [row.split()[1:4] for row in rows] == [["root", "yes", "root"], ["alice", "no", "alice"]]
    assert all("never" in row for row in rows)
    assert alice not in listing.stdout
    alices_id = rows[1].split()[0]

    # when: alice's key is revoked, twice
    revoked = aligndiff("keys", "revoke", alices_id, cwd=tmp_path)
    again = aligndiff("keys", "revoke", alices_id, cwd=tmp_path)

    # then: it is refused from now on, and listed as revoked
    assert revoked.returncode == 0 and again.returncode == 0, revoked.stderr + again.stderr
    assert f"key {alices_id} ('alice') is revoked" in revoked.stdout
    settings = Settings(data_dir=tmp_path / "aligndiff-data")
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session, pytest.raises(Problem):
        authenticate(session, f"Bearer {alice}")
    engine.dispose()
    alices_row = aligndiff("keys", "list", cwd=tmp_path).stdout.splitlines()[2]
    assert re.search(r"never\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", alices_row), alices_row


@pytest.mark.parametrize("key_id", ["00000000-0000-0000-0000-000000000000", "not-an-id"])
def test_keys_revoke_of_an_unknown_id_fails_and_says_so(tmp_path: Path, key_id: str) -> None:
    done = aligndiff("keys", "revoke", key_id, cwd=tmp_path)

    assert done.returncode == 2 and done.stdout == ""
    assert key_id in done.stderr and "aligndiff keys list" in done.stderr
    assert "Traceback" not in done.stderr
