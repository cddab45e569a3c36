"""`aligndiff-client`: the SDK's main calls from a shell.

Resources are printed to stdout as JSON (for `jq`); progress bars, errors and the summary of a
finished training's metrics go to stderr. `report` prints a summary for people to stdout (the
report as JSON with `--json`). An error is one line, `aligndiff-client: error: …`,
and a non-zero exit status (1; 2 for a wrong command line; 130 when interrupted).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
from pydantic import BaseModel

from aligndiff_client._version import __version__
from aligndiff_client.client import DEFAULT_NUM_SAMPLES, Client
from aligndiff_client.errors import AlignDiffError
from aligndiff_client.models import AcceptedCount, ClassReport, Histogram, TrainingMetrics
from aligndiff_client.shots import shot_files

PROG = "aligndiff-client"
DEFAULT_URL = "http://127.0.0.1:8000"
FORMATS = ("voc", "coco", "hf", "webdataset")
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
    )
    if args.wait:
        created = client.wait(created.id, timeout=args.timeout, progress=not _quiet(args))
    _print(created)


def _status(client: Client, args: argparse.Namespace) -> None:
    _print(client.get_class(args.class_id))


def _download(client: Client, args: argparse.Namespace) -> None:
    path = client.download_dataset(
        args.class_id,
        args.format,
        args.out,
        accepted_only=not args.all,
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
        "--prompt",
        action="append",
        metavar="P",
        help="a text prompt mentioning the class name (repeatable)",
    )
    _wait_options(create, "wait until the synthesis ends; print the final class")
    create.set_defaults(run=_create)

    status = commands.add_parser(
        "status",
        parents=[common],
        help="show a class and its progress",
        description="Print a class, with its status, stage and progress, as JSON.",
    )
    status.add_argument("class_id", metavar="CLASS_ID")
    status.set_defaults(run=_status)

    dl = commands.add_parser(
        "download",
        parents=[common],
        help="download a class's dataset archive",
        description="Download a class's dataset (zip; tar for webdataset), resuming an "
        "interrupted download of the same archive; print the archive's path.",
    )
    dl.add_argument("class_id", metavar="CLASS_ID")
    dl.add_argument("--format", choices=FORMATS, default="voc", help="default: voc")
    dl.add_argument("--out", type=Path, metavar="PATH", help="default: <CLASS_ID>-<FORMAT>.zip|tar")
    dl.add_argument(
        "--all", action="store_true", help="include samples the OOD filter did not accept"
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
    _wait_options(train, "wait until the training ends; print the final training")
    train.set_defaults(run=_train)
    return parser


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
