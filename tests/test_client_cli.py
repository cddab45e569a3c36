"""`aligndiff-client` run in-process against a mock service: help (readable at 80 columns),
the connection settings, one-line errors, `train`, `report`, and the commands over classes,
samples, jobs, trainings and keys."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from aligndiff_client.cli import main
from tests.client_support import (
    BASE_URL,
    class_body,
    job_body,
    key_body,
    problem,
    report_body,
    sample_body,
    training_body,
)

COMMANDS = [
    "create", "show", "status", "list", "models", "samples", "delete", "embedding", "download",
    "report",
    "train", "predict", "weights", "jobs", "cancel", "retry",
    "keys", "keys create", "keys list", "keys revoke",
]  # fmt: skip


@pytest.mark.parametrize("command", ["", *COMMANDS], ids=["main", *COMMANDS])
def test_every_command_answers_help_that_reads_at_80_columns(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: an 80-column terminal
    monkeypatch.setenv("COLUMNS", "80")

    # when
    with pytest.raises(SystemExit) as exited:
        main([*command.split(), "--help"])

    # then: the help fits, and no word or option name is cut at a hyphen
    help_text = capsys.readouterr().out
    assert exited.value.code == 0
    shown = "show" if command == "status" else command  # `status` is another name of `show`
    assert help_text.startswith(f"usage: aligndiff-client {shown}".rstrip())
    for line in help_text.splitlines():
        assert len(line) <= 80, line
        assert not line.rstrip().endswith("-"), line


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


def test_train_uploads_a_validation_set_in_the_order_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # given: two validation images and their label maps on disk
    files = {name: tmp_path / name for name in ("b.jpg", "a.jpg", "b.png", "a.png")}
    for name, path in files.items():
        path.write_bytes(name.encode())
    class_id = str(uuid.uuid4())
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json=training_body(class_ids=[class_id]))

    # when
    status = main(
        ["--url", BASE_URL, "--api-key", "k", "train", class_id,
         "--val-images", str(files["b.jpg"]), str(files["a.jpg"]),
         "--val-masks", str(files["b.png"]), str(files["a.png"])],
        transport=httpx.MockTransport(handler),
    )  # fmt: skip

    # then: one multipart POST, the request as JSON and each file in its field, in order
    assert status == 0
    body = seen[0].read().decode("latin-1")
    assert seen[0].headers["content-type"].startswith("multipart/form-data")
    assert json.loads(body.split('name="request"\r\n\r\n', 1)[1].split("\r\n", 1)[0]) == {
        "class_ids": [class_id],
        "architecture": "deeplabv3",
        "use_synthetic": True,
        "copy_paste": True,
        "compare_baseline": False,
    }
    parts = [part for part in body.split("\r\n\r\n")[1:] if not part.startswith("{")]
    assert [part.split("\r\n", 1)[0] for part in parts] == ["b.jpg", "a.jpg", "b.png", "a.png"]
    assert body.index('name="val_images"') < body.index('name="val_masks"')


def test_train_needs_label_maps_with_validation_images(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["train", str(uuid.uuid4()), "--val-images", "a.jpg", "--api-key", "k"])

    assert exited.value.code == 2
    assert "--val-images needs --val-masks" in capsys.readouterr().err


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


# --- classes, samples, jobs, trainings and keys --------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def run(
    capsys: pytest.CaptureFixture[str], handler: Handler, *args: str
) -> tuple[int, str, str, list[httpx.Request]]:
    """Run the command line against `handler`; its status, stdout, stderr and requests."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return handler(request)

    status = main(
        [*args, "--url", BASE_URL, "--api-key", "k", "-q"], transport=httpx.MockTransport(record)
    )
    output = capsys.readouterr()
    return status, output.out, output.err, seen


def page(*items: dict[str, object], next_cursor: str | None = None) -> httpx.Response:
    return httpx.Response(200, json={"items": list(items), "next_cursor": next_cursor})


def test_list_prints_the_classes_as_a_table_or_json_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # given: two classes over two pages
    dog = class_body(name="dog", status="succeeded", progress=1.0, num_samples_requested=4,
                     num_samples_done=4)  # fmt: skip
    cat = class_body(name="cat", status="running", stage="sampling", progress=0.25,
                     num_samples_requested=8)  # fmt: skip
    pages = {None: page(dog, next_cursor="2"), "2": page(cat)}

    def handler(request: httpx.Request) -> httpx.Response:
        return pages[request.url.params.get("cursor")]

    # when
    status, out, err, seen = run(capsys, handler, "list")

    # then: a header and a row per class, every page read
    assert status == 0 and err == ""
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "NAME", "STATUS", "STAGE", "PROGRESS", "SAMPLES",
                              "ACCEPTED", "CREATED"]  # fmt: skip
    assert rows[0].split()[:6] == [dog["id"], "dog", "succeeded", "-", "100%", "4/4"]
    assert rows[1].split()[:6] == [cat["id"], "cat", "running", "sampling", "25%", "0/8"]
    assert [r.url.path for r in seen] == ["/v1/classes"] * 2

    # and: --json prints one class a line
    status, out, _, _ = run(capsys, handler, "list", "--json")
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["dog", "cat"]


def test_models_lists_the_deployment_s_models_default_first(
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = {
        "items": [
            {"name": "sd15", "family": "sd", "default_resolution": 512},
            {"name": "xl", "family": "sdxl", "default_resolution": 1024},
        ]
    }

    status, out, err, seen = run(capsys, lambda request: httpx.Response(200, json=served), "models")

    assert status == 0 and err == ""
    assert [line.split() for line in out.splitlines()] == [
        ["NAME", "FAMILY", "RESOLUTION"], ["sd15", "sd", "512"], ["xl", "sdxl", "1024"],
    ]  # fmt: skip
    assert [r.url.path for r in seen] == ["/v1/models"]


def test_samples_filters_by_verdict_and_clip_score(capsys: pytest.CaptureFixture[str]) -> None:
    class_id = str(uuid.uuid4())
    kept = sample_body(0, class_id=class_id, clip_score=31.25, shot_similarity=0.8)

    status, out, _, seen = run(
        capsys,
        lambda _: page(kept),
        "samples", class_id, "--accepted", "--min-clip-score", "20", "--json",
    )  # fmt: skip

    assert status == 0
    assert [json.loads(line)["id"] for line in out.splitlines()] == [kept["id"]]
    (request,) = seen
    assert request.url.path == f"/v1/classes/{class_id}/samples"
    assert request.url.params["accepted"] == "true"
    assert request.url.params["min_clip_score"] == "20.0"


def test_samples_table_shows_scores_and_why_a_sample_was_rejected(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rejected = sample_body(
        3, accepted=False, rejected_by="ood", clip_score=12.5, prompt="a dog on the moon"
    )

    status, out, _, seen = run(capsys, lambda _: page(rejected), "samples", "c1", "--rejected")

    assert status == 0 and seen[0].url.params["accepted"] == "false"
    header, row = out.splitlines()
    assert header.split()[:6] == ["INDEX", "ID", "KIND", "CLIP", "SHOT_SIM", "ACCEPTED"]
    assert row.split()[:4] == ["3", rejected["id"], rejected["prompt_kind"], "12.5"]
    assert "no (ood)" in row and row.endswith("a dog on the moon")


def test_delete_deletes_the_class(capsys: pytest.CaptureFixture[str]) -> None:
    class_id = str(uuid.uuid4())

    status, out, err, seen = run(capsys, lambda _: httpx.Response(204), "delete", class_id)

    assert status == 0 and out == "" and err == f"deleted class {class_id}\n"
    assert [(r.method, r.url.path) for r in seen] == [("DELETE", f"/v1/classes/{class_id}")]


@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_cancel_and_retry_post_to_the_job_and_print_it(
    action: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job = job_body(status="cancelled" if action == "cancel" else "queued")

    status, out, _, seen = run(capsys, lambda _: httpx.Response(202, json=job), action, job["id"])

    assert status == 0 and json.loads(out)["status"] == job["status"]
    assert [(r.method, r.url.path) for r in seen] == [("POST", f"/v1/jobs/{job['id']}/{action}")]


def test_cancelling_a_finished_job_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    answer = problem(409, "the job has already succeeded")

    status, out, err, _ = run(capsys, lambda _: answer, "cancel", str(uuid.uuid4()))

    assert status == 1 and out == ""
    assert err == "aligndiff-client: error: 409 Conflict: the job has already succeeded\n"


def test_jobs_lists_by_status_and_kind(capsys: pytest.CaptureFixture[str]) -> None:
    job = job_body(kind="training", status="failed", attempts=3)

    status, out, _, seen = run(
        capsys, lambda _: page(job), "jobs", "--status", "failed", "--kind", "training"
    )

    assert status == 0
    assert seen[0].url.params["status"] == "failed" and seen[0].url.params["kind"] == "training"
    header, row = out.splitlines()
    assert header.split()[:6] == ["ID", "KIND", "STATUS", "STAGE", "PROGRESS", "ATTEMPTS"]
    assert row.split()[:6] == [job["id"], "training", "failed", "sampling", "50%", "3"]


def test_predict_saves_the_mask_and_prints_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, out_path = tmp_path / "photo.png", tmp_path / "photo-mask.png"
    image.write_bytes(b"\x89PNG photo")
    training_id = str(uuid.uuid4())

    status, out, _, seen = run(
        capsys,
        lambda _: httpx.Response(200, content=b"\x89PNG mask"),
        "predict", training_id, str(image), "--out", str(out_path),
    )  # fmt: skip

    assert status == 0 and out == f"{out_path}\n"
    assert out_path.read_bytes() == b"\x89PNG mask"
    assert seen[0].url.path == f"/v1/trainings/{training_id}/predict"
    assert b"\x89PNG photo" in seen[0].content


def test_predict_needs_out(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["predict", str(uuid.uuid4()), "photo.png", "--api-key", "k"])

    assert exited.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_a_missing_image_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.jpg"

    status, out, err, seen = run(
        capsys, lambda _: httpx.Response(200), "predict", "t1", str(missing), "--out", "m.png"
    )

    assert status == 1 and out == "" and seen == []
    assert err.startswith("aligndiff-client: error: ") and str(missing) in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "route", "default"),
    [
        ("weights", "/v1/trainings/{id}/weights", "{id}-weights.zip"),
        ("embedding", "/v1/classes/{id}/embedding", "{id}.safetensors"),
    ],
)
def test_weights_and_embedding_download_to_out_or_a_default_name(
    command: str,
    route: str,
    default: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    resource_id = str(uuid.uuid4())
    handler: Handler = lambda _: httpx.Response(200, content=b"blob bytes")  # noqa: E731

    status, out, _, seen = run(capsys, handler, command, resource_id, "--out", "a/b.bin")
    assert status == 0 and out == "a/b.bin\n"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"blob bytes"
    assert seen[0].url.path == route.format(id=resource_id)

    status, out, _, _ = run(capsys, handler, command, resource_id)
    assert status == 0 and out == default.format(id=resource_id) + "\n"
    assert (tmp_path / out.strip()).read_bytes() == b"blob bytes"


def test_keys_create_prints_the_key_alone_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    owner_id = str(uuid.uuid4())
    created = {**key_body(name="ci", owner_id=owner_id), "key": "adk_new"}

    status, out, err, seen = run(
        capsys,
        lambda _: httpx.Response(201, json=created),
        "keys", "create", "--name", "ci", "--admin", "--owner-id", owner_id,
    )  # fmt: skip

    assert status == 0 and out == "adk_new\n"
    assert "shown this once" in err and created["id"] in err
    (request,) = seen
    assert (request.method, request.url.path) == ("POST", "/v1/keys")
    assert json.loads(request.content) == {"name": "ci", "admin": True, "owner_id": owner_id}

    # and: with --json, the whole answer
    status, out, _, _ = run(
        capsys, lambda _: httpx.Response(201, json=created), "keys", "create", "--name", "ci",
        "--json",
    )  # fmt: skip
    assert json.loads(out)["key"] == "adk_new" and json.loads(out)["id"] == created["id"]


def test_keys_list_and_revoke(capsys: pytest.CaptureFixture[str]) -> None:
    revoked = key_body(name="old", revoked_at="2025-01-03T00:00:00Z")

    status, out, _, _ = run(capsys, lambda _: page(key_body(admin=True), revoked), "keys", "list")
    assert status == 0
    header, admin_row, revoked_row = out.splitlines()
    assert header.split() == ["ID", "NAME", "ADMIN", "OWNER", "CREATED", "LAST_USED", "REVOKED"]
    assert admin_row.split()[1:3] == ["ci", "yes"] and admin_row.endswith("-")
    assert revoked_row.endswith("2025-01-03 00:00:00")

    status, out, err, seen = run(
        capsys, lambda _: httpx.Response(204), "keys", "revoke", revoked["id"]
    )
    assert status == 0 and out == "" and err == f"revoked key {revoked['id']}\n"
    assert [(r.method, r.url.path) for r in seen] == [("DELETE", f"/v1/keys/{revoked['id']}")]
