"""`aligndiff-client` run in-process against a mock service: help, the connection settings,
one-line errors, and `train` (whose routes the service does not serve yet)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from aligndiff_client.cli import main
from tests.client_support import BASE_URL, problem, report_body, training_body

COMMANDS = ["create", "status", "download", "train", "report"]


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=["main", *COMMANDS])
def test_every_command_answers_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])

    assert exited.value.code == 0
    assert "usage: aligndiff-client" in capsys.readouterr().out


def test_without_an_api_key_the_command_line_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ALIGNDIFF_API_KEY", raising=False)

    with pytest.raises(SystemExit) as exited:
        main(["status", str(uuid.uuid4())])

    assert exited.value.code == 2
    assert "no API key" in capsys.readouterr().err


def test_create_needs_masks_with_images(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["create", "dog", "--images", "a.jpg", "--api-key", "k"])

    assert exited.value.code == 2
    assert "--images needs --masks" in capsys.readouterr().err


def test_the_url_and_key_come_from_the_environment_and_an_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # given: the service's URL and key in the environment, and a class that does not exist
    monkeypatch.setenv("ALIGNDIFF_URL", BASE_URL)
    monkeypatch.setenv("ALIGNDIFF_API_KEY", "adk_env")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return problem(404, "class not found")

    # when
    status = main(
        ["status", "6d1f3c1e-0000-4000-8000-000000000000"], transport=httpx.MockTransport(handler)
    )

    # then
    assert status == 1
    assert str(seen[0].url) == f"{BASE_URL}/v1/classes/6d1f3c1e-0000-4000-8000-000000000000"
    assert seen[0].headers["Authorization"] == "Bearer adk_env"
    output = capsys.readouterr()
    assert output.out == ""
    assert output.err == "aligndiff-client: error: 404 Not Found: class not found\n"


def test_train_posts_the_training_and_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    class_ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    queued = training_body(class_ids=class_ids, architecture="segformer")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json=queued)

    status = main(
        [
            "--url",
            BASE_URL,
            "train",
            *class_ids,
            "--architecture",
            "segformer",
            "--steps",
            "300",
            "--compare-baseline",
            "--no-copy-paste",
            "--api-key",
            "adk_flag",
        ],
        transport=httpx.MockTransport(handler),
    )

    assert status == 0
    assert seen[0].headers["Authorization"] == "Bearer adk_flag"
    assert json.loads(seen[0].content) == {
        "class_ids": class_ids,
        "architecture": "segformer",
        "steps": 300,
        "use_synthetic": True,
        "copy_paste": False,
        "compare_baseline": True,
    }
    assert json.loads(capsys.readouterr().out)["id"] == queued["id"]


@pytest.mark.parametrize(
    ("flags", "quiet"),
    [([], False), (["-q"], True), (["--quiet"], True), (["download-q"], True)],
    ids=["default", "-q before the command", "--quiet before", "-q after the command"],
)
def test_quiet_silences_the_download_s_progress_wherever_it_is_given(
    flags: list[str], quiet: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # given: a service answering the dataset with a small archive
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"ETag": '"v1"'}, content=b"PK" + bytes(4000))

    dest = tmp_path / "dog.zip"
    command = ["download", "-q"] if flags == ["download-q"] else [*flags, "download"]

    # when
    status = main(
        [*command, str(uuid.uuid4()), "--out", str(dest), "--api-key", "k"],
        transport=httpx.MockTransport(handler),
    )

    # then: the archive's path is printed; the progress bar (stderr) only without -q
    output = capsys.readouterr()
    assert status == 0 and output.out == f"{dest}\n"
    assert (output.err == "") is quiet, output.err


HELD_OUT = {
    "per_class_iou": {"dog": 0.6},
    "miou": 0.7,
    "eval_set": "held_out_shots",
    "per_class_iou_std": {"dog": 0.05},
    "folds": [
        {"fold": k, "held_out": {"dog": k}, "per_class_iou": {"dog": 0.6}, "miou": 0.7,
         "baseline": {"per_class_iou": {"dog": 0.5}, "miou": 0.6}}
        for k in range(2)
    ],
    "baseline": {"per_class_iou": {"dog": 0.5}, "miou": 0.6, "per_class_iou_std": {"dog": 0.1}},
    "comparison": {"miou_difference": 0.1, "per_class_difference": {"dog": 0.1}, "spread": 0.02,
                   "exceeds_spread": True},
}  # fmt: skip
TRAINING_SHOTS = {"per_class_iou": {"dog": 0.9}, "miou": 0.9, "eval_set": "training_shots"}


@pytest.mark.parametrize(
    ("metrics", "lines"),
    [
        (
            HELD_OUT,
            [
                "eval set: held_out_shots: held-out shots (leave-one-shot-out folds; the IoUs "
                "are fold means), 2 folds",
                "  dog: IoU 0.600 ± 0.050",
                "baseline (shots only): mIoU 0.600",
                "comparison (with - without synthetic): mIoU +0.100, exceeds the spread over "
                "folds (0.020)",
            ],
        ),
        (
            TRAINING_SHOTS,
            [
                "eval set: training_shots: the training shots (optimistic: measured on the "
                "training shots)",
                "  dog: IoU 0.900",
            ],
        ),
    ],
    ids=["held_out_shots", "training_shots"],
)
def test_train_wait_prints_what_the_metrics_were_measured_on_and_the_comparison(
    metrics: dict[str, object], lines: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # given: a service that queues the training and answers it succeeded with these metrics
    queued = training_body()
    done = {**queued, "status": "succeeded", "progress": 1.0, "metrics": metrics}
    answers = iter([httpx.Response(202, json=queued), httpx.Response(200, json=done)])

    # when
    status = main(
        ["train", queued["class_ids"][0], "--wait", "-q", "--url", BASE_URL, "--api-key", "k"],
        transport=httpx.MockTransport(lambda request: next(answers)),
    )

    # then: the training as JSON on stdout, the summary of its metrics on stderr
    output = capsys.readouterr()
    assert status == 0
    assert json.loads(output.out)["metrics"]["eval_set"] == metrics["eval_set"]
    summary = output.err.splitlines()
    assert all(line in summary for line in lines), output.err


def test_report_prints_a_summary_of_counts_rejections_tuning_and_trainings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # given: a service answering a class's report
    body = report_body()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=body)

    # when
    status = main(
        ["report", body["class_id"], "--url", BASE_URL, "--api-key", "k"],
        transport=httpx.MockTransport(handler),
    )

    # then: a summary for people on stdout
    output = capsys.readouterr()
    assert status == 0 and output.err == ""
    assert seen[0].url.path == f"/v1/classes/{body['class_id']}/report"
    summary = output.out.splitlines()
    held_out, optimistic = (t["id"] for t in body["trainings"])
    for line in [
        f"class {body['class_id']}: 10 finished samples, 6/10 accepted (60%)",
        "  by prompt kind: inversion 4/5 accepted (80%), text 2/5 accepted (40%)",
        "  by mask source: consensus 4/6 accepted (67%), pseudo_label 2/4 accepted (50%)",
        "rejected: 4 (ood 2, similarity 1, user 1)",
        "acceptance thresholds: prototype_similarity >= 0.420 (calibrated), "
        "shot_similarity >= 0.610 (settings)",
        "  clip_score  0..100   ▄█·▂  (10)",
        "  ood_iou     0..1     ··  (0)",
        "bg_lambda: 0.60, chosen of 2 trials (*):",
        "  * 0.60       0.700  0.690      0.710  40     0.1900",
        f"  {held_out}  held_out_shots  mIoU 0.710, baseline 0.580 (+0.130)",
        f"  {optimistic}  training_shots  mIoU 0.930, no baseline (optimistic: measured on "
        "the training shots)",
    ]:
        assert line in summary, f"{line!r} not in\n{output.out}"


def test_report_json_prints_the_report_as_the_service_sent_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = report_body(tuning=None, acceptance=None)

    status = main(
        ["report", body["class_id"], "--json", "--url", BASE_URL, "--api-key", "k"],
        transport=httpx.MockTransport(lambda request: httpx.Response(200, json=body)),
    )

    printed = json.loads(capsys.readouterr().out)
    assert status == 0
    assert printed["counts"] == body["counts"]
    assert printed["trainings"][0]["miou"] == 0.71 and printed["tuning"] is None


def test_report_of_an_unknown_class_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        ["report", str(uuid.uuid4()), "--url", BASE_URL, "--api-key", "k"],
        transport=httpx.MockTransport(lambda request: problem(404, "class not found")),
    )

    assert status == 1
    assert capsys.readouterr().err == "aligndiff-client: error: 404 Not Found: class not found\n"
