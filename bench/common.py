"""What every benchmark shares: options, model loading, interleaved timing, memory, results file.

Timings are only ever compared within one run: variants are warmed up, then run in interleaved
rounds (A B, B A, A B, …) so that drift in machine load lands on all of them alike; each is
summarized by its median time, and two variants by the median of their per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import diffusers
import torch

from aligndiff.models.diffusion import DiffusionModel, load_diffusion_model
from aligndiff.settings import TINY, Settings
from aligndiff.synth import SynthConfig
from bench.sd15 import build_sd15

# The class the benchmarks synthesize, and its real shots (the project's shared fixtures).
CLASS_NAME = "dog"
SHOTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "shots" / CLASS_NAME
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
RESULTS_TITLE = "# Benchmark results"
RESULTS_PREAMBLE = (
    "Written by the scripts in `bench/` (`record_results`); each section is replaced when its "
    "command runs again. Ratios are measured side by side in one run; absolute times depend "
    "on the machine and its load."
)

T = TypeVar("T")


# Options and models


def benchmark_parser(
    description: str, *, steps: int | None, repeats: int, shots: bool = False
) -> argparse.ArgumentParser:
    """The options every benchmark takes; defaults: tiny models on the CPU in float32.

    `shots`: also a `--shots` folder option (default: the shared dog fixture).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--full",
        action="store_true",
        help="SD 1.5 shapes with random weights (for a GPU) instead of the tiny models",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    parser.add_argument(
        "--steps", type=int, default=steps, help=f"default: {steps or 'the configured default'}"
    )
    parser.add_argument(
        "--repeats", type=int, default=repeats, help=f"timed rounds (default: {repeats})"
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="pixels (default: the model's native size)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: 1 on a CPU device, else torch's default)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the tiny models are cached (default: ALIGNDIFF_MODEL_CACHE_DIR)",
    )
    if shots:
        parser.add_argument(
            "--shots", type=Path, default=SHOTS_DIR, help=f"{CLASS_NAME} shots folder"
        )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS_PATH,
        help="markdown file the results section is written to",
    )
    return parser


def with_run_options(config: SynthConfig, args: argparse.Namespace) -> SynthConfig:
    """`config` with the run's `--inversion-steps`, `--steps` (sampling) and `--resolution`."""
    return replace(
        config,
        inversion=replace(config.inversion, steps=args.inversion_steps, resolution=args.resolution),
        sampling=replace(
            config.sampling,
            num_steps=args.steps or config.sampling.num_steps,
            resolution=args.resolution,
        ),
    )


def set_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from `--threads` (default: 1 on a CPU device)."""
    # NOTE: on a CPU shared with other work, two OpenMP threads stall whenever another
    # process holds one of the cores (a barrier waits for the descheduled thread): single
    # calls then take 10-20x longer, at random. One thread slows down at most 2x under the same
    # load, which keeps the side-by-side ratios stable; `--threads 2` measures both cores.
    threads = args.threads or (1 if torch.device(args.device).type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)


def load_model(args: argparse.Namespace) -> DiffusionModel:
    """The diffusion model under test (tiny, or SD 1.5 shapes with `--full`); sets threads."""
    set_threads(args)
    if args.full:
        return build_sd15(device=args.device, dtype=args.dtype)
    return load_diffusion_model(
        TINY, device=args.device, dtype=args.dtype, cache_dir=model_cache_dir(args)
    )


def model_cache_dir(args: argparse.Namespace) -> Path:
    return args.cache_dir or Settings().model_cache_dir


def setup_label(args: argparse.Namespace, model: DiffusionModel) -> str:
    """E.g. "tiny, 128 px, cpu (1 thread), float32": what a section was measured on."""
    models = "SD 1.5 shapes, random weights" if args.full else "tiny"
    resolution = args.resolution or model.default_resolution
    dtype = str(model.dtype).removeprefix("torch.")
    device = model.device.type
    if device == "cpu":
        device = f"cpu ({plural(torch.get_num_threads(), 'thread')})"
    return f"{models}, {resolution} px, {device}, {dtype}"


# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    """`fn` as a function returning its wall-clock seconds (device work included)."""

    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    return run


def run_interleaved(
    variants: Mapping[str, Callable[[], T]], *, repeats: int, warmup: int = 1
) -> dict[str, list[T]]:
    """Call each variant `warmup` times, then `repeats` rounds of all; each round's results.

    Rounds alternate the order (A B C, C B A, A B C, …) so that a linear drift in machine
    load cancels out between variants rather than favouring the one that runs first.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    results: dict[str, list[T]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            results[name].append(variants[name]())
    return results


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


@dataclass(frozen=True)
class Ratio:
    """A ratio of two variants: the median of their per-round ratios, with its quartiles.

    Each round's two timings were taken moments apart, so their ratio cancels load that
    drifts between rounds; the median then discards the rounds a burst of load hit unevenly.
    """

    median: float
    low: float
    high: float

    @classmethod
    def paired(cls, numerators: Sequence[float], denominators: Sequence[float]) -> Ratio:
        ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
        if len(ratios) < 2:
            return cls(ratios[0], ratios[0], ratios[0])
        low, mid, high = statistics.quantiles(ratios, n=4, method="inclusive")
        return cls(mid, low, high)

    def __str__(self) -> str:
        return f"{self.median:.3f} (IQR {self.low:.3f}–{self.high:.3f})"


def verdict(ok: bool) -> str:
    return "met" if ok else "not met"


class StepClock:
    """Timestamps taken at each progress callback: the duration of every step after the first.

    The first callback only marks a start, so one-time work before the first step (encoding,
    model warm-up) never counts.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, *_: object) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    @property
    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


# Memory


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of memory the tensors keep alive: each underlying storage counted once.

    A view (a slice of a larger result) keeps its whole storage alive, so it counts in full.
    """
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


@contextmanager
def cuda_peak_memory(device: torch.device) -> Iterator[list[int]]:
    """Peak CUDA memory allocated by a block above what was allocated at its start.

    Yields a list that holds the figure (bytes) once the block ends; it stays empty off CUDA,
    where benchmarks report the bytes their tensors hold instead (`held_bytes`): a process's
    max-RSS high-water mark only moves on a new high and mostly shows allocator caching.
    """
    peak: list[int] = []
    if device.type != "cuda":
        yield peak
        return
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        yield peak
    finally:
        synchronize(device)
        peak.append(torch.cuda.max_memory_allocated(device) - before)


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# Results file


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command line this process was started with, as typed (interpreter included)."""
    return shlex.join(sys.orig_argv)


def machine_description(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    cpu = _cpu_model() or platform.processor() or platform.machine()
    parts = [
        f"{os.cpu_count()} CPU cores ({cpu}), {plural(torch.get_num_threads(), 'torch thread')}",
        f"torch {torch.__version__}, diffusers {diffusers.__version__}",
        f"Python {platform.python_version()} on {platform.system()}",
    ]
    if device.type == "cuda":
        parts.append(f"device {device} = {torch.cuda.get_device_name(device)}")
    else:
        parts.append(f"device {device}")
    return "; ".join(parts)


def _cpu_model() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else None


def record_results(
    section: str,
    command: str,
    markdown_table: str,
    *,
    device: torch.device | str = "cpu",
    notes: str = "",
    path: Path = RESULTS_PATH,
) -> None:
    """Write `section` (heading, command, date, machine, table, notes) into the results file.

    A section with the same heading is replaced in place; a new one is appended.
    """
    body = [
        f"## {section}",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"Machine: {machine_description(device)}",
        "",
        markdown_table.strip(),
    ]
    if notes.strip():
        body += ["", notes.strip()]
    new_section = "\n".join(body) + "\n"

    sections: list[str] = []
    if path.exists():
        text = path.read_text(encoding="utf-8")
        # Split before every level-2 heading; the part before the first one is the preamble.
        sections = re.split(r"(?m)^(?=## )", text)[1:]
    heading = f"## {section}\n"
    if any(s.startswith(heading) for s in sections):
        sections = [new_section if s.startswith(heading) else s for s in sections]
    else:
        sections.append(new_section)
    parts = [f"{RESULTS_TITLE}\n\n{RESULTS_PREAMBLE}\n"] + [s.rstrip("\n") + "\n" for s in sections]
    path.write_text("\n".join(parts), encoding="utf-8")


def report(
    section: str,
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    args: argparse.Namespace,
    device: torch.device,
    notes: str = "",
) -> None:
    """Print a results table and record it (with this process's command line) in the file."""
    table = markdown_table(headers, [list(row) for row in rows])
    print(f"\n## {section}\n\n{table}\n")
    if notes:
        print(notes + "\n")
    record_results(section, command_line(), table, device=device, notes=notes, path=args.results)
