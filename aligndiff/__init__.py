"""AlignDiff: align a diffusion model to a few real image+mask shots and synthesize a dataset."""

__version__ = "0.1.0"
