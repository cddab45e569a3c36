"""The README's five-minute tour, run as written against a live `aligndiff serve`: every
```bash and ```python block of its "A five-minute tour" section, in order, in one shell
session's environment, from the repository root. So the README cannot drift from the product.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve_support import Server, running_server

REPO = Path(__file__).resolve().parents[1]
SECTION = "## A five-minute tour"
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.MULTILINE | re.DOTALL)
STEP_TIMEOUT = 300


def tour_blocks() -> list[tuple[str, str]]:
    """The tour's runnable blocks, (language, code), in the README's order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    if SECTION not in text:
        pytest.fail(f"README.md has no {SECTION!r} section")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [(match[1], match[2]) for match in BLOCK.finditer(section)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("serve"), model_cache) as server:
        yield server


def test_the_readme_tour_runs_as_written(server: Server, tmp_path: Path, model_cache: Path):
    # given the tour's blocks, and a shell environment that outlives each block (as a reader's
    # terminal does): each bash block runs after the ones before it, and exports carry on
    blocks = tour_blocks()
    assert [language for language, _ in blocks].count("bash") >= 3
    assert "python" in [language for language, _ in blocks]
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNDIFF_")}
    env |= {"HOME": str(home), "ALIGNDIFF_MODEL_CACHE_DIR": str(model_cache)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    state = tmp_path / "env.sh"
    state.write_text("")

    # when each block runs in turn, the first (the reader's own URL and key) pointed at this
    # server
    for number, (language, code) in enumerate(blocks):
        if number == 0:
            assert "export URL=" in code and "KEY=" in code, "the tour starts by setting URL/KEY"
            code = f"export URL={server.url} KEY={server.admin_key}\n"
        if language == "bash":
            script = f"set -euo pipefail\n. {state}\n{code}\nexport -p > {state}\n"
            command = ["bash", "-c", script]
        else:
            exported = _exports(state)
            command = [sys.executable, "-c", code]
            env = {**env, **exported}
        done = subprocess.run(
            command,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT,
        )
        # then every block succeeds
        assert done.returncode == 0, f"tour block {number} failed:\n{code}\n{done.stderr[-3000:]}"

    # and the files it promised are there and sound
    tour = REPO / "tour"
    created = json.loads((tour / "dog.json").read_text())
    assert created["status"] == "queued" and created["name"] == "dog"
    with zipfile.ZipFile(tour / "dog-coco.zip") as archive:
        assert "annotations/instances.json" in archive.namelist()
    training = json.loads((tour / "training.json").read_text())
    assert training["status"] == "succeeded"
    assert training["metrics"]["eval_set"] == "training_shots"


@pytest.fixture(autouse=True)
def no_tour_left_behind() -> Iterator[None]:
    """The tour writes into the repository's git-ignored `tour/`; a test leaves none there."""
    tour = REPO / "tour"
    existed = tour.exists()
    yield
    if not existed:
        shutil.rmtree(tour, ignore_errors=True)


def _exports(state: Path) -> dict[str, str]:
    """The variables the bash blocks so far exported, as a python block's environment."""
    done = subprocess.run(
        ["bash", "-c", f". {state}; env -0"], capture_output=True, text=True, check=True
    )
    pairs = (item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)
    return {key: value for key, value in pairs if key in {"URL", "KEY", "CLASS"}}
