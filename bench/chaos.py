"""Chaos run: steady load on real processes while workers die, restart gracefully,
Redis goes away, the frontend restarts, the queue overflows and deadlines expire.

`python -m bench.chaos [--seconds 30]` prints what happened to every request:
completed correctly, failed with the right status, lost (must be 0) and duplicated
(must be 0). The test suite runs a short version (tests/integration/test_chaos.py).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from esm2_service.alphabet import token_ids
from esm2_service.client.rich_errors import cancelled_unseen
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc
from esm2_service.server.embedded_redis import EmbeddedRedis, free_port

# What a request may end with, other than success, while faults are injected.
EXPECTED_FAILURES = {
    grpc.StatusCode.UNAVAILABLE,  # Redis or the frontend away
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # queue full
    grpc.StatusCode.DEADLINE_EXCEEDED,  # only for requests sent with a short deadline
    grpc.StatusCode.CANCELLED,  # only before the service took it (rich_errors.cancelled_unseen)
}
AMINO = "ACDEFGHIKLMNPQRSTVWY"


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    failed_right: Counter = field(default_factory=Counter)
    lost: list = field(default_factory=list)  # (reason, detail)
    duplicated: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> str:
        failed = sum(self.failed_right.values())
        codes = ", ".join(
            f"{code.name} {n}" for code, n in sorted(self.failed_right.items(), key=str)
        )
        lines = [
            f"requests sent                 {self.sent}",
            f"completed correctly           {self.completed}",
            f"failed with the right status  {failed} ({codes or 'none'})",
            f"lost                          {len(self.lost)}",
            f"duplicated                    {self.duplicated}",
        ]
        lines += [f"  lost: {reason}: {detail}" for reason, detail in self.lost[:10]]
        return "\n".join(lines)


class Cluster:
    """Redis, a frontend and workers as real processes, restartable one by one."""

    def __init__(self, workdir: Path, weights: Path, workers: int, max_queue_items: int):
        self.workdir, self.weights, self.max_queue_items = workdir, weights, max_queue_items
        self.redis = EmbeddedRedis(workdir)
        self.port = free_port()
        self.env = {**os.environ, "REDIS_URL": self.redis.url, "ESM2_WEIGHTS": str(weights)}
        self.frontend = self.start_frontend()
        self.workers = [self.start_worker(i) for i in range(workers)]

    def _spawn(self, module: str, args: list[str]) -> subprocess.Popen:
        with open(
            self.workdir / f"{module.rsplit('.', 1)[1]}.log", "a"
        ) as log:  # the child keeps it
            return subprocess.Popen(
                [sys.executable, "-m", module, *args], env=self.env, stdout=log, stderr=log
            )

    def start_frontend(self) -> subprocess.Popen:
        args = ["--port", str(self.port), "--max-queue-items", str(self.max_queue_items)]
        return self._spawn("esm2_service.server", args)

    def start_worker(self, index: int) -> subprocess.Popen:
        args = [
            "--threads",
            "1",
            "--worker-id",
            f"chaos-{index}-{time.monotonic_ns()}",
            "--claim-idle-s",
            "5",
        ]
        return self._spawn("esm2_service.worker", args)

    def stop(self) -> None:
        for process in [self.frontend, *self.workers]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [self.frontend, *self.workers]:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        self.redis.stop()


def run_faults(cluster: Cluster, seconds: float, stop: threading.Event, events: list[str]) -> None:
    """Injects one fault every `seconds / 6`, in the order of the issue's list."""
    step = seconds / 6

    def at(n: int) -> bool:
        return not stop.wait(step) if n else True

    faults = [
        (
            "kill -9 a worker mid-batch, start a new one",
            lambda: _kill_worker(cluster, 0, signal.SIGKILL),
        ),
        (
            "SIGTERM a worker (rolling restart), start a new one",
            lambda: _kill_worker(cluster, 1, signal.SIGTERM),
        ),
        ("stop Redis for 2 s, restart it empty", lambda: _bounce_redis(cluster)),
        (
            "SIGTERM the frontend (rolling restart), start a new one",
            lambda: _restart_frontend(cluster),
        ),
    ]
    for n, (name, fault) in enumerate(faults, start=1):
        if not at(n):
            return
        events.append(f"t+{n * step:4.1f}s {name}")
        fault()


def _kill_worker(cluster: Cluster, index: int, signum: int) -> None:
    old = cluster.workers[index]
    old.send_signal(signum)
    old.wait(timeout=120)
    cluster.workers[index] = cluster.start_worker(index)


def _bounce_redis(cluster: Cluster) -> None:
    cluster.redis.stop()
    time.sleep(2)
    cluster.redis.__init__(cluster.workdir, port=cluster.redis.port)


def _restart_frontend(cluster: Cluster) -> None:
    cluster.frontend.send_signal(signal.SIGTERM)
    cluster.frontend.wait(timeout=60)
    cluster.frontend = cluster.start_frontend()


def client_loop(target: str, seed: int, stop: threading.Event, tally: Tally, reference) -> None:
    """Sends requests one after another until `stop`, checking every answer."""
    rng = random.Random(seed)
    with grpc.insecure_channel(target) as channel:
        stub = esm2_pb2_grpc.Esm2ServiceStub(channel)
        while not stop.is_set():
            sequences = [
                "".join(rng.choices(AMINO, k=rng.randint(20, 300)))
                for _ in range(rng.randint(1, 8))
            ]
            short_deadline = rng.random() < 0.1
            request = pb.EncodeRequest(items=[pb.Item(sequence=s) for s in sequences])
            with tally.lock:
                tally.sent += 1
            try:
                messages = list(stub.Encode(request, timeout=0.3 if short_deadline else 90))
            except grpc.RpcError as error:
                _record_failure(tally, error, short_deadline)
                time.sleep(0.2)  # a client backing off before it retries
                continue
            _check(messages, sequences, tally, reference)


def _record_failure(tally: Tally, error: grpc.RpcError, short_deadline: bool) -> None:
    code = error.code()
    right = code in EXPECTED_FAILURES
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        right = short_deadline
    elif code == grpc.StatusCode.CANCELLED:  # the frontend restarting as the call arrived
        right = cancelled_unseen(error)
    with tally.lock:
        if right:
            tally.failed_right[code] += 1
        else:
            tally.lost.append((code.name, error.details()))


def _check(messages, sequences, tally: Tally, reference) -> None:
    keys = [
        (m.sequence_index,)
        if m.HasField("complete")
        else (m.sequence_index, m.chunk.kind, m.chunk.offset)
        for m in messages
    ]
    duplicates = len(keys) - len(set(keys))
    means = {
        m.sequence_index: np.frombuffer(m.chunk.tensor.data, np.float32)
        for m in messages
        if m.HasField("chunk")
    }
    complete = {k[0] for k in keys if len(k) == 1}
    wrong = [
        i
        for i, s in enumerate(sequences)
        if i not in means or np.abs(means[i] - reference(s)).max() > 1e-4
    ]
    with tally.lock:
        tally.duplicated += duplicates
        if complete != set(range(len(sequences))) or wrong:
            tally.lost.append(
                ("incomplete or wrong", f"complete {sorted(complete)}, wrong {wrong}")
            )
        else:
            tally.completed += 1


def make_reference(weights: Path):
    """Mean last-layer embedding of one sequence, computed in this process."""
    from esm2_service.worker.checkpoint import load_checkpoint
    from esm2_service.worker.engine import Engine
    from esm2_service.worker.model import Esm2
    from esm2_service.worker.work import WorkItem

    engine = Engine(Esm2.from_checkpoint(load_checkpoint(weights)))
    lock = threading.Lock()

    def reference(sequence: str) -> np.ndarray:
        found = []
        item = WorkItem(token_ids(sequence), frozenset([pb.INCLUDE_MEAN]), (6,))
        with lock:
            engine.run([item], lambda output: found.append(np.frombuffer(output.data, np.float32)))
        return found[0]

    return reference


def chaos_run(
    weights: Path, seconds: float = 30.0, clients: int = 6, max_queue_items: int = 24
) -> Tally:
    """Runs the whole scenario; returns the tally (also printed)."""
    tally, events, stop = Tally(), [], threading.Event()
    reference = make_reference(weights)
    with tempfile.TemporaryDirectory(prefix="esm2-chaos-") as workdir:
        cluster = Cluster(Path(workdir), weights, workers=2, max_queue_items=max_queue_items)
        try:
            _wait_serving(f"127.0.0.1:{cluster.port}")
            threads = [
                threading.Thread(
                    target=client_loop,
                    args=(f"127.0.0.1:{cluster.port}", seed, stop, tally, reference),
                )
                for seed in range(clients)
            ]
            for thread in threads:
                thread.start()
            run_faults(cluster, seconds, stop, events)
            stop.wait(seconds / 6)
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
        finally:
            stop.set()
            cluster.stop()
    print("\n".join(events))
    print(tally.summary())
    return tally


def _wait_serving(target: str, timeout_s: float = 60) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        while time.monotonic() < deadline:
            try:
                check = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                if check.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError("the service never reported SERVING")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--weights", type=Path, help="a checkpoint (default: a random 8M one)")
    args = parser.parse_args()
    weights = args.weights
    if weights is None:
        from esm2_service.worker.checkpoint import make_random_checkpoint

        weights = Path(".cache/chaos/esm2_t6_8M_UR50D.pt")
        if not weights.exists():
            make_random_checkpoint(weights)
    tally = chaos_run(weights, args.seconds, args.clients)
    return 0 if not tally.lost and not tally.duplicated else 1


if __name__ == "__main__":
    sys.exit(main())
