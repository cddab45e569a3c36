"""Dataset exports: samples/s and peak memory of COCO and YOLO archives with instances, for one
class and for several.

Seeds a scratch SQLite database and a local blob folder with classes of synthetic 512x512
samples, each mask holding 1-3 objects (some with a hole, some with a speck below the minimum
area), and streams their archives through the service's own download path
(`service.contexts.datasets`: keyset-batched rows, blobs read one at a time, the zip written
front to back), in interleaved rounds: one class of 200 samples, one of 2,000, and two classes
of 1,000 in one archive (`GET /v1/datasets`), beside the one class of the same total.

Memory: tracemalloc's peak over two more passes of each (traced apart from the timed rounds:
tracing slows allocation-heavy code several-fold). Flat in the number of samples means the
2,000-sample archives peak near the 200-sample one, not ten times higher.

    python -m bench.export [--repeats 2]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from bench.common import (
    RESULTS_PATH,
    command_line,
    format_bytes,
    markdown_table,
    median,
    record_results,
    run_interleaved,
)
from service.auth import Principal, create_key
from service.contexts import datasets
from service.db import make_engine, make_session_factory, session_scope
from service.migrate import upgrade
from service.models import Job, Owner, Sample, SegClass, utcnow
from service.settings import Settings
from service.storage import LocalStorage, sample_key

SIZE = 512
IMAGES = 8  # distinct images, shared by the samples (their bytes are copied as they are)
FORMATS = ("coco", "yolo")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (default: 2)")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH)
    return parser.parse_args(argv)


def object_mask(rng: np.random.Generator) -> np.ndarray:
    """A 512x512 mask of 1-3 disks or ellipses; some with a hole, some with a 4-pixel speck."""
    y, x = np.mgrid[:SIZE, :SIZE]
    mask = np.zeros((SIZE, SIZE), bool)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.integers(60, SIZE - 60, 2)
        ry, rx = rng.integers(15, 60, 2)
        shape = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        if rng.random() < 0.3:
            shape &= ((y - cy) / (ry / 3)) ** 2 + ((x - cx) / (rx / 3)) ** 2 > 1
        mask |= shape
    if rng.random() < 0.3:
        sy, sx = rng.integers(0, SIZE - 2, 2)
        mask[sy : sy + 2, sx : sx + 2] = True
    return mask


def png(array: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def seed_class(
    factory: sessionmaker[Session],
    storage: LocalStorage,
    owner_id: uuid.UUID,
    count: int,
    name: str,
    *,
    seed: int,
) -> uuid.UUID:
    """A succeeded class of `count` finalized, accepted samples with their own masks."""
    rng = np.random.default_rng(seed)
    class_id = uuid.uuid4()
    image_keys = []
    for number in range(IMAGES):
        colours = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(colours).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        key = sample_key(class_id, number, "image.png")
        storage.put(key, png(image), content_type="image/png")
        image_keys.append(key)
    rows = []
    for index in range(count):
        mask_key = sample_key(class_id, index, "mask.png")
        storage.put(
            mask_key, png(object_mask(rng).astype(np.uint8) * 255), content_type="image/png"
        )
        rows.append(
            {
                "class_id": class_id, "index": index, "prompt": f"a photo of a {name}",
                "prompt_kind": "text", "seed": index, "width": SIZE, "height": SIZE,
                "image_key": image_keys[index % IMAGES], "coarse_mask_key": mask_key,
                "mask_key": mask_key, "mask_source": "consensus", "clip_score": 30.0,
                "accepted": True, "accepted_by": "filter", "finalized_at": utcnow(),
            }
        )  # fmt: skip
    with session_scope(factory) as session:
        job = Job(kind="synthesis", owner_id=owner_id, target_id=class_id, status="succeeded",
                  finished_at=utcnow())  # fmt: skip
        session.add(job)
        session.flush()
        session.add(
            SegClass(id=class_id, owner_id=owner_id, name=name, seed=0, prompts=[], num_shots=0,
                     num_samples_requested=count, num_samples_done=count, job_id=job.id)
        )  # fmt: skip
        session.flush()
        session.execute(insert(Sample), rows)
    return class_id


def exporter(
    factory: sessionmaker[Session],
    storage: LocalStorage,
    settings: Settings,
    principal: Principal,
    class_ids: list[uuid.UUID],
    export_format: str,
) -> Callable[[], int]:
    """A function that streams the archive through and returns its size in bytes."""

    def run() -> int:
        with factory() as session:
            download = datasets.prepare_download(
                session=session,
                session_factory=factory,
                storage=storage,
                settings=settings,
                principal=principal,
                class_ids=class_ids,
                export_format=export_format,  # type: ignore[arg-type]
                accepted_only=True,
            )
            return sum(len(chunk) for chunk in download.stream())

    return run


def traced(run: Callable[[], int]) -> tuple[int, int]:
    """The archive's size and the most memory Python held at once while it was streamed."""
    tracemalloc.start()
    try:
        size = run()
        return size, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aligndiff-bench-export-") as scratch:
        root = Path(scratch)
        url = f"sqlite:///{root / 'bench.db'}"
        upgrade(url)
        factory = make_session_factory(make_engine(url))
        storage = LocalStorage(root / "blobs")
        settings = Settings(data_dir=root, database_url=url, storage_url=f"file://{root / 'blobs'}")
        with session_scope(factory) as session:
            create_key(session, name="bench", admin=True)
            owner_id = session.execute(select(Owner.id)).scalar_one()
        principal = Principal(owner_id=owner_id, key_id=uuid.uuid4(), is_admin=True)
        print("seeding 4,200 samples of 512x512 …", flush=True)
        layouts = {
            "1 class x 200": [seed_class(factory, storage, owner_id, 200, "dog", seed=0)],
            "1 class x 2,000": [seed_class(factory, storage, owner_id, 2000, "dog", seed=1)],
            "2 classes x 1,000": [
                seed_class(factory, storage, owner_id, 1000, "dog", seed=2),
                seed_class(factory, storage, owner_id, 1000, "owl", seed=3),
            ],
        }
        counts = {"1 class x 200": 200, "1 class x 2,000": 2000, "2 classes x 1,000": 2000}
        runs = {
            f"{export_format}, {layout}": exporter(
                factory, storage, settings, principal, class_ids, export_format
            )
            for export_format in FORMATS
            for layout, class_ids in layouts.items()
        }
        print(f"timing {len(runs)} exports, {args.repeats} rounds …", flush=True)
        timings = run_interleaved(
            {name: _timed(run) for name, run in runs.items()}, repeats=args.repeats
        )
        # NOTE: traced twice, in both orders: a pass now and then peaks megabytes higher for a
        # moment, when the interpreter rebuilds a table of its own (the interned strings that
        # blob paths churn); the lower pass is the export's own peak, the higher one is shown.
        print("tracing memory …", flush=True)
        passes = run_interleaved(
            {name: functools.partial(traced, run) for name, run in runs.items()},
            repeats=2,
            warmup=0,
        )
        sizes = {name: passes[name][0][0] for name in runs}
        peaks = {name: min(peak for _, peak in passes[name]) for name in runs}
        highs = {name: max(peak for _, peak in passes[name]) for name in runs}

    rows = []
    for name in runs:
        layout = name.split(", ", 1)[1]
        seconds = median(timings[name])
        rows.append(
            [
                name,
                f"{counts[layout]:,}",
                f"{counts[layout] / seconds:.0f}",
                f"{seconds:.2f} s",
                format_bytes(sizes[name]),
                f"{format_bytes(peaks[name])} ({format_bytes(highs[name])})",
            ]
        )
    table = markdown_table(
        [
            "archive",
            "samples",
            "samples/s",
            "median time",
            "archive size",
            "peak traced memory (higher pass)",
        ],
        rows,
    )
    growth = {
        export_format: peaks[f"{export_format}, 1 class x 2,000"]
        / peaks[f"{export_format}, 1 class x 200"]
        for export_format in FORMATS
    }
    ratios = ", ".join(f"{export_format} {ratio:.2f}x" for export_format, ratio in growth.items())
    notes = (
        "Synthetic 512x512 samples (1-3 ellipses a mask, 30% with a hole, 30% with a 4-pixel "
        "speck), no shots, SQLite and a local blob folder on the same machine, "
        f"{args.repeats} interleaved rounds after a warm-up, the median shown. Peak traced "
        "memory: tracemalloc's peak (Python and NumPy allocations) over two more passes, the "
        "lower shown first: the higher one may hold a momentary rebuild of the interpreter's "
        "interned strings, which blob paths churn. "
        f"Memory, 2,000 samples over 200: {ratios}: flat in the number of samples; two classes "
        "of 1,000 in one archive peak like one class of 2,000."
    )
    print(f"\n{table}\n\n{notes}\n")
    record_results(
        "export: COCO and YOLO with instances, one class and several",
        command_line(),
        table,
        notes=notes,
        path=args.results,
    )


def _timed(run: Callable[[], int]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    return timed


if __name__ == "__main__":
    main()
