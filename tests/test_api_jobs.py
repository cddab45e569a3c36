"""`/v1/jobs`: listing with filters, reading, and cancel and retry along the legal edges of
the job state machine."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import event

from service.models import Job, utcnow
from tests.api_support import Api, add_class, get_job_row, set_job

pytest_plugins = ["tests.api_support"]

SYNTHESIS_TASK = "aligndiff.synthesis.start"


def add_training_job(api: Api, owner_id: uuid.UUID, status: str = "queued") -> uuid.UUID:
    with api.session() as session:
        job = Job(kind="training", owner_id=owner_id, target_id=uuid.uuid4(), status=status)
        session.add(job)
        session.commit()
        return job.id


def job_ids(page: dict[str, Any]) -> list[str]:
    return [job["id"] for job in page["items"]]


def test_an_owner_lists_its_own_jobs_newest_first_and_an_admin_everyones(api: Api) -> None:
    older = add_class(api, owner_id=api.alice_id, age=timedelta(minutes=5))[1]
    newer = add_class(api, owner_id=api.alice_id)[1]
    bobs = add_class(api, owner_id=api.bob_id)[1]

    alices = api.alice.get("/v1/jobs").json()
    everyone = api.admin.get("/v1/jobs").json()

    assert job_ids(alices) == [str(newer), str(older)]
    assert set(job_ids(everyone)) == {str(older), str(newer), str(bobs)}


def test_jobs_are_filtered_by_status_and_kind(api: Api) -> None:
    running = add_class(api, owner_id=api.alice_id, status="running")[1]
    add_class(api, owner_id=api.alice_id, status="failed")
    training = add_training_job(api, api.alice_id, status="running")

    by_status = api.alice.get("/v1/jobs", params={"status": "running"}).json()
    by_both = api.alice.get("/v1/jobs", params={"status": "running", "kind": "training"}).json()

    assert set(job_ids(by_status)) == {str(running), str(training)}
    assert job_ids(by_both) == [str(training)]


@pytest.mark.parametrize("params", [{"status": "paused"}, {"kind": "painting"}, {"limit": 0}])
def test_unknown_job_filters_are_refused(api: Api, params: dict[str, Any]) -> None:
    assert api.alice.get("/v1/jobs", params=params).status_code == 422


def test_a_cursor_walk_lists_every_job_once(api: Api) -> None:
    expected = [
        str(add_class(api, owner_id=api.alice_id, age=timedelta(seconds=s))[1]) for s in range(5)
    ]

    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = api.alice.get("/v1/jobs", params=params).json()
        seen += job_ids(page)
        if (cursor := page["next_cursor"]) is None:
            break

    assert seen == expected


def test_a_job_reads_as_its_row(api: Api) -> None:
    class_id, job_id = add_class(api, owner_id=api.alice_id)
    set_job(api, job_id, status="failed", error="out of memory", attempts=2, finished_at=utcnow())

    job = api.alice.get(f"/v1/jobs/{job_id}").json()

    assert job["kind"] == "synthesis" and job["target_id"] == str(class_id)
    assert (job["status"], job["error"], job["attempts"]) == ("failed", "out of memory", 2)
    assert job["owner_id"] == str(api.alice_id) and job["finished_at"] is not None


def test_cancelling_a_queued_job_ends_it_at_once(api: Api) -> None:
    _, job_id = add_class(api, owner_id=api.alice_id)

    response = api.alice.post(f"/v1/jobs/{job_id}/cancel")

    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None


def test_cancelling_a_running_job_asks_its_worker_to_stop(api: Api) -> None:
    _, job_id = add_class(api, owner_id=api.alice_id, status="running")

    response = api.alice.post(f"/v1/jobs/{job_id}/cancel")

    assert response.status_code == 202
    assert response.json()["status"] == "running"
    assert get_job_row(api, job_id).cancel_requested


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_a_finished_job_cannot_be_cancelled(api: Api, status: str) -> None:
    _, job_id = add_class(api, owner_id=api.alice_id, status=status)

    response = api.alice.post(f"/v1/jobs/{job_id}/cancel")

    assert response.status_code == 409
    assert get_job_row(api, job_id).status == status


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_retrying_a_failed_or_cancelled_job_queues_and_starts_it(api: Api, status: str) -> None:
    _, job_id = add_class(api, owner_id=api.alice_id, status=status, error="boom")

    response = api.alice.post(f"/v1/jobs/{job_id}/retry")

    assert response.status_code == 202
    assert (response.json()["status"], response.json()["error"]) == ("queued", None)
    assert api.queue.sent == [(SYNTHESIS_TASK, (str(job_id),))]


@pytest.mark.parametrize("status", ["queued", "running", "succeeded"])
def test_only_failed_or_cancelled_jobs_can_be_retried(api: Api, status: str) -> None:
    _, job_id = add_class(api, owner_id=api.alice_id, status=status)

    response = api.alice.post(f"/v1/jobs/{job_id}/retry")

    assert response.status_code == 409
    assert api.queue.sent == []


def test_the_job_of_a_deleted_class_cannot_be_retried(api: Api) -> None:
    class_id, job_id = add_class(api, owner_id=api.alice_id, status="failed")
    api.alice.delete(f"/v1/classes/{class_id}")

    response = api.alice.post(f"/v1/jobs/{job_id}/retry")

    assert response.status_code == 409
    assert api.queue.sent == []


def test_a_retry_with_an_idempotency_key_is_done_once(api: Api) -> None:
    _, job_id = add_class(api, owner_id=api.alice_id, status="failed")
    headers = {"Idempotency-Key": "retry-1"}

    first = api.alice.post(f"/v1/jobs/{job_id}/retry", headers=headers)
    again = api.alice.post(f"/v1/jobs/{job_id}/retry", headers=headers)

    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert len(api.queue.sent) == 1


def test_an_idempotency_key_reused_on_another_job_is_refused(api: Api) -> None:
    first_job = add_class(api, owner_id=api.alice_id)[1]
    other_job = add_class(api, owner_id=api.alice_id)[1]
    headers = {"Idempotency-Key": "cancel-1"}

    assert api.alice.post(f"/v1/jobs/{first_job}/cancel", headers=headers).status_code == 202
    reused = api.alice.post(f"/v1/jobs/{other_job}/cancel", headers=headers)

    assert reused.status_code == 422
    assert get_job_row(api, other_job).status == "queued"


def test_reads_open_no_transaction_and_writes_run_in_one(api: Api) -> None:
    # given: the database's own view, after each statement the API sends, of whether the
    # connection is inside a transaction
    in_transaction: list[tuple[str, bool]] = []

    def after(connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        driver = connection.connection.driver_connection
        status = getattr(driver, "info", None)
        inside = (
            status.transaction_status != TransactionStatus.IDLE
            if status is not None
            else driver.in_transaction  # sqlite3
        )
        in_transaction.append((statement.split()[0], inside))

    _, job_id = add_class(api, owner_id=api.alice_id, status="queued")
    event.listen(api.app.state.engine, "after_cursor_execute", after)
    try:
        # when: a job is read and listed, then cancelled
        assert api.alice.get(f"/v1/jobs/{job_id}").status_code == 200
        assert api.alice.get("/v1/jobs").status_code == 200
        reads, in_transaction[:] = list(in_transaction), []
        assert api.alice.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        writes = list(in_transaction)
    finally:
        event.remove(api.app.state.engine, "after_cursor_execute", after)

    # then: each read was a statement of its own (no BEGIN before it, no ROLLBACK after: one
    # round trip), and the cancel's update ran inside a transaction
    assert reads and not any(inside for _, inside in reads)
    assert ("UPDATE", True) in writes and ("UPDATE", False) not in writes
