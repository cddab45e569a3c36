"""Servers of a fault test's own, which it may stop and start at will: a private Redis, a
private PostgreSQL cluster, an S3 endpoint (moto) behind a proxy that can cut it off, and the
API served over real HTTP from a thread. The machine's shared servers are never touched.

Every helper is a context manager (or has `close`) that stops what it started.
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def wait_until(check: object, *, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `check()` until it is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def require_tool(name: str, *, package: str) -> str:
    """The path of the system tool `name`. Missing, the test fails as root (`./dev test`
    installs Debian's `package`, and CI runs as root) and is skipped otherwise, saying why."""
    import pytest

    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed: apt-get install {package} (./dev test does, as root)"
    if os.geteuid() == 0:
        pytest.fail(message)
    pytest.skip(message)


def _answers(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class PrivateRedis:
    """A redis-server on a free loopback port that keeps nothing on disk: stopping it loses
    every message, the harshest outage a broker can have."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(lambda: _answers(self.port), timeout=10, what="the private redis")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    @classmethod
    @contextmanager
    def running(cls, folder: Path) -> Iterator[PrivateRedis]:
        redis = cls(folder)
        redis.start()
        try:
            yield redis
        finally:
            redis.stop()


class PrivatePostgres:
    """A PostgreSQL cluster of its own in a temporary folder, on a free loopback port."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="aligndiff-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        # NOTE: PostgreSQL refuses to run as root; as root, run it as the postgres user.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.folder, "postgres")
        self._pg(["initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-N"])

    def _pg(self, command: list[str]) -> None:
        subprocess.run(
            [*self._as, str(PG_BIN / command[0]), *command[1:]],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def _ctl(self, action: str) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg(["pg_ctl", "-D", str(self.data), "-o", options, "-m", "fast", "-w",
                  "-l", str(self.folder / "server.log"), action])  # fmt: skip

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        self._ctl("stop")

    def close(self) -> None:
        with suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    @classmethod
    @contextmanager
    def running(cls) -> Iterator[PrivatePostgres]:
        postgres = cls()
        try:
            postgres.start()
            yield postgres
        finally:
            postgres.close()


class CuttableProxy:
    """A TCP proxy on a free port of `host` (loopback by default) to `target_port` on
    loopback. `cut()` closes the listener and every open connection (the endpoint is
    unreachable: connections are refused); `restore()` listens again on the same port.
    `cut_after(n, b"PUT ")` cuts it as the (n+1)-th HTTP request of that method arrives,
    before passing it on: an outage in the middle of work. With `unix` (a path), it listens
    on that Unix socket instead, which a process in another network namespace reaches too."""

    def __init__(
        self, target_port: int, *, host: str = "127.0.0.1", unix: Path | None = None
    ) -> None:
        self.target_port = target_port
        self.host = host
        self.unix = unix
        self.port = 0  # the first listener's, kept by `restore`
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut_after: tuple[int, bytes] | None = None
        self.requests_seen = 0
        self.restore()

    def cut_after(self, requests: int, method: bytes) -> None:
        with self._lock:
            self.requests_seen = 0
            self._cut_after = (requests, method)

    def _passes(self, data: bytes) -> bool:
        """Whether a chunk from a client may go on (False: the proxy was cut for it)."""
        with self._lock:
            rule = self._cut_after
            if rule is None or not data.startswith(rule[1]):
                return True
            self.requests_seen += 1
            if self.requests_seen <= rule[0]:
                return True
            self._cut_after = None
        self.cut()
        return False

    def restore(self) -> None:
        if self.unix is not None:
            listener = socket.socket(socket.AF_UNIX)
            self.unix.unlink(missing_ok=True)
            listener.bind(str(self.unix))
        else:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            self.port = listener.getsockname()[1]
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, []
        if listener is not None:
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for connection in connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._connections += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        try:
            while True:
                for key, _ in selector.select(timeout=1):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data or (key.fileobj is client and not self._passes(data)):
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            for end in (client, upstream):
                with suppress(OSError):
                    end.close()


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in a process of its own on a free loopback port; yields its URL.
    The caller sets dummy AWS credentials in the environment (see `aws_credentials`)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _answers(port), timeout=30, what="the moto server")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(timeout=10)


AWS_TEST_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


class ServedApi:
    """An app served by uvicorn over real HTTP on a free loopback port, from a thread."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=20, what="the API to serve")

    def client(self, key: str, *, timeout: float = 30) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    @classmethod
    @contextmanager
    def serving(cls, app: FastAPI) -> Iterator[ServedApi]:
        served = cls(app)
        try:
            yield served
        finally:
            served.close()
