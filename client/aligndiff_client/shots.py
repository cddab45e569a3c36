"""Pairing the files of a shots folder (API.md, "Command line"), for uploading them.

A shots folder holds `<stem>.<jpg|jpeg|webp>` images with `<stem>.png` masks beside them, or
`images/<stem>.<jpg|jpeg|png|webp>` with `masks/<stem>.png`. Only the pairing is done here;
the service checks the files themselves.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MASK_SUFFIX = ".png"


def shot_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """The images of a shots folder and their masks, paired by position, in stem order.

    Raises `ValueError` naming the file without a partner, or when the folder holds no shot."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    images_dir, masks_dir = folder / "images", folder / "masks"
    if images_dir.is_dir() or masks_dir.is_dir():
        images = _by_stem(images_dir, IMAGE_SUFFIXES)
        masks = _by_stem(masks_dir, (MASK_SUFFIX,))
    else:
        images = _by_stem(folder, tuple(s for s in IMAGE_SUFFIXES if s != MASK_SUFFIX))
        masks = _by_stem(folder, (MASK_SUFFIX,))
    for stem in sorted(images.keys() ^ masks.keys()):
        lone = images.get(stem) or masks[stem]
        raise ValueError(f"{lone} has no {'mask' if stem in images else 'image'} beside it")
    if not images:
        raise ValueError(
            f"{folder} holds no shots: expected <stem>.jpg|jpeg|webp images with <stem>.png "
            "masks beside them, or images/ and masks/ folders"
        )
    stems = sorted(images)
    return [images[s] for s in stems], [masks[s] for s in stems]


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {
        path.stem: path
        for path in sorted(folder.iterdir())
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in suffixes
    }
