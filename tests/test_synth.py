"""The whole pipeline: `aligndiff synth` as a user runs it (its progress on a terminal, none
when piped or --quiet), and `synthesize` on real shots."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aligndiff.inversion import load_embedding
from aligndiff.shots import load_shots
from aligndiff.synth import Models, SynthConfig, synthesize
from tests.conftest import SHOTS_DIR

SAMPLE_FIELDS = {
    "id", "class_id", "index", "prompt", "prompt_kind", "seed", "width", "height", "clip_score",
    "shot_similarity", "prototype_similarity", "consensus_iou", "ood_iou", "accepted",
    "rejected_by", "mask_source", "created_at",
}  # fmt: skip


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ALIGNDIFF_MODEL_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "aligndiff.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_synth_on_the_dog_shots_writes_n_scored_pairs(tmp_path: Path, model_cache: Path) -> None:
    # when: a user runs the command on the dog shots
    out = tmp_path / "dog"
    done = run_cli(
        "synth", str(SHOTS_DIR / "dog"), "--class-name", "dog", "--out", str(out),
        "--num-samples", "3", "--seed", "4", cache=model_cache,
    )  # fmt: skip

    # then: three image/mask pairs, their records, the embedding and a summary
    assert done.returncode == 0, done.stderr
    images = sorted((out / "images").glob("*.png"))
    masks = sorted((out / "masks").glob("*.png"))
    assert (
        [p.name for p in images]
        == [p.name for p in masks]
        == ["00000.png", "00001.png", "00002.png"]
    )
    for image_path, mask_path in zip(images, masks, strict=True):
        mask = np.asarray(Image.open(mask_path))
        assert Image.open(image_path).size == Image.open(mask_path).size
        assert set(np.unique(mask)) <= {0, 255}
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    for record in records:
        assert set(record) == SAMPLE_FIELDS
        assert record["mask_source"] in {"consensus", "pseudo_label"}
        assert record["clip_score"] >= 0 and -1 <= record["shot_similarity"] <= 1
        assert 0 <= record["ood_iou"] <= 1 and 0 <= record["consensus_iou"] <= 1
    assert [r["prompt_kind"] for r in records] == ["inversion", "text", "inversion"]
    token, vector = load_embedding(out / "embedding.safetensors")
    assert token == "<dog>" and vector.shape == (64,)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_samples"] == 3
    assert summary["num_accepted"] == sum(r["accepted"] for r in records)
    assert set(summary["stage_seconds"]) == {"inversion", "sampling", "annotation", "scoring"}


def test_synth_refuses_bad_input_with_a_message_and_writes_nothing(
    tmp_path: Path, model_cache: Path
) -> None:
    shots = tmp_path / "shots"
    shutil.copytree(SHOTS_DIR / "dog", shots)
    (shots / "1.png").unlink()  # the mask goes missing
    out = tmp_path / "out"

    missing_mask = run_cli("synth", str(shots), "--class-name", "dog", "--out", str(out),
                           cache=model_cache)  # fmt: skip
    bad_prompt = run_cli("synth", str(SHOTS_DIR / "dog"), "--class-name", "dog", "--out",
                         str(out), "--prompt", "a cat", cache=model_cache)  # fmt: skip

    bad_bg_lambda = run_cli("synth", str(SHOTS_DIR / "dog"), "--class-name", "dog", "--out",
                            str(out), "--bg-lambda", "2.5", cache=model_cache)  # fmt: skip
    no_name = run_cli("synth", str(SHOTS_DIR / "dog"), "--class-name", " ", "--out", str(out),
                      cache=model_cache)  # fmt: skip

    assert missing_mask.returncode == 2 and "mask" in missing_mask.stderr
    assert bad_prompt.returncode == 2 and "does not mention the class name" in bad_prompt.stderr
    assert bad_bg_lambda.returncode == 2 and "bg_lambda must be in [0, 2]" in bad_bg_lambda.stderr
    assert no_name.returncode == 2 and "--class-name must name the class" in no_name.stderr
    assert not out.exists() or not any(out.iterdir())


def test_synth_with_bg_lambda_auto_records_its_trials(tmp_path: Path, model_cache: Path) -> None:
    out = tmp_path / "dog"
    done = run_cli(
        "synth", str(SHOTS_DIR / "dog"), "--class-name", "dog", "--out", str(out),
        "--num-samples", "2", "--bg-lambda", "auto", cache=model_cache,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [trial["bg_lambda"] for trial in summary["tuning"]] == [0.2, 0.6, 1.0]
    assert summary["bg_lambda"] == max(summary["tuning"], key=lambda t: t["score"])["bg_lambda"]
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert summary["rejected_by"] == {
        reason: sum(r["rejected_by"] == reason for r in records)
        for reason in {r["rejected_by"] for r in records if r["rejected_by"]}
    }


def test_synth_will_not_write_into_a_folder_with_content(tmp_path: Path, model_cache: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")

    done = run_cli("synth", str(SHOTS_DIR / "dog"), "--class-name", "dog", "--out", str(out),
                   cache=model_cache)  # fmt: skip

    assert done.returncode == 2 and "not an empty folder" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


QUICK = ("--num-samples", "2", "--inversion-steps", "2", "--sampling-steps", "2")
STAGES = ("inversion", "sampling", "scoring", "annotation")
BAR = re.compile(r"\d+%\||it/s\]|s/it\]|\r")


def run_cli_on_a_terminal(*args: str, cache: Path) -> tuple[int, str, str]:
    """The command with its stderr on a terminal (80 columns) and its stdout piped: its exit
    status, what the terminal showed and stdout."""
    env = {**os.environ, "ALIGNDIFF_MODEL_CACHE_DIR": str(cache)}
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "aligndiff.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert process.stdout is not None
    stdout = process.stdout.read().decode()
    return process.wait(timeout=300), shown.decode(errors="replace"), stdout


def test_synth_shows_a_bar_per_stage_on_a_terminal(tmp_path: Path, model_cache: Path) -> None:
    out = tmp_path / "dog"

    status, shown, _ = run_cli_on_a_terminal(
        "synth", str(SHOTS_DIR / "dog"), "--class-name", "dog", "--out", str(out), *QUICK,
        cache=model_cache,
    )  # fmt: skip

    assert status == 0, shown
    assert "loading the models" in shown
    for stage in STAGES:
        assert re.search(rf"{stage}\s*: 100%\|", shown), (stage, shown)
    assert "wrote 2 samples" in shown


def test_synth_piped_shows_no_bar(tmp_path: Path, model_cache: Path) -> None:
    out = tmp_path / "dog"

    done = run_cli(
        "synth", str(SHOTS_DIR / "dog"), "--class-name", "dog", "--out", str(out), *QUICK,
        cache=model_cache,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert not BAR.search(done.stdout + done.stderr), done.stdout + done.stderr
    assert done.stdout == f"wrote 2 samples to {out}\n"


def test_synth_quiet_prints_nothing_but_errors(tmp_path: Path, model_cache: Path) -> None:
    out = tmp_path / "dog"

    # when: it runs --quiet on a terminal, and --quiet into a folder that is not empty
    status, shown, stdout = run_cli_on_a_terminal(
        "synth", str(SHOTS_DIR / "dog"), "--class-name", "dog", "--out", str(out), *QUICK,
        "--quiet", cache=model_cache,
    )  # fmt: skip
    refused = run_cli(
        "synth", str(SHOTS_DIR / "dog"), "--class-name", "dog", "--out", str(out), "--quiet",
        cache=model_cache,
    )  # fmt: skip

    # then: the run shows nothing at all, and the refusal its error alone
    assert status == 0 and (out / "samples.jsonl").is_file()
    assert (shown, stdout) == ("", "")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("error: --out") and len(refused.stderr.splitlines()) == 1


@pytest.mark.parametrize("name", ["dog", "albatross"])
def test_every_sample_leaves_with_a_final_mask_and_its_scores(tiny_models: Models, name: str):
    shots = load_shots(SHOTS_DIR / name)

    result = synthesize(
        tiny_models,
        shots,
        class_name=name,
        num_samples=4,
        seed=1,
        config=SynthConfig.for_model("tiny"),
    )

    assert [s.index for s in result.samples] == [0, 1, 2, 3]
    for sample in result.samples:
        assert sample.mask.shape == sample.image.shape[:2] and sample.mask.dtype == bool
        assert sample.mask_source in {"consensus", "pseudo_label"}
        assert sample.clip_score is not None and sample.ood_iou is not None
        # only text samples can be filtered out by default
        if sample.prompt_kind == "inversion":
            assert sample.accepted
        else:
            assert sample.accepted == (sample.ood_iou >= 0.5)


def test_the_same_seed_gives_the_same_dataset(tiny_models: Models) -> None:
    shots = load_shots(SHOTS_DIR / "dog")
    config = SynthConfig.for_model("tiny")

    first = synthesize(tiny_models, shots, class_name="dog", num_samples=2, seed=9, config=config)
    second = synthesize(tiny_models, shots, class_name="dog", num_samples=2, seed=9, config=config)

    for a, b in zip(first.samples, second.samples, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.clip_score == b.clip_score
