"""Inversion: the cost of one optimizer step of `invert`, against two references.

(a) The irreducible work: a bare UNet forward on fixed random latents, with gradients flowing
    to the text states only, then backward, at the same batch and accumulation. Target: an
    `invert` step costs <= 1.10x that.
(b) A baseline in the style of diffusers' `textual_inversion.py`: the shots are VAE-encoded
    again at every micro-batch, the whole token-embedding matrix requires grad and is stepped
    by AdamW, and every row but the new token's is restored after each step. Target: `invert`
    makes >= 1.6x its steps/s at SD 1.5 shapes, where a VAE encode costs more than a UNet pass.

`invert` itself is timed, on the real dog shots, from its progress callback: the one-time shot
encoding before the first step is excluded. The three run in interleaved rounds of `--steps`
optimizer steps each.

Run: `python -m bench.inversion` (tiny, CPU), or on a GPU
`python -m bench.inversion --full --device cuda --dtype float16`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from aligndiff.inversion import (
    InversionConfig,
    InversionData,
    encode_shots,
    invert,
    masked_diffusion_loss,
)
from aligndiff.models.diffusion import DiffusionModel
from aligndiff.prompts import inversion_prompt, tokenize_prompts
from aligndiff.shots import Shot, load_shots
from bench.common import (
    CLASS_NAME,
    Ratio,
    StepClock,
    benchmark_parser,
    format_seconds,
    load_model,
    median,
    plural,
    report,
    run_interleaved,
    setup_label,
    synchronize,
    verdict,
)


class BareUNet:
    """UNet forward + backward on fixed random inputs; the gradient reaches the text states."""

    def __init__(self, model: DiffusionModel, config: InversionConfig, latent: int) -> None:
        self.model, self.config = model, config
        generator = torch.Generator().manual_seed(0)
        batch, channels = config.batch_size, model.unet.config.in_channels
        width = model.text_encoder.config.hidden_size
        length = model.tokenizer.model_max_length
        self.latents = torch.randn((batch, channels, latent, latent), generator=generator)
        self.states = torch.randn((batch, length, width), generator=generator)
        steps = model.scheduler.config.num_train_timesteps
        self.timesteps = torch.randint(0, steps, (batch,), generator=generator)
        self.latents = self.latents.to(model.device, model.dtype)
        self.states = self.states.to(model.device, model.dtype)
        self.timesteps = self.timesteps.to(model.device)

    def run(self, steps: int) -> list[float]:
        clock = StepClock(self.model.device)
        for _ in range(steps):
            for _ in range(self.config.gradient_accumulation):
                states = self.states.detach().requires_grad_(True)
                out = self.model.unet(self.latents, self.timesteps, encoder_hidden_states=states)
                out.sample.float().pow(2).mean().backward()
            clock()
        return clock.durations


class TextualInversionBaseline:
    """diffusers' textual_inversion.py training step, with aligndiff's loss for parity.

    Its own copy of the text encoder has a trainable embedding matrix (the shared model stays
    frozen); the placeholder's slot trains as the row of the initializer word.
    """

    def __init__(
        self,
        model: DiffusionModel,
        pixels: torch.Tensor,
        data: InversionData,
        config: InversionConfig,
    ) -> None:
        self.model, self.pixels, self.data, self.config = model, pixels, data, config
        self.text_encoder = copy.deepcopy(model.text_encoder)
        weight = self.text_encoder.get_input_embeddings().weight
        assert isinstance(weight, torch.nn.Parameter)
        self.weight = weight
        self.weight.requires_grad_(True)
        self.tokens = tokenize_prompts(model.tokenizer, [inversion_prompt(CLASS_NAME)], CLASS_NAME)
        slot = int(self.tokens.input_ids[self.tokens.placeholder_mask][0])
        self.frozen_rows = torch.ones(len(self.weight), dtype=torch.bool, device=model.device)
        self.frozen_rows[slot] = False
        self.original = self.weight.detach().clone()
        self.optimizer = torch.optim.AdamW(
            [self.weight], lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.train_steps = model.scheduler.config.num_train_timesteps

    def run(self, steps: int) -> list[float]:
        model, config = self.model, self.config
        input_ids = self.tokens.input_ids.to(model.device)
        clock = StepClock(model.device)
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            for _ in range(config.gradient_accumulation):
                indices = torch.randint(
                    0, len(self.pixels), (config.batch_size,), generator=self.generator
                )
                with torch.no_grad():
                    posterior = model.vae.encode(self.pixels[indices.to(model.device)])
                    latents = posterior.latent_dist.sample() * model.vae.config.scaling_factor
                noise = torch.randn(latents.shape, generator=self.generator).to(latents)
                timesteps = torch.randint(
                    0, self.train_steps, (config.batch_size,), generator=self.generator
                )
                timesteps = timesteps.to(model.device)
                noisy = model.scheduler.add_noise(latents, noise, timesteps)
                states = self.text_encoder(input_ids)[0].expand(config.batch_size, -1, -1)
                prediction = model.unet(noisy, timesteps, encoder_hidden_states=states).sample
                foreground = self.data.foreground[indices.to(model.device)]
                loss = masked_diffusion_loss(prediction, noise, foreground, config.lambda_bg)
                (loss / config.gradient_accumulation).backward()
            self.optimizer.step()
            with torch.no_grad():
                self.weight[self.frozen_rows] = self.original[self.frozen_rows]
            clock()
        return clock.durations


def shot_pixels(shots: Sequence[Shot], size: int, *, flip: bool) -> torch.Tensor:
    """Shots as the baseline's dataset would feed them: (N, 3, size, size) in [-1, 1]."""
    arrays = [
        np.asarray(shot.image.resize((size, size), Image.Resampling.BICUBIC)) for shot in shots
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return torch.cat([pixels, pixels.flip(-1)]) if flip else pixels


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], steps=10, repeats=9, shots=True)
    parser.add_argument("--batch-size", type=int, default=4, help="default 4 (the reference's)")
    parser.add_argument("--grad-accum", type=int, default=2, help="default 2 (the reference's)")
    args = parser.parse_args(argv)
    model = load_model(args)
    device, label = model.device, setup_label(args, model)
    size = args.resolution or model.default_resolution

    shots = load_shots(args.shots)
    images, masks = [s.image_array for s in shots], [s.mask for s in shots]
    config = InversionConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        gradient_accumulation=args.grad_accum,
        resolution=size,
    )
    synchronize(device)
    start = time.perf_counter()
    data = encode_shots(
        model,
        images,
        masks,
        resolution=size,
        flip=config.flip,
        mask_threshold=config.mask_threshold,
    )
    synchronize(device)
    encode_seconds = time.perf_counter() - start

    pixels = shot_pixels(shots, size, flip=config.flip).to(device, model.dtype)
    bare = BareUNet(model, config, latent=data.latent_mean.shape[-1])
    baseline = TextualInversionBaseline(model, pixels, data, config)

    def aligndiff_steps() -> list[float]:
        clock = StepClock(device)
        invert(model, images, masks, class_name=CLASS_NAME, config=config, progress=clock)
        return clock.durations

    print(f"timing {args.repeats} rounds of {args.steps} optimizer steps ({label}) …")
    rounds = run_interleaved(
        {
            "bare": lambda: bare.run(args.steps),
            "invert": aligndiff_steps,
            "baseline": lambda: baseline.run(args.steps),
        },
        repeats=args.repeats,
    )
    # Per round: the median step time of each variant; ratios pair the rounds.
    per_round = {name: [median(steps) for steps in runs] for name, runs in rounds.items()}
    t = {name: median(values) for name, values in per_round.items()}
    overhead = Ratio.paired(per_round["invert"], per_round["bare"])
    speedup = Ratio.paired(per_round["baseline"], per_round["invert"])
    baseline_vs_bare = Ratio.paired(per_round["baseline"], per_round["bare"])
    shape = f"batch {config.batch_size} x {config.gradient_accumulation} accumulated"
    rows: list[tuple[str, float, str]] = [
        ("bare UNet forward + backward (text states require grad)", t["bare"], "1.000"),
        ("aligndiff `invert`", t["invert"], f"**{overhead}**"),
        ("textual_inversion.py-style baseline", t["baseline"], str(baseline_vs_bare)),
    ]
    report(
        f"inversion: step cost — {label}",
        ["variant", "time per optimizer step (median)", "steps/s", "vs bare UNet"],
        [[name, format_seconds(s), f"{1 / s:.2f}", ratio] for name, s, ratio in rows],
        args=args,
        device=device,
        notes="\n".join(
            [
                f"{shape}, {size} px, {args.repeats} interleaved rounds of {args.steps} steps "
                "(the first step of each round not counted); ratios are medians of per-round "
                "ratios.",
                f"(a) `invert` step / bare UNet forward+backward: **{overhead}** (target "
                f"<= 1.10: {verdict(overhead.median <= 1.10)}).",
                f"(b) `invert` steps/s / baseline steps/s: **{speedup}** (target >= 1.6 "
                f"at SD 1.5 shapes: {verdict(speedup.median >= 1.6)} in this setup).",
                f"One-time shot encoding in `invert` ({plural(len(shots), 'shot')} and flips): "
                f"{format_seconds(encode_seconds)}.",
            ]
        ),
    )


if __name__ == "__main__":
    main()
