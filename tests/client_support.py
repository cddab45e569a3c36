"""Helpers of the SDK's unit tests: resources as the service answers them, and a `Client` whose
network is an `httpx.MockTransport` and whose waits are recorded instead of slept."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from aligndiff_client import Client

BASE_URL = "http://aligndiff.test"
API_KEY = "adk_test"
NOW = "2025-01-02T03:04:05Z"

Handler = Callable[[httpx.Request], httpx.Response]


def class_body(**overrides: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "name": "dog",
        "status": "queued",
        "stage": None,
        "progress": 0.0,
        "num_shots": 1,
        "num_samples_requested": 2,
        "num_samples_done": 0,
        "num_accepted": 0,
        "clip_score_mean": None,
        "job_id": str(uuid.uuid4()),
        "error": None,
        "created_at": NOW,
        "updated_at": NOW,
        **overrides,
    }


def sample_body(index: int, **overrides: Any) -> dict[str, Any]:
    sample_id = str(uuid.uuid4())
    return {
        "id": sample_id,
        "class_id": str(uuid.uuid4()),
        "index": index,
        "prompt": "a photo of a dog",
        "prompt_kind": "text",
        "seed": index,
        "width": 128,
        "height": 128,
        "clip_score": 21.5,
        "shot_similarity": 0.8,
        "consensus_iou": 0.9,
        "ood_iou": 0.7,
        "accepted": True,
        "mask_source": "consensus",
        "image_url": f"{BASE_URL}/v1/samples/{sample_id}/image",
        "mask_url": f"{BASE_URL}/v1/samples/{sample_id}/mask",
        "created_at": NOW,
        **overrides,
    }


def job_body(**overrides: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "kind": "synthesis",
        "status": "running",
        "stage": "sampling",
        "progress": 0.5,
        "attempts": 1,
        "error": None,
        "owner_id": str(uuid.uuid4()),
        "target_id": str(uuid.uuid4()),
        "created_at": NOW,
        "started_at": NOW,
        "finished_at": None,
        **overrides,
    }


def training_body(**overrides: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "status": "queued",
        "progress": 0.0,
        "class_ids": [str(uuid.uuid4())],
        "architecture": "deeplabv3",
        "metrics": None,
        "job_id": str(uuid.uuid4()),
        "error": None,
        "created_at": NOW,
        "updated_at": NOW,
        **overrides,
    }


def key_body(**overrides: Any) -> dict[str, Any]:
    """A key as `GET /v1/keys` lists it (`POST /v1/keys` adds its secret, `key`)."""
    return {
        "id": str(uuid.uuid4()),
        "name": "ci",
        "admin": False,
        "owner_id": str(uuid.uuid4()),
        "created_at": NOW,
        "last_used_at": None,
        "revoked_at": None,
        **overrides,
    }


def report_body(**overrides: Any) -> dict[str, Any]:
    """A class's report: 10 finished samples, 6 accepted, tuned, with two trainings on it."""
    return {
        "class_id": str(uuid.uuid4()),
        "counts": {
            "samples": 10,
            "accepted": 6,
            "by_prompt_kind": {
                "inversion": {"samples": 5, "accepted": 4},
                "text": {"samples": 5, "accepted": 2},
            },
            "by_mask_source": {
                "consensus": {"samples": 6, "accepted": 4},
                "pseudo_label": {"samples": 4, "accepted": 2},
                "human": {"samples": 0, "accepted": 0},
            },
            "rejected_by": {"ood": 2, "similarity": 1, "user": 1},
        },
        "histograms": {
            "clip_score": {"edges": [0, 25, 50, 75, 100], "counts": [3, 6, 0, 1]},
            "ood_iou": {"edges": [0, 0.5, 1], "counts": [0, 0]},
        },
        "acceptance": {
            "prototype_similarity": 0.42,
            "shot_similarity": 0.61,
            "source": {"prototype_similarity": "calibrated", "shot_similarity": "settings"},
            "calibration": {"prototype_similarity": [0.7], "shot_similarity": []},
        },
        "bg_lambda": 0.6,
        "tuning": [
            {"bg_lambda": 0.3, "score": 0.61, "prototype_similarity": 0.58,
             "shot_similarity": 0.64, "steps": 40, "loss": 0.21},
            {"bg_lambda": 0.6, "score": 0.7, "prototype_similarity": 0.69,
             "shot_similarity": 0.71, "steps": 40, "loss": 0.19},
        ],
        "trainings": [
            {"id": str(uuid.uuid4()), "eval_set": "held_out_shots", "miou": 0.71,
             "baseline_miou": 0.58, "created_at": NOW},
            {"id": str(uuid.uuid4()), "eval_set": "training_shots", "miou": 0.93,
             "baseline_miou": None, "created_at": NOW},
        ],
        **overrides,
    }  # fmt: skip


def problem(status: int, detail: str, **extra: Any) -> httpx.Response:
    titles = {401: "Unauthorized", 404: "Not Found", 409: "Conflict", 422: "Unprocessable Content"}
    body = {"type": "about:blank", "title": titles.get(status, "Error"), "status": status}
    return httpx.Response(
        status,
        json={**body, "detail": detail, **extra},
        headers={"Content-Type": "application/problem+json"},
    )


@dataclass
class Recorder:
    """The requests a client sent and the waits it asked for, in order."""

    requests: list[httpx.Request] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)


@contextmanager
def mock_client(handler: Handler, *, max_retries: int = 5) -> Iterator[tuple[Client, Recorder]]:
    """A client whose every request goes to `handler` (recorded first)."""
    recorder = Recorder()

    def record(request: httpx.Request) -> httpx.Response:
        request.read()
        recorder.requests.append(request)
        return handler(request)

    with Client(
        BASE_URL,
        API_KEY,
        max_retries=max_retries,
        transport=httpx.MockTransport(record),
        sleep=recorder.sleeps.append,
    ) as client:
        yield client, recorder


def answers(*responses: httpx.Response | Exception) -> Handler:
    """A handler giving these answers in turn (raising the exceptions), then failing."""
    queue = list(responses)

    def handle(request: httpx.Request) -> httpx.Response:
        assert queue, f"unexpected request {request.method} {request.url}"
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handle
