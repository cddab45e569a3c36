"""Starting a worker: `run_worker(settings)`, or `python -m worker.main`."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import warnings
from collections.abc import Sequence

from celery.exceptions import SecurityWarning
from pydantic import ValidationError

from service.queue import synthesis_queue
from service.settings import Settings, describe_invalid_settings
from worker.celery_app import JOBS_QUEUE, PREDICT_QUEUE, make_celery
from worker.heartbeat import install_heartbeat
from worker.recovery import install_sweeper

POOLS = ("solo", "prefork")
# What `--queues` may name: the jobs (training, and the synthesis of this worker's model's
# classes) and the predictions; and the worker's model's synthesis queue alone (no training),
# which is how `aligndiff serve` runs a worker for each of the deployment's other models.
QUEUES = (JOBS_QUEUE, PREDICT_QUEUE)


def worker_hostname(pid: int | None = None) -> str:
    """The Celery node name of the worker process `pid` (this one by default): unique on the
    machine, and what Celery's log lines name it by (`aligndiff serve` waits for its
    "<name> ready.")."""
    return f"aligndiff-{os.getpid() if pid is None else pid}@{socket.gethostname()}"


class _WithoutResult(logging.Filter):
    """Celery logs every task's return value when it succeeds (`celery.app.trace`): a
    prediction's whole PNG, in hex. The line keeps its task, id and run time."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict) and "return_value" in record.args:
            record.msg = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
        return True


def quiet_worker_logs() -> None:
    """Keep a worker's log to what an operator reads: no task results, and none of the model
    libraries' progress bars ("Loading weights", "Writing model shards", …), which a worker
    would log as warnings line by line (Celery logs what the process prints)."""
    logging.getLogger("celery.app.trace").addFilter(_WithoutResult())
    # NOTE: Celery warns of a worker running as root in a banner of several lines, once per
    # worker (and `aligndiff serve` runs several): one line says as much.
    warnings.filterwarnings("ignore", category=SecurityWarning)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        logging.getLogger(__name__).warning(
            "this worker runs as root: in production, run workers as an unprivileged user "
            "(the worker image does)"
        )
    # NOTE: the worker imports these anyway, with its task modules.
    import diffusers
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def consumed_queues(
    settings: Settings, *, pool: str, concurrency: int, queues: Sequence[str]
) -> list[str]:
    """The `--queues` a worker consumes (empty: every queue), or ValueError saying what
    `pool`, `concurrency` or `queues` may be, before anything starts.

    `["aligndiff.predict"]` makes a worker that serves predictions only, so that they never
    wait for a job's task. The jobs' queue comes with the synthesis queue of the model it
    serves (`settings.served_model`, the model it loads), so that it draws only that model's
    classes; that synthesis queue alone takes no training.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    own_synthesis = synthesis_queue(settings.served_model)
    allowed = (*QUEUES, own_synthesis)
    unknown = [queue for queue in queues if queue not in allowed]
    if unknown:
        raise ValueError(
            f"unknown queue {unknown[0]!r}: choose among {', '.join(allowed)} "
            f"(the last is the synthesis of model {settings.served_model!r}, the one --model "
            "names)"
        )
    return [*dict.fromkeys([*queues, *([own_synthesis] if JOBS_QUEUE in queues else [])])]


def run_worker(
    settings: Settings,
    *,
    concurrency: int = 1,
    pool: str = "solo",
    loglevel: str = "INFO",
    queues: Sequence[str] = (),
) -> None:
    """Run a Celery worker on the configured broker until it is stopped (blocks; it installs
    signal handlers, so call it from a process's main thread).

    One worker process per GPU: `pool="solo"` runs tasks in this process (the choice for the
    embedded SQLite setup too); `prefork` forks `concurrency` children, each loading the models
    once, on its first task. The worker sweeps when it starts and then periodically
    (`worker.recovery`). Every process that runs tasks writes a heartbeat (`worker.heartbeat`).

    It consumes every queue in `QUEUES`, or only `queues` (`consumed_queues`).
    """
    consumed = consumed_queues(settings, pool=pool, concurrency=concurrency, queues=queues)
    app = make_celery(settings)
    install_heartbeat(
        app, draws_classes=not consumed or synthesis_queue(settings.served_model) in consumed
    )
    install_sweeper(app)
    quiet_worker_logs()
    app.worker_main(
        [
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--loglevel={loglevel}",
            f"--hostname={worker_hostname()}",
            # NOTE: gossip, mingle and event heartbeats broadcast between workers; the jobs
            # need none of them, and the embedded SQLite broker cannot broadcast.
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *([f"--queues={','.join(consumed)}"] if consumed else []),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worker.main",
        description="Run an AlignDiff worker (settings from ALIGNDIFF_* variables).",
    )
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--pool", choices=POOLS, default="solo")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--model", default=None, help="the model it serves; default the first")
    parser.add_argument(
        "--queues",
        default="",
        help=f"comma-separated, among {', '.join(QUEUES)} and aligndiff.synthesis.MODEL (the "
        "synthesis of the --model's classes alone); default all",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings() if args.model is None else Settings(worker_model=args.model)
    except ValidationError as error:
        parser.exit(2, f"error: {describe_invalid_settings(error)}\n")
    queues = [queue for queue in args.queues.split(",") if queue]
    try:
        consumed_queues(settings, pool=args.pool, concurrency=args.concurrency, queues=queues)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    run_worker(
        settings,
        concurrency=args.concurrency,
        pool=args.pool,
        loglevel=args.loglevel,
        queues=queues,
    )


if __name__ == "__main__":
    main()
