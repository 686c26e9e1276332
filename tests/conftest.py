"""Shared fixtures: a real redis-server, random checkpoints, and the service's processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

# The tests run many frontends at once: none serves metrics (default port 9090) unless
# a test gives it a port of its own.
os.environ["ESM2_METRICS_PORT"] = "0"

# The container images' tests build and run images for minutes: `make test-images` only.
collect_ignore = [] if os.environ.get("ESM2_TEST_IMAGES") == "1" else ["images"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from esm2_service.worker.checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", tiny=True, seed=1)


@pytest.fixture(scope="session")
def full_checkpoint(tmp_path_factory) -> Path:
    """A random checkpoint of the real ESM-2 8M shape."""
    from esm2_service.worker.checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "esm2_t6_8M_UR50D.pt", seed=2)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    from esm2_service.server.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    """A client of the session's Redis on database 1 (services use 0), flushed before the test."""
    import redis

    client = redis.Redis.from_url(redis_server.url_for_db(1))
    client.flushdb()
    yield client
    client.close()


class ServiceProcesses:
    """A frontend and workers as real child processes against one Redis."""

    def __init__(
        self,
        redis_url: str,
        weights: Path,
        workers: int = 1,
        server_args=(),
        worker_args=(),
        env=None,
        stderr=None,
    ):
        """`env`: extra environment variables; `stderr`: a file every process logs to."""
        self.env = {**os.environ, "REDIS_URL": redis_url, "ESM2_WEIGHTS": str(weights)}
        self.env.update(env or {})
        self.stderr = stderr
        self.worker_args = list(worker_args)
        self.frontend = self._spawn("esm2_service.server", ["--port", "0", *server_args])
        self.port = self._read_port(self.frontend)
        self.target = f"127.0.0.1:{self.port}"
        self.workers = [self.start_worker(f"test-worker-{i}") for i in range(workers)]

    def _spawn(self, module: str, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )

    def start_worker(self, worker_id: str, extra_args=()) -> subprocess.Popen:
        args = ["--threads", "1", "--worker-id", worker_id, *self.worker_args, *extra_args]
        return self._spawn("esm2_service.worker", args)

    @staticmethod
    def _read_port(process: subprocess.Popen) -> int:
        line = process.stdout.readline()
        if "listening on port" not in line:
            raise RuntimeError(f"frontend did not start: {line!r}")
        return int(line.rsplit(" ", 1)[1])

    def wait_serving(self, timeout_s: float = 60.0, credentials=None) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        channel = (
            grpc.secure_channel(self.target, credentials)
            if credentials is not None
            else grpc.insecure_channel(self.target)
        )
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    status = stub.Check(
                        health_pb2.HealthCheckRequest(service="esm2.v1.Esm2Service"), timeout=1
                    )
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError("the service never reported SERVING")

    def stop(self) -> None:
        for process in [self.frontend, *self.workers]:
            if process.poll() is None:
                process.terminate()
        for process in [self.frontend, *self.workers]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()


@pytest.fixture(scope="module")
def service(redis_server, tiny_checkpoint) -> Iterator[ServiceProcesses]:
    """Frontend + one worker on the tiny random checkpoint, SERVING, on a flushed database 0."""
    import redis

    with redis.Redis.from_url(redis_server.url) as client:
        client.flushdb()
    processes = ServiceProcesses(redis_server.url, tiny_checkpoint)
    try:
        processes.wait_serving()
        yield processes
    finally:
        processes.stop()


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    """fair-esm's ESM2 on the tiny checkpoint."""
    from esm2_service.worker.checkpoint import build_fair_esm_model, load_checkpoint

    return build_fair_esm_model(load_checkpoint(tiny_checkpoint))
