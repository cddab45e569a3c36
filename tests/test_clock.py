"""One clock: leases, heartbeats, sweep cutoffs and grace periods are the database's time,
never the clock of the process that writes or reads them. A sweeper whose clock runs 2
minutes or 2 hours ahead or behind takes over no live worker's job and deletes no young
blob, and still takes a dead worker's job over at once; a worker whose clock runs off writes
its heartbeat and its lease in the database's time. In process on SQLite and PostgreSQL (the
process's clock skewed), and across processes on PostgreSQL (`aligndiff sweep` under
Debian's faketime)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select

from service.contexts import jobs, sweeper
from service.db import database_now, db_now, session_scope
from service.models import Job, WorkerHeartbeat
from service.queue import RecordingQueue
from service.settings import Settings
from service.storage import LocalStorage, shot_key
from service.web_sessions import SESSION_COOKIE
from tests.api_support import Api, add_class, csrf_token_of, sign_in
from tests.fault_support import require_tool
from tests.worker_support import load_worker_healthcheck
from worker.celery_app import make_celery
from worker.heartbeat import Heartbeat

pytest_plugins = ["tests.api_support"]

SKEWS = {
    "2 minutes ahead": timedelta(minutes=2),
    "2 minutes behind": -timedelta(minutes=2),
    "2 hours ahead": timedelta(hours=2),
    "2 hours behind": -timedelta(hours=2),
}
LOST_AFTER, LEASE, GRACE = 60, 60, 3600


def skew_process_clock(monkeypatch: pytest.MonkeyPatch, skew: timedelta) -> None:
    """Make this process's clock run `skew` off: `utcnow`, the one way the service's and the
    workers' code reads the time, wherever a module imported it."""
    from service import models

    real = models.utcnow

    def skewed() -> datetime:
        return real() + skew

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("service", "worker") and getattr(module, "utcnow", None) is real:
            monkeypatch.setattr(module, "utcnow", skewed)


@dataclass(frozen=True)
class Fleet:
    """A live worker's job, a dead worker's, a blob just written whose row is not (an upload
    in flight) and an orphan written 2 hours ago."""

    live_job: uuid.UUID
    dead_job: uuid.UUID
    young_blob: str
    old_orphan: str


def a_fleet(api: Api) -> Fleet:
    # The workers' beats and leases as they write them: in the database's time. The live
    # worker beat just now and its lease runs another minute; the dead one has been silent
    # for 2 minutes, and its lease would run another hour.
    sessions = api.app.state.session_factory
    fleet: dict[str, uuid.UUID] = {}
    for name, silent, lease in (("live", 0, LEASE), ("dead", 2 * LOST_AFTER, 3600)):
        _, job_id = add_class(api, owner_id=api.alice_id, status="queued")
        with session_scope(sessions) as session:
            claim = jobs.claim(
                session, job_id, worker=f"{name}:1", lease_seconds=lease, max_attempts=3
            )
            assert claim == 1
            session.execute(
                insert(WorkerHeartbeat).values(
                    name=f"{name}:1", hostname="elsewhere", pid=1, started_at=db_now(-3600),
                    last_seen_at=db_now(-silent), current_job_id=job_id,
                )
            )  # fmt: skip
        fleet[name] = job_id
    young, old = (shot_key(uuid.uuid4(), 0, "image.png") for _ in range(2))
    for key in (young, old):
        api.storage.put(key, b"blob", content_type="image/png")
    assert isinstance(api.storage, LocalStorage)
    two_hours_ago = time.time() - 2 * 3600
    os.utime(api.storage.root / old, (two_hours_ago, two_hours_ago))
    return Fleet(fleet["live"], fleet["dead"], young, old)


def assert_only_the_dead_worker_s_job_was_taken_over(api: Api, fleet: Fleet) -> None:
    with session_scope(api.app.state.session_factory) as session:
        live = session.get(Job, fleet.live_job)
        dead = session.get(Job, fleet.dead_job)
        assert live is not None and dead is not None
        assert (live.status, live.attempts, live.claim, live.worker) == ("running", 1, 1, "live:1")
        assert (dead.status, dead.attempts, dead.claim) == ("running", 2, 2)
        assert dead.worker != "dead:1"
        beating = set(session.scalars(select(WorkerHeartbeat.name)))
    assert beating == {"live:1"}


def sweep_settings(api: Api) -> Settings:
    return api.settings.model_copy(
        update={
            "worker_lost_after_seconds": LOST_AFTER,
            "job_lease_seconds": LEASE,
            "orphan_grace_seconds": GRACE,
        }
    )


@pytest.mark.parametrize("skew", SKEWS.values(), ids=SKEWS.keys())
def test_a_sweeper_whose_clock_runs_off_judges_ages_by_the_database_s_clock(
    api: Api, monkeypatch: pytest.MonkeyPatch, skew: timedelta
) -> None:
    # given: a live worker's job, a dead worker's, a young blob and an old orphan
    fleet = a_fleet(api)
    queue = RecordingQueue()

    # when: a sweeper whose clock runs off sweeps
    skew_process_clock(monkeypatch, skew)
    report = sweeper.sweep(
        sessions=lambda: session_scope(api.app.state.session_factory),
        storage=api.storage,
        queue=queue,
        settings=sweep_settings(api),
        worker="skewed:1",
    )

    # then: the dead worker's job is taken over (and resumed) at once, the live one's is not
    assert queue.sent == [("aligndiff.synthesis.resume", (str(fleet.dead_job),))]
    assert_only_the_dead_worker_s_job_was_taken_over(api, fleet)
    # and: the orphan 2 hours old is deleted, the blob written a moment ago is not
    assert report.orphaned_blobs == [fleet.old_orphan]
    assert api.blobs() == [fleet.young_blob]


@pytest.mark.parametrize("skew", SKEWS.values(), ids=SKEWS.keys())
def test_a_worker_whose_clock_runs_off_beats_and_leases_in_the_database_s_time(
    api: Api, monkeypatch: pytest.MonkeyPatch, skew: timedelta
) -> None:
    # given: a worker whose clock runs off
    settings = api.settings.model_copy(
        update={"broker_url": "memory://", "job_lease_seconds": LEASE}
    )
    context = make_celery(settings).context
    _, job_id = add_class(api, owner_id=api.alice_id, status="queued")
    skew_process_clock(monkeypatch, skew)

    # when: it beats, claims a job and reports progress
    Heartbeat(context).beat()
    claim = context.claim_job(job_id)
    assert claim is not None
    with context.session() as session:
        assert jobs.report_progress(
            session, job_id, stage="sampling", progress=0.5, lease_seconds=LEASE, claim=claim
        )

    # then: its beat, and its job's lease, are the database's now (and a lease past it)
    with context.session() as session:
        now = database_now(session)
        beat = session.scalars(select(WorkerHeartbeat)).one()
        job = session.get(Job, job_id)
        assert job is not None and job.lease_expires_at is not None
    off = abs(skew) / 2  # far more than the test takes, far less than the skew
    assert abs(beat.last_seen_at - now) < off
    assert beat.started_at <= beat.last_seen_at
    assert abs(job.lease_expires_at - (now + timedelta(seconds=LEASE))) < off
    assert job.started_at is not None and abs(job.started_at - now) < off
    context.engine.dispose()


@pytest.mark.parametrize("skew", SKEWS.values(), ids=SKEWS.keys())
def test_the_dashboard_and_the_health_check_judge_heartbeats_by_the_database_s_clock(
    api: Api, monkeypatch: pytest.MonkeyPatch, skew: timedelta
) -> None:
    # given: a worker that beat just now and one silent for 10 minutes, in the database's time,
    # on this machine's name
    hostname = socket.gethostname()
    with session_scope(api.app.state.session_factory) as session:
        for name, silent in (("live:1", 0), ("dead:1", 600)):
            session.execute(
                insert(WorkerHeartbeat).values(
                    name=name, hostname=hostname if name == "live:1" else "gone", pid=1,
                    started_at=db_now(-3600), last_seen_at=db_now(-silent),
                )
            )  # fmt: skip

    # when: the API's host, and the container that runs the health check, have clocks that
    # run off
    skew_process_clock(monkeypatch, skew)
    overview = api.admin.get("/admin/api/jobs").json()
    healthcheck = load_worker_healthcheck()

    # then: the dashboard shows the live worker online, and only it; the check passes
    assert [worker["name"] for worker in overview["workers"]] == ["live:1"]
    assert healthcheck.check(api.settings, hostname) is None


@pytest.mark.parametrize("skew", SKEWS.values(), ids=SKEWS.keys())
def test_a_sign_out_on_one_api_host_ends_the_sessions_another_host_issued(
    api: Api, monkeypatch: pytest.MonkeyPatch, skew: timedelta
) -> None:
    # given: a dashboard session issued by an API host whose clock runs off, and a copy of
    # its cookie
    with monkeypatch.context() as host:
        skew_process_clock(host, skew)
        browser = sign_in(api, api.keys["admin"])
    copied = TestClient(api.app, cookies={SESSION_COOKIE: browser.cookies[SESSION_COOKIE]})
    assert copied.get("/admin/api/jobs").status_code == 200

    # when: it signs out through a host whose clock is right
    token = csrf_token_of(browser.get("/admin").text)
    assert browser.post("/admin/sign-out", data={"csrf_token": token}).status_code == 200

    # then: the copy is refused; and a sign-in again through the skewed host works at once
    assert copied.get("/admin/api/jobs").status_code == 401
    with monkeypatch.context() as host:
        skew_process_clock(host, skew)
        again = sign_in(api, api.keys["admin"])
    assert again.get("/admin/api/jobs").status_code == 200


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("offset", ["+2m", "-2m", "+2h", "-2h"])
def test_aligndiff_sweep_under_a_skewed_clock_takes_over_only_the_dead_worker_s_job(
    api: Api, tmp_path: Path, offset: str
) -> None:
    # given: a live worker's job, a dead worker's, a young blob and an old orphan on
    # PostgreSQL, and a machine whose clock runs off (the whole process, libc's clock)
    faketime = require_tool("faketime", package="faketime")
    fleet = a_fleet(api)
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALIGNDIFF_")}
    assert isinstance(api.storage, LocalStorage)
    env |= {
        "ALIGNDIFF_DATA_DIR": str(tmp_path),
        "ALIGNDIFF_DATABASE_URL": api.settings.resolved_database_url,
        "ALIGNDIFF_STORAGE_URL": f"file://{api.storage.root}",
        "ALIGNDIFF_BROKER_URL": "memory://",
        "ALIGNDIFF_WORKER_LOST_AFTER_SECONDS": str(LOST_AFTER),
        "ALIGNDIFF_JOB_LEASE_SECONDS": str(LEASE),
        "ALIGNDIFF_ORPHAN_GRACE_SECONDS": str(GRACE),
    }
    clock = "import datetime; print(datetime.datetime.now(datetime.UTC).isoformat())"
    command = [faketime, "-m", "-f", offset, sys.executable, "-c", clock]
    seen = datetime.fromisoformat(subprocess.check_output(command, env=env, text=True).strip())
    with session_scope(api.app.state.session_factory) as session:
        assert abs(seen - database_now(session)) > timedelta(minutes=1)  # the skew is real

    # when: `aligndiff sweep` runs there
    aligndiff = Path(sys.executable).parent / "aligndiff"
    done = subprocess.run(
        [faketime, "-m", "-f", offset, str(aligndiff), "sweep"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    # then: it took over the dead worker's job only, and deleted the old orphan only
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resume job {fleet.dead_job} (lost its worker)" in done.stdout
    assert f"resume job {fleet.live_job}" not in done.stdout
    assert_only_the_dead_worker_s_job_was_taken_over(api, fleet)
    assert api.blobs() == [fleet.young_blob]
    assert "jobs: 1 resumed" in done.stdout and "orphaned blobs: 1" in done.stdout
