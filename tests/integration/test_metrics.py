"""Prometheus metrics and JSON logs of real frontend and worker processes."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import grpc
import pytest
import redis
from conftest import ServiceProcesses
from prometheus_client.parser import text_string_to_metric_families

from esm2_service.client import Esm2Client, request_id
from esm2_service.esm2.v1 import esm2_pb2 as pb
from esm2_service.esm2.v1 import esm2_pb2_grpc
from esm2_service.queue import LANE_NAMES
from esm2_service.server.embedded_redis import free_port

ENCODE = "esm2.v1.Esm2Service/Encode"
ENCODE_PACKED = "esm2.v1.Esm2Service/EncodePacked"  # what the Python client calls
SEQUENCES = ["MKTAYIAKQR", "ACDEFG"]  # 12 + 8 tokens with BOS/EOS
# A line that grpc's C core writes to stderr itself, outside Python's logging.
GRPC_CORE_LINE = re.compile(r"^[IWEF]\d{4} ")


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def depths(samples: dict) -> dict[str, float]:
    return {lane: value(samples, "esm2_queue_depth", lane=lane) for lane in LANE_NAMES}


def wait_for(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return result


@pytest.fixture(scope="module")
def observed(redis_server, tiny_checkpoint, tmp_path_factory):
    """Frontend and worker with metrics ports of their own and JSON logs to one file."""
    url = redis_server.url_for_db(5)
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    ports = {"frontend": free_port(), "worker": free_port()}
    log_path = tmp_path_factory.mktemp("logs") / "json.log"
    with open(log_path, "w") as log:
        processes = ServiceProcesses(
            url,
            tiny_checkpoint,
            server_args=["--metrics-port", str(ports["frontend"]), "--log-format", "json"],
            worker_args=["--metrics-port", str(ports["worker"])],
            env={"ESM2_LOG_FORMAT": "json"},  # the worker's, through its environment
            stderr=log,
        )
        try:
            processes.wait_serving()
            processes.metrics_ports = ports
            processes.log_path = log_path
            yield processes
        finally:
            processes.stop()


def test_frontend_metrics_count_requests_items_and_workers(observed):
    port = observed.metrics_ports["frontend"]
    before = scrape(port)
    with Esm2Client(observed.target, timeout_s=60) as client:
        client.encode(SEQUENCES)
    # Straight to the server: the Python client would refuse it before sending.
    with grpc.insecure_channel(observed.target) as channel, pytest.raises(grpc.RpcError) as invalid:
        bad = pb.EncodeRequest(items=[pb.Item(sequence="not a protein")])
        list(esm2_pb2_grpc.Esm2ServiceStub(channel).Encode(bad, timeout=60))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server counts an RPC once its handler returns, which can be just after the
    # client has the status: wait for both to be counted.
    count = "esm2_request_duration_seconds_count"

    def counted(samples, method):
        return value(samples, count, method=method) - value(before, count, method=method)

    wait_for(
        lambda: (counted(scrape(port), ENCODE_PACKED), counted(scrape(port), ENCODE)) == (1, 1)
    )
    after = scrape(port)
    for method, code in ((ENCODE_PACKED, "OK"), (ENCODE, "INVALID_ARGUMENT")):
        labels = {"method": method, "code": code}
        total = value(after, "esm2_requests_total", **labels)
        assert total == value(before, "esm2_requests_total", **labels) + 1
        assert counted(after, method) == 1
    items = "esm2_item_latency_seconds_count"
    assert value(after, items) == value(before, items) + len(SEQUENCES)
    assert value(after, "esm2_item_latency_seconds_sum") > value(
        before, "esm2_item_latency_seconds_sum"
    )
    # Health checks pass through the same interceptor.
    assert value(after, "esm2_requests_total", method="grpc.health.v1.Health/Check", code="OK") >= 1
    assert value(after, "esm2_workers_alive") == 1
    assert {("esm2_queue_depth", (("lane", lane),)) for lane in LANE_NAMES} <= after.keys()


def test_queue_depth_and_live_workers_follow_redis(redis_server, tiny_checkpoint):
    from esm2_service import queue

    url = redis_server.url_for_db(6)
    port = free_port()
    with redis.Redis.from_url(url) as client:
        client.flushdb()
        frontend = ServiceProcesses(
            url, tiny_checkpoint, workers=0, server_args=["--metrics-port", str(port)]
        )
        try:
            wait_for(lambda: ("esm2_queue_depth", (("lane", LANE_NAMES[0]),)) in scrape(port))
            assert value(scrape(port), "esm2_workers_alive") == 0
            ids = [client.xadd(lane, {b"noise": b"x"}) for lane in queue.QUEUE_LANES]
            client.xadd(queue.QUEUE_LANES[-1], {b"noise": b"y"})
            expected = dict.fromkeys(LANE_NAMES, 1) | {LANE_NAMES[-1]: 2}
            wait_for(lambda: depths(scrape(port)) == expected)
            for lane, entry_id in zip(queue.QUEUE_LANES, ids, strict=True):
                client.xdel(lane, entry_id)
            expected = dict.fromkeys(LANE_NAMES, 0) | {LANE_NAMES[-1]: 1}
            wait_for(lambda: depths(scrape(port)) == expected)
            client.zadd(queue.HEARTBEATS, {"a-worker": time.time() + 60})
            wait_for(lambda: value(scrape(port), "esm2_workers_alive") == 1)
        finally:
            frontend.stop()


def test_worker_metrics_count_batches_tokens_and_outcomes(observed):
    port = observed.metrics_ports["worker"]
    before = scrape(port)
    with Esm2Client(observed.target, timeout_s=60) as client:
        client.encode(SEQUENCES)
    tokens = sum(len(s) + 2 for s in SEQUENCES)
    # The worker counts a batch after writing its results, so the client can have them
    # first: wait until the counters include this batch.
    done = {"outcome": "completed"}
    counted = value(before, "esm2_worker_tokens_total") + tokens  # the batch's last count
    wait_for(lambda: value(scrape(port), "esm2_worker_tokens_total") == counted)
    after = scrape(port)
    assert (
        value(after, "esm2_worker_tokens_total")
        == value(before, "esm2_worker_tokens_total") + tokens
    )
    assert value(after, "esm2_worker_items_total", **done) == (
        value(before, "esm2_worker_items_total", **done) + 2
    )
    for outcome in ("failed", "expired", "cancelled", "dead_lettered"):
        assert ("esm2_worker_items_total", (("outcome", outcome),)) in after
    batches = value(after, "esm2_worker_batch_size_count") - value(
        before, "esm2_worker_batch_size_count"
    )
    assert batches >= 1
    assert value(after, "esm2_worker_batch_size_sum") - value(
        before, "esm2_worker_batch_size_sum"
    ) == len(SEQUENCES)
    assert (
        value(after, "esm2_worker_batch_tokens_sum") - value(before, "esm2_worker_batch_tokens_sum")
        == tokens
    )
    assert (
        value(after, "esm2_worker_batch_seconds_count")
        - value(before, "esm2_worker_batch_seconds_count")
        == batches
    )
    assert value(after, "esm2_worker_tokens_per_second") > 0
    assert ("esm2_worker_padding_ratio", ()) in after
    assert value(after, "esm2_worker_padding_ratio") == 0.0  # packed: no padding


def test_json_logs_carry_request_and_worker_ids(observed):
    with grpc.insecure_channel(observed.target) as channel:
        stub = esm2_pb2_grpc.Esm2ServiceStub(channel)
        call = stub.Encode(pb.EncodeRequest(items=[pb.Item(sequence="MKTAYIAK")]), timeout=60)
        list(call)
        served_id = dict(call.trailing_metadata())["esm2-request-id"]
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Encode(pb.EncodeRequest(items=[pb.Item(sequence="not a protein")])))
    refused_id = request_id(refused.value)
    assert re.fullmatch(r"[0-9a-f]{32}", served_id) and re.fullmatch(r"[0-9a-f]{32}", refused_id)
    assert served_id != refused_id

    def service_records():
        lines = observed.log_path.read_text().splitlines()
        records = [json.loads(line) for line in lines if line and not GRPC_CORE_LINE.match(line)]
        return records, [r for r in records if r["logger"] == "esm2_service.server.service"]

    # The refusal is logged under the id the client got, like the served request.
    wait_for(lambda: any(r.get("request_id") == refused_id for r in service_records()[1]))
    records, service = service_records()
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["ts"])
    (refusal,) = [r for r in service if r.get("request_id") == refused_id]
    assert "failed: invalid request: items[0].sequence" in refusal["message"]
    (done,) = [r for r in service if r.get("request_id") == served_id]
    assert " done in " in done["message"] and f"request_id={served_id}" in done["message"]
    assert all("request_id" in r for r in service)
    worker = [r for r in records if r.get("worker_id") == "test-worker-0"]
    assert any(" serving " in r["message"] for r in worker)
    # Per-batch lines are DEBUG: an INFO log stays what an operator needs.
    assert not any(r["message"].startswith("batch of") for r in worker)
