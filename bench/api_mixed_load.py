"""Mixed load test: uploads, sample listings and blob fetches at once, on PostgreSQL and Redis.

Seeds a fresh database with one class of N finalized samples (with real PNG blobs for some of
them), serves the API with uvicorn on loopback (broker: a Redis database of its own; no worker
runs, so uploaded classes stay queued) and drives it with three wrk processes side by side for
a bounded time: one posting the dog shots as new classes, one paging through samples, one
fetching sample images. Reports throughput, p50/p90/p99 and errors per kind, and checks that
every accepted upload left exactly one class and one queued job.

    python -m bench.api_mixed_load [--duration 120] [--upload-connections 2] ...
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import redis
from sqlalchemy import create_engine, func, select

from bench.api_load import (
    api_server,
    blob_script,
    run_wrk,
    sample_ids,
    scratch_database,
    seed,
    seed_blobs,
    wrk_script,
)
from bench.common import RESULTS_PATH, command_line, markdown_table, record_results
from service.models import Job, SegClass

SHOTS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "shots" / "dog"
BROKER_URL = os.environ.get("ALIGNDIFF_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
BOUNDARY = "aligndiffbenchboundary"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--blobs", type=int, default=500, help="samples given a real PNG")
    parser.add_argument("--duration", type=int, default=120, help="seconds of load")
    parser.add_argument("--upload-connections", type=int, default=2)
    parser.add_argument("--list-connections", type=int, default=16)
    parser.add_argument("--blob-connections", type=int, default=8)
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS_PATH)
    return parser.parse_args()


def upload_body() -> bytes:
    """The multipart body of `POST /v1/classes` with the dog shot, 4 samples."""
    image = next(SHOTS.glob("*.jpg")).read_bytes()
    mask = next(SHOTS.glob("*.png")).read_bytes()
    out = BytesIO()

    def part(headers: str, content: bytes) -> None:
        out.write(f"--{BOUNDARY}\r\n{headers}\r\n\r\n".encode())
        out.write(content + b"\r\n")

    part('Content-Disposition: form-data; name="name"', b"dog")
    part('Content-Disposition: form-data; name="num_samples"', b"4")
    part(
        'Content-Disposition: form-data; name="images"; filename="1.jpg"\r\n'
        "Content-Type: image/jpeg",
        image,
    )
    part(
        'Content-Disposition: form-data; name="masks"; filename="1.png"\r\nContent-Type: image/png',
        mask,
    )
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def upload_script(body_path: Path, path: Path) -> None:
    # NOTE: the body is read from a file: a Lua long string would turn its CR LFs into LFs.
    path.write_text(
        f'local f = assert(io.open("{body_path}", "rb"))\n'
        "local body = f:read('*all')\n"
        "f:close()\n"
        # wrk.format replaces wrk.headers (Host, Authorization) with the table it is given.
        "local headers = {}\n"
        "for name, value in pairs(wrk.headers) do headers[name] = value end\n"
        f'headers["Content-Type"] = "multipart/form-data; boundary={BOUNDARY}"\n'
        "request = function()\n"
        '  return wrk.format("POST", "/v1/classes", headers, body)\n'
        "end\n"
    )


def count_uploads(database_url: str, class_id: uuid.UUID) -> tuple[int, int]:
    """(classes other than the seeded one, queued jobs of those classes)."""
    engine = create_engine(database_url)
    with engine.connect() as connection:
        classes = connection.execute(
            select(func.count()).select_from(SegClass).where(SegClass.id != class_id)
        ).scalar_one()
        jobs = connection.execute(
            select(func.count())
            .select_from(Job)
            .where(Job.target_id != class_id, Job.status == "queued")
        ).scalar_one()
    engine.dispose()
    return classes, jobs


def main() -> None:
    args = parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()
    scratch = Path(tempfile.mkdtemp(prefix="aligndiff-mixed-"))
    # NOTE: `api_server` turns rate limits and quotas off (one key drives the whole load).
    env = {
        "ALIGNDIFF_BROKER_URL": BROKER_URL,
        "ALIGNDIFF_STORAGE_URL": f"file://{scratch / 'data' / 'blobs'}",
    }
    try:
        with scratch_database() as url:
            key, class_id = seed(url, args.samples)
            ids = sample_ids(url, class_id, seed_blobs(scratch / "data", class_id, args.blobs))
            scripts = {name: scratch / f"{name}.lua" for name in ("upload", "list", "blob")}
            body = scratch / "upload.body"
            body.write_bytes(upload_body())
            upload_script(body, scripts["upload"])
            wrk_script(class_id, args.samples, scripts["list"])
            blob_script(ids, scripts["blob"])
            # A kind given 0 connections is left out (to measure the others without it).
            connections = {
                name: count
                for name, count in (
                    ("upload", args.upload_connections),
                    ("list", args.list_connections),
                    ("blob", args.blob_connections),
                )
                if count > 0
            }
            with (
                api_server(url, args.api_workers, data_dir=scratch / "data", env=env) as api,
                ThreadPoolExecutor(3) as pool,
            ):
                runs = {
                    name: pool.submit(
                        run_wrk, api, key, scripts[name], connections[name], args.duration
                    )
                    for name in connections
                }
                results = {name: run.result() for name, run in runs.items()}
            classes, queued = count_uploads(url, class_id)
    finally:
        broker.flushdb()
        shutil.rmtree(scratch, ignore_errors=True)

    labels = {
        "upload": "POST /v1/classes (dog shot)",
        "list": "GET /v1/classes/{id}/samples",
        "blob": "GET /v1/samples/{id}/image (512² PNG)",
    }
    rows = [[labels[name], connections[name], *results[name].values()] for name in results]
    total = sum(float(results[name]["requests/s"]) for name in results)
    table = markdown_table(
        [
            "requests",
            "connections",
            "p50",
            "p90",
            "p95",
            "p99",
            "count",
            "requests/s",
            "non-2xx / errors",
        ],
        rows,
    )
    print(table)
    uploads = results.get("upload", {"requests": "0", "errors": "0"})
    accepted = int(uploads["requests"]) - int(uploads["errors"].split()[0])
    consistency = (
        f"{accepted} uploads were answered 202; the database holds {classes} new classes and "
        f"{queued} queued jobs for them (one each per accepted upload; wrk stops mid-request "
        "at the end, so a class may exist whose answer it never read)."
    )
    print(f"total {total:.1f} requests/s; {consistency}")
    record_results(
        "API: mixed load (uploads, listings and blob fetches at once) on PostgreSQL",
        command_line(),
        table,
        notes=(
            f"Three wrk processes side by side for {args.duration} s on the same 2-core machine as "
            f"the API ({args.api_workers} uvicorn worker), PostgreSQL and Redis (loopback); "
            f"{args.samples:,} samples seeded, {args.blobs} with a PNG on local storage; no "
            f"worker consumes the queue. Total {total:.1f} requests/s. {consistency}"
        ),
        path=args.results,
    )


if __name__ == "__main__":
    main()
