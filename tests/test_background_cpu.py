"""Uploads' image work runs at a lower scheduling priority than the event loop
(`service.background_cpu`)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from service.background_cpu import NICENESS, at_low_priority
from service.problems import Problem


def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="nice values are per thread on Linux")
def test_the_work_runs_nicer_and_the_caller_keeps_its_priority() -> None:
    before = _niceness()
    assert at_low_priority(_niceness) == max(before, NICENESS)
    assert _niceness() == before


def test_answers_and_errors_come_back_to_the_caller() -> None:
    assert at_low_priority(lambda a, *, b: a + b, 2, b=3) == 5

    def refuse() -> None:
        raise Problem(422, "not a shot")

    with pytest.raises(Problem, match="not a shot"):
        at_low_priority(refuse)
