"""`esm2 serve` with a port already taken (a second `make serve`) stops before it starts
anything, naming the port, the flag and the variable that move it."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from esm2_service.server import serve


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A loopback port a listening socket holds."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture
def serve_never_starts(monkeypatch):
    for name in ("ESM2_PORT", "ESM2_HTTP_PORT", "ESM2_METRICS_PORT", "ESM2_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(serve, "run", lambda args: pytest.fail("esm2 serve started"))


def test_a_busy_metrics_port_is_named_with_its_flag_and_variable(serve_never_starts, capsys):
    with held_port() as port:
        code = serve.main(["--port", "0", "--http-port", "0", "--metrics-port", str(port)])

    assert code == 2
    error = capsys.readouterr().err
    assert f"port {port} (--metrics-port, ESM2_METRICS_PORT)" in error
    assert "another esm2 serve" in error


def test_every_busy_door_is_named(serve_never_starts, capsys):
    with held_port() as grpc_port, held_port() as http_port:
        argv = ["--port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "0"]
        code = serve.main(argv)

    assert code == 2
    error = capsys.readouterr().err
    assert f"port {grpc_port} (--port, ESM2_PORT)" in error
    assert f"port {http_port} (--http-port, ESM2_HTTP_PORT)" in error


@contextlib.contextmanager
def held_port_after_a_free_one() -> Iterator[int]:
    """A held loopback port whose predecessor is free (as far as can be known)."""
    for _ in range(100):
        with held_port() as port:
            if not serve.port_in_use("127.0.0.1", port - 1):
                yield port
                return
    pytest.fail("found no held port after a free one")


def test_a_workers_metrics_port_counts_too(serve_never_starts, capsys):
    with held_port_after_a_free_one() as port:
        argv = ["--port", "0", "--http-port", "0", "--metrics-port", str(port - 1)]
        assert serve.main(argv) == 2
    assert f"port {port} (--metrics-port, ESM2_METRICS_PORT)" in capsys.readouterr().err


def test_a_grpc_server_sharing_its_port_counts_as_busy():
    """gRPC servers set SO_REUSEPORT: a second one would share the port silently."""
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert serve.port_in_use("127.0.0.1", port)
    finally:
        server.stop(None)


def test_a_free_port_is_not_busy():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert not serve.port_in_use("127.0.0.1", port)
