"""`aligndiff serve`'s start, in an order a user can follow: the port is taken first (a busy
one fails at once, before anything starts), the embedded workers start and print their
banners, the server starts listening, and only then does serve say where it is, last, so that
the URL and a first start's admin key do not scroll away under the workers' output."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import uvicorn

from service.queue import synthesis_queue
from service.settings import Settings
from worker.celery_app import JOBS_QUEUE, PREDICT_QUEUE
from worker.main import worker_hostname

# How long serve waits for its workers to say they are ready before it announces itself
# anyway (they import the ML libraries first, which takes seconds, on a busy machine more).
WORKERS_READY_TIMEOUT = 300.0
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class CannotListen(Exception):
    """The server's address cannot be bound; the message says why and what to do."""


class WorkerExited(Exception):
    """An embedded worker exited before it was ready."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port`, for uvicorn to listen on: binding it before anything
    starts makes a taken port fail at once, and handing it to the server leaves no moment in
    which another process could take the port in between."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise CannotListen(f"cannot listen on {host}:{port}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    # NOTE: as uvicorn does: a port left in TIME_WAIT by a server just stopped is free again.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise CannotListen(
                f"port {port} on {host} is already in use (another server, or another "
                f"aligndiff serve?); choose another port with --port, e.g. --port {port + 1}"
            ) from None
        raise CannotListen(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


def url_of(host: str, port: int) -> str:
    """The URL a browser on this machine opens for a server on `host:port`."""
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(frozen=True)
class WorkerRole:
    """One embedded worker: the model it serves and the queues it consumes (none named: all
    of them, `aligndiff worker`'s default)."""

    model: str
    queues: tuple[str, ...] = ()


def embedded_roles(settings: Settings, *, predictions_apart: bool) -> list[WorkerRole]:
    """serve's workers: the default model's (its classes' synthesis and every training), one
    for predictions alone when `predictions_apart`, and one for each other model of
    `ALIGNDIFF_MODELS`, taking that model's classes alone, so that every class serve accepts
    is drawn. No two consume one queue: the embedded broker (SQLite) cannot hand one queue's
    messages to two consumers safely. A worker loads its model on its first task, so a model
    no class uses costs an idle process."""
    default, *others = settings.served_models
    roles = (
        [WorkerRole(default, (JOBS_QUEUE,)), WorkerRole(default, (PREDICT_QUEUE,))]
        if predictions_apart
        else [WorkerRole(default)]
    )
    return roles + [WorkerRole(name, (synthesis_queue(name),)) for name in others]


def announcement(
    *,
    host: str,
    port: int,
    data_dir: Path,
    admin_key: str | None,
    workers: Sequence[WorkerRole],
) -> list[str]:
    """What serve prints once it is listening: where the API, its docs and the dashboard
    are, and (first start) the admin key, alone on the last line."""
    url = url_of(host, port)
    everywhere = " (listening on every interface)" if host in WILDCARD_HOSTS else ""
    models = list(dict.fromkeys(role.model for role in workers))
    lines = [
        "",
        f"AlignDiff is serving on {url}{everywhere}",
        f"  API docs:   {url}/docs",
        f"  dashboard:  {url}/admin",
        f"  data:       {data_dir}",
        f"  workers:    {len(workers)} embedded" if workers else "  workers:    none embedded",
    ]
    if len(models) > 1:
        lines.append(f"  models:     {', '.join(models)} (the first is the default)")
    if admin_key is None:
        lines.append(
            "Sign in with an admin key (a new one: aligndiff keys create --name NAME --admin)."
        )
    else:
        lines += ["First start: an admin API key was created; it is shown only once:", admin_key]
    return lines


class _Output:
    """serve's own stdout and stderr, written a whole line at a time by any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def write(self, stream: IO[str], data: bytes) -> None:
        with self.lock:
            stream.flush()
            binary = getattr(stream, "buffer", None)
            if binary is not None:
                binary.write(data)
            else:
                stream.write(data.decode(errors="replace"))
            stream.flush()

    def lines(self, lines: Sequence[str]) -> None:
        with self.lock:
            sys.stderr.flush()
            sys.stdout.write("".join(f"{line}\n" for line in lines))
            sys.stdout.flush()


class EmbeddedWorker:
    """`aligndiff worker` in a child process whose output serve passes on to its own, line
    by line, watching for the line that says the worker is ready."""

    def __init__(self, role: WorkerRole, *, env: dict[str, str], output: _Output) -> None:
        command = [sys.executable, "-m", "service.cli", "worker", "--pool", "solo"]
        self.process = subprocess.Popen(
            [*command, f"--model={role.model}", f"--queues={','.join(role.queues)}"],
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        self.ready = threading.Event()
        # Celery logs "<hostname> ready." once the worker consumes its queues.
        self._ready_line = f"{worker_hostname(self.process.pid)} ready.".encode()
        streams = [(self.process.stdout, sys.stdout), (self.process.stderr, sys.stderr)]
        for source, target in streams:
            assert source is not None
            threading.Thread(
                target=self._pass_on, args=(source, target, output), daemon=True
            ).start()

    def _pass_on(self, source: IO[bytes], target: IO[str], output: _Output) -> None:
        for line in iter(source.readline, b""):
            output.write(target, line)
            if line.rstrip().endswith(self._ready_line):
                self.ready.set()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def wait_stopped(self, timeout: float) -> None:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wait_until_ready(workers: Sequence[EmbeddedWorker], timeout: float) -> bool:
    """Wait until every worker is ready (True), or `timeout` passed (False); raises
    `WorkerExited` when one exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers:
            if not worker.ready.is_set() and worker.process.poll() is not None:
                raise WorkerExited(
                    f"an embedded worker exited with status {worker.process.returncode} "
                    "before it was ready; its output is above"
                )
        if all(worker.ready.is_set() for worker in workers):
            return True
        time.sleep(0.1)
    return False


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that calls `on_listening` once its socket listens, before it answers
    a request."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.on_listening()


@dataclass
class Serve:
    """What `aligndiff serve` runs: `app` on `sock`, after a worker for each of `workers`
    (none when empty) is ready."""

    app: Any
    sock: socket.socket
    host: str
    port: int
    data_dir: Path
    admin_key: str | None
    workers: Sequence[WorkerRole]

    def run(self) -> None:
        """Start the workers, wait until they are ready, serve until stopped, then stop them
        (raises `WorkerExited` when a worker dies while starting)."""
        # NOTE: the workers stay in serve's process group (Ctrl-C reaches them) and the kernel
        # signals them when serve dies, however serve dies: uvicorn re-raises SIGTERM on
        # shutdown, so the `finally` below does not run then.
        output = _Output()
        env = {**os.environ, "ALIGNDIFF_DATA_DIR": str(self.data_dir)}
        workers = [EmbeddedWorker(role, env=env, output=output) for role in self.workers]
        try:
            if not wait_until_ready(workers, WORKERS_READY_TIMEOUT):
                output.lines(["serve: the workers are still starting; serving meanwhile"])
            lines = announcement(
                host=self.host,
                port=self.port,
                data_dir=self.data_dir,
                admin_key=self.admin_key,
                workers=self.workers,
            )
            config = uvicorn.Config(self.app, log_level="info")
            _AnnouncingServer(config, lambda: output.lines(lines)).run(sockets=[self.sock])
        finally:
            for worker in workers:
                worker.stop()
            for worker in workers:
                worker.wait_stopped(timeout=20)


def _die_with_parent() -> None:
    """In a child process: ask Linux to send SIGTERM when the parent exits."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
