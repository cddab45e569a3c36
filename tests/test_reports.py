"""The report per class (`GET /v1/classes/{id}/report`): its counts are the finished samples'
rows, its histograms count every measured score once in fixed bins, it shows the class's
thresholds and tuning and the caller's trainings on it, and another owner's class is not found."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest

from service.auth import authenticate
from tests.api_support import Api
from tests.report_support import (
    ACCEPTANCE,
    MIXED_SAMPLES,
    TUNED_BG_LAMBDA,
    TUNING,
    add_report_class,
    add_samples,
    add_training,
    held_out_metrics,
    training_shots_metrics,
)

pytest_plugins = ["tests.api_support"]

SIGNALS = ("clip_score", "shot_similarity", "prototype_similarity", "ood_iou", "consensus_iou")


@pytest.fixture
def mixed_class(api: Api) -> uuid.UUID:
    """Alice's auto-tuned class with MIXED_SAMPLES: 10 finished, 2 still being worked on."""
    with api.session() as session:
        class_id = add_report_class(
            session, owner_id=api.alice_id, acceptance=ACCEPTANCE, tuning=TUNING
        )
        add_samples(session, api.storage, class_id, MIXED_SAMPLES)
        session.commit()
    return class_id


def report_of(api: Api, class_id: uuid.UUID, who: str = "alice") -> dict[str, Any]:
    response = getattr(api, who).get(f"/v1/classes/{class_id}/report")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def listed_samples(api: Api, class_id: uuid.UUID) -> list[dict[str, Any]]:
    page = api.alice.get(f"/v1/classes/{class_id}/samples", params={"limit": 200}).json()
    return page["items"]  # type: ignore[no-any-return]


def test_the_counts_are_those_of_the_finished_samples_as_listed(
    api: Api, mixed_class: uuid.UUID
) -> None:
    # when
    counts = report_of(api, mixed_class)["counts"]

    # then: the numbers of the seeded mix, the unfinished samples left out
    assert (counts["samples"], counts["accepted"]) == (10, 6)
    assert counts["by_prompt_kind"] == {
        "inversion": {"samples": 5, "accepted": 4},
        "text": {"samples": 5, "accepted": 2},
    }
    assert counts["by_mask_source"] == {
        "consensus": {"samples": 6, "accepted": 4},
        "pseudo_label": {"samples": 4, "accepted": 2},
        "human": {"samples": 0, "accepted": 0},
    }
    assert counts["rejected_by"] == {"ood": 2, "similarity": 1, "user": 1}
    # and they are what a user counts in the listing
    samples = listed_samples(api, mixed_class)
    assert counts["samples"] == len(samples)
    assert counts["accepted"] == sum(s["accepted"] for s in samples)
    for field, groups in (("prompt_kind", "by_prompt_kind"), ("mask_source", "by_mask_source")):
        listed = Counter(s[field] for s in samples)
        accepted = Counter(s[field] for s in samples if s["accepted"])
        for value, count in counts[groups].items():
            assert count == {"samples": listed[value], "accepted": accepted[value]}, value
    reasons = Counter(s["rejected_by"] for s in samples if s["rejected_by"])
    assert counts["rejected_by"] == {
        reason: reasons[reason] for reason in ("ood", "similarity", "user")
    }


def test_each_measured_score_is_counted_once_in_fixed_bins(
    api: Api, mixed_class: uuid.UUID
) -> None:
    # when
    histograms = report_of(api, mixed_class)["histograms"]

    # then: every finished sample with the signal is in exactly one bin
    samples = listed_samples(api, mixed_class)
    for signal in SIGNALS:
        histogram = histograms[signal]
        measured = [s[signal] for s in samples if s[signal] is not None]
        assert sum(histogram["counts"]) == len(measured), signal
        assert len(histogram["edges"]) == len(histogram["counts"]) + 1, signal
    # and the bins are the same for every class, the range's ends counted in the end bins
    clip, shot, ood = histograms["clip_score"], histograms["shot_similarity"], histograms["ood_iou"]
    assert (clip["edges"][0], clip["edges"][1], clip["edges"][-1]) == (0, 5, 100)
    assert (shot["edges"][0], shot["edges"][-1], len(shot["counts"])) == (-1, 1, 20)
    assert shot["edges"][3] == -0.7
    assert (ood["edges"][0], ood["edges"][-1], len(ood["counts"])) == (0, 1, 10)
    assert clip["counts"][0] == 1 and clip["counts"][-1] == 1  # 0.0 and 100.0
    assert clip["counts"][6] == 2  # 30.0 and 31.5: [30, 35)
    assert shot["counts"][0] == 1 and shot["counts"][-1] == 1  # -1.0 and 1.0
    assert ood["counts"][0] == 1 and ood["counts"][1] == 1  # 0.0 and 0.12


def test_the_report_shows_the_class_s_thresholds_and_its_bg_lambda_trials(
    api: Api, mixed_class: uuid.UUID
) -> None:
    report = report_of(api, mixed_class)

    assert report["class_id"] == str(mixed_class)
    assert report["acceptance"] == ACCEPTANCE
    assert report["bg_lambda"] == TUNED_BG_LAMBDA
    assert report["tuning"] == TUNING
    assert report["trainings"] == []


def test_a_class_without_samples_reports_zeros_and_no_thresholds(api: Api) -> None:
    with api.session() as session:
        class_id = add_report_class(session, owner_id=api.alice_id, status="running")
        session.commit()

    report = report_of(api, class_id)

    assert report["counts"]["samples"] == 0
    assert report["counts"]["rejected_by"] == {"ood": 0, "similarity": 0, "user": 0}
    assert all(set(h["counts"]) == {0} for h in report["histograms"].values())
    assert (report["acceptance"], report["tuning"]) == (None, None)


def test_another_owner_s_class_is_not_found_as_a_missing_one_is(
    api: Api, mixed_class: uuid.UUID
) -> None:
    # when: bob asks for alice's class, and for a class that does not exist
    other = api.bob.get(f"/v1/classes/{mixed_class}/report")
    missing = api.bob.get(f"/v1/classes/{uuid.uuid4()}/report")

    # then: the same 404; an admin sees the report
    assert other.status_code == missing.status_code == 404
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json() == missing.json()
    assert report_of(api, mixed_class, "admin")["counts"]["samples"] == 10


def test_the_owner_s_succeeded_trainings_on_the_class_are_listed_newest_first(
    api: Api, mixed_class: uuid.UUID
) -> None:
    # given: alice's trainings on the class (held out with a baseline, an older one on the
    # training shots), one still running, one on another class only, and an admin's
    with api.session() as session:
        other_class = add_report_class(session, owner_id=api.alice_id, name="owl")

        def train(class_ids: list[uuid.UUID], metrics: Any, **fields: Any) -> uuid.UUID:
            return add_training(session, class_ids=class_ids, metrics=metrics, **fields)

        held_out = train(
            [other_class, mixed_class],
            held_out_metrics(["owl", "pidan"], miou=0.71, baseline_miou=0.58),
            owner_id=api.alice_id,
            age=timedelta(minutes=1),
        )
        optimistic = train(
            [mixed_class],
            training_shots_metrics(["pidan"], miou=0.93),
            owner_id=api.alice_id,
            age=timedelta(hours=1),
        )
        train([mixed_class], None, owner_id=api.alice_id, status="running")
        train([other_class], training_shots_metrics(["owl"], miou=0.5), owner_id=api.alice_id)
        admins = train(
            [mixed_class],
            held_out_metrics(["pidan"], miou=0.66, baseline_miou=None),
            owner_id=authenticate(session, f"Bearer {api.keys['admin']}").owner_id,
        )
        session.commit()

    # when
    trainings = report_of(api, mixed_class)["trainings"]

    # then
    assert [t["id"] for t in trainings] == [str(held_out), str(optimistic)]
    first, second = trainings
    assert (first["eval_set"], first["miou"], first["baseline_miou"]) == (
        "held_out_shots",
        0.71,
        0.58,
    )
    assert (second["eval_set"], second["miou"], second["baseline_miou"]) == (
        "training_shots",
        0.93,
        None,
    )
    assert first["created_at"] > second["created_at"]
    everyone = [t["id"] for t in report_of(api, mixed_class, "admin")["trainings"]]
    assert everyone == [str(admins), str(held_out), str(optimistic)]
