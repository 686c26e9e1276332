"""The `esm2` command line against live processes."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from conftest import ServiceProcesses
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ESM2, esm2, free_ports

from esm2_service.client import Esm2Client
from esm2_service.server.embedded_redis import free_port


def test_predict_and_status_print_json(service):
    result = esm2("predict", "--sequence", "MK<mask>AY", "--target", service.target)
    assert result.returncode == 0, result.stderr
    assert "MK<mask>AY" in result.stdout or "<mask>" in result.stdout
    status = esm2("status", "--target", service.target)
    assert status.returncode == 0
    assert json.loads(status.stdout)["any_random_weights"] is True
    assert "random" in status.stderr.lower()


def test_invalid_input_prints_the_violations_and_exits_2(service):
    result = esm2("predict", "--sequence", "MKAY", "--target", service.target)
    assert result.returncode == 2
    assert "INVALID_ARGUMENT" in result.stderr
    assert "items[0].sequence" in result.stderr and "no <mask>" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_runs_the_whole_service_and_ctrl_c_stops_it_cleanly(tiny_checkpoint, tmp_path):
    port, http_port, metrics_port, *_ = free_ports(2 + 5)  # metrics: 2 frontends, 2 workers, HTTP
    argv = ["serve", "--port", port, "--metrics-port", metrics_port, "--workers", "2"]
    argv += ["--frontends", "2"]
    argv += ["--http-port", http_port, "--weights", tiny_checkpoint]
    target = f"127.0.0.1:{port}"
    with _running_serve(argv) as (process, lines):
        _wait_for_line(
            lines,
            f"esm2 serve: ready to take requests on 127.0.0.1:{port} (gRPC) and "
            f"http://127.0.0.1:{http_port} (HTTP)",
        )
        # Ready means ready: health says SERVING and a request is served at once.
        assert _health(target) == health_pb2.HealthCheckResponse.SERVING
        fasta = tmp_path / "two.fasta"
        fasta.write_text(">a\nMKTAYIAK\n>b\nACDEFG\n")
        result = esm2("encode", fasta, "-o", tmp_path / "two.h5", "--target", target)
        assert result.returncode == 0, result.stderr
        body = json.dumps({"items": [{"sequence": "MKTAYIAK"}]}).encode()
        url = f"http://127.0.0.1:{http_port}/api/v3/esm2-8m/encode/"
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as answer:
            assert json.loads(answer.read())["results"][0]["sequence_index"] == 0
        # Two frontends share the gRPC port, and the kernel spreads connections over them:
        # 24 new connections all reaching one would happen once in 8 million runs.
        assert listening_sockets(port) == 2
        for _ in range(24):
            with Esm2Client(target, timeout_s=60) as client:
                client.encode(["MKTAYIAK"])
        frontend_metrics = (metrics_port, metrics_port + 1 + 2 + 1)
        for metrics in frontend_metrics:
            assert _served_encodes(metrics) >= 1, metrics
        # This machine only: the gRPC and HTTP ports and every metrics port (frontend,
        # two workers, HTTP door, second frontend) listen on loopback.
        ports = (port, http_port, *range(metrics_port, metrics_port + 5))
        for listening_port in ports:
            assert listening_addresses(listening_port) == {"127.0.0.1"}, listening_port
        children = _descendants(process.pid)
        assert len(children) >= 5  # redis-server, two frontends, two workers
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        assert process.wait(timeout=60) == 0
        time.sleep(0.5)
        assert [pid for pid in children if _alive(pid)] == []
    stderr = "".join(lines)
    assert "Traceback" not in stderr
    assert stderr.count("ready to take requests") == 1
    assert "batch of " not in stderr  # per-batch lines are DEBUG


def test_serve_restarts_its_redis_when_it_dies(tiny_checkpoint):
    """kill -9 of the embedded Redis: serve starts an empty one on the same port and says
    the queue went with it; the frontend and worker reconnect without being restarted."""
    port = free_port()
    argv = ["serve", "--port", port, "--metrics-port", 0, "--http-port", 0, "--workers", 1]
    argv += ["--weights", tiny_checkpoint]
    with _running_serve(argv) as (process, lines):
        _wait_for_line(lines, f"ready to take requests on 127.0.0.1:{port}")
        redis_pid = _redis_server_below(process.pid)
        frontend_and_worker = [pid for pid in _descendants(process.pid) if pid != redis_pid]
        os.kill(redis_pid, signal.SIGKILL)
        result = _encode_once_it_answers(f"127.0.0.1:{port}", "MKTAYIAK", within_s=20)
        assert result.embeddings[6].shape == (32,)  # the tiny checkpoint's width
        _wait_for_line(lines, "the embedded Redis (pid", timeout_s=5)
        _wait_for_serving(f"127.0.0.1:{port}", within_s=10)  # the worker's heartbeats resumed
        assert process.poll() is None
        assert _redis_server_below(process.pid) != redis_pid
        assert all(_alive(pid) for pid in frontend_and_worker)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 0
    stderr = "".join(lines)
    warning = next(line for line in stderr.splitlines() if "the embedded Redis (pid" in line)
    assert "WARNING" in warning and "restarted it on port" in warning
    assert "queue was lost" in warning and "UNAVAILABLE" in warning
    assert "Traceback" not in stderr


def _redis_server_below(pid: int) -> int:
    (redis_pid,) = [
        child
        for child in _descendants(pid)
        if Path(f"/proc/{child}/comm").read_text().strip() == "redis-server"
    ]
    return redis_pid


def _encode_once_it_answers(target: str, sequence: str, within_s: float):
    """The first Encode result that `target` serves, retrying UNAVAILABLE (what clients
    get while Redis is away, or when it lost their request) as clients should."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            with Esm2Client(target, timeout_s=10) as client:
                return client.encode([sequence])[0]
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_the_frontend_binds_every_interface_only_when_told(redis_server, tiny_checkpoint):
    for host, expected in (("0.0.0.0", ({"0.0.0.0"}, {"::"})), (None, ({"127.0.0.1"},))):
        server_args = ["--host", host] if host else []
        service = ServiceProcesses(redis_server.url, tiny_checkpoint, 0, server_args)
        try:
            # gRPC binds 0.0.0.0 as the dual-stack wildcard where the machine has IPv6.
            assert listening_addresses(service.port) in expected
        finally:
            service.stop()


@contextlib.contextmanager
def _running_serve(argv: list):
    """`esm2 <argv>` with an embedded Redis of its own, its stderr lines collected; on
    the way out it is killed, children included, if the test left it running."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ESM2_HOST")}
    process = subprocess.Popen(
        [*ESM2, *map(str, argv)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        yield process, lines
    finally:
        if process.poll() is None:
            # On a failure: its children too (each in a session of its own), or they
            # would keep the stderr pipe, and so the reader, open.
            for pid in _descendants(process.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        reader.join(timeout=10)
        if not reader.is_alive():
            process.stderr.close()


def _served_encodes(metrics_port: int) -> float:
    """Encode calls a frontend counted as OK, from its Prometheus endpoint."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("esm2_requests_total{") and "Encode" in line and '"OK"' in line
    )


def listening_sockets(port: int) -> int:
    """TCP sockets listening on `port` (several where processes share it)."""
    return sum(
        1
        for table in ("tcp", "tcp6")
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        if row.split()[3] == "0A" and int(row.split()[1].split(":")[1], 16) == port
    )


def listening_addresses(port: int) -> set[str]:
    """The local addresses of TCP sockets listening on `port`, from /proc/net/tcp{,6}
    (an IPv4-mapped IPv6 address as the IPv4 address it is)."""
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # The kernel prints each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                address = ipaddress.ip_address(socket.inet_ntop(family, words))
                found.add(str(getattr(address, "ipv4_mapped", None) or address))
    return found


def _wait_for_line(lines: list[str], text: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in lines):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no line with {text!r} in: {''.join(lines)}")
        time.sleep(0.05)


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _wait_for_serving(target: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while _health(target) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "health never said SERVING again"
        time.sleep(0.2)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children start their own sessions)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
