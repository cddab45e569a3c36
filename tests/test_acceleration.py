"""The GPU fast path on the CPU: each switch leaves the samples what they were (within the
switch's tolerance), buckets pad and un-pad, "auto" batch sizes fit memory, and a worker serving
many classes keeps a constant vocabulary and draws each class as a fresh process would."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligndiff.acceleration import (
    Acceleration,
    BucketedUNet,
    auto_batch_size,
    bucket_for,
    pad_batch,
    resolve_batch_size,
    sampling_sizes,
)
from aligndiff.attention import (
    AttentionCapture,
    CapturingCrossAttnProcessor,
    finest_positions,
    install_shared_capture,
)
from aligndiff.inversion import InversionConfig, initial_embedding, invert, save_embedding
from aligndiff.models.diffusion import DiffusionModel, load_diffusion_model
from aligndiff.prompts import SampleSpec, prompt_bank
from aligndiff.sampling import GeneratedSample, Sampler, SamplingConfig
from aligndiff.settings import Settings as CoreSettings
from aligndiff.shots import load_shots
from aligndiff.synth import Models, SynthConfig, load_models
from tests.conftest import SHOTS_DIR
from tests.worker_support import (
    InProcessQueue,
    Service,
    create_class,
    give_embedding,
    local_settings,
)
from worker import synthesis
from worker.celery_app import make_celery

EMBEDDING = torch.linspace(-1, 1, 64)
STEPS = 3
# bfloat16 keeps 8 bits of mantissa: over 3 DDIM steps and a VAE decode the tiny model's pixels
# move by about 1 level on average (10-15 at worst, measured) and the coarse masks by < 0.01.
BF16_MEAN_PIXEL_LEVELS, BF16_MAX_PIXEL_LEVELS, BF16_MASK = 3.0, 32, 0.03
# channels_last and SDPA only reorder float32 sums: at most one level of rounding in a pixel.
FLOAT_PIXEL_LEVELS, FLOAT_MASK = 1, 1e-5


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def specs() -> list[SampleSpec]:
    return prompt_bank("dog", num_samples=4, class_seed=5)


def tiny(model_cache: Path, dtype: str = "float32", **switches: object) -> DiffusionModel:
    """A fresh tiny SD with `switches` applied (each test mutates its own model)."""
    return load_diffusion_model(
        "tiny", cache_dir=model_cache, dtype=dtype, acceleration=Acceleration(**switches)
    )


def draw(model: DiffusionModel, specs: Sequence[SampleSpec]) -> list[GeneratedSample]:
    config = SamplingConfig(num_steps=STEPS, batch_size=4)
    sampler = Sampler(model, class_name="dog", token_embedding=EMBEDDING, config=config)
    return list(sampler.generate(specs))


def pixel_levels(a: list[GeneratedSample], b: list[GeneratedSample]) -> tuple[float, int]:
    """(mean, max) absolute difference of the images, in uint8 levels."""
    diffs = [np.abs(x.image.astype(int) - y.image.astype(int)) for x, y in zip(a, b, strict=True)]
    return float(np.mean(diffs)), int(np.max(diffs))


def mask_difference(a: list[GeneratedSample], b: list[GeneratedSample]) -> float:
    return max(
        float(np.abs(x.coarse_mask - y.coarse_mask).max()) for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def reference(model_cache: Path, specs: list[SampleSpec]) -> list[GeneratedSample]:
    """The default path: float32, stock layout, explicit capture."""
    return draw(load_diffusion_model("tiny", cache_dir=model_cache), specs)


# Each switch against the default path


def test_bfloat16_samples_are_close_to_float32(model_cache, specs, reference) -> None:
    samples = draw(tiny(model_cache, "bfloat16"), specs)

    mean, worst = pixel_levels(samples, reference)
    assert 0 < mean <= BF16_MEAN_PIXEL_LEVELS and worst <= BF16_MAX_PIXEL_LEVELS
    assert mask_difference(samples, reference) <= BF16_MASK


@pytest.mark.parametrize(
    "switches",
    [{"channels_last": True}, {"capture_attention": "sdpa"}, {"vae_slicing": True}],
    ids=["channels_last", "sdpa", "vae_slicing"],
)
def test_float_switches_give_the_default_outputs(model_cache, specs, reference, switches) -> None:
    samples = draw(tiny(model_cache, **switches), specs)

    assert pixel_levels(samples, reference)[1] <= FLOAT_PIXEL_LEVELS
    assert mask_difference(samples, reference) <= FLOAT_MASK


def test_channels_last_keeps_the_unet_activations_channels_last(model_cache) -> None:
    model = tiny(model_cache, channels_last=True)
    seen = []
    handle = model.unet.conv_in.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.inference_mode():
            model.denoise(torch.randn(2, 4, 16, 16), torch.tensor(10), torch.randn(2, 77, 64))
    finally:
        handle.remove()

    assert seen[0].is_contiguous(memory_format=torch.channels_last)


def test_sdpa_capture_equals_the_explicit_softmax(tiny_sd: DiffusionModel) -> None:
    # given: one cross-attention layer, a [uncond; cond] batch and weights on the cond half
    attn = tiny_sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn((4, 256, 32), generator=generator)
    text = torch.randn((4, 77, 64), generator=generator)
    weights = torch.rand((2, 77), generator=generator) * (torch.rand(2, 77) > 0.7)
    explicit = AttentionCapture(weights, conditional_offset=2)
    fused = AttentionCapture(weights, conditional_offset=2)

    # when: the explicit and the fused processor run the same call
    with torch.inference_mode():
        out_explicit = CapturingCrossAttnProcessor(explicit)(attn, hidden, text)
        out_fused = CapturingCrossAttnProcessor(fused, mode="sdpa")(attn, hidden, text)

    # then: the same attention output and the same captured mass
    torch.testing.assert_close(out_fused, out_explicit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.sums[256], explicit.sums[256], rtol=1e-5, atol=1e-6)


def test_sdpa_mode_captures_only_the_resolutions_the_mask_reads(model_cache, specs) -> None:
    model = tiny(model_cache, capture_attention="sdpa")
    captures: list[AttentionCapture] = []
    original = AttentionCapture.__init__

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        captures.append(self)

    AttentionCapture.__init__ = spy  # type: ignore[method-assign]
    try:
        draw(model, specs)
    finally:
        AttentionCapture.__init__ = original  # type: ignore[method-assign]

    # the tiny UNet cross-attends at 16², 8² and 4² (down/up) and 2² (mid): the mid block,
    # the coarsest, is not among the 3 the mask reads
    assert set(captures[0].counts) == {256, 64, 16} == finest_positions(model.unet, (16, 16), 3)


# Buckets


def test_a_batch_is_padded_up_to_the_nearest_bucket() -> None:
    buckets = (1, 2, 4, 8)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert bucket_for(11, buckets) == 11  # beyond the largest: its own shape
    with pytest.raises(ValueError):
        bucket_for(0, buckets)

    batch = torch.arange(6.0).reshape(3, 2)
    padded = pad_batch(batch, 4)
    assert padded.tolist() == [[0, 1], [2, 3], [4, 5], [4, 5]]
    assert pad_batch(batch, 3) is batch


def test_the_bucketed_unet_runs_bucket_shapes_and_returns_the_real_rows() -> None:
    calls: list[tuple[int, ...]] = []

    def unet(sample, timestep, *, encoder_hidden_states, return_dict):  # type: ignore[no-untyped-def]
        calls.append((sample.shape[0], timestep.shape[0], encoder_hidden_states.shape[0]))
        # each row's output is its own input scaled by its timestep: mixing rows would show
        return (sample * timestep[:, None],)

    runner = BucketedUNet(unet, (2, 4, 8))
    sample = torch.arange(3.0)[:, None].expand(3, 5) + 1
    noise = runner(sample, torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, 7))

    assert calls == [(4, 4, 4)]
    assert noise.shape == (3, 5)
    assert noise[:, 0].tolist() == [1.0, 4.0, 9.0]
    assert runner.sizes_run == {4}


def test_shared_processors_behind_buckets_give_the_default_samples(
    model_cache, specs, reference
) -> None:
    # given: what `compile_unet` sets up, minus the compiler: shared processors and buckets
    # that pad the CFG batch of 2 × 3 up to 8
    model = tiny(model_cache)
    shared = install_shared_capture(model.unet, mode="explicit")
    model.runner = BucketedUNet(model.unet, (2, 8), shared)

    # when: three samples are drawn (a batch of 3 keeps the padding in play)
    config = SamplingConfig(num_steps=STEPS, batch_size=3)
    sampler = Sampler(model, class_name="dog", token_embedding=EMBEDDING, config=config)
    samples = list(sampler.generate(specs[:3]))

    # then: the UNet ran padded batches and the samples and masks are the default path's
    assert model.runner.sizes_run == {8}
    assert pixel_levels(samples, reference[:3])[1] <= FLOAT_PIXEL_LEVELS
    assert mask_difference(samples, reference[:3]) <= FLOAT_MASK
    assert shared.masses == [] and shared.weights is None


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("ALIGNDIFF_TEST_COMPILE") != "1",
    reason="compiling the UNet takes minutes on a CPU: on a GPU, or ALIGNDIFF_TEST_COMPILE=1",
)
def test_a_compiled_unet_gives_the_eager_samples(model_cache, specs) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eager = load_diffusion_model(
        "tiny",
        cache_dir=model_cache,
        device=device,
        acceleration=Acceleration(capture_attention="sdpa"),
    )
    compiled = load_diffusion_model(
        "tiny",
        cache_dir=model_cache,
        device=device,
        acceleration=Acceleration(capture_attention="sdpa", compile_unet=True),
    )

    expected, samples = draw(eager, specs), draw(compiled, specs)

    assert pixel_levels(samples, expected)[1] <= FLOAT_PIXEL_LEVELS
    assert mask_difference(samples, expected) <= 1e-4


# Batch size from free memory

GIB = 1024**3


def test_auto_batch_size_fits_free_memory() -> None:
    # 20 GiB free, 85% of it usable, 1.5 GiB per image: 11 images fit
    assert auto_batch_size(20 * GIB, int(1.5 * GIB), fraction=0.85, maximum=64) == 11
    # ... capped at the maximum, and never below one image
    assert auto_batch_size(200 * GIB, GIB, fraction=0.85, maximum=16) == 16
    assert auto_batch_size(GIB // 2, GIB, fraction=0.85, maximum=16) == 1
    # with compiled buckets (UNet batches 2..32 under CFG: 1..16 images) it rounds down to one
    allowed = sampling_sizes(Acceleration(compile_unet=True), guided=True)
    assert allowed == [1, 2, 4, 8, 16]
    assert (
        auto_batch_size(20 * GIB, int(1.5 * GIB), fraction=0.85, maximum=64, allowed=allowed) == 8
    )


def test_batch_size_settings_resolve(tiny_sd: DiffusionModel) -> None:
    def resolve(setting: object) -> int:
        return resolve_batch_size(setting, configured=4, model=tiny_sd, resolution=128)  # type: ignore[arg-type]

    assert resolve(None) == 4
    assert resolve(6) == 6
    assert resolve("auto") == 4  # a CPU has no free-memory figure to fit: the configured size
    with pytest.raises(ValueError):
        resolve(0)


def test_auto_uses_the_measured_image_size_and_free_memory(tiny_sd, monkeypatch) -> None:
    # given: a model on a "cuda" device whose per-image figure was measured as 3 GiB, and a
    # device reporting 40 GiB free
    model = replace(tiny_sd, device=torch.device("cuda"), image_bytes={(512, True): 3 * GIB})
    monkeypatch.setattr("aligndiff.acceleration.free_device_bytes", lambda _device: 40 * GIB)

    size = resolve_batch_size("auto", configured=4, model=model, resolution=512, fraction=0.9)

    assert size == 12  # 36 GiB usable / 3 GiB


def test_synth_config_takes_the_batch_size_setting(tiny_sd: DiffusionModel) -> None:
    settings = CoreSettings(batch_size=3)
    assert SynthConfig.for_settings(settings, tiny_sd).sampling.batch_size == 3
    default = SynthConfig.for_settings(CoreSettings(), tiny_sd)
    assert default == SynthConfig.for_model("tiny")


# Inversion in half precision


def test_half_precision_inversion_learns_the_float32_token(model_cache: Path) -> None:
    shots = load_shots(SHOTS_DIR / "dog")
    config = replace(InversionConfig.tiny(), steps=8)
    learned = {}
    for dtype in ("float32", "bfloat16", "float16"):
        model = tiny(model_cache, dtype)
        if dtype == "float32":
            start = initial_embedding(model)
        result = invert(
            model,
            [s.image_array for s in shots],
            [s.mask for s in shots],
            class_name="dog",
            config=config,
        )
        assert result.embedding.dtype == torch.float32
        learned[dtype] = result.embedding

    # the row moved, and the half-precision runs moved it as float32 did: the same direction
    # and length of update (their gradients differ by rounding, bfloat16's 8-bit mantissa
    # most, not by vanishing or overflowing)
    update = learned["float32"] - start
    assert update.norm() > 0
    for dtype in ("bfloat16", "float16"):
        moved = learned[dtype] - start
        direction = torch.nn.functional.cosine_similarity(moved, update, dim=0)
        assert direction >= 0.95, dtype
        assert 0.9 <= moved.norm() / update.norm() <= 1.1, dtype


# A worker serving many classes


def test_a_worker_serving_five_classes_keeps_its_vocabulary_and_draws_each_class_freshly(
    tmp_path: Path, tiny_models: Models, model_cache: Path
) -> None:
    # given: one worker's models and app, and five classes with their own learned tokens
    settings = local_settings(tmp_path, sample_chunk_size=2)
    queue = InProcessQueue()
    app = make_celery(settings, queue=queue, models=tiny_models)
    app.loader.import_default_modules()
    service = Service.create(settings)
    diffusion = tiny_models.diffusion
    vocabulary = len(diffusion.tokenizer)
    matrix = diffusion.text_encoder.get_input_embeddings().weight.detach().clone()

    names = ["dog", "cat", "samarra mosque", "red fox", "albatross"]
    embeddings = {}
    classes: list[tuple[str, uuid.UUID, uuid.UUID]] = []
    for number, name in enumerate(names):
        created = create_class(service, SHOTS_DIR / "dog", name=name, num_samples=2, seed=number)
        vector = initial_embedding(diffusion) + 0.05 * (number + 1) * EMBEDDING
        embeddings[name] = vector
        path = tmp_path / f"{number}.safetensors"
        save_embedding(path, f"<{name.replace(' ', '-')}>", vector)
        give_embedding(service, created.class_id, path.read_bytes(), path.stem)
        classes.append((name, created.class_id, created.job_id))

    # when: the worker runs the five jobs in a row
    for _, _, job_id in classes:
        queue.enqueue(synthesis.START, str(job_id))
        queue.drain(app)

    # then: its tokenizer and embedding matrix are as they were
    assert len(diffusion.tokenizer) == vocabulary
    assert torch.equal(diffusion.text_encoder.get_input_embeddings().weight, matrix)
    # and: every class's samples are what freshly loaded models draw with its own token
    fresh = load_models(CoreSettings(model_cache_dir=model_cache)).diffusion
    sampling = SynthConfig.for_model("tiny").sampling
    for name, class_id, job_id in classes:
        assert service.job(job_id).status == "succeeded", name
        specs = prompt_bank(name, num_samples=2, class_seed=names.index(name))
        sampler = Sampler(fresh, class_name=name, token_embedding=embeddings[name], config=sampling)
        expected = list(sampler.generate(specs))
        stored = service.samples(class_id)
        assert [s.prompt_kind for s in stored] == ["inversion", "text"]
        for sample, drawn in zip(stored, expected, strict=True):
            image = np.asarray(Image.open(io.BytesIO(service.storage.get(sample.image_key))))
            np.testing.assert_array_equal(image, drawn.image, err_msg=name)
