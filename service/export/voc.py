"""PASCAL VOC segmentation layout, as a zip.

    metadata.json
    labelmap.txt                          background:0,0,0:: and a line per class, its colour
    JPEGImages/<name>.jpg                 the image, JPEG quality 95
    SegmentationClass/<name>.png          palette PNG: index 0 background, i the i-th class
    ImageSets/Segmentation/train.txt      the names of the train split, one a line
    ImageSets/Segmentation/val.txt        the names of the validation split (with a `val`)

Names are `shot_<position>` for the real shots and `sample_<index>` for the samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from service.export.archive import (
    FOREGROUND,
    VOC_PALETTE,
    ExportItem,
    ExportOptions,
    ExportSource,
    Files,
    ZipStream,
    jpeg,
    label_names,
    label_png,
    write_metadata,
    zip_archive,
)
from service.export.splits import SPLITS


def write_voc(source: ExportSource, options: ExportOptions) -> Iterator[bytes]:
    """The archive's bytes, streamed."""

    def write(archive: ZipStream) -> Iterator[None]:
        yield from write_metadata(archive, source, format_name="voc", files=_files)
        archive.write("labelmap.txt", labelmap(source.label_names).encode(), compress=True)
        for item in source.items():
            files = _files(0, item)
            archive.write(files["image"], jpeg(source.read(item.image_key)), compress=False)
            mask = label_png(source.read(item.mask_key), item.label)
            archive.write(files["mask"], mask, compress=False)
            yield
        for split in SPLITS if source.val.has_val else ("train",):
            with archive.open(f"ImageSets/Segmentation/{split}.txt", compress=True) as entry:
                for item in source.split_items(split):
                    entry.write(f"{item.name}\n".encode())
                    yield

    return zip_archive(source.created_at, write)


def labelmap(names: Sequence[str]) -> str:
    """The VOC label map (as CVAT and others read it): `label:color_rgb:parts:actions`, a line
    per label index (label i+1 is `names[i]`) with its colour in the masks' palette."""
    lines = ["# label:color_rgb:parts:actions", "background:0,0,0::"]
    # ':' separates the fields, so a name cannot hold one; names that become one ("a:b" and
    # "a_b") are told apart again.
    written = label_names([" ".join(name.replace(":", "_").split()) for name in names])
    for label, name in enumerate(written, start=FOREGROUND):
        colour = ",".join(str(v) for v in VOC_PALETTE[3 * label : 3 * label + 3])
        lines.append(f"{name}:{colour}::")
    return "\n".join(lines) + "\n"


def _files(_: int, item: ExportItem) -> Files:
    return {
        "image": f"JPEGImages/{item.name}.jpg",
        "mask": f"SegmentationClass/{item.name}.png",
    }
