"""Load test of the API's hot reads on PostgreSQL: throughput, latency percentiles, errors,
and the throughput as a ratio of a floor's.

Seeds a fresh database with one class of N finalized samples (some with a PNG on local
storage), serves the API with uvicorn on loopback and drives it with wrk (Debian package
`wrk`) for a bounded time: `GET /v1/classes/{id}/samples` at random pages, some filtered. In
the same run, alternating with the API, the same wrk script drives the floor
(`bench/api_floor.py`: a minimal ASGI app running the same SQL on the same database and
writing the same JSON), so the API's requests/s come as a ratio of the floor's on this
machine as it is now. Then `GET /v1/samples/{id}/image` (blob fetches) on the API.
Targets (issue 18): p99 <= 50 ms and >= 1,200 requests/s with 2 workers at 32 connections,
zero errors; the API at >= 0.6 of the floor.

    python -m bench.api_load [--samples 10000] [--connections 32] [--duration 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image
from sqlalchemy import create_engine, insert, select

from bench.common import RESULTS_PATH, command_line, markdown_table, record_results
from service.auth import create_key
from service.db import make_engine, make_session_factory, session_scope
from service.migrate import upgrade
from service.models import ApiKey, Job, Owner, Sample, SegClass, utcnow
from service.pagination import encode_cursor
from service.storage import LocalStorage, png_bytes, sample_key

SHOTS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "shots" / "dog"
FLOOR_APP = "bench.api_floor:create_floor"

ADMIN_URL = os.environ.get(
    "ALIGNDIFF_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=int, default=20, help="seconds of load per run")
    parser.add_argument("--api-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2, help="API/floor runs per worker count")
    parser.add_argument("--blobs", type=int, default=500, help="samples given a real PNG")
    parser.add_argument("--classes", type=int, default=199, help="more classes, with jobs")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH)
    return parser.parse_args()


@contextmanager
def scratch_database() -> Iterator[str]:
    name = f"aligndiff_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def seed(url: str, samples: int) -> tuple[str, uuid.UUID]:
    """One owner, a key, one class of `samples` finalized samples; returns (key, class id)."""
    upgrade(url)
    engine = make_engine(url)
    with session_scope(make_session_factory(engine)) as session:
        key = create_key(session, name="bench", admin=False)
        owner_id = session.query(Owner.id).scalar()
        class_id = uuid.uuid4()
        job = Job(kind="synthesis", owner_id=owner_id, target_id=class_id, status="succeeded")
        session.add(job)
        session.flush()
        session.add(
            SegClass(id=class_id, owner_id=owner_id, name="dog", seed=0, prompts=[], num_shots=1,
                     num_samples_requested=samples, num_samples_done=samples, job_id=job.id)
        )  # fmt: skip
        session.flush()
        now = utcnow()
        rng = random.Random(0)
        rows = [
            {
                "id": uuid.uuid4(), "class_id": class_id, "index": i,
                "prompt": "a photo of a dog", "prompt_kind": "text" if i % 2 else "inversion",
                "seed": rng.getrandbits(63), "width": 512, "height": 512,
                "image_key": f"classes/{class_id}/samples/{i:05d}/image.png",
                "coarse_mask_key": f"classes/{class_id}/samples/{i:05d}/coarse.png",
                "mask_key": f"classes/{class_id}/samples/{i:05d}/mask.png",
                "consensus_iou": rng.random(), "mask_source": "consensus",
                "ood_iou": rng.random(), "clip_score": rng.uniform(15, 35),
                "shot_similarity": rng.random(), "accepted": rng.random() > 0.2,
                "created_at": now, "finalized_at": now,
            }
            for i in range(samples)
        ]  # fmt: skip
        for start in range(0, samples, 2000):
            session.execute(insert(Sample), rows[start : start + 2000])
    # NOTE: statistics, as autovacuum keeps them on a live database. Freshly seeded tables have
    # none: the planner then guesses 3 samples per class and fetches all of a class's rows to
    # sort them for every page, several milliseconds a query instead of a tenth of one.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("ANALYZE")
    engine.dispose()
    return key, class_id


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NO_LIMITS = {
    "ALIGNDIFF_RATE_LIMIT_PER_SECOND": "0",
    "ALIGNDIFF_JOB_RATE_LIMIT_PER_MINUTE": "0",
    "ALIGNDIFF_QUOTA_CONCURRENT_JOBS": "0",
    "ALIGNDIFF_QUOTA_UPLOAD_BYTES": "0",
}


@contextmanager
def api_server(
    database_url: str,
    workers: int,
    *,
    app: str = "service.app:create_app",
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """uvicorn serving the API (or another ASGI `app` factory: the floor) on a free loopback
    port; `data_dir` (default: a scratch folder, removed afterwards) and `env` (more
    ALIGNDIFF_* settings) configure it."""
    port = free_port()
    scratch = data_dir is None
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="aligndiff-bench-"))
    env = {
        # One key drives the whole load: the per-key rate limits and per-owner quotas are
        # off (unless the environment sets them), as this measures capacity, not the throttle.
        **NO_LIMITS,
        **os.environ,
        "ALIGNDIFF_DATABASE_URL": database_url,
        "ALIGNDIFF_DATA_DIR": str(data_dir),
        **(env or {}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", app,
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
         "--log-level", "warning", "--no-access-log"],
        env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise RuntimeError("the API did not start")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        if scratch:
            shutil.rmtree(data_dir, ignore_errors=True)


def seed_blobs(data_dir: Path, class_id: uuid.UUID, count: int) -> list[int]:
    """Write a 512² PNG (the dog photo, resized) as the image of samples 0..count-1."""
    photo = Image.open(next(SHOTS.glob("*.jpg"))).convert("RGB").resize((512, 512))
    data = png_bytes(photo)
    storage = LocalStorage(data_dir / "blobs")
    for index in range(count):
        storage.put(sample_key(class_id, index, "image.png"), data, content_type="image/png")
    return list(range(count))


def sample_ids(database_url: str, class_id: uuid.UUID, indexes: list[int]) -> list[str]:
    from service.models import Sample

    engine = create_engine(database_url)
    with engine.connect() as connection:
        rows = connection.execute(
            select(Sample.id).where(Sample.class_id == class_id, Sample.index.in_(indexes))
        ).scalars()
        ids = [str(row) for row in rows]
    engine.dispose()
    return ids


def blob_script(ids: list[str], path: Path) -> None:
    rng = random.Random(2)
    paths_script([f"/v1/samples/{rng.choice(ids)}/image" for _ in range(400)], path)


def owner_of(database_url: str) -> uuid.UUID:
    """The owner of the seeded key (the floor checks it as the API does)."""
    engine = create_engine(database_url)
    with engine.connect() as connection:
        owner = connection.execute(select(ApiKey.owner_id)).scalar_one()
    engine.dispose()
    return owner


def paths_script(paths: list[str], path: Path) -> None:
    """A wrk script requesting `paths`, each request one of them at random."""
    lua_paths = ",\n".join(f'  "{p}"' for p in paths)
    path.write_text(
        f"paths = {{\n{lua_paths}\n}}\n"
        "request = function()\n"
        '  return wrk.format("GET", paths[math.random(#paths)])\n'
        "end\n"
    )


def wrk_script(class_id: uuid.UUID, samples: int, path: Path) -> None:
    """A wrk script choosing among pages all over the class, some of them filtered."""
    rng = random.Random(1)
    paths = []
    for _ in range(400):
        query = f"limit=50&cursor={encode_cursor([rng.randrange(samples)])}"
        if rng.random() < 0.25:
            query += "&accepted=true&min_clip_score=20"
        paths.append(f"/v1/classes/{class_id}/samples?{query}")
    paths_script(paths, path)


def seed_classes(url: str, count: int) -> tuple[str, list[uuid.UUID]]:
    """`count` more classes of the seeded owner, each with its synthesis job in one of the
    states a deployment has, and an admin key; returns (admin key, the class ids)."""
    engine = make_engine(url)
    statuses = ["succeeded"] * 6 + ["failed", "cancelled", "running", "queued"]
    ids = []
    with session_scope(make_session_factory(engine)) as session:
        admin_key = create_key(session, name="bench-admin", admin=True)
        owner_id = session.execute(select(ApiKey.owner_id).where(~ApiKey.is_admin)).scalar_one()
        for i in range(count):
            class_id = uuid.uuid4()
            job = Job(kind="synthesis", owner_id=owner_id, target_id=class_id,
                      status=statuses[i % len(statuses)], progress=1.0)  # fmt: skip
            session.add(job)
            session.flush()
            session.add(
                SegClass(id=class_id, owner_id=owner_id, name=f"class-{i}", seed=i, prompts=[],
                         num_shots=1, num_samples_requested=100, num_samples_done=100,
                         job_id=job.id)
            )  # fmt: skip
            ids.append(class_id)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("ANALYZE")  # as in `seed`
    engine.dispose()
    return admin_key, ids


def hot_read_scripts(class_ids: list[uuid.UUID], folder: Path) -> dict[str, Path]:
    """A wrk script per hot read besides the listing: what the SDK's `wait`, tools and the
    dashboard poll."""
    rng = random.Random(3)
    scripts = {
        "GET /v1/classes/{id}": [f"/v1/classes/{rng.choice(class_ids)}" for _ in range(200)],
        "GET /v1/classes": ["/v1/classes?limit=50"],
        "GET /v1/jobs": ["/v1/jobs?limit=50", "/v1/jobs?status=succeeded&limit=50"],
        "GET /admin/api/jobs, session cookie, no If-None-Match": ["/admin/api/jobs"],
    }
    paths = {}
    for i, (name, requests) in enumerate(scripts.items()):
        paths[name] = folder / f"hot-{i}.lua"
        paths_script(requests, paths[name])
    return paths


def revalidating_script(path: str, etag: str, script: Path) -> None:
    """A wrk script polling `path` as the dashboard's page does: with the ETag it holds."""
    # NOTE: headers given to wrk.format replace wrk's own (-H): the key is copied in.
    script.write_text(
        "request = function()\n"
        "  local headers = {}\n"
        "  for name, value in pairs(wrk.headers) do headers[name] = value end\n"
        f"  headers[\"If-None-Match\"] = '{etag}'\n"
        f'  return wrk.format("GET", "{path}", headers)\n'
        "end\n"
    )


# The dashboard's poll, revalidated as the page's fetch sends it (a row of its own).
DASHBOARD_POLL = "/admin/api/jobs"
REVALIDATED_POLL = "GET /admin/api/jobs, session cookie, If-None-Match (the page's poll)"


# wrk's summary prints p50/75/90/99 only; this prints the p95 too (latency in microseconds).
P95_REPORT = """
done = function(summary, latency, requests)
  io.write(string.format("p95 latency %d us\\n", latency:percentile(95)))
end
"""


def bearer(key: str) -> str:
    return f"Authorization: Bearer {key}"


def dashboard_cookie(url: str, admin_key: str) -> str:
    """The cookie of a dashboard session signed in with `admin_key` (`name=value`), as the
    sign-in form makes one (its CSRF token and cookie first)."""
    with httpx.Client(base_url=url) as browser:
        form = browser.get("/admin/sign-in", headers={"Accept": "text/html"})
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token is not None, form.text
        signed_in = browser.post(
            "/admin/sign-in",
            data={"key": admin_key, "csrf_token": token.group(1), "next": "/admin"},
        )
        assert signed_in.status_code == 303, signed_in.text
        return f"aligndiff_session={browser.cookies['aligndiff_session']}"


def run_wrk(
    url: str, credentials: str, script: Path, connections: int, duration: int
) -> dict[str, str]:
    """Drive `url` with wrk running `script`, each request with the header `credentials`:
    latency percentiles, counts and errors."""
    with_p95 = script.with_suffix(".p95.lua")
    with_p95.write_text(script.read_text() + P95_REPORT)
    try:
        done = subprocess.run(
            ["wrk", "-t", "2", "-c", str(connections), "-d", f"{duration}s", "--latency",
             "--timeout", "10s", "-H", credentials, "-s", str(with_p95), url],
            capture_output=True, text=True, check=True, timeout=duration + 60,
        )  # fmt: skip
    finally:
        with_p95.unlink()
    out = done.stdout
    latency = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, flags=re.MULTILINE))
    p95 = re.search(r"p95 latency (\d+) us", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.+)", out)
    return {
        "p50": latency.get("50", "?"),
        "p90": latency.get("90", "?"),
        "p95": f"{int(p95.group(1)) / 1000:.2f}ms" if p95 else "?",
        "p99": latency.get("99", "?"),
        "requests": re.search(r"(\d+) requests in", out).group(1),  # type: ignore[union-attr]
        "requests/s": re.search(r"Requests/sec:\s+(\S+)", out).group(1),  # type: ignore[union-attr]
        "errors": str(int(non_2xx.group(1)) if non_2xx else 0)
        + (f" (socket: {socket_errors.group(1)})" if socket_errors else ""),
    }


# The columns of a run's row, after the server and the worker count.
RESULT_KEYS = ("p50", "p90", "p95", "p99", "requests", "requests/s", "errors")
RESULT_HEADERS = ["p50", "p90", "p95", "p99", "requests", "requests/s", "non-2xx / errors"]


def main() -> None:
    args = parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    rows: list[list[object]] = []
    ratios: list[str] = []
    data_dir = Path(tempfile.mkdtemp(prefix="aligndiff-bench-"))
    with scratch_database() as url:
        key, class_id = seed(url, args.samples)
        floor_env = {"FLOOR_KEY": key, "FLOOR_OWNER_ID": str(owner_of(url))}
        blob_ids = sample_ids(url, class_id, seed_blobs(data_dir, class_id, args.blobs))
        script = Path(tempfile.mkstemp(suffix=".lua")[1])
        wrk_script(class_id, args.samples, script)
        for workers in args.api_workers:
            rates: dict[str, list[float]] = {"API": [], "floor": []}
            for round_ in range(args.rounds):
                # Alternating, the floor first every other round: drift hits both alike.
                order = ["API", "floor"] if round_ % 2 == 0 else ["floor", "API"]
                for server in order:
                    app = FLOOR_APP if server == "floor" else "service.app:create_app"
                    with api_server(url, workers, app=app, data_dir=data_dir, env=floor_env) as api:
                        run_wrk(api, bearer(key), script, args.connections, 3)  # warm-up
                        result = run_wrk(api, bearer(key), script, args.connections, args.duration)
                    rates[server].append(float(result["requests/s"]))
                    rows.append([server, workers, *(result[k] for k in RESULT_KEYS)])
                    print(rows[-1], flush=True)
            ratio = sum(rates["API"]) / sum(rates["floor"])
            ratios.append(f"{workers} worker(s): {ratio:.2f}")
        # The other hot reads and blob fetches, on the API with the most workers asked for.
        admin_key, class_ids = seed_classes(url, args.classes)
        folder = Path(tempfile.mkdtemp(prefix="aligndiff-bench-wrk-"))
        scripts = hot_read_scripts([class_id, *class_ids], folder)
        scripts["GET /v1/samples/{id}/image"] = folder / "blobs.lua"
        blob_script(blob_ids, scripts["GET /v1/samples/{id}/image"])
        other_rows = []
        workers = max(args.api_workers)
        with api_server(url, workers, data_dir=data_dir) as api:
            # The dashboard's page polls with its session cookie, and the ETag it holds.
            cookie = dashboard_cookie(api, admin_key)
            etag = httpx.get(api + DASHBOARD_POLL, headers={"Cookie": cookie}).headers["etag"]
            scripts[REVALIDATED_POLL] = folder / "poll.lua"
            revalidating_script(DASHBOARD_POLL, etag, scripts[REVALIDATED_POLL])
            for name, other in scripts.items():
                credentials = f"Cookie: {cookie}" if name.startswith("GET /admin") else bearer(key)
                run_wrk(api, credentials, other, args.connections, 3)
                result = run_wrk(api, credentials, other, args.connections, args.duration)
                other_rows.append([name, workers, *(result[k] for k in RESULT_KEYS)])
                print(other_rows[-1], flush=True)
        shutil.rmtree(folder)
        script.unlink()
    shutil.rmtree(data_dir, ignore_errors=True)
    table = markdown_table(["server", "uvicorn workers", *RESULT_HEADERS], rows)
    other_table = markdown_table(["request", "uvicorn workers", *RESULT_HEADERS], other_rows)
    summary = "API requests/s as a ratio of the floor's (sum over the rounds): " + ", ".join(ratios)
    print(table, other_table, summary, sep="\n\n")
    record_results(
        f"API: GET /v1/classes/{{id}}/samples, {args.samples:,} samples on PostgreSQL",
        command_line(),
        table,
        notes=(
            f"{summary} (target >= 0.6).\n\n"
            f"wrk on the same 2-core machine as the API and PostgreSQL (loopback), "
            f"{args.connections} connections, {args.duration} s per run after a 3 s warm-up, "
            "pages of 50 at random cursors, a quarter filtered by accepted and min_clip_score. "
            "`floor`: `bench/api_floor.py`, the same SQL, database, JSON and wrk script. "
            "Targets: p99 <= 50 ms and >= 1,200 requests/s with 2 workers, zero errors.\n\n"
            f"The other hot reads (the seeded owner's {args.classes + 1} classes with their "
            "jobs, 50 a page; `GET /admin/api/jobs`, the dashboard's poll, with a dashboard "
            "session's cookie as the page sends it: 100 jobs with the queue, workers and "
            "backlogs, asked without and with the ETag the page holds, 304 while nothing "
            "changed) and blob fetches (`GET "
            f"/v1/samples/{{id}}/image`, 512² PNGs of ~{_png_size()} on local storage, "
            f"{args.blobs} samples), same connections and duration:\n\n" + other_table
        ),
        path=args.results,
    )


def _png_size() -> str:
    photo = Image.open(next(SHOTS.glob("*.jpg"))).convert("RGB").resize((512, 512))
    return f"{len(png_bytes(photo)) // 1024} KiB"


if __name__ == "__main__":
    main()
