"""The `aligndiff` command line."""

from __future__ import annotations

import sys
import warnings
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
    # click's plain help: re-wrapped to the terminal, option names never cut (service/cli.py)
    rich_markup_mode=None,
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
    """One tqdm bar per stage (on stderr), or none at all when `shown` is false."""

    def __init__(self, *, shown: bool) -> None:
        self.shown = shown
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            bar = tqdm(
                total=total, desc=f"{stage:<10}", unit="it", disable=not self.shown, leave=True
            )
            self.bars[stage] = bar
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


@app.command()
def synth(
    shots_dir: Annotated[
        Path,
        typer.Argument(
            metavar="SHOTS_DIR",
            help="Folder of shots: <stem>.jpg + <stem>.png mask, or images/ + masks/.",
        ),
    ],
    class_name: Annotated[
        str,
        typer.Option(
            "--class-name", metavar="NAME", help="The class's name, e.g. 'samarra mosque'."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", metavar="DIR", help="Output folder (created; must be empty)."),
    ],
    num_samples: Annotated[
        int, typer.Option("--num-samples", min=1, metavar="N", help="Samples to draw.")
    ] = 8,
    seed: Annotated[
        int,
        typer.Option("--seed", metavar="SEED", help="Class seed: sample i's seed derives from it."),
    ] = 0,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt",
            metavar="TEXT",
            help="A text prompt mentioning the class name (repeatable).",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="MODEL",
            help="'tiny', 'tiny-sd2', 'tiny-sdxl', a local diffusers folder (SD 1.x/2.x or "
            "SDXL) or a hub id [env ALIGNDIFF_DIFFUSION_MODEL].",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            metavar="DEVICE",
            help="torch device, e.g. cpu, cuda, cuda:1 [env ALIGNDIFF_DEVICE].",
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            metavar="DTYPE",
            help="float32, float16 or bfloat16 [env ALIGNDIFF_DTYPE].",
        ),
    ] = None,
    inversion_steps: Annotated[
        int | None,
        typer.Option("--inversion-steps", min=1, metavar="N", help="Default 500 (tiny: 20)."),
    ] = None,
    bg_lambda: Annotated[
        str | None,
        typer.Option(
            "--bg-lambda",
            metavar="VALUE",
            help="The inversion's background weight in [0, 2], or 'auto' to choose it by short "
            "trials [env ALIGNDIFF_BG_LAMBDA, default 0.6].",
        ),
    ] = None,
    sampling_steps: Annotated[
        int | None,
        typer.Option("--sampling-steps", min=1, metavar="N", help="Default 50 (tiny: 5)."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=1, metavar="N", help="Images per sampling batch."),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option("--guidance-scale", min=1.0, metavar="SCALE", help="Default 7.5 (SDXL: 5.0)."),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(
            "--resolution",
            metavar="PIXELS",
            help="A multiple of 64; default: the model's.",
        ),
    ] = None,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="Print nothing but errors. Without it, progress bars show on a terminal.",
        ),
    ] = False,
) -> None:
    """Run the whole pipeline locally, no service.

    Writes images/*.png, masks/*.png, samples.jsonl (one Sample per line), embedding.safetensors
    (loadable by diffusers' load_textual_inversion) and summary.json to --out.
    """
    import dataclasses

    from aligndiff.names import find_name
    from aligndiff.shots import ShotError, load_shots

    settings = Settings()
    if model is not None:
        settings = settings.model_copy(update={"diffusion_model": model})
    # What can be refused without the model libraries is, before they load (seconds).
    if not class_name.strip():
        raise fail("--class-name must name the class, e.g. 'samarra mosque'")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise fail(f"--out {out} exists and is not an empty folder; choose a new one")
    try:
        shots = load_shots(shots_dir)
        chosen_bg_lambda = parse_bg_lambda(bg_lambda) if bg_lambda is not None else None
        for text in prompt or ():
            find_name(text, class_name)
    except (ShotError, ValueError) as error:
        raise fail(str(error)) from None

    from aligndiff.synth import SynthConfig, load_models, synthesize, write_synthesis

    config = SynthConfig.from_settings(settings)
    try:
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
    if quiet:
        warnings.simplefilter("ignore")
    # Progress goes to stderr, and only to a terminal: piped output stays clean.
    shown = not quiet and sys.stderr.isatty()
    if shown:
        typer.echo(f"loading the models ({settings.diffusion_model}) …", err=True)
    try:
        models = load_models(settings, device=device, dtype=dtype)
    except (OSError, ValueError) as error:
        raise fail(f"cannot load the models: {error}") from None

    bars = _StageBars(shown=shown)
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
    if not quiet:
        typer.echo(f"wrote {len(result.samples)} samples to {out}", err=sys.stderr.isatty())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
