"""Takeover latency: how long a job waits after its worker is cut off from the network.

Two real workers (`aligndiff worker`, tiny models), each on a host of its own (a network
namespace and hostname, `tests.netns_support`), draw a class's samples; PostgreSQL, Redis and
the S3 endpoint (moto) stay on this machine's loopback and are reached through the hosts'
links. Each round cuts the link of a worker while it draws a sample (packets dropped, as in a
partition) and measures, polling the job's row every 20 ms:

- cut → takeover: until the job is claimed again by the other worker's sweep;
- cut → progressing: until the other worker, under the new claim, reports progress on it.

Then the link is healed, the cut-off worker is seen abandoning its task (fenced), and the
job is cancelled before the next round. Needs root (network namespaces).

    sudo .venv/bin/python -m bench.takeover [--partitions 10] [--lost-after 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import boto3

from bench.api_load import scratch_database
from bench.common import RESULTS_PATH, command_line, markdown_table, record_results
from service.contexts.jobs import TERMINAL, request_cancel
from service.db import make_engine, make_session_factory
from service.models import Base, Job
from service.settings import Settings
from service.storage import make_storage
from tests.fault_support import AWS_TEST_ENVIRONMENT, PrivateRedis, moto_server
from tests.netns_support import Host, HostedWorker, hosts
from tests.worker_support import (
    Service,
    create_class,
    give_embedding,
    token_embedding,
    wait_for,
    worker_env,
)
from worker import synthesis
from worker.celery_app import make_celery

SHOTS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "shots" / "dog"
POLL = 0.02


def victim_drawing(
    service: Service, class_id: uuid.UUID, workers: list[HostedWorker]
) -> HostedWorker | None:
    """A worker whose log says it is drawing a sample of the class not stored yet."""
    stored = {sample.index for sample in service.samples(class_id)}
    if not stored:
        return None
    for worker in workers:
        found = re.findall(r"drawing samples (\d+)$", worker.text(), re.MULTILINE)
        if found and int(found[-1]) not in stored:
            return worker
    return None


def one_partition(
    service: Service,
    settings: Settings,
    workers: list[HostedWorker],
    models_token: bytes,
    samples: int,
) -> tuple[float, float]:
    """Cut a worker mid-sample; (cut → takeover, cut → progressing) in seconds."""
    created = create_class(service, SHOTS, name="dog", num_samples=samples)
    give_embedding(service, created.class_id, models_token, "<dog>")
    for worker in workers:  # each round reads only its own log lines
        worker.log.write_text("")
    make_celery(settings).send_task(synthesis.START, args=[str(created.job_id)])
    victim = wait_for(
        lambda: victim_drawing(service, created.class_id, workers),
        timeout=120,
        what="a worker mid-sample",
    )
    (other,) = [worker for worker in workers if worker is not victim]
    before = service.job(created.job_id).claim
    victim.host.cut()
    cut = time.monotonic()
    taken: float | None = None
    claimed_at = None
    while True:
        job = service.job(created.job_id)
        now = time.monotonic()
        if job.claim > before and (job.worker or "").startswith(f"{other.hostname}:"):
            if taken is None:
                taken, claimed_at = now - cut, job.updated_at
            elif job.updated_at != claimed_at:
                progressing = now - cut
                break
        if now - cut > 120:
            raise RuntimeError("no takeover within 120 s")
        time.sleep(POLL)
    victim.host.heal()
    fenced = f"fenced: job {created.job_id} was claimed again"
    wait_for(lambda: fenced in victim.text(), timeout=120, what="the fence", log=victim.log)
    with service.session() as session:
        row = session.get(Job, created.job_id)
        assert row is not None
        if row.status not in TERMINAL:
            request_cancel(session, row)

    def ended() -> bool:
        return service.job(created.job_id).status in TERMINAL

    wait_for(ended, timeout=120, what="the job to end")
    return taken, progressing


def measure(
    args: argparse.Namespace, folder: Path, cache: Path, token: bytes, lost_after: float
) -> list[tuple[float, float]]:
    """`args.partitions` rounds with workers taken as dead after `lost_after` s of silence
    (heartbeats every sixth of it), on servers of their own."""
    heartbeat = lost_after / 6
    folder.mkdir(parents=True)
    with ExitStack() as stack:
        database = stack.enter_context(scratch_database())
        redis = stack.enter_context(PrivateRedis.running(folder))
        endpoint = stack.enter_context(moto_server())
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="blobs"
        )
        settings = Settings(
            data_dir=folder,
            database_url=database,
            broker_url=redis.url,
            storage_url="s3://blobs/aligndiff",
            s3_endpoint_url=endpoint,
            sample_chunk_size=1,
            annotation_chunk_size=4,
            worker_heartbeat_seconds=heartbeat,
            worker_lost_after_seconds=lost_after,
        )
        engine = make_engine(database)
        stack.callback(engine.dispose)
        Base.metadata.create_all(engine)
        service = Service(
            settings,
            make_session_factory(engine),
            make_storage(settings.resolved_storage_url, endpoint_url=endpoint),
        )
        machines: list[Host] = stack.enter_context(hosts("a", "b"))
        workers: list[HostedWorker] = []

        def stop_workers() -> None:
            for worker in workers:
                worker.resume()
                worker.kill()
                worker.stop()

        stack.callback(stop_workers)
        for host in machines:
            hosted = settings.model_copy(
                update={"database_url": host.reach(database), "broker_url": host.reach(redis.url)}
            )
            env = worker_env(
                hosted,
                cache,
                ALIGNDIFF_S3_ENDPOINT_URL=host.reach(endpoint),
                ALIGNDIFF_WORKER_HEARTBEAT_SECONDS=str(heartbeat),
                ALIGNDIFF_WORKER_LOST_AFTER_SECONDS=str(lost_after),
                ALIGNDIFF_SWEEP_INTERVAL_SECONDS=str(args.sweep_interval),
                **AWS_TEST_ENVIRONMENT,
            )
            log = folder / f"worker-{host.name}.log"
            workers.append(HostedWorker(host, env, log, hostname=f"worker-{host.name}"))
        for worker in workers:
            wait_for(worker.ready, timeout=180, what=f"{worker.hostname} to start", log=worker.log)
        rounds: list[tuple[float, float]] = []
        for number in range(args.partitions):
            taken, progressing = one_partition(service, settings, workers, token, args.samples)
            print(
                f"lost after {lost_after:g} s, partition {number + 1}: takeover {taken:.2f} s, "
                f"progressing {progressing:.2f} s"
            )
            rounds.append((taken, progressing))
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=10)
    parser.add_argument(
        "--lost-after",
        type=float,
        nargs="+",
        default=[3.0, 6.0],
        help="worker_lost_after_seconds values, one row each (default: 3 6)",
    )
    parser.add_argument("--sweep-interval", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=24, help="samples per round's class")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.takeover needs root (network namespaces)")
    os.environ.update(AWS_TEST_ENVIRONMENT)
    folder = Path(tempfile.mkdtemp(prefix="aligndiff-takeover-"))
    cache = folder / "models"
    from aligndiff.settings import Settings as ModelSettings
    from aligndiff.synth import load_models

    token = token_embedding(load_models(ModelSettings(model_cache_dir=cache)), "<dog>")
    rows = []
    for lost_after in args.lost_after:
        rounds = measure(args, folder / f"lost-after-{lost_after:g}", cache, token, lost_after)
        takeovers = [taken for taken, _ in rounds]
        progress = [progressing for _, progressing in rounds]
        rows.append(
            [
                len(rounds),
                f"{lost_after:g} s",
                f"{lost_after / 6:g} s",
                f"{statistics.median(takeovers):.2f} s / {max(takeovers):.2f} s",
                f"{statistics.median(progress):.2f} s / {max(progress):.2f} s",
            ]
        )
    table = markdown_table(
        [
            "partitions",
            "ALIGNDIFF_WORKER_LOST_AFTER_SECONDS",
            "heartbeat every",
            "cut → takeover, median / max",
            "cut → progressing on the other worker, median / max",
        ],
        rows,
    )
    print(table)
    record_results(
        "takeover: a worker cut off from the network mid-sample (partitions across hosts)",
        command_line(),
        table,
        notes=(
            "Two solo workers (tiny models, one sample per chunk), each in a network namespace "
            "of its own, PostgreSQL, Redis and moto S3 on loopback through TCP proxies on the "
            "veth pairs; each round cuts the link of the worker drawing a sample. Sweeps every "
            f"{args.sweep_interval:g} s (± 25 %), the default lease (600 s): the takeover is the "
            "heartbeat's silence, judged by the database's clock. It takes the silence "
            "(`ALIGNDIFF_WORKER_LOST_AFTER_SECONDS`, less the time since the last beat, up to a "
            "heartbeat interval) plus up to a sweep interval; progressing adds the resume task's "
            "trip through Redis and its first progress report. After each round the link is "
            "healed and the cut-off worker is seen abandoning its task (fenced)."
        ),
        path=args.results,
    )


if __name__ == "__main__":
    main()
