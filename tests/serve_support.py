"""A live `aligndiff serve` as a user runs it: a subprocess on defaults, on loopback with a
free port, its admin key read from stdout; stopped (with its whole process group) at the end."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

START_TIMEOUT = 120


@dataclass
class Server:
    url: str
    admin_key: str
    process: subprocess.Popen[str]
    workdir: Path
    output: deque[str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(
    workdir: Path, model_cache: Path, settings: dict[str, str] | None = None
) -> Iterator[Server]:
    """`aligndiff serve` in `workdir` with no ALIGNDIFF_* setting but the shared model cache
    and `settings` (variable → value)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNDIFF_")}
    env["ALIGNDIFF_MODEL_CACHE_DIR"] = str(model_cache)
    env |= settings or {}
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    key = None
    deadline = time.monotonic() + START_TIMEOUT
    assert process.stdout is not None
    while key is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.fullmatch(r"adk_\S+\n", line):
            key = line.strip()
    url = f"http://127.0.0.1:{port}"
    # NOTE: keep reading serve's output (access logs): a full pipe would block the server.
    output: deque[str] = deque(lines, maxlen=500)
    threading.Thread(target=output.extend, args=(process.stdout,), daemon=True).start()
    try:
        assert key is not None, "serve printed no admin key:\n" + "".join(lines)
        assert any(url in line for line in lines), "serve printed no URL"
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield Server(url=url, admin_key=key, process=process, workdir=workdir, output=output)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
