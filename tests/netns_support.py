"""Hosts of a fault test's own on this machine: each a network namespace with a hostname of its
own (a UTS namespace), joined to this namespace by a veth pair. PostgreSQL, Redis and the S3
endpoint stay here on loopback; a host reaches each through a TCP proxy listening on this end
of its pair. Cutting the link takes this end down: packets are dropped both ways, as in a
network partition, and open connections stall until it is healed.

The hosts' addresses exist only on the pairs the test creates (10.231.x.y/30), and `close`
removes them with the namespace, so no traffic leaves the machine. Needs root (and Debian's
iproute2 and util-linux)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.fault_support import CuttableProxy, require_tool
from tests.worker_support import WorkerProcess

_numbers = itertools.count()
REPOSITORY = Path(__file__).resolve().parents[1]


def require_namespaces() -> None:
    """Skip unless this test can create network namespaces (root, with `ip` and `unshare`)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs the tests as root)")
    require_tool("ip", package="iproute2")
    require_tool("unshare", package="util-linux")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Host:
    """A network namespace named after this process and `name`, with one veth pair to this
    namespace: `outer` here (address .1 of its /30), the host's end inside (.2)."""

    def __init__(self, name: str) -> None:
        number = next(_numbers)
        tag = f"{os.getpid() % 100000}{number}"
        self.name = name
        self.netns = f"aligndiff-{tag}-{name}"[:40]
        self.outer = f"adv{tag}o"[:15]
        inner = f"adv{tag}i"[:15]
        base = 4 * (number % 64)
        subnet = f"10.231.{os.getpid() % 250}"
        self.address = f"{subnet}.{base + 1}"  # this end: where the proxies listen
        self.inner_address = f"{subnet}.{base + 2}"
        self.proxies: list[CuttableProxy] = []
        _ip("netns", "add", self.netns)
        try:
            _ip("link", "add", self.outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", self.netns)
            _ip("addr", "add", f"{self.address}/30", "dev", self.outer)
            _ip("link", "set", self.outer, "up")
            inside = ("netns", "exec", self.netns, "ip")
            _ip(*inside, "addr", "add", f"{self.inner_address}/30", "dev", inner)
            _ip(*inside, "link", "set", inner, "up")
            _ip(*inside, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def reach(self, url: str) -> str:
        """`url` (a server on this machine's loopback) as this host reaches it: through a
        proxy on this end of its link."""
        parts = urlsplit(url)
        if parts.port is None:
            raise ValueError(f"{url} names no port")
        proxy = CuttableProxy(parts.port, host=self.address)
        self.proxies.append(proxy)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@" if credentials else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}{self.address}:{proxy.port}"))

    def cut(self) -> None:
        """Partition the host: its link goes down, and every packet to or from it is lost."""
        _ip("link", "set", self.outer, "down")

    def heal(self) -> None:
        _ip("link", "set", self.outer, "up")

    def command(self, argv: Sequence[str], *, hostname: str) -> list[str]:
        """`argv` run on this host: in its network namespace, with `hostname` as its own."""
        script = 'hostname "$0" && exec "$@"'
        return [
            "ip", "netns", "exec", self.netns,
            "unshare", "--uts", "--", "sh", "-c", script, hostname, *argv,
        ]  # fmt: skip

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        with suppress(subprocess.CalledProcessError):
            _ip("netns", "delete", self.netns)  # its end of the pair, and so the pair, go too
        with suppress(subprocess.CalledProcessError):
            _ip("link", "delete", self.outer)


@contextmanager
def hosts(*names: str) -> Iterator[list[Host]]:
    """Hosts of these names, removed afterwards whatever happens."""
    made: list[Host] = []
    try:
        for name in names:
            made.append(Host(name))
        yield made
    finally:
        for host in made:
            host.close()


class HostedWorker(WorkerProcess):
    """`aligndiff worker` (the real worker command, solo pool) on `host`, named `hostname`,
    logging to `log`; `prefix` runs it under another command (e.g. faketime)."""

    def __init__(
        self,
        host: Host,
        env: dict[str, str],
        log: Path,
        *,
        hostname: str,
        queues: str = "",
        prefix: Sequence[str] = (),
    ) -> None:
        self.host, self.hostname, self.log = host, hostname, log
        self._log_handle = log.open("ab")
        aligndiff = str(Path(sys.executable).parent / "aligndiff")
        argv = [*prefix, aligndiff, "worker", "--pool=solo", "--loglevel=info"]
        if queues:
            argv.append(f"--queues={queues}")
        self.process = subprocess.Popen(
            host.command(argv, hostname=hostname),
            env=env,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPOSITORY,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        return " ready." in self.text()


class HostedApi(WorkerProcess):
    """The API (uvicorn serving `service.app:create_app`, its settings from `env`) on `host`,
    answering HTTP on the Unix socket `socket_path`: a socket file is outside every network
    namespace, so clients here reach the API whatever becomes of its host's link."""

    def __init__(self, host: Host, env: dict[str, str], log: Path, *, socket_path: Path) -> None:
        self.host, self.log, self.socket_path = host, log, socket_path
        self._log_handle = log.open("ab")
        argv = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
                "--uds", str(socket_path), "--log-level", "warning"]  # fmt: skip
        self.process = subprocess.Popen(
            host.command(argv, hostname="api"),
            env=env,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPOSITORY,
        )

    def client(self, key: str | None, *, timeout: float) -> httpx.Client:
        """A client of the API as `key` (None: anonymous), waiting `timeout` seconds at most
        for an answer."""
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)),
            base_url="http://api",
            headers={} if key is None else {"Authorization": f"Bearer {key}"},
            timeout=timeout,
        )

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the API exited:\n{self.log.read_text(errors='replace')}")
        if not self.socket_path.exists():
            return False
        with suppress(httpx.HTTPError), self.client(None, timeout=5) as client:
            return client.get("/healthz").status_code == 200
        return False
