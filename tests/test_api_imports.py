"""The API runs without torch, diffusers, transformers or accelerate (its Docker image has
none): a fresh interpreter serves a user's requests with none of them loaded, and still does
where importing them fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

EXPECTED = {
    "healthz": 200,
    "openapi": 200,
    "create class": 202,
    "get class": "succeeded",
    "samples": 2,
    "sample mask": 200,
    "coco export": 200,
    "coco json": True,
    "jobs": 1,
    "get job": "succeeded",
    "create training": 202,
    "get training": "queued",
    "predict before it succeeded": 409,
}


def run_api(data_dir: Path, *flags: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNDIFF_")}
    done = subprocess.run(
        [sys.executable, "-m", "tests.torchless_api", str(data_dir), *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_api_serves_every_resource_without_loading_torch(tmp_path: Path) -> None:
    # when: a fresh interpreter builds the app and a user goes through every resource
    report = run_api(tmp_path)

    # then: every request was answered as usual, and no heavy ML package was ever loaded
    assert {name: report["seen"][name] for name in EXPECTED} == EXPECTED
    assert report["heavy"] == []


def test_the_api_serves_every_resource_where_torch_cannot_be_imported(tmp_path: Path) -> None:
    # given: an interpreter in which importing torch, diffusers, transformers or accelerate
    # fails, as where they are not installed
    # when: a user goes through every resource, and every module of `service` is imported
    report = run_api(tmp_path, "--block")

    # then: everything answered as usual, and nothing even tried to import them
    assert {name: report["seen"][name] for name in EXPECTED} == EXPECTED
    assert report["service modules"] > 30
    assert (report["heavy"], report["refused"]) == ([], [])
