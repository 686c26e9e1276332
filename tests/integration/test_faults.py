"""Faults against real processes: a worker killed mid-batch, Redis going away and
coming back, a full queue, deadlines, cancellation and graceful shutdown."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import redis
from conftest import ServiceProcesses
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from queue_helpers import pending_count, queue_length
from support import assert_close

from esm2_service import queue
from esm2_service.alphabet import token_ids
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc
from esm2_service.server.embedded_redis import EmbeddedRedis
from esm2_service.worker.checkpoint import load_checkpoint
from esm2_service.worker.engine import Engine
from esm2_service.worker.model import Esm2
from esm2_service.worker.work import WorkItem

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def protein(length: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list(AMINO), length))


def raw_encode(target: str, sequences, include=(pb.INCLUDE_MEAN,), timeout=120):
    """Every message of one Encode stream, straight off the wire."""
    with grpc.insecure_channel(target) as channel:
        request = pb.EncodeRequest(
            items=[pb.Item(sequence=s) for s in sequences], params=pb.EncodeParams(include=include)
        )
        return list(esm2_pb2_grpc.Esm2ServiceStub(channel).Encode(request, timeout=timeout))


def pieces(messages) -> list[tuple]:
    """(item, kind, layer, offset) of every chunk and (item,) of every completion."""
    return [
        (m.sequence_index,)
        if m.HasField("complete")
        else (m.sequence_index, m.chunk.kind, m.chunk.layer, m.chunk.offset)
        for m in messages
    ]


def means(messages) -> dict[int, np.ndarray]:
    return {
        m.sequence_index: np.frombuffer(m.chunk.tensor.data, np.float32)
        for m in messages
        if m.HasField("chunk") and m.chunk.kind == pb.INCLUDE_MEAN
    }


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service="esm2.v1.Esm2Service")
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
        except grpc.RpcError:
            return -1


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


@pytest.fixture
def own_redis(tmp_path):
    server = EmbeddedRedis(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def full_engine(full_checkpoint):
    return Engine(Esm2.from_checkpoint(load_checkpoint(full_checkpoint)))


def expected_mean(engine, sequence: str) -> np.ndarray:
    found = {}
    item = WorkItem(token_ids(sequence), frozenset([pb.INCLUDE_MEAN]), (6,))
    engine.run(
        [item], lambda output: found.setdefault("mean", np.frombuffer(output.data, np.float32))
    )
    return found["mean"]


def test_a_worker_killed_mid_batch_loses_and_duplicates_nothing(
    own_redis, full_checkpoint, full_engine
):
    service = ServiceProcesses(
        own_redis.url, full_checkpoint, workers=2, worker_args=["--claim-idle-s", "5"]
    )
    client = redis.Redis.from_url(own_redis.url)
    try:
        service.wait_serving()
        requests = [
            [protein(600 + 10 * i + j, seed=10 * i + j) for j in range(4)] for i in range(6)
        ]
        results: dict[int, list] = {}
        threads = [
            threading.Thread(
                target=lambda i=i: results.__setitem__(i, raw_encode(service.target, requests[i]))
            )
            for i in range(len(requests))
        ]
        for thread in threads:
            thread.start()
        victim = service.workers[0]
        wait_for(
            lambda: pending_count(client, "test-worker-0"),
            60,
            "worker 0 never took work",
        )
        time.sleep(0.3)  # well inside its batch of 4 x 600 residues
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        for thread in threads:
            thread.join(timeout=180)
        assert sorted(results) == list(range(len(requests)))
        for index, messages in results.items():
            found = pieces(messages)
            assert len(found) == len(set(found)), "a piece reached the client twice"
            assert sorted(p for p in found if len(p) == 1) == [(0,), (1,), (2,), (3,)]
            for item, mean in means(messages).items():
                assert_close(mean, expected_mean(full_engine, requests[index][item]))
        assert queue_length(client) == 0
    finally:
        service.stop()


def test_redis_outage_fails_fast_and_everything_reconnects(own_redis, tiny_checkpoint, tmp_path):
    service = ServiceProcesses(own_redis.url, tiny_checkpoint)
    redis_server = own_redis
    try:
        service.wait_serving()
        assert len(raw_encode(service.target, ["MKV"])) == 2
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            raw_encode(service.target, ["MKV"], timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Redis" in raised.value.details()
        assert time.monotonic() - started < 5
        wait_for(
            lambda: health(service.target) == health_pb2.HealthCheckResponse.NOT_SERVING,
            10,
            "still SERVING",
        )
        redis_server.__init__(tmp_path, port=redis_server.port)  # the same address, empty
        wait_for(
            lambda: health(service.target) == health_pb2.HealthCheckResponse.SERVING,
            30,
            "never recovered",
        )
        messages = raw_encode(service.target, ["MKV", "ACDE"])
        assert sorted(p for p in pieces(messages) if len(p) == 1) == [(0,), (1,)]
        assert service.frontend.poll() is None and service.workers[0].poll() is None
    finally:
        service.stop()


def test_a_full_queue_answers_resource_exhausted_with_a_retry_hint(own_redis, tiny_checkpoint):
    service = ServiceProcesses(
        own_redis.url, tiny_checkpoint, workers=0, server_args=["--max-queue-items", "3"]
    )
    try:
        with grpc.insecure_channel(service.target) as channel:
            stub = esm2_pb2_grpc.Esm2ServiceStub(channel)
            request = pb.EncodeRequest(items=[pb.Item(sequence="MKV")] * 2)
            waiting = stub.Encode(request, timeout=30)  # queued; no worker runs it
            wait_for(
                lambda: queue_length(redis.Redis.from_url(own_redis.url)) == 2,
                10,
                "not queued",
            )
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.Encode(request, timeout=10))
            waiting.cancel()
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the queue holds 2 of at most 3 items" in raised.value.details()
        (detail,) = rpc_status.from_call(raised.value).details
        retry = error_details_pb2.RetryInfo()
        assert detail.Unpack(retry) and retry.retry_delay.ToMilliseconds() == 1000
    finally:
        service.stop()


def test_expired_and_cancelled_requests_are_skipped_by_the_worker(own_redis, full_checkpoint):
    service = ServiceProcesses(own_redis.url, full_checkpoint)
    client = redis.Redis.from_url(own_redis.url)
    try:
        service.wait_serving()
        busy = threading.Thread(
            target=raw_encode,
            args=(service.target, [protein(900, s) for s in range(8)], (pb.INCLUDE_CONTACTS,)),
        )
        busy.start()
        wait_for(lambda: pending_count(client) == 8, 30, "the worker never took the busy batch")
        with pytest.raises(grpc.RpcError) as raised:
            raw_encode(service.target, ["MKV"], timeout=0.5)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with grpc.insecure_channel(service.target) as channel:
            call = esm2_pb2_grpc.Esm2ServiceStub(channel).Encode(
                pb.EncodeRequest(items=[pb.Item(sequence="MKVL")])
            )
            time.sleep(0.5)
            call.cancel()
        busy.join(timeout=180)
        wait_for(lambda: queue_length(client) == 0, 30, "queue never drained")
        cancelled = [
            key.decode().rsplit(":", 1)[1] for key in client.scan_iter(queue.cancel_key("*"))
        ]
        assert len(cancelled) == 2  # the expired request and the cancelled one
        for request_id in cancelled:
            assert client.xlen(queue.reply_stream(request_id)) == 0, (
                "a skipped item produced output"
            )
    finally:
        service.stop()


def test_graceful_shutdown_finishes_streams_in_flight(own_redis, full_checkpoint, full_engine):
    service = ServiceProcesses(own_redis.url, full_checkpoint, workers=2)
    try:
        service.wait_serving()
        sequences = [protein(700, s) for s in range(8)]
        outcome = {}
        thread = threading.Thread(
            target=lambda: outcome.setdefault("messages", raw_encode(service.target, sequences))
        )
        thread.start()
        client = redis.Redis.from_url(own_redis.url)
        wait_for(
            lambda: pending_count(client) > 0,
            30,
            "idle",
        )
        service.workers[0].send_signal(signal.SIGTERM)  # a rolling restart of both sides
        service.frontend.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as raised:  # no new requests while draining
            raw_encode(service.target, ["MKV"], timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert service.workers[0].wait(timeout=120) == 0
        thread.join(timeout=180)
        messages = outcome["messages"]
        assert sorted(p for p in pieces(messages) if len(p) == 1) == [(i,) for i in range(8)]
        for item, mean in means(messages).items():
            assert_close(mean, expected_mean(full_engine, sequences[item]))
        assert service.frontend.wait(timeout=60) == 0
    finally:
        service.stop()
