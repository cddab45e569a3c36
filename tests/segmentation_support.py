"""Factories for the segmentation training tests: a small learnable shapes-on-textures task."""

from __future__ import annotations

import numpy as np

from aligndiff.copy_paste import LabeledImage, PasteObject, UInt8Array
from aligndiff.training import TrainingSet

SIZE = 64


def striped_disk_image(rng: np.random.Generator, size: int = SIZE) -> LabeledImage:
    """Class 1: a disk with a bright diagonal-stripe texture on a dark noisy background."""
    yy, xx = np.mgrid[:size, :size]
    radius = rng.uniform(size * 0.15, size * 0.3)
    cy, cx = rng.uniform(radius, size - radius, size=2)
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    image = rng.normal(70, 20, size=(size, size, 3))
    stripes = np.where(((yy + xx) // 3) % 2 == 0, 230.0, 150.0)
    image[disk] = stripes[disk][:, None] * np.array([1.0, 0.8, 0.3])
    labels = disk.astype(np.uint8)
    return LabeledImage(image=np.clip(image, 0, 255).astype(np.uint8), labels=labels)


def disk_training_set(count: int, seed: int) -> TrainingSet:
    """`count` striped-disk images, half of their objects tagged as shots and half as text."""
    rng = np.random.default_rng(seed)
    images = [striped_disk_image(rng) for _ in range(count)]
    objects = [
        PasteObject(
            image=sample.image,
            mask=sample.labels == 1,
            class_index=1,
            kind="shot" if i % 2 == 0 else "text",
        )
        for i, sample in enumerate(images)
    ]
    return TrainingSet(class_names=["disk"], images=images, objects=objects)


def solid_object(colour: tuple[int, int, int], *, class_index: int, kind: str) -> PasteObject:
    """A solid-colour rectangle-with-notch object in a 40x40 frame of another colour."""
    image = np.full((40, 40, 3), 7, dtype=np.uint8)
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:30, 10:35] = True
    mask[5:15, 10:18] = False  # a notch, so a flip is visible
    image[mask] = colour
    return PasteObject(image=image, mask=mask, class_index=class_index, kind=kind)  # type: ignore[arg-type]


def random_uint8_image(rng: np.random.Generator, height: int, width: int) -> UInt8Array:
    image: UInt8Array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return image
