"""CPU-heavy work of a request (decoding and encoding uploaded images) at a lower scheduling
priority than the rest of the API process.

An upload decodes its shots and encodes them as PNG for tens of milliseconds of CPU, mostly
in C code that runs beside the event loop's thread. On a busy machine those threads took the
cores from the event loop, and every read in flight waited (bench/RESULTS.md, mixed load).
Here the work runs on threads of their own with a higher nice value (Linux's nice is per
thread): the kernel gives the event loop's thread the cores first, and uploads take what is
left. Where the nice value cannot be set, the work runs as before.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

log = logging.getLogger(__name__)

# Nice 10 weighs about a tenth of nice 0 in the kernel's fair scheduler.
NICENESS = 10

P = ParamSpec("P")
R = TypeVar("R")


def _lower_priority() -> None:
    thread = threading.get_native_id()
    try:
        # Never higher than the process was started at (`nice -n 15 aligndiff serve`).
        niceness = max(NICENESS, os.getpriority(os.PRIO_PROCESS, thread))
        os.setpriority(os.PRIO_PROCESS, thread, niceness)
    except (OSError, AttributeError) as error:  # not Linux, or not allowed
        log.debug("background CPU work runs at normal priority: %s", error)


_EXECUTOR = ThreadPoolExecutor(
    max_workers=max(2, os.cpu_count() or 1),
    thread_name_prefix="aligndiff-background-cpu",
    initializer=_lower_priority,
)


def at_low_priority(function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`function(*args, **kwargs)` on a low-priority thread; blocks the caller (a worker
    thread of the API's pool, never the event loop) until it returns or raises."""
    return _EXECUTOR.submit(function, *args, **kwargs).result()
