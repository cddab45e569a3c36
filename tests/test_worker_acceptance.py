"""Acceptance and `bg_lambda` through the synthesis job: the class's thresholds stored once,
each sample's verdict and reason, consensus only for samples that pass, and `auto` tuning."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from aligndiff.synth import Models, SynthConfig
from service.settings import Settings
from tests.conftest import SHOTS_DIR
from tests.worker_support import create_class, in_process_app, run_job

DOG = SHOTS_DIR / "dog"


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def every_prediction_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers whose pass 1 takes any non-empty FSS prediction as agreeing with the coarse
    mask: every sample would be a consensus sample but for the semantic check."""
    from_settings = SynthConfig.from_settings.__func__  # type: ignore[attr-defined]

    def agreeing(cls: type[SynthConfig], settings: Settings) -> SynthConfig:
        config = from_settings(cls, settings)
        return replace(config, annotation=replace(config.annotation, consensus_iou=0.0))

    monkeypatch.setattr(SynthConfig, "from_settings", classmethod(agreeing))


@pytest.mark.usefixtures("every_prediction_agrees")
def test_only_samples_that_pass_the_semantic_check_become_consensus_samples(
    tmp_path: Path, tiny_models: Models
) -> None:
    # given the same class on a server with the check off and one whose prototype threshold
    # no sample can reach
    open_app, open_queue, open_service = in_process_app(
        tmp_path / "open", tiny_models, sample_chunk_size=2, accept_semantic_check=False
    )
    app, queue, service = in_process_app(
        tmp_path / "strict", tiny_models, sample_chunk_size=2, accept_min_prototype_similarity=1.0
    )
    open_class = create_class(open_service, DOG, name="dog", num_samples=4)
    created = create_class(service, DOG, name="dog", num_samples=4)

    # when each is synthesized
    run_job(open_app, open_queue, open_class.job_id)
    run_job(app, queue, created.job_id)

    # then without the check samples reach consensus; with it none does, none is accepted,
    # each is rejected with its reason (inversion samples too), and the thresholds used are
    # stored with the class
    assert "consensus" in {s.mask_source for s in open_service.samples(open_class.class_id)}
    assert service.job(created.job_id).status == "succeeded"
    samples = service.samples(created.class_id)
    assert len(samples) == 4
    for sample in samples:
        assert sample.accepted is False
        assert sample.rejected_by in {"ood", "similarity"}
        assert sample.prototype_similarity is not None and sample.prototype_similarity < 1.0
        assert sample.mask_source == "pseudo_label"
    assert {s.rejected_by for s in samples if s.prompt_kind == "inversion"} == {"similarity"}
    segclass = service.segclass(created.class_id)
    assert segclass.num_accepted == 0
    assert segclass.acceptance is not None
    assert segclass.acceptance["prototype_similarity"] == 1.0
    assert segclass.acceptance["source"]["prototype_similarity"] == "settings"


def test_by_default_the_tiny_models_record_the_signals_and_accept_by_the_ood_filter(
    tmp_path: Path, tiny_models: Models
) -> None:
    app, queue, service = in_process_app(tmp_path, tiny_models, sample_chunk_size=2)
    created = create_class(service, DOG, name="dog", num_samples=4, bg_lambda=0.3)

    run_job(app, queue, created.job_id)

    samples = service.samples(created.class_id)
    for sample in samples:
        assert sample.prototype_similarity is not None
        assert sample.rejected_by == (None if sample.accepted else "ood")
    assert {s.accepted for s in samples if s.prompt_kind == "inversion"} == {True}
    segclass = service.segclass(created.class_id)
    assert segclass.acceptance is not None
    assert set(segclass.acceptance["source"].values()) == {"disabled"}
    assert (segclass.bg_lambda, segclass.bg_lambda_auto, segclass.tuning) == (0.3, False, None)


def test_an_auto_class_stores_its_trials_and_the_value_it_kept(
    tmp_path: Path, tiny_models: Models
) -> None:
    # given a class that asks for bg_lambda "auto" on a two-value grid
    app, queue, service = in_process_app(
        tmp_path, tiny_models, sample_chunk_size=2, bg_lambda_grid=(0.2, 1.0)
    )
    created = create_class(service, DOG, name="dog", num_samples=2, bg_lambda="auto")
    before = service.segclass(created.class_id)
    assert (before.bg_lambda, before.bg_lambda_auto) == (None, True)

    # when it is synthesized
    run_job(app, queue, created.job_id)

    # then it kept the best-scoring trial's value, with every trial stored
    assert service.job(created.job_id).status == "succeeded"
    segclass = service.segclass(created.class_id)
    assert segclass.tuning is not None
    assert [trial["bg_lambda"] for trial in segclass.tuning] == [0.2, 1.0]
    best = max(segclass.tuning, key=lambda trial: trial["score"])
    assert segclass.bg_lambda == best["bg_lambda"]
    assert segclass.embedding_key is not None
