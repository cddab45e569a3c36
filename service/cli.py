"""The `aligndiff` command: the core's `synth` plus the service's serve, worker, keys and db."""

from __future__ import annotations

import os
import sys
import uuid
from datetime import datetime
from typing import Annotated

import typer
from pydantic import ValidationError
from sqlalchemy import select

from aligndiff.cli import app as core_app
from service.settings import Settings, describe_invalid_settings

# NOTE: rich_markup_mode=None: click's plain help, which re-wraps the docstrings to the
# terminal and never cuts an option's name (Rich's tables do, at 80 columns).
app = typer.Typer(
    name="aligndiff",
    help="AlignDiff: turn a few image+mask shots of a class into a synthetic segmentation dataset.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
for command in core_app.registered_commands:
    app.registered_commands.append(command)

keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True, rich_markup_mode=None)
db_app = typer.Typer(help="Manage the database.", no_args_is_help=True, rich_markup_mode=None)
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
    name: Annotated[
        str, typer.Option("--name", metavar="NAME", help="Who the key is for (a new owner).")
    ],
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


@keys_app.command("list")
def keys_list() -> None:
    """List every API key, newest first.

    A table of each key's id, name, admin or not, owner, and when it was created, last used
    (to within about a minute) and revoked. Never the keys themselves."""
    from service.contexts.keys import every_key
    from service.db import make_engine, make_session_factory

    settings = Settings()
    _upgrade(settings)
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            listed = every_key(session=session)
    finally:
        engine.dispose()
    rows = [
        [
            str(item.key.id),
            item.key.name,
            "yes" if item.key.admin else "no",
            item.owner,
            _when(item.key.created_at),
            _when(item.key.last_used_at) or "never",
            _when(item.key.revoked_at),
        ]
        for item in listed
    ]
    header = ["ID", "NAME", "ADMIN", "OWNER", "CREATED (UTC)", "LAST USED", "REVOKED"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else ""


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[
        str, typer.Argument(metavar="KEY_ID", help="The key's id (see `aligndiff keys list`).")
    ],
) -> None:
    """Revoke an API key.

    Running servers refuse it within ALIGNDIFF_AUTH_CACHE_SECONDS, and its dashboard sessions
    end at once. Revoking a revoked key changes nothing."""
    from service.contexts.keys import revoke_any_key
    from service.db import make_engine, make_session_factory
    from service.problems import Problem

    try:
        parsed = uuid.UUID(key_id)
    except ValueError:
        raise _fail(f"{key_id!r} is not a key id (see `aligndiff keys list`)") from None
    settings = Settings()
    _upgrade(settings)
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            key = revoke_any_key(session=session, key_id=parsed)
    except Problem:
        raise _fail(f"no key has the id {parsed} (see `aligndiff keys list`)") from None
    finally:
        engine.dispose()
    typer.echo(f"key {key.id} ({key.name!r}) is revoked, since {_when(key.revoked_at)} UTC")


@app.command()
def worker(
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, metavar="N", help="Worker processes.")
    ] = 1,
    pool: Annotated[str, typer.Option("--pool", metavar="POOL", help="solo or prefork.")] = "solo",
    loglevel: Annotated[
        str, typer.Option("--loglevel", metavar="LEVEL", help="debug, info, warning or error.")
    ] = "info",
    queues: Annotated[
        str,
        typer.Option(
            "--queues",
            metavar="QUEUES",
            help="Comma-separated: aligndiff (jobs: training, and the synthesis of its "
            "model's classes), aligndiff.predict (predictions), aligndiff.synthesis.MODEL (the "
            "synthesis of its model's classes alone, MODEL being --model's). Default: the first "
            "two.",
        ),
    ] = "",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="NAME",
            help="The model it loads and synthesizes classes of: a name in ALIGNDIFF_MODELS. "
            "Default: the first [env ALIGNDIFF_WORKER_MODEL].",
        ),
    ] = None,
) -> None:
    """Run a Celery worker (GPU work), one per GPU, serving one of the deployment's models."""
    from worker.main import consumed_queues, run_worker

    settings = Settings() if model is None else Settings(worker_model=model)
    chosen = [queue for queue in queues.split(",") if queue]
    try:
        consumed_queues(settings, pool=pool, concurrency=concurrency, queues=chosen)
    except ValueError as error:
        raise _fail(str(error)) from None
    run_worker(settings, concurrency=concurrency, pool=pool, loglevel=loglevel, queues=chosen)


@app.command()
def sweep(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be done; change nothing.")
    ] = False,
) -> None:
    """Sweep once, as every worker does periodically.

    Resume jobs whose worker died, send lost starts again, remove stale unfinished samples
    and orphaned blobs, expire idempotency records. Prints one line per thing done, then a
    summary."""
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
    host: Annotated[
        str, typer.Option("--host", metavar="HOST", help="The address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, metavar="PORT", help="The port.")
    ] = 8000,
    embedded_worker: Annotated[
        bool,
        typer.Option(
            "--embedded-worker/--no-embedded-worker",
            help="Also run workers in child processes: one for each model of ALIGNDIFF_MODELS "
            "(the first also trains).",
        ),
    ] = True,
    predict_worker: Annotated[
        bool,
        typer.Option(
            "--predict-worker/--no-predict-worker",
            help="With the embedded workers, run predictions in a worker of their own, so they "
            "never wait behind a synthesis or a training (one more process).",
        ),
    ] = True,
) -> None:
    """Run the API, the dashboard and embedded workers on one machine.

    Defaults need no server: SQLite, a local blob folder and a SQLite-backed broker, all
    under ./aligndiff-data (ALIGNDIFF_DATA_DIR). Once it listens, serve prints its URL and,
    on first start, an admin API key.
    """
    from service.app import create_app
    from service.serve import CannotListen, Serve, WorkerExited, embedded_roles, listening_socket

    settings = Settings()
    try:
        # Before anything starts: a taken port fails at once.
        sock = listening_socket(host, port)
    except CannotListen as error:
        raise _fail(str(error)) from None
    if embedded_worker:
        # Its workers load the models from this machine: one it cannot read fails now, not at
        # a class's first task.
        from service.contexts.models import unreadable_models

        problems = unreadable_models(settings)
        if problems:
            sock.close()
            raise _fail(
                "; ".join(problems) + ". serve's workers load the models from this machine: set "
                "ALIGNDIFF_MODELS (or ALIGNDIFF_DIFFUSION_MODEL) to models it has"
            )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _upgrade(settings)
    admin_key = _first_admin_key(settings)
    try:
        Serve(
            app=create_app(settings),
            sock=sock,
            host=host,
            port=port,
            data_dir=settings.data_dir.resolve(),
            admin_key=admin_key,
            workers=embedded_roles(settings, predictions_apart=predict_worker)
            if embedded_worker
            else [],
        ).run()
    except WorkerExited as error:
        raise _fail(str(error)) from None


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
