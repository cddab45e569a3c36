"""`aligndiff-client`: the SDK's calls from a shell.

A resource is printed to stdout as JSON (for `jq`); lists (`list`, `samples`, `jobs`, `keys
list`) as a table for people, or one JSON object a line with `--json`; downloads print the
path they wrote. Progress bars, confirmations, errors and the summary of a finished training's
metrics go to stderr. `report` prints a summary for people to stdout (the report as JSON with
`--json`). An error is one line, `aligndiff-client: error: …`, and a non-zero exit status (1;
2 for a wrong command line; 130 when interrupted).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel

from aligndiff_client._version import __version__
from aligndiff_client.client import DEFAULT_NUM_SAMPLES, Client
from aligndiff_client.errors import AlignDiffError
from aligndiff_client.models import (
    AcceptedCount,
    ClassInfo,
    ClassReport,
    Histogram,
    Job,
    KeyInfo,
    ModelInfo,
    Sample,
    TrainingMetrics,
)
from aligndiff_client.shots import shot_files

M = TypeVar("M", bound=BaseModel)

PROG = "aligndiff-client"
DEFAULT_URL = "http://127.0.0.1:8000"
FORMATS = ("voc", "coco", "hf", "webdataset", "yolo")
ARCHITECTURES = ("deeplabv3", "segformer")
EVAL_SETS = {
    "validation": "the uploaded validation set",
    "held_out_shots": "held-out shots (leave-one-shot-out folds; the IoUs are fold means)",
    "training_shots": "the training shots (optimistic: measured on the training shots)",
    "shots": "the training shots (optimistic: measured on the training shots)",
}


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run the command line; return the exit status. `transport` replaces the network."""
    parser = _parser()
    args = parser.parse_args(argv)
    url = getattr(args, "url", None) or os.environ.get("ALIGNDIFF_URL") or DEFAULT_URL
    api_key = getattr(args, "api_key", None) or os.environ.get("ALIGNDIFF_API_KEY")
    if not api_key:
        parser.error("no API key: pass --api-key or set ALIGNDIFF_API_KEY")
    if args.run is _create and (args.images is None) != (args.masks is None):
        parser.error("create: --images needs --masks (one per image); --shots-dir takes none")
    if args.run is _train and (args.val_images is None) != (args.val_masks is None):
        parser.error("train: --val-images needs --val-masks (one label map per image)")
    try:
        with Client(url, api_key, transport=transport) as client:
            args.run(client, args)
    except KeyboardInterrupt:
        _fail("interrupted (a download resumes when the same command is run again)")
        return 130
    except (AlignDiffError, OSError, ValueError) as error:
        _fail(str(error))
        return 1
    return 0


def _quiet(args: argparse.Namespace) -> bool:
    # NOTE: `-q` may come before or after the command: each parser leaves it unset unless given
    # (a default set on the top parser overwrote the top parser's `-q` once a command parsed).
    return bool(getattr(args, "quiet", False))


def _create(client: Client, args: argparse.Namespace) -> None:
    if args.shots_dir is not None:
        images, masks = shot_files(args.shots_dir)
    else:
        images, masks = args.images, args.masks
    created = client.create_class(
        args.name,
        images,
        masks,
        prompts=args.prompt,
        num_samples=args.num_samples,
        seed=args.seed,
        bg_lambda=args.bg_lambda,
        model=args.model,
    )
    if args.wait:
        created = client.wait(created.id, timeout=args.timeout, progress=not _quiet(args))
    _print(created)


def _show(client: Client, args: argparse.Namespace) -> None:
    _print(client.get_class(args.class_id))


def _list(client: Client, args: argparse.Namespace) -> None:
    _print_list(client.list_classes(), args, _class_row, CLASS_COLUMNS)


def _models(client: Client, args: argparse.Namespace) -> None:
    _print_list(client.models(), args, _model_row, MODEL_COLUMNS)


def _samples(client: Client, args: argparse.Namespace) -> None:
    samples = client.samples(
        args.class_id,
        accepted=True if args.accepted else False if args.rejected else None,
        min_clip_score=args.min_clip_score,
    )
    _print_list(samples, args, _sample_row, SAMPLE_COLUMNS)


def _review(client: Client, args: argparse.Namespace) -> None:
    _print(client.review_sample(args.sample_id, accepted=args.accept))


def _replace_mask(client: Client, args: argparse.Namespace) -> None:
    _print(client.replace_mask(args.sample_id, args.mask))


def _delete(client: Client, args: argparse.Namespace) -> None:
    client.delete_class(args.class_id)
    print(f"deleted class {args.class_id}", file=sys.stderr)


def _embedding(client: Client, args: argparse.Namespace) -> None:
    print(client.get_embedding(args.class_id, args.out or f"{args.class_id}.safetensors"))


def _jobs(client: Client, args: argparse.Namespace) -> None:
    _print_list(client.jobs(status=args.status, kind=args.kind), args, _job_row, JOB_COLUMNS)


def _cancel(client: Client, args: argparse.Namespace) -> None:
    _print(client.cancel_job(args.job_id))


def _retry(client: Client, args: argparse.Namespace) -> None:
    _print(client.retry_job(args.job_id))


def _predict(client: Client, args: argparse.Namespace) -> None:
    client.predict(args.training_id, args.image, args.out)
    print(args.out)


def _weights(client: Client, args: argparse.Namespace) -> None:
    print(client.download_weights(args.training_id, args.out, progress=not _quiet(args)))


def _keys_create(client: Client, args: argparse.Namespace) -> None:
    created = client.create_key(args.name, admin=args.admin, owner_id=args.owner_id)
    if args.json:
        _print(created)
        return
    kind = "admin key" if created.admin else "key"
    print(
        f"created {kind} {created.id} ({created.name}) of owner {created.owner_id}; "
        "it is shown this once:",
        file=sys.stderr,
    )
    print(created.key)


def _keys_list(client: Client, args: argparse.Namespace) -> None:
    _print_list(client.list_keys(), args, _key_row, KEY_COLUMNS)


def _keys_revoke(client: Client, args: argparse.Namespace) -> None:
    client.revoke_key(args.key_id)
    print(f"revoked key {args.key_id}", file=sys.stderr)


# --- tables ----------------------------------------------------------------------------------

CLASS_COLUMNS = ("ID", "NAME", "STATUS", "STAGE", "PROGRESS", "SAMPLES", "ACCEPTED", "CREATED")
SAMPLE_COLUMNS = ("INDEX", "ID", "KIND", "CLIP", "SHOT_SIM", "ACCEPTED", "MASK", "PROMPT")
JOB_COLUMNS = ("ID", "KIND", "STATUS", "STAGE", "PROGRESS", "ATTEMPTS", "TARGET", "CREATED")
KEY_COLUMNS = ("ID", "NAME", "ADMIN", "OWNER", "CREATED", "LAST_USED", "REVOKED")
MODEL_COLUMNS = ("NAME", "FAMILY", "RESOLUTION")


def _class_row(item: ClassInfo) -> list[str]:
    return [
        str(item.id),
        item.name,
        item.status,
        item.stage or "-",
        f"{item.progress:.0%}",
        f"{item.num_samples_done}/{item.num_samples_requested}",
        str(item.num_accepted),
        _time(item.created_at),
    ]


def _sample_row(item: Sample) -> list[str]:
    verdict = "yes" if item.accepted else f"no ({item.rejected_by})" if item.rejected_by else "no"
    return [
        str(item.index),
        str(item.id),
        item.prompt_kind,
        _number(item.clip_score, digits=1),
        _number(item.shot_similarity),
        verdict,
        item.mask_source,
        item.prompt,
    ]


def _model_row(item: ModelInfo) -> list[str]:
    return [item.name, item.family, str(item.default_resolution)]


def _job_row(item: Job) -> list[str]:
    return [
        str(item.id),
        item.kind,
        item.status,
        item.stage or "-",
        f"{item.progress:.0%}",
        str(item.attempts),
        str(item.target_id),
        _time(item.created_at),
    ]


def _key_row(item: KeyInfo) -> list[str]:
    return [
        str(item.id),
        item.name,
        "yes" if item.admin else "no",
        str(item.owner_id),
        _time(item.created_at),
        _time(item.last_used_at),
        _time(item.revoked_at),
    ]


def _print_list(
    items: Iterable[M],
    args: argparse.Namespace,
    row: Callable[[M], list[str]],
    columns: Sequence[str],
) -> None:
    """Resources as a table (all fetched first, to size the columns), or with `--json` one
    JSON object a line as they arrive."""
    if args.json:
        for item in items:
            print(item.model_dump_json())
        return
    rows = [list(columns), *(row(item) for item in items)]
    widths = [max(len(cells[i]) for cells in rows) for i in range(len(columns))]
    for cells in rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        print(line.rstrip())


def _time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _download(client: Client, args: argparse.Namespace) -> None:
    # One id: that class's dataset (GET /v1/classes/{id}/dataset); several: one archive.
    class_ids = args.class_ids[0] if len(args.class_ids) == 1 else args.class_ids
    path = client.download_dataset(
        class_ids,
        args.format,
        args.out,
        accepted_only=not args.all,
        val=args.val,
        progress=not _quiet(args),
        extract=args.extract,
    )
    print(path)
    if args.extract is not None:
        print(args.extract)


def _train(client: Client, args: argparse.Namespace) -> None:
    training = client.train(
        args.class_ids,
        architecture=args.architecture,
        steps=args.steps,
        batch_size=args.batch_size,
        use_synthetic=not args.no_synthetic,
        copy_paste=not args.no_copy_paste,
        compare_baseline=args.compare_baseline,
        validation_images=args.val_images,
        validation_masks=args.val_masks,
    )
    if args.wait:
        training = client.wait_training(
            training.id, timeout=args.timeout, progress=not _quiet(args)
        )
    _print(training)
    if args.wait and training.metrics is not None:
        print(_metrics_summary(training.metrics), file=sys.stderr)


def _metrics_summary(metrics: TrainingMetrics) -> str:
    """What the metrics were measured on, the IoUs, and the comparison with the baseline."""
    eval_set = str(metrics.eval_set)
    lines = [f"eval set: {eval_set}: {EVAL_SETS.get(eval_set, 'unknown to this client')}"]
    if metrics.folds:
        lines[0] += f", {len(metrics.folds)} folds"
    lines.append(f"mIoU {_number(metrics.miou)}")
    std = metrics.per_class_iou_std or {}
    for name, iou in metrics.per_class_iou.items():
        spread = f" ± {_number(std[name])}" if name in std else ""
        lines.append(f"  {name}: IoU {_number(iou)}{spread}")
    if metrics.baseline is not None:
        lines.append(f"baseline (shots only): mIoU {_number(metrics.baseline.miou)}")
    comparison = metrics.comparison
    if comparison is not None:
        change = _number(comparison.miou_difference, sign=True)
        line = f"comparison (with - without synthetic): mIoU {change}"
        if comparison.spread is not None:
            verdict = "exceeds" if comparison.exceeds_spread else "within"
            line += f", {verdict} the spread over folds ({_number(comparison.spread)})"
        lines.append(line)
        for name, difference in comparison.per_class_difference.items():
            lines.append(f"  {name}: IoU {_number(difference, sign=True)}")
    return "\n".join(lines)


def _report(client: Client, args: argparse.Namespace) -> None:
    report = client.report(args.class_id)
    if args.json:
        _print(report)
    else:
        print(_report_summary(report))


def _report_summary(report: ClassReport) -> str:
    """A class's report for people: counts, rejections, thresholds, score histograms, the
    bg_lambda trials and the trainings on it."""
    counts = report.counts
    lines = [
        f"class {report.class_id}: {counts.samples} finished samples, "
        f"{_accepted(AcceptedCount(samples=counts.samples, accepted=counts.accepted))}"
    ]
    for title, groups in (
        ("by prompt kind", counts.by_prompt_kind),
        ("by mask source", counts.by_mask_source),
    ):
        shown = [f"{name} {_accepted(group)}" for name, group in groups.items() if group.samples]
        if shown:
            lines.append(f"  {title}: {', '.join(shown)}")
    reasons = ", ".join(f"{reason} {count}" for reason, count in counts.rejected_by.items())
    lines.append(f"rejected: {sum(counts.rejected_by.values())} ({reasons})")
    acceptance = report.acceptance
    if acceptance is None:
        lines.append("acceptance thresholds: not set yet")
    else:
        thresholds = [
            f"{name} >= {_number(value)} ({acceptance.source.get(name, 'unknown')})"
            for name, value in (
                ("prototype_similarity", acceptance.prototype_similarity),
                ("shot_similarity", acceptance.shot_similarity),
            )
        ]
        lines.append(f"acceptance thresholds: {', '.join(thresholds)}")
    if report.histograms:
        lines.append("scores (samples per bin, low to high):")
        width = max(len(name) for name in report.histograms)
        for name, histogram in report.histograms.items():
            lines.append(f"  {name:<{width}}  {_sparkline(histogram)}  ({histogram.total})")
    lines += _tuning_lines(report)
    lines.append(f"trainings on this class: {len(report.trainings)}")
    for training in report.trainings:
        line = f"  {training.id}  {training.eval_set}  mIoU {_number(training.miou)}"
        if training.baseline_miou is not None and training.miou is not None:
            difference = _number(training.miou - training.baseline_miou, sign=True)
            line += f", baseline {_number(training.baseline_miou)} ({difference})"
        else:
            line += ", no baseline"
        if training.optimistic:
            line += " (optimistic: measured on the training shots)"
        lines.append(line)
    return "\n".join(lines)


def _accepted(group: AcceptedCount) -> str:
    share = f" ({group.share:.0%})" if group.share is not None else ""
    return f"{group.accepted}/{group.samples} accepted{share}"


SPARKS = "▁▂▃▄▅▆▇█"


def _sparkline(histogram: Histogram) -> str:
    """The range and one character per bin, as tall as its count (`·` for none)."""
    peak = max(histogram.counts, default=0)
    # The bin of the peak is the tallest; any other bin with samples at least the lowest.
    bars = "".join(
        SPARKS[-(-count * len(SPARKS) // peak) - 1] if count else "·" for count in histogram.counts
    )
    low, high = (histogram.edges[0], histogram.edges[-1]) if histogram.edges else (0.0, 0.0)
    return f"{f'{low:g}..{high:g}':<8} {bars}"


def _tuning_lines(report: ClassReport) -> list[str]:
    if report.tuning is None:
        if report.bg_lambda is None:
            return ["bg_lambda: not chosen yet"]
        return [f"bg_lambda: {report.bg_lambda:g} (fixed)"]
    chosen = report.bg_lambda
    lines = [
        f"bg_lambda: {_number(chosen, digits=2)}, chosen of {len(report.tuning)} trials (*):",
        "    bg_lambda  score  prototype  shot   steps  loss",
    ]
    for trial in report.tuning:
        mark = "*" if chosen is not None and abs(trial.bg_lambda - chosen) < 1e-9 else " "
        lines.append(
            f"  {mark} {trial.bg_lambda:<9.2f}  {_number(trial.score)}  "
            f"{_number(trial.prototype_similarity):<9}  {_number(trial.shot_similarity)}  "
            f"{trial.steps if trial.steps is not None else 'n/a':<5}  "
            f"{_number(trial.loss, digits=4)}"
        )
    return lines


def _number(value: float | None, *, sign: bool = False, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _parser() -> argparse.ArgumentParser:
    # NOTE: the connection options are accepted before and after the command; SUPPRESS keeps
    # a subcommand's unset option from overwriting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"the service's URL (env ALIGNDIFF_URL; default {DEFAULT_URL})",
    )
    common.add_argument(
        "--api-key", default=argparse.SUPPRESS, help="an API key (env ALIGNDIFF_API_KEY)"
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars"
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create AlignDiff classes, follow them, download their datasets and train "
        "segmenters on them.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    create = commands.add_parser(
        "create",
        parents=[common],
        help="create a class from shots and queue its synthesis",
        description="Upload shots (images with their masks, paired by order, or a shots "
        "folder) and queue the class's synthesis; print the class as JSON.",
    )
    create.add_argument("name", help="the class name, e.g. 'pidan'")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--shots-dir",
        type=Path,
        metavar="DIR",
        help="a folder of <stem>.jpg|jpeg|webp + <stem>.png pairs, or images/ + masks/",
    )
    source.add_argument("--images", nargs="+", type=Path, metavar="FILE", help="shot images")
    create.add_argument(
        "--masks", nargs="+", type=Path, metavar="FILE", help="their masks, in the same order"
    )
    create.add_argument(
        "--num-samples",
        type=int,
        default=DEFAULT_NUM_SAMPLES,
        metavar="N",
        help=f"how many samples to synthesize (default: {DEFAULT_NUM_SAMPLES})",
    )
    create.add_argument("--seed", type=int, metavar="S", help="the class seed (default: random)")
    create.add_argument(
        "--bg-lambda",
        metavar="L",
        help="the inversion's background weight in [0, 2], or 'auto' to choose it by trials "
        "(default: the server's, 0.6)",
    )
    create.add_argument(
        "--model",
        metavar="NAME",
        help="one of the deployment's models (GET /v1/models; default: its first)",
    )
    create.add_argument(
        "--prompt",
        action="append",
        metavar="P",
        help="a text prompt mentioning the class name (repeatable)",
    )
    _wait_options(create, "wait until the synthesis ends; print the final class")
    create.set_defaults(run=_create)

    show = commands.add_parser(
        "show",
        aliases=["status"],
        parents=[common],
        help="show a class and its progress",
        description="Print a class, with its status, stage and progress, as JSON.",
    )
    show.add_argument("class_id", metavar="CLASS_ID")
    show.set_defaults(run=_show)

    listing = commands.add_parser(
        "list",
        parents=[common],
        help="list your classes",
        description="List the classes of the key's owner (an admin key: everyone's), newest "
        "first, as a table.",
    )
    _json_option(listing)
    listing.set_defaults(run=_list)

    models = commands.add_parser(
        "models",
        parents=[common],
        help="list the models a class may use",
        description="List the deployment's diffusion models, the default first, with their "
        "family and default resolution: the names `create --model` takes.",
    )
    _json_option(models)
    models.set_defaults(run=_models)

    samples = commands.add_parser(
        "samples",
        parents=[common],
        help="list a class's samples and their scores",
        description="List a class's finished samples in index order, with their scores and "
        "verdicts, as a table.",
    )
    samples.add_argument("class_id", metavar="CLASS_ID")
    verdict = samples.add_mutually_exclusive_group()
    verdict.add_argument("--accepted", action="store_true", help="only the accepted samples")
    verdict.add_argument("--rejected", action="store_true", help="only the rejected samples")
    samples.add_argument(
        "--min-clip-score",
        type=float,
        metavar="S",
        help="only samples whose CLIP score is at least S (0 to 100)",
    )
    _json_option(samples)
    samples.set_defaults(run=_samples)

    review = commands.add_parser(
        "review",
        parents=[common],
        help="accept or reject a sample",
        description="Accept or reject a finished sample: your verdict overrides the "
        "acceptance filters', and the class's accepted count, its accepted-only datasets and "
        "later trainings follow it. Print the sample as JSON.",
    )
    review.add_argument("sample_id", metavar="SAMPLE_ID")
    verdict = review.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--accept", dest="accept", action="store_true", help="keep the sample")
    verdict.add_argument(
        "--reject", dest="accept", action="store_false", help="leave the sample out"
    )
    review.set_defaults(run=_review)

    replace_mask = commands.add_parser(
        "replace-mask",
        parents=[common],
        help="replace a sample's mask with one you drew",
        description="Replace a finished sample's mask with a PNG of its size (foreground "
        "where the gray value is >= 128), checked as a shot's mask is; its mask source "
        "becomes human. Print the sample as JSON.",
    )
    replace_mask.add_argument("sample_id", metavar="SAMPLE_ID")
    replace_mask.add_argument("mask", type=Path, metavar="MASK", help="the new mask (PNG)")
    replace_mask.set_defaults(run=_replace_mask)

    delete = commands.add_parser(
        "delete",
        parents=[common],
        help="delete a class with its samples and files",
        description="Delete a class with its shots, samples and files; its job, if still "
        "running, is cancelled.",
    )
    delete.add_argument("class_id", metavar="CLASS_ID")
    delete.set_defaults(run=_delete)

    embedding = commands.add_parser(
        "embedding",
        parents=[common],
        help="download a class's learned token",
        description="Download a class's learned token as safetensors (diffusers' "
        "load_textual_inversion loads it); print the file's path.",
    )
    embedding.add_argument("class_id", metavar="CLASS_ID")
    embedding.add_argument(
        "--out", type=Path, metavar="PATH", help="default: <CLASS_ID>.safetensors"
    )
    embedding.set_defaults(run=_embedding)

    dl = commands.add_parser(
        "download",
        parents=[common],
        help="download a class's dataset archive (or several classes' as one)",
        description="Download a class's dataset (zip; tar for webdataset), or one dataset "
        "over several classes (labelled in the order given), resuming an interrupted "
        "download of the same archive; print the archive's path.",
    )
    dl.add_argument("class_ids", nargs="+", metavar="CLASS_ID")
    dl.add_argument("--format", choices=FORMATS, default="voc", help="default: voc")
    dl.add_argument(
        "--out",
        type=Path,
        metavar="PATH",
        help="default: <CLASS_ID>-<FORMAT>.zip|tar (several: <FIRST_ID>-and-<N>-more-…)",
    )
    dl.add_argument(
        "--all", action="store_true", help="include samples the OOD filter did not accept"
    )
    dl.add_argument(
        "--val",
        default="none",
        metavar="SPLIT",
        help="validation split: none (default), shots (the real shots) or fraction:<f> "
        "(that share of the samples, e.g. fraction:0.2)",
    )
    dl.add_argument("--extract", type=Path, metavar="DIR", help="also unpack the archive into DIR")
    dl.set_defaults(run=_download)

    report = commands.add_parser(
        "report",
        parents=[common],
        help="summarize a class's samples, scores, tuning and trainings",
        description="Print a class's report: its finished samples counted by prompt kind, "
        "mask source and verdict, the rejections by reason, its acceptance thresholds, its "
        "score histograms, its bg_lambda trials, and the trainings on it.",
    )
    report.add_argument("class_id", metavar="CLASS_ID")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.set_defaults(run=_report)

    train = commands.add_parser(
        "train",
        parents=[common],
        help="train a segmenter on classes",
        description="Queue the training of a segmenter on the classes' shots and samples; "
        "print the training as JSON (with --wait, a summary of its metrics to stderr: what "
        "they were measured on, and the comparison with the baseline).",
    )
    train.add_argument("class_ids", nargs="+", metavar="CLASS_ID")
    train.add_argument("--architecture", choices=ARCHITECTURES, default="deeplabv3")
    train.add_argument("--steps", type=int, metavar="N", help="default: the service's")
    train.add_argument("--batch-size", type=int, metavar="N", help="default: the service's")
    train.add_argument(
        "--compare-baseline",
        action="store_true",
        help="also train on the real shots alone and report both",
    )
    train.add_argument("--no-synthetic", action="store_true", help="train on the shots only")
    train.add_argument("--no-copy-paste", action="store_true", help="no copy-paste augmentation")
    train.add_argument(
        "--val-images",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="a validation set to measure the training on, rather than the shots: its images",
    )
    train.add_argument(
        "--val-masks",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="their label maps, in the same order: single-channel PNGs, 0 background, k the "
        "k-th CLASS_ID, 255 ignored (a 0/255 mask of the shots' format must become 0/1)",
    )
    _wait_options(train, "wait until the training ends; print the final training")
    train.set_defaults(run=_train)

    predict = commands.add_parser(
        "predict",
        parents=[common],
        help="segment an image with a trained segmenter",
        description="Segment an image with a trained segmenter (on the service's worker) and "
        "save the label mask: a grayscale PNG of the image's size, 0 the background, k the "
        "k-th class of the training. Print the mask's path.",
    )
    predict.add_argument("training_id", metavar="TRAINING_ID")
    predict.add_argument("image", type=Path, metavar="IMAGE", help="a JPEG, PNG or WEBP image")
    predict.add_argument(
        "--out", type=Path, required=True, metavar="PATH", help="where to save the mask (PNG)"
    )
    predict.set_defaults(run=_predict)

    weights = commands.add_parser(
        "weights",
        parents=[common],
        help="download a trained segmenter's weights",
        description="Download a trained segmenter: a zip of model.safetensors and "
        "config.json. Print the file's path.",
    )
    weights.add_argument("training_id", metavar="TRAINING_ID")
    weights.add_argument(
        "--out", type=Path, metavar="PATH", help="default: <TRAINING_ID>-weights.zip"
    )
    weights.set_defaults(run=_weights)

    jobs = commands.add_parser(
        "jobs",
        parents=[common],
        help="list your jobs",
        description="List the jobs of the key's owner (an admin key: everyone's), newest "
        "first, as a table.",
    )
    jobs.add_argument(
        "--status",
        metavar="STATUS",
        help="only jobs in this state: queued, running, succeeded, failed or cancelled",
    )
    jobs.add_argument(
        "--kind", metavar="KIND", help="only jobs of this kind: synthesis or training"
    )
    _json_option(jobs)
    jobs.set_defaults(run=_jobs)

    cancel = commands.add_parser(
        "cancel",
        parents=[common],
        help="cancel a queued or running job",
        description="Ask a queued or running job to stop; it ends cancelled within one "
        "batch. Print the job as JSON.",
    )
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.set_defaults(run=_cancel)

    retry = commands.add_parser(
        "retry",
        parents=[common],
        help="queue a failed or cancelled job again",
        description="Queue a failed or cancelled job again, keeping the work it already "
        "stored. Print the job as JSON.",
    )
    retry.add_argument("job_id", metavar="JOB_ID")
    retry.set_defaults(run=_retry)

    _keys_parser(commands, common)
    return parser


def _keys_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    keys = commands.add_parser(
        "keys",
        parents=[common],
        help="create, list and revoke API keys",
        description="Create, list and revoke the API keys of the key's owner (an admin "
        "key: of any owner).",
    )
    actions = keys.add_subparsers(title="commands", required=True, metavar="COMMAND")
    create = actions.add_parser(
        "create",
        parents=[common],
        help="create a key and print it",
        description="Create an API key and print it alone on stdout (so that $(...) "
        "captures it): it is shown this once.",
    )
    create.add_argument("--name", required=True, help="what the key is for, e.g. 'ci'")
    create.add_argument("--admin", action="store_true", help="an admin key (needs an admin key)")
    create.add_argument(
        "--owner-id",
        metavar="ID",
        help="the new key's owner (admin keys only; default: the caller's owner, or a new "
        "owner when the caller is an admin key)",
    )
    _json_option(create, "print the new key with its id and owner as JSON")
    create.set_defaults(run=_keys_create)

    listing = actions.add_parser(
        "list",
        parents=[common],
        help="list keys",
        description="List the keys of the key's owner (an admin key: every key), without "
        "their secrets, as a table.",
    )
    _json_option(listing)
    listing.set_defaults(run=_keys_list)

    revoke = actions.add_parser(
        "revoke",
        parents=[common],
        help="revoke a key",
        description="Revoke a key: within seconds every request made with it is refused.",
    )
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(run=_keys_revoke)


def _json_option(
    parser: argparse.ArgumentParser, help: str = "print one JSON object a line, not a table"
) -> None:
    parser.add_argument("--json", action="store_true", help=help)


def _wait_options(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--wait", action="store_true", help=help)
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long"
    )


def _print(resource: BaseModel) -> None:
    print(resource.model_dump_json(indent=2))


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
