"""50 concurrent cancels and completions of one job end in one legal terminal state: the API's
cancel (over real HTTP) races the workers' complete, fail and finish-cancelled on PostgreSQL,
and exactly one transition ends the job."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest

from service.contexts import jobs
from service.db import session_scope
from service.models import Job, utcnow
from tests.api_support import Api, ApiFactory, add_class
from tests.fault_support import ServedApi

pytest_plugins = ["tests.api_support"]

CANCELS = 25
WORKERS = 25
ROUNDS = 5
# The longest moment of work before a worker's completion, in the last round (none in the
# first): the workers win the early rounds, the cancels the late ones, and the middle is close.
WORK_SECONDS = 0.8


@dataclass
class Round:
    """What the racers of one job saw."""

    cancel_answers: list[tuple[int, str | None]] = field(default_factory=list)
    wins: Counter[str] = field(default_factory=Counter)
    errors: list[BaseException] = field(default_factory=list)


def race(
    api: Api, served: ServedApi, job_id: uuid.UUID, *, queued: bool, work_seconds: float
) -> Round:
    """Release 25 API cancels and 25 workers on the job at one instant. Each worker claims it
    (when it starts queued), then, after a moment of work (half to all of `work_seconds`),
    completes it (every third fails it instead) and, refused, ends it cancelled as a worker
    that saw a cancel does."""
    outcome = Round()
    barrier = threading.Barrier(CANCELS + WORKERS)
    lock = threading.Lock()
    sessions = api.app.state.session_factory

    def cancel() -> None:
        with served.client(api.keys["alice"]) as client:
            barrier.wait()
            try:
                answer = client.post(f"/v1/jobs/{job_id}/cancel")
            except httpx.HTTPError as error:
                outcome.errors.append(error)
                return
        status = answer.json().get("status") if answer.status_code == 202 else None
        with lock:
            outcome.cancel_answers.append((answer.status_code, status))

    def work(number: int) -> None:
        pause = random.Random(number * 7919 + int(queued)).uniform(0.5, 1.0) * work_seconds
        barrier.wait()
        try:
            won = None
            if queued:
                with session_scope(sessions) as session:
                    jobs.claim(
                        session, job_id, worker=f"w:{number}", lease_seconds=60, max_attempts=3
                    )
            time.sleep(pause)
            with session_scope(sessions) as session:
                if number % 3 == 0:
                    won = "failed" if jobs.fail(session, job_id, "boom") else None
                else:
                    won = "succeeded" if jobs.complete(session, job_id) else None
                if won is None and jobs.finish_cancelled(session, job_id):
                    won = "cancelled"
        except BaseException as error:
            outcome.errors.append(error)
            return
        if won is not None:
            with lock:
                outcome.wins[won] += 1

    threads = [threading.Thread(target=cancel) for _ in range(CANCELS)]
    threads += [threading.Thread(target=work, args=(n,)) for n in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a racer hung"
    return outcome


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_concurrent_cancels_and_completions_end_in_one_legal_terminal_state(
    make_api: ApiFactory,
) -> None:
    api = make_api(rate_limit_per_second=0, job_rate_limit_per_minute=0, quota_concurrent_jobs=0)
    outcomes: Counter[str] = Counter()
    with ServedApi.serving(api.app) as served:
        for number in range(ROUNDS):
            # given: a job running on a worker (or, every other round, still queued)
            queued = number % 2 == 1
            fields = {} if queued else {"attempts": 1, "worker": "w", "started_at": utcnow()}
            _, job_id = add_class(api, owner_id=api.alice_id, status="queued", **fields)
            if not queued:
                with session_scope(api.app.state.session_factory) as session:
                    assert jobs.claim(session, job_id, worker="w", lease_seconds=60, max_attempts=3)

            # when: 25 cancels through the API and 25 workers race on it
            work_seconds = WORK_SECONDS * number / (ROUNDS - 1)
            outcome = race(api, served, job_id, queued=queued, work_seconds=work_seconds)

            # then: nobody crashed, and every cancel was accepted or refused as finished
            assert outcome.errors == []
            statuses = Counter(code for code, _ in outcome.cancel_answers)
            assert set(statuses) <= {202, 409}, statuses
            with api.session() as session:
                job = session.get(Job, job_id)
                assert job is not None
            # and: the job ended in one terminal state, by exactly one transition
            assert job.status in jobs.TERMINAL
            ended_by_api = [s for code, s in outcome.cancel_answers if s == "cancelled"]
            assert sum(outcome.wins.values()) + len(ended_by_api) == 1, (outcome, job.status)
            assert (set(outcome.wins) or {"cancelled"}) == {job.status}
            # and: its row agrees with that state
            assert job.finished_at is not None and job.lease_expires_at is None
            if job.status == "succeeded":
                assert (job.progress, job.stage, job.cancel_requested) == (1.0, None, False)
                # a cancel accepted before the end would have stopped the completion
                assert statuses[202] == 0
            if job.status == "cancelled":
                assert job.cancel_requested and statuses[202] >= 1
            if job.status == "failed":
                assert job.error == "boom"
            # and: the API shows the same
            with served.client(api.keys["alice"]) as client:
                shown = client.get(f"/v1/jobs/{job_id}").json()
            assert shown["status"] == job.status
            outcomes[job.status] += 1
    # the rounds did race: the workers won some, the cancels others
    assert outcomes["cancelled"] and outcomes["succeeded"] + outcomes["failed"], outcomes
