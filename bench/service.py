"""The service as real processes (Redis, gRPC frontend, workers) and its end-to-end timings."""

from __future__ import annotations

import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from bench.corpus import Corpus
from bench.procfs import cpu_seconds
from bench.timing import Contender, Latency, time_interleaved
from esm2_service.client import Esm2Client

SERVICE_NAME = "esm2.v1.Esm2Service"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
# No metrics port to collide with other servers on the machine; text logs to parse.
CHILD_ENV = {"ESM2_METRICS_PORT": "0", "ESM2_LOG_FORMAT": "text"}
_BATCH_LOG = re.compile(r"batch of (\d+) \((\d+) tokens\) in ([\d.]+) ms")
SHORT_REQUEST_ALLOWANCE_MS = 250.0  # a short request's own batch and round trips
_REQUEST_LOG = re.compile(r"Encode request_id=\S+ items=\d+ done in ([\d.]+) ms")


def _first_line(process: subprocess.Popen, timeout_s: float) -> str:
    """The first stdout line of `process` ('' if it exits first); TimeoutError after `timeout_s`."""
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True)
    reader.start()
    try:
        return lines.get(timeout=timeout_s)
    except queue.Empty:
        raise TimeoutError(f"no output from pid {process.pid} in {timeout_s:g} s") from None


def _stop(process: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S."""
    if process is None:
        return
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout:
        process.stdout.close()


def health_check_call(channel: grpc.Channel) -> Callable[[], object]:
    """One gRPC health check of the frontend: a round trip through gRPC and the
    frontend's event loop with no Redis and no worker, the floor under every request."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    return lambda: stub.Check(request, timeout=10)


class ServiceProcesses:
    """An embedded Redis, the gRPC frontend and workers as child processes.

    Use as a context manager: every process it started is stopped on exit, error or not.
    Each child's stderr (its log) goes to `log_dir/<name>.log`.
    """

    def __init__(self, weights: Path, threads: int, log_dir: Path, worker_args: list[str] = ()):
        self.weights = weights
        self.threads = threads
        self.worker_args = list(worker_args)  # e.g. --device cuda --precision fp16
        self.log_dir = log_dir
        self.redis = None
        self.frontend: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.http: subprocess.Popen | None = None
        self.target = ""
        self._redis_dir = tempfile.TemporaryDirectory(prefix="esm2-bench-redis-")

    def __enter__(self) -> ServiceProcesses:
        try:
            self._start_frontend()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _spawn(self, name: str, module: str, args: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path(name).open("w") as log:
            return subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env={**os.environ, "REDIS_URL": self.redis.local_url, **CHILD_ENV},
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )

    def _start_frontend(self) -> None:
        from esm2_service.server.embedded_redis import EmbeddedRedis

        self.redis = EmbeddedRedis(Path(self._redis_dir.name), unix_socket=True)  # as serve's
        self.frontend = self._spawn("frontend", "esm2_service.server", ["--port", "0"])
        line = _first_line(self.frontend, START_TIMEOUT_S)
        if "listening on port" not in line:
            raise RuntimeError(
                f"frontend did not start ({line!r}); see {self.log_path('frontend')}"
            )
        self.target = f"127.0.0.1:{int(line.rsplit(' ', 1)[1])}"

    def start_worker(self, worker_id: str) -> subprocess.Popen:
        """Starts a worker and returns once it has loaded the model and said 'ready'."""
        args = ["--threads", str(self.threads), "--worker-id", worker_id]
        args += ["--weights", str(self.weights), *self.worker_args]
        args += ["--log-level", "DEBUG"]  # its per-batch lines: worker_busy reads them
        process = self._spawn(worker_id, "esm2_service.worker", args)
        self.workers[worker_id] = process
        line = _first_line(process, START_TIMEOUT_S)
        if "ready" not in line:
            raise RuntimeError(f"worker {worker_id} did not start; see {self.log_path(worker_id)}")
        return process

    def start_http(self) -> str:
        """`esm2 http` over the same Redis; its base URL once it reports ready."""
        import requests

        self.http = self._spawn("http", "esm2_service.server.http_main", ["--port", "0"])
        line = _first_line(self.http, START_TIMEOUT_S)
        if "listening on port" not in line:
            raise RuntimeError(f"esm2 http did not start; see {self.log_path('http')}")
        base = f"http://127.0.0.1:{int(line.rsplit(' ', 1)[1])}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while requests.get(f"{base}/readyz", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("esm2 http never became ready")
            time.sleep(0.1)
        return base

    def pids(self) -> dict[str, int]:
        """Every running process of the benchmark by role, this one ("client") included."""
        found = {"client": os.getpid(), "frontend": self.frontend.pid}
        if self.http is not None:
            found["http"] = self.http.pid
        found["redis-server"] = self.redis.process.pid
        found.update({f"worker {w}": p.pid for w, p in self.workers.items()})
        return found

    def cpu_snapshot(self) -> dict[str, float]:
        """CPU seconds used so far by each process of `pids`."""
        return {role: cpu_seconds(pid) for role, pid in self.pids().items()}

    def stop_worker(self, worker_id: str) -> None:
        _stop(self.workers.pop(worker_id))

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Blocks until gRPC health reports SERVING for the Esm2 service."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        serving = health_pb2.HealthCheckResponse.SERVING
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    if stub.Check(request, timeout=1).status == serving:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"the service never reported SERVING in {timeout_s:g} s")

    def stop(self) -> None:
        """Stops workers, then the frontend, then Redis; safe to call more than once."""
        for worker_id in list(self.workers):
            self.stop_worker(worker_id)
        _stop(self.http)
        self.http = None
        _stop(self.frontend)
        self.frontend = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        self._redis_dir.cleanup()


class LogMarks:
    """The current ends of some log files, to read later only what was logged since."""

    def __init__(self, *paths: Path):
        self.offsets = {path: path.stat().st_size for path in paths}

    def matches(self, path: Path, pattern: re.Pattern) -> list[re.Match]:
        """Matches of `pattern` in the lines `path` got after this mark."""
        time.sleep(0.2)  # a process may log a moment after its reply went out
        with path.open() as log:
            log.seek(self.offsets[path])
            return [match for match in map(pattern.search, log) if match]


class ServicePasses:
    """Encodes of a whole corpus through the service (requests of 8 sent concurrently,
    mean of the last layer), warmed up with one untimed pass; and where the time of
    the timed passes went: the worker's logged batches (see `worker_busy`) and the CPU
    seconds of every process during those passes only."""

    LABEL = "our service e2e: client, gRPC, Redis, 1 worker"

    def __init__(self, service: ServiceProcesses, client: Esm2Client, corpus: Corpus, worker_id):
        self.service = service
        self.client = client
        self.sequences = corpus.sequences
        self.log = service.log_path(worker_id)
        self._encode()
        time.sleep(0.2)  # lets the worker log the warm-up's last batch
        self.marks = LogMarks(self.log)
        self.wall_s = 0.0
        self.cpu_s = dict.fromkeys(service.pids(), 0.0)

    def _encode(self) -> None:
        self.client.encode(self.sequences, include=["mean"], repr_layers=[-1])

    def timed_pass(self) -> None:
        cpu_before, started = self.service.cpu_snapshot(), time.perf_counter()
        self._encode()
        self.wall_s += time.perf_counter() - started
        for role, seconds in self.service.cpu_snapshot().items():
            self.cpu_s[role] += seconds - cpu_before[role]

    def contender(self) -> Contender:
        return Contender(self.LABEL, self.timed_pass, tuple(self.service.pids().values()))

    def profile(self) -> dict:
        profile = worker_busy(self.marks.matches(self.log, _BATCH_LOG))
        profile["wall_s"] = round(self.wall_s, 3)
        profile["busy_share"] = round(profile["busy_ms"] / 1000 / self.wall_s, 3)
        profile["cpu_s"] = {role: round(seconds, 2) for role, seconds in self.cpu_s.items()}
        return profile


ENGINE_LABEL = "engine.run in-process, 1 item"
SERVICE_LABEL = "service Encode end to end, 1 item"


def latency_pair(
    service: ServiceProcesses,
    engine_call: Callable[[], object],
    sequence: str,
    calls: tuple[int, int],
    worker_id: str,
) -> tuple[Latency, Latency, dict]:
    """ms of an in-process `engine_call` and of a one-item service Encode of `sequence`
    (mean, last layer), alternated for `calls` = (warm-up, timed) rounds; and the p50 of
    what the worker (engine plus Redis writes) and the frontend (receipt to last reply)
    logged for the timed service calls."""
    warmup, repeats = calls
    worker_log, frontend_log = service.log_path(worker_id), service.log_path("frontend")
    with Esm2Client(service.target, timeout_s=60) as client:

        def service_call():
            client.encode([sequence], include=["mean"], repr_layers=[-1])

        pair = {ENGINE_LABEL: engine_call, SERVICE_LABEL: service_call}
        for _ in range(warmup):
            engine_call()
            service_call()
        time.sleep(0.2)
        marks = LogMarks(worker_log, frontend_log)
        timed = time_interleaved(pair, repeats, service.pids().values())
    worker_ms = [float(match[3]) for match in marks.matches(worker_log, _BATCH_LOG)]
    frontend_ms = [float(match[1]) for match in marks.matches(frontend_log, _REQUEST_LOG)]
    breakdown = {
        "worker_batch_p50_ms": _median(worker_ms),
        "frontend_request_p50_ms": _median(frontend_ms),
    }
    return timed[ENGINE_LABEL], timed[SERVICE_LABEL], breakdown


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def worker_busy(batch_lines: list[re.Match]) -> dict:
    """Totals of the worker's "batch of N (T tokens) in X ms" lines: batches, items,
    tokens and ms spent (engine plus writing results to Redis)."""
    batches = [(int(m[1]), int(m[2]), float(m[3])) for m in batch_lines]
    return {
        "batches": len(batches),
        "items": sum(items for items, _, _ in batches),
        "tokens": sum(tokens for _, tokens, _ in batches),
        "busy_ms": round(sum(ms for _, _, ms in batches), 1),
    }


def mixed_traffic(
    service: ServiceProcesses,
    short: str,
    long_sequences: list[str],
    calls: int,
    worker_id: str,
) -> dict:
    """Latency of one-item requests of `short` sent while `long_sequences` (in requests
    of 8, all sent at once) wait in the queue: with length lanes each short request
    should wait for at most the batch in progress, not for the backlog. Returns the
    short requests' latencies, the longest batch the worker ran meanwhile and the
    backlog they arrived behind."""
    log = service.log_path(worker_id)
    with Esm2Client(service.target, timeout_s=600) as client:
        client.encode([short], include=["mean"], repr_layers=[-1])  # warm
        marks = LogMarks(log)
        bulk = threading.Thread(
            target=client.encode, args=(long_sequences,), kwargs={"include": ["mean"]}
        )
        bulk.start()
        while client.status().queue_depth < len(long_sequences) // 2:
            time.sleep(0.01)
        backlog = client.status().queue_depth
        milliseconds = []
        for _ in range(calls):
            started = time.perf_counter()
            client.encode([short], include=["mean"], repr_layers=[-1])
            milliseconds.append(1000 * (time.perf_counter() - started))
        behind = client.status().queue_depth
        bulk.join()
    batches_ms = [float(match[3]) for match in marks.matches(log, _BATCH_LOG)]
    # At most the batch in progress, then its own: a short batch, plus the round trips.
    allowed_ms = max(batches_ms) + SHORT_REQUEST_ALLOWANCE_MS
    return {
        "short_residues": len(short),
        "long_items": len(long_sequences),
        "long_residues": len(long_sequences[0]),
        "backlog_at_first_call": backlog,
        "backlog_after_last_call": behind,
        "short_ms": [round(ms, 1) for ms in milliseconds],
        "short_p50_ms": round(statistics.median(milliseconds), 1),
        "short_max_ms": round(max(milliseconds), 1),
        "longest_batch_ms": round(max(batches_ms), 1),
        "allowed_ms": round(allowed_ms, 1),
        "pass": max(milliseconds) <= allowed_ms,
    }
