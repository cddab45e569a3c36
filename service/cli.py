"""The `aligndiff` command: the core's `synth` plus the service's serve, worker, keys and db."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Annotated

import typer
from pydantic import ValidationError
from sqlalchemy import select

from aligndiff.cli import app as core_app
from service.settings import Settings, describe_invalid_settings

app = typer.Typer(
    name="aligndiff",
    help="AlignDiff: turn a few image+mask shots of a class into a synthetic segmentation dataset.",
    no_args_is_help=True,
    add_completion=False,
)
for command in core_app.registered_commands:
    app.registered_commands.append(command)

keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
db_app = typer.Typer(help="Manage the database.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _upgrade(settings: Settings) -> None:
    from service.migrate import upgrade

    try:
        upgrade(settings.resolved_database_url)
    except Exception as error:  # any failure here is reported to the user, not traced
        raise _fail(
            f"cannot migrate the database at {settings.resolved_database_url}: {error}"
        ) from None


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Run the database migrations up to the newest revision."""
    settings = Settings()
    _upgrade(settings)
    typer.echo("database is up to date")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="Who the key is for (a new owner).")],
    admin: Annotated[
        bool, typer.Option("--admin", help="An admin key: sees every owner's data.")
    ] = False,
) -> None:
    """Create an API key. It is printed once, alone on the last line of stdout."""
    from service.auth import create_key
    from service.db import make_engine, make_session_factory, session_scope

    if not name.strip() or len(name) > 128:
        raise _fail("--name must be 1 to 128 characters")
    settings = Settings()
    _upgrade(settings)
    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        key = create_key(session, name=name.strip(), admin=admin)
    engine.dispose()
    typer.echo(
        f"created {'an admin' if admin else 'a'} key for {name.strip()!r}; it is shown only once:"
    )
    typer.echo(key)


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Worker processes.")] = 1,
    pool: Annotated[str, typer.Option("--pool", help="solo or prefork.")] = "solo",
    loglevel: Annotated[str, typer.Option("--loglevel")] = "info",
    queues: Annotated[
        str,
        typer.Option(
            "--queues",
            help="Comma-separated: aligndiff (jobs), aligndiff.predict (predictions). "
            "Default: both.",
        ),
    ] = "",
) -> None:
    """Run a Celery worker (GPU work). Run one per GPU."""
    from worker.main import run_worker

    run_worker(
        Settings(),
        concurrency=concurrency,
        pool=pool,
        loglevel=loglevel,
        queues=[queue for queue in queues.split(",") if queue],
    )


@app.command()
def sweep(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be done; change nothing.")
    ] = False,
) -> None:
    """Sweep once, as every worker does periodically: resume jobs whose worker died, send
    lost starts again, remove stale unfinished samples and orphaned blobs, expire idempotency
    records. Prints one line per thing done, then a summary."""
    import socket

    from service.contexts.sweeper import sweep as sweep_once
    from service.db import make_engine, make_session_factory, session_scope
    from service.queue import CeleryQueue
    from service.storage import make_storage
    from worker.celery_app import make_celery

    settings = Settings()
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    storage = make_storage(
        settings.resolved_storage_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
    )
    try:
        report = sweep_once(
            sessions=lambda: session_scope(factory),
            storage=storage,
            queue=CeleryQueue(make_celery(settings)),
            settings=settings,
            worker=f"sweep@{socket.gethostname()}:{os.getpid()}",
            dry_run=dry_run,
        )
    finally:
        engine.dispose()
    for line in report.lines(dry_run=dry_run):
        typer.echo(line)


def _die_with_parent() -> None:
    """In a child process: ask Linux to send SIGTERM when the parent exits."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _first_admin_key(settings: Settings) -> str | None:
    """Create an admin key when the database has none yet (first start); else None."""
    from service.auth import create_key
    from service.db import make_engine, make_session_factory, session_scope
    from service.models import ApiKey

    engine = make_engine(settings.resolved_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            if session.execute(select(ApiKey.id).where(ApiKey.is_admin.is_(True))).first():
                return None
            return create_key(session, name="admin", admin=True)
    finally:
        engine.dispose()


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    embedded_worker: Annotated[
        bool,
        typer.Option(
            "--embedded-worker/--no-embedded-worker", help="Also run a worker in a child process."
        ),
    ] = True,
    predict_worker: Annotated[
        bool,
        typer.Option(
            "--predict-worker/--no-predict-worker",
            help="With the embedded worker, run predictions in a worker of their own, so they "
            "never wait behind a synthesis or a training (one more process).",
        ),
    ] = True,
) -> None:
    """Run the API, the dashboard and an embedded worker on one machine.

    Defaults need no server: SQLite, a local blob folder and a SQLite-backed broker, all under
    ./aligndiff-data (ALIGNDIFF_DATA_DIR).
    """
    import uvicorn

    from service.app import create_app
    from worker.celery_app import JOBS_QUEUE, PREDICT_QUEUE

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _upgrade(settings)
    admin_key = _first_admin_key(settings)

    children: list[subprocess.Popen[bytes]] = []
    if embedded_worker:
        env = {**os.environ, "ALIGNDIFF_DATA_DIR": str(settings.data_dir.resolve())}
        # NOTE: disjoint queues: the embedded broker (SQLite) cannot hand one queue's messages
        # to two consumers safely.
        queues = [[JOBS_QUEUE], [PREDICT_QUEUE]] if predict_worker else [[]]
        # NOTE: the workers stay in serve's process group (Ctrl-C reaches them) and the kernel
        # signals them when serve dies, however serve dies: uvicorn re-raises SIGTERM on
        # shutdown, so code after uvicorn.run() does not run then.
        command = [sys.executable, "-m", "service.cli", "worker", "--pool", "solo"]
        children = [
            subprocess.Popen(
                [*command, f"--queues={','.join(names)}"], env=env, preexec_fn=_die_with_parent
            )
            for names in queues
        ]
    typer.echo(f"AlignDiff is serving on http://{host}:{port} (data in {settings.data_dir})")
    if admin_key is not None:
        typer.echo("first start: an admin API key was created; it is shown only once:")
        typer.echo(admin_key)
    sys.stdout.flush()
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    finally:
        running = [child for child in children if child.poll() is None]
        for child in running:
            child.terminate()
        for child in running:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()


def main() -> None:
    """The `aligndiff` command. Settings that do not validate are reported by variable name,
    with exit status 2, rather than as a traceback."""
    try:
        app()
    except ValidationError as error:
        if error.title != Settings.__name__:
            raise
        typer.echo(f"error: {describe_invalid_settings(error)}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
