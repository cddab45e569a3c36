"""PASCAL VOC segmentation layout, as a zip.

    metadata.json
    labelmap.txt                          background:0,0,0:: and <name>:128,0,0::
    JPEGImages/<name>.jpg                 the image, JPEG quality 95
    SegmentationClass/<name>.png          palette PNG: index 0 background, 1 the class
    ImageSets/Segmentation/train.txt      every name, one a line

Names are `shot_<position>` for the real shots and `sample_<index>` for the samples.
"""

from __future__ import annotations

from collections.abc import Iterator

from service.export.archive import (
    ExportItem,
    ExportOptions,
    ExportSource,
    Files,
    ZipStream,
    jpeg,
    label_png,
    write_metadata,
    zip_archive,
)


def write_voc(source: ExportSource, options: ExportOptions) -> Iterator[bytes]:
    """The archive's bytes, streamed."""

    def write(archive: ZipStream) -> Iterator[None]:
        yield from write_metadata(archive, source, format_name="voc", files=_files)
        archive.write("labelmap.txt", labelmap(source.seg_class.name).encode(), compress=True)
        for item in source.items():
            files = _files(0, item)
            archive.write(files["image"], jpeg(source.read(item.image_key)), compress=False)
            archive.write(files["mask"], label_png(source.read(item.mask_key)), compress=False)
            yield
        with archive.open("ImageSets/Segmentation/train.txt", compress=True) as entry:
            for item in source.items():
                entry.write(f"{item.name}\n".encode())
                yield

    return zip_archive(source.seg_class.created_at, write)


def labelmap(name: str) -> str:
    """The VOC label map (as CVAT and others read it): `label:color_rgb:parts:actions`."""
    # ':' separates the fields, so a name cannot hold one.
    label = " ".join(name.replace(":", "_").split())
    return f"# label:color_rgb:parts:actions\nbackground:0,0,0::\n{label}:128,0,0::\n"


def _files(_: int, item: ExportItem) -> Files:
    return {
        "image": f"JPEGImages/{item.name}.jpg",
        "mask": f"SegmentationClass/{item.name}.png",
    }
