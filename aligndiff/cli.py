"""The `aligndiff` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from tqdm import tqdm

from aligndiff.settings import Settings, parse_bg_lambda

app = typer.Typer(
    name="aligndiff",
    help="AlignDiff: turn a few image+mask shots of a class into a synthetic segmentation dataset.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """AlignDiff: turn a few image+mask shots of a class into a synthetic segmentation dataset."""


def _quiet_libraries() -> None:
    """Silence the model libraries' own progress bars and load chatter on the terminal."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


class _StageBars:
    """One tqdm bar per stage, shown only on a terminal."""

    def __init__(self) -> None:
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            bar = tqdm(total=total, desc=f"{stage:<10}", unit="it", disable=None, leave=True)
            self.bars[stage] = bar
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


@app.command()
def synth(
    shots_dir: Annotated[
        Path,
        typer.Argument(help="Folder of shots: <stem>.jpg + <stem>.png mask, or images/ + masks/."),
    ],
    class_name: Annotated[
        str, typer.Option("--class-name", help="The class's name, e.g. 'samarra mosque'.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder (created; must be empty).")],
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="Samples to draw.")] = 8,
    seed: Annotated[
        int, typer.Option("--seed", help="Class seed: sample i's seed derives from it.")
    ] = 0,
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", help="A text prompt mentioning the class name (repeatable)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="'tiny', a local diffusers folder or a hub id [env ALIGNDIFF_DIFFUSION_MODEL].",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device", help="torch device, e.g. cpu, cuda, cuda:1 [env ALIGNDIFF_DEVICE]."
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="float32, float16 or bfloat16 [env ALIGNDIFF_DTYPE]."),
    ] = None,
    inversion_steps: Annotated[
        int | None, typer.Option("--inversion-steps", min=1, help="Default 500 (tiny: 20).")
    ] = None,
    bg_lambda: Annotated[
        str | None,
        typer.Option(
            "--bg-lambda",
            help="The inversion's background weight in [0, 2], or 'auto' to choose it by short "
            "trials [env ALIGNDIFF_BG_LAMBDA, default 0.6].",
        ),
    ] = None,
    sampling_steps: Annotated[
        int | None, typer.Option("--sampling-steps", min=1, help="Default 50 (tiny: 5).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Images per sampling batch.")
    ] = None,
    guidance_scale: Annotated[
        float | None, typer.Option("--guidance-scale", min=1.0, help="Default 7.5.")
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option("--resolution", help="Pixels (multiple of 64); default: the model's."),
    ] = None,
) -> None:
    """Run the whole pipeline locally, no service.

    Writes images/*.png, masks/*.png, samples.jsonl (one Sample per line), embedding.safetensors
    (loadable by diffusers' load_textual_inversion) and summary.json to --out.
    """
    import dataclasses

    from aligndiff.shots import ShotError, load_shots
    from aligndiff.synth import SynthConfig, load_models, synthesize, write_synthesis

    settings = Settings()
    if model is not None:
        settings = settings.model_copy(update={"diffusion_model": model})
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise fail(f"--out {out} exists and is not an empty folder; choose a new one")
    try:
        shots = load_shots(shots_dir)
    except ShotError as error:
        raise fail(str(error)) from None

    config = SynthConfig.from_settings(settings)
    try:
        chosen_bg_lambda = parse_bg_lambda(bg_lambda) if bg_lambda is not None else None
        inversion = config.inversion
        if inversion_steps is not None:
            inversion = dataclasses.replace(inversion, steps=inversion_steps)
        if resolution is not None:
            inversion = dataclasses.replace(inversion, resolution=resolution)
        overrides: dict[str, Any] = {
            k: v
            for k, v in {
                "num_steps": sampling_steps,
                "batch_size": batch_size,
                "guidance_scale": guidance_scale,
                "resolution": resolution,
            }.items()
            if v is not None
        }
        config = dataclasses.replace(
            config, inversion=inversion, sampling=dataclasses.replace(config.sampling, **overrides)
        )
    except ValueError as error:
        raise fail(str(error)) from None

    _quiet_libraries()
    try:
        models = load_models(settings, device=device, dtype=dtype)
    except (OSError, ValueError) as error:
        raise fail(f"cannot load the models: {error}") from None

    bars = _StageBars()
    try:
        result = synthesize(
            models,
            shots,
            class_name=class_name,
            num_samples=num_samples,
            seed=seed,
            prompts=prompt or (),
            config=config,
            bg_lambda=chosen_bg_lambda,
            progress=bars,
        )
    except ValueError as error:
        raise fail(str(error)) from None
    finally:
        bars.close()
    write_synthesis(result, out)
    typer.echo(f"wrote {len(result.samples)} samples to {out}", err=sys.stderr.isatty())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
